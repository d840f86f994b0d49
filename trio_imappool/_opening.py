"""The driver's opener tasks, and the bounded blocking steps of the pool's own work.

An :class:`Openers` task makes one attempt to open the connection the state asked for: it waits
out the backoff, a place under a shared cap or budget, connects, and (following the first-login
probe) logs in, then tells the state how it went. What to open, when to retry and what a
failure means for the waiting tasks are :class:`~trio_imappool._state.PoolState`'s decisions;
:class:`~trio_imappool.Pool` carries out the actions that come back.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from ._client import PooledClient, TrackingClient
from ._config import PoolConfig
from ._errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLimitError,
    classify_open_error,
    is_permanent_open_error,
    suggests_server_gone,
)
from ._state import Action, PoolState, Probe

if TYPE_CHECKING:
    from ._budget import PoolPlaces

__all__ = ["Openers", "housekeeping", "open_error", "unselect", "warn_insecure"]

logger = logging.getLogger("trio_imappool")


class _ProbeFailed(Exception):
    """A follower's probe did not log in: the follower gives up without a LOGIN."""


class Openers:
    """The opener tasks of one pool (see the module documentation).

    Args:
        config: The pool's settings.
        state: The pool's decisions.
        apply: Carries out the state's actions (the driver's ``_apply``).
        thread_limiter: The pool's worker-thread limiter.
        connection_limiter: A cap shared with other pools, or None.
        budget: The pool's places in a shared budget, or None.
    """

    def __init__(
        self,
        config: PoolConfig,
        state: PoolState[PooledClient],
        apply: Callable[[Sequence[Action[PooledClient]]], None],
        thread_limiter: trio.CapacityLimiter,
        connection_limiter: trio.CapacityLimiter | None,
        budget: PoolPlaces | None,
    ) -> None:
        self._config = config
        self._state = state
        self._apply = apply
        self._threads = thread_limiter
        self._cap = connection_limiter
        self.budget = budget
        self._numbers = itertools.count(1)
        self._settled: dict[Probe, trio.Event] = {}
        #: Openers waiting for a place under the shared cap (not counted as connections).
        self.queued = 0

    async def open(self, slot: PooledClient, probe: Probe | None) -> None:
        """One attempt to open *slot*, which the state put in ``opening``; the state hears of
        the outcome (opened, failed, or not needed any more). Runs in the pool's nursery."""
        state = self._state
        outcome: Sequence[Action[PooledClient]] | None = None
        try:
            await trio.sleep(max(0.0, state.next_attempt_at - trio.current_time()))
            if self._cap is not None and not slot.global_token:
                # Wait (first come, first served across the pools sharing it) for a place
                # under the global cap; meanwhile it is queued, not opening.
                self.queued += 1
                self._apply(())
                try:
                    await self._cap.acquire_on_behalf_of(slot)
                finally:
                    self.queued -= 1
                slot.global_token = True
            if state.demand() < 0:
                return  # nobody needs it any more
            try:
                # Wait for a place in the budget (False: nobody needs it any more).
                if self.budget is not None and not await self.budget.acquire(slot):
                    return
                await self._connect(slot, probe)
            except _ProbeFailed:
                return  # the probe reports; this one never tried to log in
            except (Exception, trio.TooSlowError) as exc:
                error, permanent, limit = open_error(
                    self._config.name,
                    exc,
                    others_open=state.size - len(state.opening) > 0,
                    others_healthy=state.healthy(),
                )
                outcome = state.open_failed(
                    slot,
                    trio.current_time(),
                    error,
                    permanent=permanent,
                    limit=limit,
                    server_gone=suggests_server_gone(exc),
                )
                return
            slot.number = next(self._numbers)
            logger.debug("%s: opened #%d", self._config.name, slot.number)
            outcome = state.opened(slot, trio.current_time())
        finally:
            if outcome is None:
                outcome = state.give_up_open(slot, trio.current_time())
            self._apply(outcome)

    async def _connect(self, slot: PooledClient, probe: Probe | None) -> None:
        """Connect and log in. As the probe's leader, say when it has reached the server and
        when its login has ended; as a follower, connect, then wait for the probe's login and
        log in only if that succeeded."""
        config, state = self._config, self._state
        leading = state.leads(slot)
        logged_in = False
        try:
            await connect_phase(slot, config, self._threads)
            if leading:
                self._apply(state.probe_reached(slot, trio.current_time()))
            elif probe is not None:
                if not probe.settled:
                    await self._settled.setdefault(probe, trio.Event()).wait()
                if not probe.logged_in:
                    raise _ProbeFailed
            await log_in(slot, config, self._threads)
            logged_in = True
        finally:
            if leading:
                assert probe is not None
                state.probe_settled(probe, logged_in)
                event = self._settled.pop(probe, None)
                if event is not None:
                    event.set()


