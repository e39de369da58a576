"""The shape of a hook: a *rewrite* of a hooked method's arguments, and the helper that builds new ones.

A rewrite gets the object the method is called on and its arguments and returns new arguments, an
``Override`` (new arguments *and* the value to return instead of the method's), or None to leave the call
alone. ``patch`` turns rewrites into wrappers and owns the fault isolation, so a rewrite may
simply raise on a bug. Kept apart from the hooks so that every release band's hooks import it downwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

Args = tuple[tuple[Any, ...], dict[str, Any]]


class Override(NamedTuple):
    """Call the method with ``args``/``kwargs`` (its checks and side effects run), then return ``result``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any


Rewrite = Callable[[Any, tuple[Any, ...], dict[str, Any]], "Args | Override | None"]


def replace_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, value: Any
) -> Args:
    """New (args, kwargs) with one argument replaced; the caller's tuple and dict are never mutated."""
    if len(args) > position:
        return (*args[:position], value, *args[position + 1 :]), kwargs
    return args, {**kwargs, name: value}
