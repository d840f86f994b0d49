"""Small helpers shared by the package's modules."""

from __future__ import annotations

__all__ = ["holds_only"]


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
