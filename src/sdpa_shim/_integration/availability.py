"""Make transformers treat an installed-but-broken flash-attn as not installed.

``is_flash_attn_2_available()`` only reads package metadata (and the CUDA flag), so a flash-attn whose CUDA
extension no longer loads passes it. In 4.36-4.54 every modeling module then runs
``if is_flash_attn_2_available(): from flash_attn import ...`` at import time, so
``from transformers import LlamaForCausalLM`` fails for every model, flash requested or not, before any
model hook can run; 4.55 instead prompts on stdin (``input(...)``) at the first forward.

The shim wraps the function where transformers reads it: in ``transformers.utils.import_utils`` (patched by
a post-import hook, before ``transformers.utils`` binds the name, so every later ``from ... import`` gets
the wrapper), in every already-imported ``transformers.*`` module that bound it by ``from ... import``, and
in 5.4+'s ``FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["general_availability_check"]``. The wrapper asks
the original first and only when that says yes does it consult ``_detect`` (a real import of flash_attn,
cached): a missing or CPU-only flash-attn is never imported, and a usable one is never hidden. It is inert
while the shim is inactive. Caches (``lru_cache`` in 5.x) are cleared so no stale "True" survives.

If transformers was imported before the shim, modules that already ran the check cannot be repaired; the
shim says so once, with the fix: import sdpa_shim before transformers.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import ModuleType
from typing import Any

from .._core.settings import get_logger

logger = logging.getLogger(__name__)

IMPORT_UTILS = "transformers.utils.import_utils"
FLASH_UTILS = "transformers.modeling_flash_attention_utils"
FUNCTION = "is_flash_attn_2_available"
IMPLEMENTATION = "flash_attention_2"

_lock = threading.RLock()
_registered = False
_original: Any = None
_replacement: Any = None
_wrapper_type: type | None = None
_told_hidden = False


def install() -> None:
    """Register the post-import hooks (they run at once for modules already imported). Never raises."""
    global _registered
    try:
        import wrapt

        with _lock:
            if _registered:
                return
            _registered = True
            late = IMPORT_UTILS in sys.modules
            wrapt.register_post_import_hook(_on_import_utils, IMPORT_UTILS)
            wrapt.register_post_import_hook(_on_flash_utils, FLASH_UTILS)
        if late:
            _report_late_activation()
    except Exception:
        logger.error(
            "sdpa_shim could not patch flash-attn availability; transformers is unchanged", exc_info=True
        )


def restore() -> None:
    """Put the original function back everywhere the shim put its wrapper (tests, ``deactivate``)."""
    global _original, _replacement
    with _lock:
        if _original is not None and _replacement is not None:
            _rebind(_replacement, _original)
        _original = _replacement = None


def is_patched() -> bool:
    """True when transformers' ``is_flash_attn_2_available`` is currently the shim's wrapper."""
    module = sys.modules.get(IMPORT_UTILS)
    return _replacement is not None and getattr(module, FUNCTION, None) is _replacement


def flash_import_broken() -> str:
    """The import error when flash-attn is installed but ``import flash_attn`` fails, else ""."""
    from .._core.detect import PACKAGES, flash_status

    status = flash_status(IMPLEMENTATION)
    prefix = f"{PACKAGES[IMPLEMENTATION].module} import failed"
    return status.reason if not status.usable and status.reason.startswith(prefix) else ""


def _available(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The wrapper: transformers' answer, except False when the shim is on and the import is broken."""
    from .remote_window import availability_for_caller  # True for remote code the stand-in serves

    result = wrapped(*args, **kwargs)
    if not result:
        return availability_for_caller(result)
    try:
        from .._state import is_active

        broken = is_active() and flash_import_broken()
    except Exception:
        logger.error("sdpa_shim failed while checking flash-attn; transformers' answer stands", exc_info=True)
        return result
    if not broken:
        return result
    _tell_hidden(broken)
    return availability_for_caller(False)


def _tell_hidden(reason: str) -> None:
    global _told_hidden
    if _told_hidden:
        return
    _told_hidden = True
    get_logger(__name__).info("transformers will treat flash-attn as not installed: %s", reason)


def _shim_wrapper_type() -> type:
    """A ``wrapt.FunctionWrapper`` subclass: keeps ``cache_clear`` and marks the shim's wrapper."""
    global _wrapper_type
    if _wrapper_type is None:
        import wrapt

        _wrapper_type = type("AvailabilityWrapper", (wrapt.FunctionWrapper,), {"__module__": __name__})
    return _wrapper_type


def _on_import_utils(module: ModuleType) -> None:
    """Post-import hook for ``transformers.utils.import_utils``: must never raise."""
    global _original, _replacement
    try:
        with _lock:
            current = getattr(module, FUNCTION, None)
            if current is None:
                return
            wrapper_type = _shim_wrapper_type()
            if isinstance(current, wrapper_type):
                return
            _original = current
            _replacement = wrapper_type(current, _available)
            _rebind(current, _replacement)
            _clear_caches(module)
        logger.debug("sdpa_shim wrapped %s.%s", IMPORT_UTILS, FUNCTION)
    except Exception:
        logger.error("sdpa_shim could not wrap %s.%s", IMPORT_UTILS, FUNCTION, exc_info=True)


def _on_flash_utils(module: ModuleType) -> None:
    """Post-import hook for ``modeling_flash_attention_utils``: rebinding covers its matrix (5.4+)."""
    try:
        with _lock:
            if _original is not None and _replacement is not None:
                _rebind(_original, _replacement)
    except Exception:
        logger.error("sdpa_shim could not patch %s", FLASH_UTILS, exc_info=True)


def _rebind(old: Any, new: Any) -> None:
    """Replace ``old`` by ``new`` wherever transformers bound it: module globals and the 5.4+ matrix."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "transformers" or name.startswith("transformers.")):
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for attribute, value in list(namespace.items()):
            if value is old:
                setattr(module, attribute, new)
        matrix = namespace.get("FLASH_ATTENTION_COMPATIBILITY_MATRIX")
        if isinstance(matrix, dict):
            for entry in matrix.values():
                if isinstance(entry, dict) and entry.get("general_availability_check") is old:
                    entry["general_availability_check"] = new


def _clear_caches(module: ModuleType) -> None:
    """Forget cached flash-attn answers (5.x ``lru_cache``), so the next call goes through the wrapper."""
    for name, value in list(vars(module).items()):
        if name.startswith("is_flash_attn") and callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def _report_late_activation() -> None:
    """Shim activated after ``import transformers``: say so when it matters, with the fix."""
    try:
        module = sys.modules.get(IMPORT_UTILS)
        original = _original if _original is not None else getattr(module, FUNCTION, None)
        if original is None or not original():
            return
        reason = flash_import_broken()
    except Exception:
        logger.debug("checking flash-attn after a late activation failed", exc_info=True)
        return
    if not reason:
        return
    imported = sorted(
        name
        for name in sys.modules
        if name.startswith("transformers.models.") or name in ("transformers.modeling_utils", FLASH_UTILS)
    )
    logger.warning(
        "sdpa_shim was activated after transformers was imported, and flash-attn is installed but broken "
        "(%s). Transformers modules imported before now (%s) may already have failed or captured the broken "
        "flash-attn; later imports treat it as not installed. Fix: import sdpa_shim before transformers.",
        reason,
        ", ".join(imported[:5]) + (", ..." if len(imported) > 5 else "") if imported else "none yet",
    )
