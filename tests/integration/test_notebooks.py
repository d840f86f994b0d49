"""The demo notebooks run headless, top to bottom, in this environment's Python.

Each notebook in ``notebooks/`` is executed with nbclient in a kernel named ``python3`` (the name
the notebooks carry). So that the kernel is this interpreter, whatever kernels the machine has
installed, the tests put a ``python3`` kernelspec for ``sys.executable`` first on
``JUPYTER_PATH``; a cell appended to the executed copy checks it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))

# What each notebook must print (by file name); other notebooks only have to run cleanly.
EXPECTED_OUTPUT: dict[str, list[str]] = {
    "01-quickstart.ipynb": [
        "{'INBOX': 30, 'Archive': 10}",
        "INBOX has 30 messages; the first five:",
        "Message 0 in INBOX",
        "Message 4 in INBOX",
        "INBOX: 30 messages, 30 unseen, 11 with 'Message 2' in the subject",
        "Archive: 10 messages, 10 unseen, 1 with 'Message 2' in the subject",
        "statistics: size=",
        "acquires=7 ",
        "impatient task gave up waiting: True",
        "acquires=1 acquire_waits=2 acquire_timeouts=0 in_use=0",
        "pool closed: True | <TrioRunner closed calls=0 background_tasks=0 contexts=0 errors=0>",
        "server running: False",
    ],
    "02-cancellation.ipynb": [
        "gave up waiting after 0.3 s: True",
        "connections discarded: 0",
        "IDLE wait cancelled after 0.5 s: True",
        "connections discarded: 1",
        "replacements opened: 1",
        "cancelled in a command: ",
        "after the crowd: size=",
        "pool closed: True | <TrioRunner closed calls=0 background_tasks=0 contexts=0 errors=0>",
        "server running: False",
    ],
    "03-throughput.ipynb": [
        "400 messages in 8 folders",
        "pool size |",
        "baseline, plain imapclient, 1 connection, a folder per FETCH: ",
        "proxy closed | <TrioRunner closed calls=0 background_tasks=0 contexts=0 errors=0>",
        "server running: False",
    ],
    "04-fetch-many.ipynb": [
        "300 messages in 4 folders",
        "300/300 [",  # the progress bar's last state
        "progress: 300/300 messages, 450000 bytes, 8/8 batches, 4/4 folders",
        "fetched 300 messages, 450000 bytes",
        "{'Archive': 80, 'INBOX': 120, 'Lists/trio': 60, 'Sent': 40}",
        "max_size=4 in_use=0",
        "pool closed: True | server running: False",
    ],
    "05-idle.ipynb": [
        "push: EXISTS  number=8",
        "push: FETCH   number=8 data={b'FLAGS': (b'\\\\Flagged'",
        "INBOX now holds 8 messages",
        "in_use=0 discarded=0",
        "pool closed: True | server running: False",
    ],
    "06-export.ipynb": [
        "INBOX         -> Mail: 50 on the server, 50 fetched, 50 exported",
        "Archive/2025  -> Mail/.Archive.2025: 20 on the server, 20 fetched, 20 exported",
        "100 messages fetched, 0 already there",
        "last progress report: 100/100 messages, 3/3 folders",
        "cur                   50 files, e.g. ",
        "INBOX         -> Mail: 52 on the server, 2 fetched, 52 exported",
        "2 messages fetched, 0 already there",
        "pool closed: True | server running: False",
    ],
}

# Notebooks that draw a plot, and how many.
EXPECTED_IMAGES: dict[str, int] = {"02-cancellation.ipynb": 1, "03-throughput.ipynb": 1}

_KERNEL_CHECK = "import sys\nimport trio_imappool\nprint('kernel:', sys.executable)"

pytestmark = pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks")


@pytest.fixture
def matplotlib_font_cache() -> None:
    """Build matplotlib's font cache here, if it is missing, rather than in a notebook's kernel.

    A first build that takes long logs "Matplotlib is building the font cache" to stderr, which
    would fail the notebook that plots first. The kernel shares this process's environment, so
    it finds the cache built.
    """
    import matplotlib.font_manager

    assert matplotlib.font_manager.fontManager is not None


def _read(path: Path) -> nbformat.NotebookNode:
    nb: nbformat.NotebookNode = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    return nb


def _stream_text(cell: Any, name: str) -> str:
    return "".join(
        output["text"]
        for output in cell.get("outputs", [])
        if output["output_type"] == "stream" and output["name"] == name
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: clear the outputs before committing"
            assert cell.execution_count is None, f"{path.name}: clear the execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
@pytest.mark.usefixtures("python3_kernel", "matplotlib_font_cache")
def test_notebook_runs_headless(path: Path) -> None:
    nb = _read(path)
    nb.cells.append(nbformat.v4.new_code_cell(_KERNEL_CHECK))  # type: ignore[no-untyped-call]
    client = nbclient.NotebookClient(
        nb,
        timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    stderr = "".join(_stream_text(cell, "stderr") for cell in code_cells)
    assert stderr == "", f"{path.name} wrote to stderr:\n{stderr}"

    assert _stream_text(code_cells[-1], "stdout") == f"kernel: {sys.executable}\n"
    stdout = "".join(_stream_text(cell, "stdout") for cell in code_cells)
    for expected in EXPECTED_OUTPUT.get(path.name, []):
        assert expected in stdout, f"{path.name}: {expected!r} not printed:\n{stdout}"
    images = [
        out
        for cell in code_cells
        for out in cell.outputs
        if out.output_type == "display_data" and "image/png" in out.get("data", {})
    ]
    assert len(images) == EXPECTED_IMAGES.get(path.name, 0), f"{path.name}: plots drawn"
