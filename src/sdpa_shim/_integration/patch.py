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

import os
import sys

from .. import _state
from .._core import faults as _faults
from .._core.settings import get_logger, read_settings
from .._state import DYNAMIC_MODULE_UTILS, MODELING_UTILS, is_active
from .watch import when_package_imported

TYPE_CHECKING = False  # typing costs milliseconds at every start with SDPA_SHIM=1
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

    from .rewrite import Rewrite

__all__ = ["DYNAMIC_MODULE_UTILS", "MODELING_UTILS", "activate", "deactivate", "is_active", "patched_methods"]

_lock = _state.lock
_hook_registered = False
_NO_OVERRIDE = object()
#: (class, attribute name) -> the original object found in ``vars(class)``.
_originals: dict[tuple[type, str], Any] = {}


def activate() -> bool:
    """Turn the shim on (idempotent, thread-safe). Returns False when ``SDPA_SHIM`` says off."""
    settings = read_settings()
    if settings.enabled is False:
        get_logger(__name__).info("SDPA_SHIM is off: sdpa_shim stays inactive")
        return False
    with _lock:
        _state.set_active(True)
        if settings.standin_everywhere:  # SDPA_SHIM_STANDIN=1: also code that never loads a remote model
            from .remote_code import install_if_opted_in

            install_if_opted_in()
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
        get_logger(__name__).warning(
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
    patched = ", ".join(f"{owner.__name__}.{name}" for name in hooks)
    get_logger(__name__).debug("patched %s", patched)


def _guarded(rewrite: Rewrite, name: str) -> Any:
    """Turn a rewrite into a wrapt wrapper that is inert while inactive and never lets a fault out.

    Errors raised by the wrapped transformers method itself are the user's and pass untouched. Warnings
    it raises with a ``stacklevel`` that lands on this wrapper (or wrapt) are shown at the frame they
    would name without the shim: the caller of the hooked method (``_CallerWarnings``).
    """

    from .rewrite import Override  # after transformers is imported: typing is loaded by then

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
        with _CallerWarnings(sys._getframe(0)):
            result = wrapped(*args, **kwargs)
        return result if override is _NO_OVERRIDE else override

    return wrapper


#: The shim's own files and wrapt's: frames a warning's ``stacklevel`` must not count.
_SHIM_FILES = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_WRAPT_FILES = f"{os.sep}wrapt{os.sep}"


def _plumbing(filename: str) -> bool:
    return filename.startswith(_SHIM_FILES) or _WRAPT_FILES in filename


class _CallerWarnings:
    """While a hooked method runs, catch its warnings; afterwards show each one again, at the frame it
    would name without the shim's frames in between (``warnings.warn_explicit`` with that frame's module
    and registry, so filters and "once per location" work as for a plain ``warnings.warn`` there).

    Before Python 3.14, ``warnings.catch_warnings`` swaps process-wide state and corrupts it when two
    threads overlap; so the filters and ``showwarning`` are swapped here by hand and put back only if
    they are still ours, and a ``showwarning`` of ours met after its call ended puts the saved ones back
    itself. Warnings of other threads caught meanwhile are shown again unchanged. With a filter that
    turns warnings into errors, the error is raised when the hooked method returns, not inside it.
    """

    __slots__ = ("_callers", "_caught", "_context", "_filters", "_open", "_plumbing", "_saved")

    def __init__(self, frame: Any) -> None:
        self._plumbing: list[Any] = []
        while frame is not None and _plumbing(frame.f_code.co_filename):
            self._plumbing.append(frame.f_code.co_filename)
            frame = frame.f_back
        self._callers: list[Any] = []  # the frames a stacklevel landing on plumbing frame j means
        while frame is not None and len(self._callers) < len(self._plumbing):
            self._callers.append((frame.f_code.co_filename, frame.f_lineno, frame.f_globals))
            frame = frame.f_back
        self._caught: list[tuple[Any, ...]] = []
        self._context: Any = None
        self._filters: Any = None
        self._open = False
        self._saved: tuple[Any, Any] = (None, None)

    def __enter__(self) -> None:
        import warnings

        if getattr(sys.flags, "context_aware_warnings", False):  # 3.14+: catch_warnings is per context
            self._context = warnings.catch_warnings(record=True)
            log = self._context.__enter__()
            warnings.simplefilter("always")
            self._caught = log
            return
        self._saved = (warnings.filters, warnings.showwarning)
        self._open = True
        warnings.showwarning = self._show
        warnings.filters = self._filters = [("always", None, Warning, None, 0)]

    def _show(self, message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if self._open:
            self._caught.append((message, category, filename, lineno))
            return
        self._restore()  # left behind by another thread's catch_warnings: put the user's back, then show
        self._issue(message, category, filename, lineno)

    def _restore(self) -> None:
        import warnings

        filters, show = self._saved
        if warnings.filters is self._filters:
            warnings.filters = filters
        if warnings.showwarning == self._show:
            warnings.showwarning = show

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            caught = [(w.message, w.category, w.filename, w.lineno) for w in self._caught]
        else:
            self._open = False
            self._restore()
            caught = self._caught
        for message, category, filename, lineno in caught:
            self._issue(message, category, filename, lineno)

    def _issue(self, message: Any, category: Any, filename: str, lineno: int) -> None:
        import warnings

        module_globals: Any = None
        if filename in self._plumbing and self._callers:
            index = min(self._plumbing.index(filename), len(self._callers) - 1)
            filename, lineno, module_globals = self._callers[index]
        else:
            module_globals = next(
                (
                    vars(module)
                    for module in list(sys.modules.values())
                    if getattr(module, "__file__", None) == filename
                ),
                None,
            )
        if module_globals is None:
            warnings.warn_explicit(message, category, filename, lineno)
            return
        warnings.warn_explicit(
            message,
            category,
            filename,
            lineno,
            module=module_globals.get("__name__"),
            registry=module_globals.setdefault("__warningregistry__", {}),
            module_globals=module_globals,
        )
