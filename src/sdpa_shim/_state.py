"""The shim's shared state, at the bottom of the import graph: the on/off flag, its lock, the wrapper type.

Every layer above reads ``is_active()``; only activation (``activate``/``deactivate``) changes it. Keeping the
state here, apart from the code that orchestrates activation, lets the integration modules ask "is the shim
on?" without importing the orchestrator, so imports run one way. Stdlib only: importing it costs nothing.
"""

from __future__ import annotations

import _thread

#: Held while the shim (de)activates or installs its wrappers; re-entrant because installing may import.
lock = _thread.RLock()
_active = False
_wrapper_type: type | None = None


def is_active() -> bool:
    """True while the shim is on (transformers is patched as soon as it is imported)."""
    return _active


def set_active(active: bool) -> None:
    """Only activation calls this, holding ``lock``."""
    global _active
    _active = active


def wrapper_type() -> type:
    """``wrapt.FunctionWrapper`` subclass marking the shim's wrappers (double wrapping = isinstance).

    Created on first use: importing wrapt costs tens of milliseconds, paid only once transformers is imported.
    The patching ledger (``_integration.ledger``) is the one user; the type lives down here only because
    the attention entries and the flash path still check it themselves.
    """
    global _wrapper_type
    if _wrapper_type is None:
        import wrapt

        _wrapper_type = type("ShimWrapper", (wrapt.FunctionWrapper,), {"__module__": __name__})
    return _wrapper_type


def wrapper_type_if_created() -> type | None:
    """The wrapper type, or None while nothing has been wrapped (no wrapt import)."""
    return _wrapper_type
