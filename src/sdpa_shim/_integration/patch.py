"""Activation and the wrapt mechanics: install, uninstall, and the post-import hook (state: ``_state``).

The hook targets ``transformers.modeling_utils`` (not the lazy top-level ``transformers``), so
importing the shim before or after transformers gives the same result. Wrappers go on the raw
attributes of the class that defines them, so every subclass goes through them; uninstalling puts
the very same original objects back.

Importing wrapt costs tens of milliseconds, so while transformers is not imported yet the shim only
leaves a tiny watcher on ``sys.meta_path``; the first ``import transformers`` registers the real
wrapt post-import hook (see ``watch``).
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import _state
from .._core import faults as _faults
from .._core.settings import disabled_by_env
from .._state import DYNAMIC_MODULE_UTILS, MODELING_UTILS, is_active
from .rewrite import Override
from .watch import when_package_imported

if TYPE_CHECKING:
    from .rewrite import Rewrite

logger = logging.getLogger(__name__)

__all__ = ["DYNAMIC_MODULE_UTILS", "MODELING_UTILS", "activate", "deactivate", "is_active", "patched_methods"]

_lock = _state.lock
_hook_registered = False
_NO_OVERRIDE = object()
#: (class, attribute name) -> the original object found in ``vars(class)``.
_originals: dict[tuple[type, str], Any] = {}


def activate() -> bool:
    """Turn the shim on (idempotent, thread-safe). Returns False when ``SDPA_SHIM`` says off."""
    if disabled_by_env():
        logger.info("SDPA_SHIM is off: sdpa_shim stays inactive")
        return False
    with _lock:
        _state.set_active(True)
        from .remote_code import install_if_opted_in

        install_if_opted_in()  # SDPA_SHIM_STANDIN=1 also serves code that never loads a remote model
        if _hook_registered:
            if MODELING_UTILS in sys.modules:
                _install(sys.modules[MODELING_UTILS])
            if DYNAMIC_MODULE_UTILS in sys.modules:
                _install_remote_code(sys.modules[DYNAMIC_MODULE_UTILS])
        elif "transformers" in sys.modules:
            _register_post_import_hook()
        else:
            when_package_imported("transformers", _register_post_import_hook)
    return True


def deactivate() -> None:
    """Turn the shim off and put transformers' original functions back (identity-equal)."""
    with _lock:
        _state.set_active(False)
        wrapper_type = _state.wrapper_type_if_created()
        if wrapper_type is not None:
            from . import flash_paths, registry, remote_code

            registry.uninstall()
            flash_paths.uninstall()
            remote_code.uninstall()
        for (owner, name), original in list(_originals.items()):
            if wrapper_type is not None and isinstance(vars(owner).get(name), wrapper_type):
                setattr(owner, name, original)
            del _originals[(owner, name)]


def patched_methods() -> list[str]:
    """ "Class.method" for every method currently wrapped (for ``doctor`` and tests)."""
    with _lock:
        return [f"{owner.__name__}.{name}" for owner, name in _originals]


def _register_post_import_hook() -> None:
    """Register the wrapt hook once; it runs at once if ``transformers.modeling_utils`` is imported."""
    global _hook_registered
    try:
        import wrapt

        with _lock:
            if _hook_registered:
                return
            _hook_registered = True
            wrapt.register_post_import_hook(_on_modeling_utils_import, MODELING_UTILS)
            wrapt.register_post_import_hook(_on_dynamic_module_utils_import, DYNAMIC_MODULE_UTILS)
        from .availability import install as patch_flash_availability  # never raises

        patch_flash_availability()  # before transformers' modeling modules read is_flash_attn_2_available
    except Exception as error:
        _faults.report("registering the import hook", error, "transformers is left unchanged")


def _on_modeling_utils_import(module: ModuleType) -> None:
    """Post-import hook: must never raise, or the user's ``import transformers`` would fail."""
    try:
        with _lock:
            if is_active():  # wrapt cannot unregister a hook; a deactivated shim leaves it inert
                _install(module)
    except Exception as error:
        _faults.report(f"patching {MODELING_UTILS}", error, "transformers is left unchanged")


def _on_dynamic_module_utils_import(module: ModuleType) -> None:
    """Post-import hook for remote code loading; like the one above, it must never raise."""
    try:
        with _lock:
            if is_active():
                _install_remote_code(module)
    except Exception as error:
        _faults.report(f"patching {DYNAMIC_MODULE_UTILS}", error, "remote code loads as without the shim")


def _install_remote_code(module: ModuleType) -> None:
    from . import remote_code

    _state.wrapper_type()
    remote_code.install(module)


def _install(module: ModuleType) -> None:
    from .hooks import hooks_for

    owner = module.PreTrainedModel
    hooks = hooks_for(owner)
    if not hooks:
        version = getattr(sys.modules.get("transformers"), "__version__", "unknown")
        logger.warning(
            "sdpa_shim does not support transformers %s (no known attention hook); leaving it unchanged",
            version,
        )
        return
    wrapper_type = _state.wrapper_type()
    for name, rewrite in hooks.items():
        raw = vars(owner)[name]
        if isinstance(raw, wrapper_type):
            continue
        _originals[(owner, name)] = raw
        setattr(owner, name, wrapper_type(raw, _guarded(rewrite, name)))
    from . import flash_paths, registry

    registry.install(module)
    flash_paths.install()
    logger.debug("sdpa_shim patched %s", ", ".join(f"{owner.__name__}.{name}" for name in hooks))


def _guarded(rewrite: Rewrite, name: str) -> Any:
    """Turn a rewrite into a wrapt wrapper that is inert while inactive and never lets a fault out.

    Errors raised by the wrapped transformers method itself are the user's and pass untouched.
    """

    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        override: Any = _NO_OVERRIDE
        if is_active():
            try:
                rewritten = rewrite(instance, args, kwargs)
            except Exception as error:
                _faults.report(f"the {name} hook", error, "the call passes through to transformers unchanged")
                rewritten = None
            if isinstance(rewritten, Override):
                args, kwargs, override = rewritten
            elif rewritten is not None:
                args, kwargs = rewritten
        result = wrapped(*args, **kwargs)
        return result if override is _NO_OVERRIDE else override

    return wrapper
