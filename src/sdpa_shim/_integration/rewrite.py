"""The shape of a hook: a *rewrite* of a hooked method's arguments, and the helper that builds new ones.

A rewrite gets the object the method is called on and its arguments and returns new arguments, or None to
leave the call alone. ``patch`` turns rewrites into wrappers and owns the fault isolation, so a rewrite may
simply raise on a bug. Kept apart from the hooks so that every release band's hooks import it downwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Args = tuple[tuple[Any, ...], dict[str, Any]]
Rewrite = Callable[[Any, tuple[Any, ...], dict[str, Any]], "Args | None"]


def replace_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, value: Any
) -> Args:
    """New (args, kwargs) with one argument replaced; the caller's tuple and dict are never mutated."""
    if len(args) > position:
        return (*args[:position], value, *args[position + 1 :]), kwargs
    return args, {**kwargs, name: value}
