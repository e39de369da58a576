"""The patching ledger: every change the shim makes to transformers' objects, and its exact undo.

Primitives apart from policy (wrapt's habit), with an exact undo (truststore's): a unit decides *what*
to change, and changes it only through the three primitives here, each of which pushes its undo on one
last-in-first-out stack:

- ``wrap(owner, name, wrapper)``: a class attribute (the raw object in ``vars(owner)``, so a classmethod
  stays one and every subclass goes through it) or a module attribute, wrapped in the shim's wrapper type;
- ``set_item(mapping, key, value)``: one entry of a registry dict (transformers' attention functions);
- ``rebind(old, new)``: a function transformers' modules bound by ``from ... import`` (a module global,
  or a value in a dict of such dicts, like 5.4's flash compatibility matrix), replaced everywhere.

``undo()`` (what ``deactivate()`` runs) pops the stack and puts back the very objects that were there
(identity-equal; an attribute the shim added is deleted again), but only where the shim's object is
still in place: a change someone else made on top is left alone. Wrappers are inert while the shim is
off (``_state.is_active``), so a wrapper that could not be taken out does nothing. Nothing else in the
package sets attributes on transformers or torch objects (``tests/test_architecture.py``).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import _state

#: ``wrap`` without an explicit object to wrap: the attribute's current (raw) value.
_CURRENT: Any = object()
#: What an attribute that did not exist before is put back as: deleted.
_ABSENT: Any = object()

Wrapper = Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]


class Change(NamedTuple):
    """One entry of the ledger: which unit made it, what it names ("Class.attr"), and how to undo it."""

    unit: str
    label: str
    undo: Callable[[], None]
    original: Any
    target: Callable[[], Any]  # the patched owner (weakly held where possible), None once collected
    name: str


_changes: list[Change] = []


def wrapper_type() -> type:
    """The shim's ``wrapt.FunctionWrapper`` subclass (created on first use: importing wrapt costs tens
    of ms). ``isinstance(obj, wrapper_type())`` tells the shim's wrappers apart (no double wrapping)."""
    return _state.wrapper_type()


def is_shim_wrapper(value: object) -> bool:
    """True for a wrapper the shim made (False while nothing was ever wrapped: no wrapt import)."""
    created = _state.wrapper_type_if_created()
    return created is not None and isinstance(value, created)


def wrap(owner: Any, name: str, wrapper: Wrapper, unit: str, wrapped: Any = _CURRENT) -> Any:
    """Put ``wrapper`` (wrapt's ``(wrapped, instance, args, kwargs)`` signature) around ``owner.name``.

    For a class, the raw object of ``vars(owner)`` is wrapped (an inherited attribute is wrapped where
    ``owner`` gets it; give ``wrapped`` to wrap something else, e.g. a delegating ``__init__``). Returns the
    new wrapper, or None when ``owner.name`` is missing or already the shim's wrapper (idempotent).
    """
    with _state.lock:
        current = _raw(owner, name)
        if is_shim_wrapper(current):
            return None
        target = current if wrapped is _CURRENT else wrapped
        if target is _ABSENT:
            return None
        installed = make_wrapper(target, wrapper)
        setattr(owner, name, installed)
        reference = _reference(owner)
        _changes.append(
            Change(
                unit,
                f"{_name_of(owner)}.{name}",
                _undo_wrap(reference, name, installed, current),
                current,
                reference,
                name,
            )
        )
    return installed


def make_wrapper(target: Any, wrapper: Wrapper) -> Any:
    """``target`` in the shim's wrapper type around ``wrapper``, inert while the shim is off (``rebind``)."""
    return wrapper_type()(target, _switched(wrapper))


def _undo_wrap(reference: Callable[[], Any], name: str, installed: Any, current: Any) -> Callable[[], None]:
    def undo() -> None:
        holder = reference()
        if holder is None or _raw(holder, name) is not installed:
            return  # collected, or someone else's object is in place now: theirs stands
        if current is _ABSENT:
            delattr(holder, name)
        else:
            setattr(holder, name, current)

    return undo


