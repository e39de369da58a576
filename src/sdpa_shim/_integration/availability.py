"""Make transformers treat an installed-but-broken flash-attn as not installed.

``is_flash_attn_2_available()`` only reads package metadata (and the CUDA flag), so a flash-attn whose CUDA
extension no longer loads passes it. In 4.36-4.54 every modeling module then runs
``if is_flash_attn_2_available(): from flash_attn import ...`` at import time, so
``from transformers import LlamaForCausalLM`` fails for every model, flash requested or not, before any
model hook can run; 4.55 instead prompts on stdin (``input(...)``) at the first forward.

The shim wraps the function where transformers reads it (``ledger.rebind``): in
``transformers.utils.import_utils`` (at its import, before ``transformers.utils`` binds the name, so every
later ``from ... import`` gets the wrapper), in every already-imported ``transformers.*`` module that bound
it by ``from ... import``, and in 5.4+'s
``FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["general_availability_check"]`` (``on_flash_utils``). The
wrapper asks the original first and only when that says yes does it consult
``_core.detect`` (a real import of flash_attn, cached): a missing or CPU-only flash-attn is never imported,
and a usable one is never hidden. It is inert while the shim is inactive, and ``deactivate()`` puts the
original back everywhere. Caches (``lru_cache`` in 5.x) are cleared so no stale "True" survives.

If transformers was imported before the shim, modules that already ran the check cannot be repaired; the
shim says so once, with the fix: import sdpa_shim before transformers.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import ModuleType
from typing import Any

from .._core.names import FLASH_ATTENTION_2, FLASH_UTILS, IMPORT_UTILS
from .._core.settings import get_logger
from . import ledger

logger = logging.getLogger(__name__)

FUNCTION = "is_flash_attn_2_available"
IMPLEMENTATION = FLASH_ATTENTION_2
#: The ledger's name for this unit's changes.
UNIT = "availability"

_lock = threading.RLock()
_original: Any = None
_replacement: Any = None
_told_hidden = False


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


def on_import_utils(module: ModuleType) -> None:
    """Install at ``transformers.utils.import_utils``' import (again after a deactivate). Never raises."""
    global _original, _replacement
    try:
        with _lock:
            current = getattr(module, FUNCTION, None)
            if current is None or ledger.is_shim_wrapper(current):
                return
            _original = current
            _replacement = ledger.make_wrapper(current, _available)
            ledger.rebind(current, _replacement, UNIT)
            _clear_caches(module)
        logger.debug("sdpa_shim wrapped %s.%s", IMPORT_UTILS, FUNCTION)
    except Exception:
        logger.error("sdpa_shim could not wrap %s.%s", IMPORT_UTILS, FUNCTION, exc_info=True)


def on_flash_utils(module: ModuleType) -> None:
    """At ``modeling_flash_attention_utils``' import: rebinding covers its matrix (5.4+). Never raises."""
    try:
        with _lock:
            if _original is not None and _replacement is not None and is_patched():
                ledger.rebind(_original, _replacement, UNIT)
    except Exception:
        logger.error("sdpa_shim could not patch %s", FLASH_UTILS, exc_info=True)


def _clear_caches(module: ModuleType) -> None:
    """Forget cached flash-attn answers (5.x ``lru_cache``), so the next call goes through the wrapper."""
    for name, value in list(vars(module).items()):
        if name.startswith("is_flash_attn") and callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def report_late_activation() -> None:
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
