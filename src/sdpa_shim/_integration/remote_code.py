"""Remote-code models that import flash_attn themselves (dots.ocr and its kind).

Their modeling files bypass transformers' attention selection: they ``import flash_attn`` at top level,
inside ``try``, under ``if is_flash_attn_2_available():`` or inside ``__init__``, and call it directly.
When flash-attn cannot run here and the shim is active:

- ``check_imports`` no longer refuses them: ``dynamic_module_utils.get_imports``, which ``check_imports``
  looks up as a module global in every release, drops ``flash_attn``. A missing flash-attn is then not
  reported, and a broken one is not imported (4.45+ would re-raise its ``undefined symbol`` error).
- While such a model loads, that is inside ``get_class_in_module`` (the remote module runs) and inside
  ``__init__`` of the model class it returned (``from_pretrained``, ``from_config``, direct construction,
  lazy imports), a *remote module* (``transformers_modules.*``) that imports ``flash_attn`` in this
  thread gets the PyTorch stand-in (``standin_import``, ``remote_window``), and
  ``is_flash_attn_2_available()`` called *from a remote module* answers True, so guarded imports run
  and define their names.
- Never worse than without the shim: an import the module guards itself (``try``/``except``, an
  availability or ``find_spec`` test) is not served when the module checks for CUDA or half precision
  and this load is not CUDA + float16/bfloat16; the module then takes its own fallback
  (``remote_policy.serve_guarded``). The load's dtype is read from the ``from_pretrained``/
  ``from_config`` call in progress (``_load_dtype``).
- The WARNING names the model class: a window that resolved a config class (defined in the modeling
  file) hands its importers to the model class of the same package.
- When the last such window closes, the stand-in leaves ``sys.modules`` (a real but unusable flash_attn
  that was importable is put back): everywhere else ``import flash_attn`` and transformers' own checks
  behave exactly as without the shim. The remote modules keep the functions they bound.

``SDPA_SHIM_STANDIN=1`` serves every importer, for the whole process, where ``import flash_attn`` would
fail. One WARNING per model (class, importing files, reason) says the stand-in serves its flash_attn calls.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from .._core import faults as _faults
from .._core.detect import flash_status
from .._core.names import FLASH_ATTN
from .._core.versions import transformers_release
from .._state import is_active
from . import ledger, standin_import
from .remote_window import IMPLEMENTATION, clear, install_if_opted_in, loading, should_serve, standin_uses

__all__ = ["clear", "install", "install_if_opted_in", "loading", "standin_uses", "uninstall"]

logger = logging.getLogger(__name__)

PACKAGE = FLASH_ATTN
#: The ledger's name for this unit's changes.
UNIT = "remote code"

_lock = threading.RLock()
_module: ModuleType | None = None  # the patched transformers.dynamic_module_utils


def install(dynamic_module_utils: ModuleType) -> None:
    """Wrap ``get_imports`` and ``get_class_in_module`` (idempotent); install the finder. Never raises."""
    global _module
    try:
        standin_import.install(should_serve)
        with _lock:
            _module = dynamic_module_utils
            wrappers = {"get_imports": _get_imports, "get_class_in_module": _get_class_in_module}
            for name, wrapper in wrappers.items():
                current = getattr(dynamic_module_utils, name, None)
                if current is None or ledger.is_shim_wrapper(current):
                    continue
                # rebind, not wrap: modules that import the name (generation.utils) get the original back too
                ledger.rebind(current, ledger.make_wrapper(current, wrapper), UNIT)
    except Exception as error:
        _faults.report(
            "patching transformers.dynamic_module_utils", error, "remote code loads as without the shim"
        )


def uninstall() -> None:
    """Put back the original functions and model ``__init__`` methods (identity-equal)."""
    ledger.undo(UNIT)


def _get_imports(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``check_imports`` must not require (or import) flash_attn when the stand-in will serve it."""
    imports = wrapped(*args, **kwargs)
    try:
        if not is_active() or PACKAGE not in imports:
            return imports
        status = flash_status(IMPLEMENTATION)
        if status.usable:
            return imports
        logger.debug("check_imports: not requiring flash_attn (%s): %s", status.reason, args[:1] or kwargs)
        return [name for name in imports if name != PACKAGE]
    except Exception as error:
        _faults.report(
            "the get_imports wrapper", error, "transformers checks the remote file's imports unchanged"
        )
        return imports