def set_item(mapping: dict[Any, Any], key: Any, value: Any, unit: str) -> None:
    """Set ``mapping[key] = value`` (a registry entry); the undo puts the previous value back."""
    with _state.lock:
        previous = mapping.get(key, _ABSENT)
        mapping[key] = value

    def undo() -> None:
        if mapping.get(key, _ABSENT) is not value:
            return
        if previous is _ABSENT:
            del mapping[key]
        else:
            mapping[key] = previous

    with _state.lock:
        _changes.append(Change(unit, f"[{key!r}]", undo, previous, lambda: mapping, str(key)))


#: Where transformers' functions get bound by ``from ... import``: its own modules and remote code's.
PACKAGES = ("transformers", "transformers_modules")


def rebind(old: Any, new: Any, unit: str, packages: tuple[str, ...] = PACKAGES) -> int:
    """Replace ``old`` by ``new`` wherever ``packages``' imported modules bound it; returns how many.

    Module globals, and values of module-level dicts and of dicts inside them (5.4's
    ``FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["general_availability_check"]``). The undo replaces
    ``new`` by ``old`` everywhere in ``packages`` again, so modules imported meanwhile (which bound
    ``new`` by ``from ... import``: remote code too) get the original back.
    """
    with _state.lock:
        count = _replace_everywhere(old, new, packages)
        label = str(getattr(old, "__name__", repr(old)))
        _changes.append(
            Change(unit, label, lambda: _replace_everywhere(new, old, packages), old, _none, label)
        )
    return count


def undo(unit: str | None = None) -> None:
    """Undo the changes (of ``unit``, or all), newest first."""
    with _state.lock:
        kept: list[Change] = []
        while _changes:
            change = _changes.pop()
            if unit is None or change.unit == unit:
                change.undo()
            else:
                kept.append(change)
        _changes.extend(reversed(kept))


def changes(unit: str | None = None) -> list[Change]:
    """The changes in place (of ``unit``, or all), oldest first (``doctor``, tests)."""
    with _state.lock:
        return [change for change in _changes if unit is None or change.unit == unit]


def labels(unit: str) -> list[str]:
    """ "Owner.attribute" for every change of ``unit`` in place, oldest first."""
    return [change.label for change in changes(unit)]


def _none() -> None:
    return None


def _replace_everywhere(old: Any, new: Any, packages: tuple[str, ...]) -> int:
    count = 0
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.partition(".")[0] not in packages:
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for attribute, value in list(namespace.items()):
            if value is old:
                setattr(module, attribute, new)
                count += 1
            elif type(value) is dict:  # plain dicts only: transformers' lazy mappings load models on items()
                count += _replace_in(value, old, new, depth=2)
    return count


def _replace_in(mapping: dict[Any, Any], old: Any, new: Any, depth: int) -> int:
    count = 0
    for key, value in list(mapping.items()):
        if value is old:
            mapping[key] = new
            count += 1
        elif depth > 1 and type(value) is dict:
            count += _replace_in(value, old, new, depth - 1)
    return count


#: Set on a wrapper that is inert while the shim is off by itself (``guard.guarded``): no extra frame,
#: which would shift the frames a hooked method's warnings are shown at.
SWITCHED = "__sdpa_shim_switched__"


def _switched(wrapper: Wrapper) -> Wrapper:
    """``wrapper``, inert while the shim is off: the call goes straight to transformers' function."""
    if getattr(wrapper, SWITCHED, False):
        return wrapper

    def switched(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not _state.is_active():
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, instance, args, kwargs)

    switched.__name__ = getattr(wrapper, "__name__", "wrapper")
    return switched


def _raw(owner: Any, name: str) -> Any:
    """The attribute as stored: ``vars(owner)`` for a class (no descriptor binding), else ``getattr``."""
    if isinstance(owner, type):
        return vars(owner).get(name, _ABSENT)
    return getattr(owner, name, _ABSENT)


def _reference(owner: Any) -> Callable[[], Any]:
    """A weak reference where possible (remote-code classes may be collected), else a strong one."""
    try:
        return weakref.ref(owner)
    except TypeError:
        return lambda: owner


def _name_of(owner: Any) -> str:
    return str(getattr(owner, "__name__", type(owner).__name__))
