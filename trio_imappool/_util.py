"""Small helpers shared by the package's modules: pure functions, no trio, no I/O.

One copy of each: the layering test (tests/unit/test_layering.py) keeps this module a leaf, so
every layer, the ones without trio included, may use it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

__all__ = ["holds_only", "is_loopback", "uid_runs", "uid_set"]


def holds_only(group: BaseExceptionGroup[BaseException], error: BaseException) -> bool:
    """Whether *group* holds just *error*, possibly nested in single-exception groups.

    Context managers that own a nursery use it to let the exception raised in their body come
    out as it was raised, not wrapped by the nursery in an exception group.
    """
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if inner is error:
            return True
        if not isinstance(inner, BaseExceptionGroup):
            return False
        group = inner
    return False


def is_loopback(host: str) -> bool:
    """Whether *host* names this machine's loopback: ``localhost`` or a loopback address.

    Other names are not resolved: a name that resolves to 127.0.0.1 today may not tomorrow.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uid_runs(uids: Iterable[int]) -> Iterator[range]:
    """Runs of consecutive UIDs, in the order given: ``[1, 2, 3, 7]`` gives ``range(1, 4)``
    and ``range(7, 8)``."""
    start = prev = None
    for uid in uids:
        if prev is not None and uid == prev + 1:
            prev = uid
            continue
        if start is not None and prev is not None:
            yield range(start, prev + 1)
        start = prev = uid
    if start is not None and prev is not None:
        yield range(start, prev + 1)


def uid_set(uids: Iterable[int], *, max_chars: int | None = None) -> str:
    """UIDs as a compact IMAP set, runs of consecutive UIDs joined: ``1:200,205``.

    Runs are found in the order given (sort first for the shortest set). With *max_chars*, a
    longer set is cut after a whole element and ends with ``,...`` (for messages, not the wire).
    """
    text = ",".join(
        f"{run.start}" if len(run) == 1 else f"{run.start}:{run.stop - 1}" for run in uid_runs(uids)
    )
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 3].rsplit(",", 1)[0] + ",..."
    return text
