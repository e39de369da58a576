"""Which models the shim took over, and what it chose for each: the one record of a decision's outcome.

A model is recognised by the identity of its config object (weakly held, forgotten when the config is
collected), so nothing is written into the config and nothing can be saved by ``save_pretrained``.
``resolve`` marks; the units that serve calls (the attention entries, the flash path, the packed-row
guard) read the mark. Its own module so that those units need not import each other.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_lock = threading.Lock()
#: id(config) -> (weak reference to that config, what the shim chose: "sdpa", "eager" or "flash"), for
#: every config of a (sub-)model the shim took over.
_downgraded: dict[int, tuple[weakref.ref[Any], str]] = {}


def mark(config: Any, kind: str = "sdpa") -> None:
    """Remember that ``config`` belongs to a model the shim took over: "sdpa", "eager" or "flash" (path)."""
    if config is None:
        return
    key = id(config)

    def forget(_: object, key: int = key) -> None:
        _downgraded.pop(key, None)

    try:
        reference = weakref.ref(config, forget)
    except TypeError:  # not weak-referenceable: do not risk holding it forever
        return
    with _lock:
        _downgraded[key] = (reference, kind)


def forget(config: Any) -> None:
    """Undo ``mark`` (a decision that could not be completed)."""
    with _lock:
        _downgraded.pop(id(config), None)


def kind_of(config: Any) -> str | None:
    """What the shim chose for the model owning ``config`` ("sdpa", "eager", "flash"), or None."""
    entry = _downgraded.get(id(config))
    return None if entry is None or entry[0]() is not config else entry[1]
