"""One Trio run that lives across Jupyter cells: Trio in guest mode on the kernel's asyncio loop.

A generic helper, not part of the pool: it runs any Trio code (the examples use a pool) and
imports nothing else of the package.

A pool lives inside one Trio run: its connections and background work belong to a nursery that
must be exited in the run that opened it. Jupyter's ``%autoawait trio`` runs every cell as a
``trio.run`` of its own, so a pool opened in one cell is closed when that cell ends. This module
keeps a single Trio run going for as long as you want, as a *guest* on the asyncio event loop the
kernel already runs (:func:`trio.lowlevel.start_guest_run`), and lets each cell hand work to it::

    # IPython's default autoawait (asyncio) lets a cell await at the top level.
    import trio_imappool
    from trio_imappool.notebook import TrioRunner

    trio_runner = await TrioRunner.start()  # cell 1: the Trio run starts

    pool = await trio_runner.enter(trio_imappool.open_pool(**settings))  # cell 2: stays open


    async def unseen(pool, folder):  # cell 3: a Trio function, run in the Trio run
        async with pool.connection() as conn:
            await conn.select_folder(folder, readonly=True)
            return await conn.search(["UNSEEN"])


    print(await trio_runner.run(unseen, pool, "INBOX"))

    sampler = trio_runner.start_soon(sample_forever, pool)  # keeps running between cells
    ...
    await trio_runner.close()  # last cell: cancel tasks, close the pool, end the run

Nothing here depends on IPython: any running asyncio loop will do (the tests use
:func:`asyncio.run`).

**What is taken care of.**

- *Interrupts.* Interrupting the kernel while a cell awaits :meth:`TrioRunner.run`,
  :meth:`~TrioRunner.enter` or :meth:`~TrioRunner.exit` cancels the cell's asyncio task
  (ipykernel turns SIGINT into :exc:`asyncio.CancelledError` for async cells). The runner
  forwards it: it cancels the Trio task's cancel scope, waits until the Trio task has finished
  (so nothing is left running behind your back: a pool connection busy in a command is
  interrupted and discarded, as for any Trio cancellation), then re-raises the
  :exc:`~asyncio.CancelledError`. Interrupt a second time to stop waiting for a Trio task that
  ignores cancellation (a shielded one); it then finishes on its own. Trio does not install its
  own Ctrl-C handler in this run: Ctrl-C belongs to the kernel.
- *Output.* Each Trio task runs in a copy of the calling cell's :mod:`contextvars` context,
  where ipykernel keeps the cell's identity, so ``print()`` in a task lands in the cell that
  called :meth:`~TrioRunner.run` or :meth:`~TrioRunner.start_soon` (for a background task: the
  cell that started it, even after that cell has finished).
- *Crashes of background tasks.* An exception in a task started with
  :meth:`~TrioRunner.start_soon` does not end the run: it is printed to ``sys.stderr`` (or
  given to ``on_background_error``), kept in :attr:`TrioRunner.errors`, and the run goes on.
  An exception raised by a function given to :meth:`~TrioRunner.run` is raised in the cell.

**Limits.**

- *A blocking cell freezes Trio.* The Trio run makes progress only while the kernel's asyncio
  loop runs, that is between cells and while a cell awaits. A cell that blocks (``time.sleep``,
  a blocking network call, a long computation) stops every Trio task for that long: background
  tasks do not tick, deadlines fire late, pooled connections wait. Await instead
  (``await asyncio.sleep(1)``, ``await trio_runner.run(trio.sleep, 1)``), or run the blocking
  work in a thread (``await asyncio.to_thread(fn)``).
- *No other Trio run in the kernel's thread.* While a runner is alive, ``trio.run()`` in a cell,
  ``%autoawait trio`` and a second :class:`TrioRunner` fail with Trio's
  ``RuntimeError("Attempted to call run() from inside a run()")``: Trio allows one run per
  thread. Do Trio work through :meth:`~TrioRunner.run`, or close the runner first. Conversely,
  :meth:`TrioRunner.start` needs IPython's default ``%autoawait asyncio``: under
  ``%autoawait trio`` there is no asyncio loop to be a guest of.
- *Trio objects belong to the run.* Create Trio objects (events, channels, cancel scopes, pools)
  and call Trio functions inside functions given to :meth:`~TrioRunner.run`, not directly in a
  cell. Reading plain attributes (``pool.statistics()``, ``pool.counts.value``) from a cell is
  fine: the cell and the Trio run share one thread and never run at the same moment.
- *Close before you stop.* Await :meth:`TrioRunner.close` before restarting or shutting down the
  kernel, so contexts exit cleanly (a pool logs out). If the kernel dies first, the operating
  system closes the sockets; the server sees dropped connections.
- *Signals.* If the asyncio loop has no signal wakeup fd of its own (ipykernel's has none),
  Trio installs its own for the life of the run, which also makes kernel interrupts of any
  awaiting cell take effect at once instead of when the loop next wakes (ipykernel#881). A
  signal handler added with :meth:`asyncio.loop.add_signal_handler` while the runner is alive
  replaces it, and closing the runner then removes asyncio's. If the loop has one already,
  Trio leaves it alone (``host_uses_signal_set_wakeup_fd=True``).

(The other way round is ipykernel's own ``--trio-loop`` option, in a kernelspec of your own:
the whole kernel then runs inside one Trio run, with ``%autoawait trio`` fixed, so asyncio code
cannot be awaited in its cells.)
"""

from ._parts import BackgroundTask, RunnerStatistics
from ._parts import ErrorHandler as ErrorHandler
from ._parts import State as State
from ._runner import TrioRunner

__all__ = ["BackgroundTask", "RunnerStatistics", "TrioRunner"]

# Shown (and documented) as trio_imappool.notebook's own.
for _cls in (BackgroundTask, RunnerStatistics, TrioRunner):
    _cls.__module__ = __name__
del _cls