def _get_class_in_module(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Class resolution: the remote module runs here, so its flash_attn imports get the stand-in."""
    label = _plan(args, kwargs)
    if label is None:
        return wrapped(*args, **kwargs)
    with loading(label, dtype=_load_dtype()) as window:
        found = wrapped(*args, **kwargs)
        _label(window, found)
    _adopt(found)
    return found


def _label(window: Any, found: Any) -> None:
    """Name the window after the model class found; a config (or other) class names no model."""
    if window is None:
        return
    try:
        window.package = str(getattr(found, "__module__", "")).rpartition(".")[0]
        if not _is_model_class(found):
            window.label = ""  # its importers wait for the model class of the package
    except Exception as error:
        _faults.report("naming a remote-code load", error, "the WARNING may name the class looked up")


def _is_model_class(cls: Any) -> bool:
    torch_nn = sys.modules.get("torch.nn")
    return isinstance(cls, type) and torch_nn is not None and issubclass(cls, torch_nn.Module)


#: transformers functions whose frame holds the dtype a remote model is loaded in (``kwargs``, ``config``).
_LOADERS = frozenset({"from_pretrained", "from_config", "_from_config"})


def _load_dtype() -> str | None:
    """The dtype transformers will build the model in, from the loading call in progress; None: unknown.

    ``dtype=``/``torch_dtype=`` of the nearest ``from_pretrained``/``from_config`` frame of transformers;
    "auto", and no dtype where the release defaults to the config's (``from_config`` from 4.49,
    ``from_pretrained`` from 5.0), mean the config's ``dtype``/``torch_dtype``. None (torch's default dtype
    applies) when there is no such call or it does not say. Never raises.
    """
    try:
        frame = sys._getframe(1)
        try:
            while frame is not None:
                name = str(frame.f_globals.get("__name__") or "")
                if name.startswith("transformers.") and frame.f_code.co_name in _LOADERS:
                    return _dtype_of_call(frame.f_code.co_name, frame.f_locals)
                frame = frame.f_back
        finally:
            del frame
    except Exception:
        logger.debug("the dtype of a remote-code load could not be read", exc_info=True)
    return None


#: The first release whose loader, given no dtype, builds in the config's dtype (``dtype="auto"``).
_CONFIG_DTYPE_DEFAULT = {"from_pretrained": (5, 0), "from_config": (4, 49), "_from_config": (4, 49)}


def _dtype_of_call(function: str, names: dict[str, Any]) -> str | None:
    requested: Any = None
    for source in (names.get("kwargs"), names.get("kwargs_orig")):
        if isinstance(source, dict):
            requested = source.get("dtype") or source.get("torch_dtype")
            if requested is not None:
                break
    if requested is None and (transformers_release() or (0, 0)) >= _CONFIG_DTYPE_DEFAULT[function]:
        requested = "auto"
    if requested == "auto":
        settings = getattr(names.get("config"), "__dict__", {})
        requested = settings.get("dtype") or settings.get("torch_dtype")
    if requested is None or requested == "auto":
        return None
    return str(requested).removeprefix("torch.")


def _plan(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The class name when its remote module mentions flash_attn and flash-attn cannot run, else None."""
    try:
        if not is_active():
            return None
        class_name = args[0] if args else kwargs["class_name"]
        module_path = str(args[1] if len(args) > 1 else kwargs["module_path"])
        if not _mentions_flash_attn(_module_file(module_path)) or flash_status(IMPLEMENTATION).usable:
            return None
        return str(class_name)
    except Exception as error:
        _faults.report("preparing a remote-code load", error, "flash_attn is imported as without the shim")
        return None


def _module_file(module_path: str) -> Path:
    """The file ``get_class_in_module`` runs (4.36-4.44 pass the path without ``.py``)."""
    path = Path(getattr(_module, "HF_MODULES_CACHE", "")) / module_path
    return path if path.suffix == ".py" else path.with_name(path.name + ".py")


def _mentions_flash_attn(path: Path) -> bool:
    """Whether the module or a file it imports relatively contains "flash_attn" (a cheap text scan)."""
    files = [str(path)]
    try:
        files += list(_module.get_relative_import_files(str(path)))  # type: ignore[union-attr]
    except Exception:
        logger.debug("relative imports of %s not read", path, exc_info=True)
    for file in files:
        try:
            if PACKAGE in Path(file).read_text(encoding="utf-8", errors="replace"):
                return True
        except OSError:
            continue
    return False


def _adopt(cls: Any) -> None:
    """Wrap the model class's ``__init__`` so lazy flash_attn imports during construction are served."""
    try:
        if not _is_model_class(cls):
            return
        with _lock:
            if "__init__" in vars(cls):
                ledger.wrap(cls, "__init__", _init_wrapper, UNIT)
            else:  # inherits its __init__: the undo deletes the one added here
                ledger.wrap(cls, "__init__", _init_wrapper, UNIT, wrapped=_delegating_init(cls))
    except Exception as error:
        _faults.report(
            "preparing a remote model class", error, "its __init__ imports flash_attn as without the shim"
        )


def _delegating_init(cls: type) -> Any:
    """An ``__init__`` for a class that inherits its own: calls the inherited one."""
    inherited = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        super(cls, self).__init__(*args, **kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__wrapped__ = inherited  # type: ignore[attr-defined]  # inspect.signature shows the real one
    return __init__


def _init_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if instance is None or not is_active():
        return wrapped(*args, **kwargs)
    cls = type(instance)
    with loading(cls.__name__) as window:  # dtype: torch's default, which transformers sets while building
        if window is not None:
            window.package = cls.__module__.rpartition(".")[0]
        return wrapped(*args, **kwargs)
