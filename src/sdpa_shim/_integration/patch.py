"""Activation: post-import hooks that install the integration units; ``deactivate`` (state: ``_state``).

The hook targets ``transformers.modeling_utils`` (not the lazy top-level ``transformers``), so
importing the shim before or after transformers gives the same result. Every change goes through the
``ledger`` (wrappers on the raw attributes of the class that defines them, so every subclass goes
through them); ``deactivate`` is the ledger's undo, which puts the very same original objects back.

Importing wrapt costs tens of milliseconds, so while transformers is not imported yet the shim only
leaves a tiny watcher on ``sys.meta_path``; the first ``import transformers`` registers the real
wrapt post-import hook (see ``watch``).
"""

from __future__ import annotations

import sys

from .. import _state
from .._core import faults as _faults
from .._core.names import IMPORT_UTILS
from .._core.settings import get_logger, read_settings
from .._state import is_active
from .watch import when_package_imported

TYPE_CHECKING = False  # typing costs milliseconds at every start with SDPA_SHIM=1
if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["activate", "deactivate", "is_active", "patched_methods"]

_lock = _state.lock
_hook_registered = False


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
        if _hook_registered:  # activated again after deactivate: wrapt's hooks ran already
            from .units import watched_modules

            for name in watched_modules():
                if name in sys.modules:
                    _install(sys.modules[name])
        elif "transformers" in sys.modules:
            _register_post_import_hook()
        else:
            when_package_imported("transformers", _register_post_import_hook)
    return True


def deactivate() -> None:
    """Turn the shim off and put transformers' original objects back (identity-equal): the ledger's undo."""
    with _lock:
        _state.set_active(False)
        if _state.wrapper_type_if_created() is not None:
            from . import flash_paths, ledger

            flash_paths.uninstall()  # its log filter; the ledger's undo below covers the rest
            ledger.undo()


def patched_methods() -> list[str]:
    """ "Class.method" for every ``PreTrainedModel`` method currently wrapped (for ``doctor`` and tests)."""
    if _state.wrapper_type_if_created() is None:
        return []
    from . import ledger
    from .hooks import UNIT

    return ledger.labels(UNIT)


def _register_post_import_hook() -> None:
    """Register one wrapt hook per module a unit patches; each runs at once if its module is imported."""
    global _hook_registered
    try:
        import wrapt

        from .units import watched_modules

        with _lock:
            if _hook_registered:
                return
            _hook_registered = True
            late = IMPORT_UTILS in sys.modules
            for name in watched_modules():  # import_utils first: before modeling modules read availability
                wrapt.register_post_import_hook(_on_import, name)
        if late:
            from .availability import report_late_activation

            report_late_activation()
    except Exception as error:
        _faults.report("registering the import hook", error, "transformers is left unchanged")


def _on_import(module: ModuleType) -> None:
    """Post-import hook: must never raise, or the user's ``import transformers`` would fail."""
    try:
        with _lock:
            if is_active():  # wrapt cannot unregister a hook; a deactivated shim leaves it inert
                _install(module)
    except Exception as error:
        _faults.report(
            f"patching {getattr(module, '__name__', module)}", error, "transformers is left unchanged"
        )


def _install(module: ModuleType) -> None:
    """Install the units this module's import brings, each on its own: one unit's fault spares the rest."""
    from .units import units_for

    name = getattr(module, "__name__", "")
    try:
        units = units_for(name)
    except Exception as error:
        _faults.report(f"patching {name}", error, "transformers is left unchanged")
        return
    for unit in units:
        try:
            unit.install(module)
        except Exception as error:
            _faults.report(f"patching {name}", error, unit.consequence)