async def connect_phase(
    slot: PooledClient, config: PoolConfig, limiter: trio.CapacityLimiter
) -> None:
    """TCP, TLS, greeting (and STARTTLS), bounded by the connect and login timeouts."""
    with trio.fail_after(config.connect_timeout + config.login_timeout):
        await slot.run(limiter, slot.connect_blocking, config, grace=0.0)


async def _login_phase(
    slot: PooledClient, config: PoolConfig, limiter: trio.CapacityLimiter, token: str | None
) -> None:
    with trio.fail_after(config.login_timeout):
        await slot.run(limiter, slot.login_blocking, config, token, grace=0.0)


async def log_in(slot: PooledClient, config: PoolConfig, limiter: trio.CapacityLimiter) -> None:
    """Log *slot* in, bounded by ``login_timeout``. With an OAuth2 token provider, a token the
    server rejects is asked for again once, with ``refresh=True``, before the failure counts
    (reconnecting first: the server may have closed the connection)."""
    token = None if config.oauth2_token is None else await _token(config, refresh=False)
    try:
        await _login_phase(slot, config, limiter, token)
    except LoginError as exc:
        if token is None or classify_open_error(exc) is not AuthenticationError:
            raise
        logger.info("%s: the server rejected the token; refreshing it", config.name)
        token = await _token(config, refresh=True)
        await connect_phase(slot, config, limiter)
        await _login_phase(slot, config, limiter, token)


async def _token(config: PoolConfig, *, refresh: bool) -> str:
    """Ask the configured provider for an access token (sync ones run in a thread)."""
    provider = config.oauth2_token
    assert provider is not None
    result: object = None
    try:
        # Bounded like the login it is for: a provider that hangs must not hold the opener
        # (the first login's, which every other waits for) forever.
        with trio.move_on_after(config.login_timeout) as scope:
            if inspect.iscoroutinefunction(provider):
                result = await provider(refresh)
            else:
                result = await trio.to_thread.run_sync(provider, refresh, abandon_on_cancel=True)
                if inspect.isawaitable(result):
                    result = await result
    except Exception as exc:
        raise ConnectError(
            f"{config.name}: the oauth2_token provider failed: {type(exc).__name__}"
        ) from exc
    if scope.cancelled_caught:
        raise ConnectError(
            f"{config.name}: the oauth2_token provider gave no token within the login "
            f"timeout ({config.login_timeout:g} s)"
        )
    if not isinstance(result, str) or not result:
        raise ConnectError(f"{config.name}: the oauth2_token provider gave no token")
    return result


def open_error(
    name: str, exc: BaseException, *, others_open: bool, others_healthy: bool
) -> tuple[ConnectError, bool, bool]:
    """The :class:`ConnectError` to report for a failed open, whether retrying cannot mend
    it, and whether the server refused for too many connections.

    With connections of ours open, a bare NO to LOGIN or a connection closed before the
    greeting is the server refusing one more, not wrong credentials or an outage.
    """
    if isinstance(exc, trio.TooSlowError):
        kind: type[ConnectError] = ConnectError
        text = "timed out opening a connection"
    else:
        kind = classify_open_error(exc, others_open=others_open, others_healthy=others_healthy)
        text = f"could not open a connection: {type(exc).__name__}: {exc}"
    error = kind(f"{name}: {text}")
    error.__cause__ = exc
    logger.warning("%s", error)
    return error, is_permanent_open_error(error), kind is ConnectionLimitError


def unselect(client: TrackingClient) -> None:
    """Leave the selected folder without expunging (the reset on release)."""
    if client.has_capability("UNSELECT"):
        client.unselect_folder()
    else:
        # Without UNSELECT: a failed SELECT leaves no folder selected, and unlike CLOSE it
        # expunges nothing.
        with contextlib.suppress(IMAPClient.Error):
            client.select_folder("trio-imappool-no-such-folder-\x7f", readonly=True)


async def housekeeping(
    slot: PooledClient,
    fn: Callable[[TrackingClient], object],
    limit: float,
    limiter: trio.CapacityLimiter,
    name: str,
) -> bool:
    """Run the pool's own command *fn* on *slot*, bounded by *limit*; True if it succeeded.

    Failures are logged, not raised: the connection is judged by ``slot.broken``, which the
    thread call sets for a failure that leaves it in doubt, and for a timeout.
    """
    with trio.move_on_after(limit):
        try:
            await slot.run(limiter, fn, slot.client)
        except Exception as exc:
            logger.info("%s: %s on #%d failed: %r", name, fn.__name__, slot.number, exc)
            return False
        return True
    return False


def warn_insecure(config: PoolConfig) -> None:
    """Log the insecure settings a pool was opened with."""
    if config.insecure_skip_tls_verify and (config.ssl or config.starttls):
        logger.warning(
            "%s: TLS certificates are NOT verified (insecure_skip_tls_verify=True): "
            "anyone on the network path can read the credentials",
            config.name,
        )
    if config.insecure_plaintext and not (config.ssl or config.starttls):
        logger.warning(
            "%s: credentials are sent WITHOUT TLS (insecure_plaintext=True)", config.name
        )
