"""Reporting the shim's own faults: one ERROR per distinct fault, then DEBUG.

A fault in the shim must never break the user's import, load or forward: the caller catches it,
reports it here and carries on as if the shim were not there. Deduplication keeps one bug from
printing an ERROR for every sub-model or every layer.
"""

from __future__ import annotations

import _thread

from .settings import get_logger

#: (exception type, message): one fault met by several hooks (a model and its sub-models) is one ERROR.
_seen: set[tuple[str, str]] = set()
_lock = _thread.allocate_lock()


def report(where: str, error: BaseException, consequence: str) -> None:
    """Log ``error`` raised in ``where`` with what the shim did instead (``consequence``)."""
    key = (type(error).__name__, str(error))
    with _lock:
        first = key not in _seen
        _seen.add(key)
    if first:
        get_logger().error("internal error in %s (%s: %s); %s", where, *key, consequence, exc_info=error)
    else:
        get_logger().debug("internal error in %s again (%s: %s)", where, *key)


def one_line(error: BaseException) -> str:
    """ "Type: first line of the message" (or just the type): how every error is quoted to users."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def clear() -> None:
    """Forget reported faults (tests)."""
    with _lock:
        _seen.clear()
