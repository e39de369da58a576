"""The shim's shared state, at the bottom of the import graph: the on/off flag, its lock, the wrapper type.

Every layer above reads ``is_active()``; only ``_integration.patch`` (activation) changes it. Keeping the
state here, apart from the code that orchestrates activation, lets the integration modules ask "is the shim
on?" without importing the orchestrator, so imports run one way. Stdlib only: importing it costs nothing.
"""

from __future__ import annotations

import _thread

#: The transformers modules whose import the shim waits for.
MODELING_UTILS = "transformers.modeling_utils"
DYNAMIC_MODULE_UTILS = "transformers.dynamic_module_utils"

#: Held while the shim (de)activates or installs its wrappers; re-entrant because installing may import.
lock = _thread.RLock()
_active = False
_wrapper_type: type | None = None


def is_active() -> bool:
    """True while the shim is on (transformers is patched as soon as it is imported)."""
    return _active


def set_active(active: bool) -> None:
    """Only ``_integration.patch`` calls this, holding ``lock``."""
    global _active
    _active = active


def wrapper_type() -> type:
    """``wrapt.FunctionWrapper`` subclass marking the shim's wrappers (double wrapping = isinstance).

    Created on first use: importing wrapt costs tens of milliseconds, paid only once transformers is imported.
    """
    global _wrapper_type
    if _wrapper_type is None:
        import wrapt

        _wrapper_type = type(
            "ShimWrapper", (wrapt.FunctionWrapper,), {"__module__": "sdpa_shim._integration.patch"}
        )
    return _wrapper_type


def wrapper_type_if_created() -> type | None:
    """The wrapper type, or None while nothing has been wrapped (no wrapt import)."""
    return _wrapper_type
