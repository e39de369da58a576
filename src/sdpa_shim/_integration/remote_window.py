"""The loading window: while a remote model that imports flash_attn loads, its imports get the stand-in.

A window opens per model load in one thread (class resolution and the model class's ``__init__``, see
``remote_code``). While any window is open in this thread, a *remote module* (``transformers_modules.*``)
that imports ``flash_attn`` gets the PyTorch stand-in (``standin_import``'s finder asks ``should_serve``),
and ``is_flash_attn_2_available()`` called from a remote module answers True (``availability_for_caller``),
so guarded imports run and define their names.

**Never worse than without the shim** (``remote_policy.serve_guarded``). An import the remote code guards
itself (inside ``try`` with a handler for ImportError/Exception/bare, under ``if is_flash_attn_*()``/
``find_spec``, or the availability call and ``find_spec`` probe themselves) has a fallback: serving it is a
speed-up, not a rescue. It is served unless the importing module checks for CUDA or half precision (``assert
qkv.is_cuda``, ``assert x.dtype in [torch.float16, torch.bfloat16]``, or the same test raising): such a
flash path cannot run on CPU or in float32, stand-in or not, so the module is served only when a CUDA device
is present and the load's dtype is float16/bfloat16. Otherwise its import fails as without the shim and it
takes its own fallback. Unguarded imports are always served: the module could not even load otherwise. Each
decision is logged at DEBUG, once per module and load.

When the last window closes the stand-in leaves ``sys.modules`` (a real but unusable flash_attn is put
back) and one WARNING per model names the model class and every remote module of the load that imported
flash_attn. Imports served while a *config* class resolved (a config defined in the modeling file) wait
for the model class of the same package (``_pending``); modules that took flash_attn from ``sys.modules``
(no finder lookup) are found by the stand-in objects their globals hold.

``SDPA_SHIM_STANDIN=1`` serves every importer, for the whole process, where ``import flash_attn`` would fail.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .._core import faults as _faults
from .._core.detect import PACKAGES, FlashStatus, flash_status
from .._core.names import FLASH_ATTENTION_2, REMOTE_PREFIX
from .._core.settings import get_logger, read_settings
from .._state import is_active
from . import standin_import
from .remote_policy import caller_module as _caller_module
from .remote_policy import remote_frames as _remote_frames
from .remote_policy import serve_guarded as _serve_guarded

logger = logging.getLogger(__name__)

IMPLEMENTATION = FLASH_ATTENTION_2


@dataclass(frozen=True)
class StandinUse:
    """A model whose flash_attn imports the stand-in served: its class, the importing modules, why."""

    model: str
    importers: tuple[str, ...]
    reason: str


@dataclass(eq=False)
class _Window:
    """One model being loaded in one thread."""

    label: str  # the model class the WARNING names ("" for transformers' own flash path: no WARNING)
    status: FlashStatus
    importers: list[str] = field(default_factory=list)
    #: Importers served besides remote modules: "transformers." while transformers' own flash path imports
    #: its kernels for a model the shim serves (see ``flash_paths``).
    also_serves: str = ""
    #: The dtype the load builds the model in ("bfloat16"), when the opener knows it; else torch's default.
    dtype: str | None = None
    #: ``transformers_modules.<repo>``: the package of the class being loaded (set by ``remote_code``).
    package: str = ""
    #: remote module -> serve its guarded imports? (decided once per module and load)
    guarded: dict[str, bool] = field(default_factory=dict)


_lock = threading.RLock()
_open_windows = 0  # in all threads
_hidden: dict[str, ModuleType | None] = {}  # real flash_attn entries parked while windows are open
_local = threading.local()  # .windows: this thread's open windows, outermost first
_uses: list[StandinUse] = []
_announced: set[tuple[str, str, str]] = set()
_everywhere_announced = False
#: package -> remote modules served while a non-model class of it (its config) resolved: named in the
#: WARNING of the model class of that package.
_pending: dict[str, list[str]] = {}
#: file -> ((mtime, size), its source facts): guarded line ranges and CUDA/half-precision checks.


def install_if_opted_in() -> None:
    """``SDPA_SHIM_STANDIN=1``: install the finder at activation (serves code that loads no remote model)."""
    try:
        if read_settings().standin_everywhere:
            standin_import.install(should_serve)
    except Exception as error:
        _faults.report("reading SDPA_SHIM_STANDIN", error, "flash_attn is left alone")


def standin_uses() -> list[StandinUse]:
    """Every model load the stand-in served so far in this process, oldest first."""
    with _lock:
        return list(_uses)


def clear() -> None:
    """Forget served models, so the next one warns again (tests)."""
    global _everywhere_announced
    with _lock:
        _uses.clear()
        _announced.clear()
        _pending.clear()
        _everywhere_announced = False


@contextmanager
def loading(label: str, dtype: str | None = None) -> Iterator[_Window | None]:
    """While the body runs, remote modules that import flash_attn in this thread get the stand-in.

    ``dtype``: what the load builds the model in, when known (guarded imports of modules that check for
    CUDA/half precision are served only in float16/bfloat16); None: torch's default dtype at the import.
    Yields the window (None when nothing is served): ``remote_code`` relabels it once the class is known.
    """
    window = _open(label, dtype=dtype)
    try:
        yield window
    finally:
        if window is not None:
            _close(window)


@contextmanager
def transformers_flash_path() -> Iterator[None]:
    """While the body runs, transformers' own modules in this thread get the stand-in for ``flash_attn``.

    Used around transformers' lazy import of its flash kernels, for models the shim serves on the flash
    path: ``is_flash_attn_2_available()`` answers True there and ``from flash_attn import ...`` binds
    the stand-in's functions. No WARNING: the model's decision already said what runs.
    """
    window = _open("", also_serves="transformers.")
    try:
        yield
    finally:
        if window is not None:
            _close(window)


def _serves_importer(importer: str) -> _Window | None:
    """The open window of this thread that serves ``importer``, or None."""
    for window in _windows():
        if importer.startswith(REMOTE_PREFIX) or (
            window.also_serves and importer.startswith(window.also_serves)
        ):
            return window
    return None


def should_serve(fullname: str) -> bool:
    """The finder's question: serve this ``flash_attn*`` import from the stand-in?"""
    if not is_active():
        return False
    windows = _windows()
    if windows:
        frames, probe = _remote_frames()
        importer = frames[0][0] if frames else _caller_module()
        window = _serves_importer(importer)
        if window is not None:
            if importer.startswith(REMOTE_PREFIX):
                if not _serve_guarded(windows[0], frames, probe):
                    return False
                if importer not in windows[0].importers:
                    windows[0].importers.append(importer)
            return True
    if read_settings().standin_everywhere:
        if _caller_module().split(".")[0] == "transformers":
            return False  # transformers' own probes (find_spec in is_flash_attn_2_available) see the truth
        # First use may import the real flash_attn here (same thread: the import lock is re-entrant).
        status = flash_status(IMPLEMENTATION)
        if _serves_everywhere(status):
            _announce_everywhere(status)
            return True
    return False


def availability_for_caller(answer: Any) -> Any:
    """``is_flash_attn_2_available()`` as its caller should see it: True for a remote module loading here.

    ``_availability`` calls this with transformers' negative answer. Never raises.
    """
    try:
        if answer or not _windows() or not is_active():
            return answer
        frames, _ = _remote_frames()
        caller = frames[0][0] if frames else _caller_module()
        if _serves_importer(caller) is None:
            return answer
        if caller.startswith(REMOTE_PREFIX) and not _serve_guarded(_windows()[0], frames, probe=True):
            return answer  # the caller's own fallback runs, as without the shim
        logger.debug("is_flash_attn_2_available() is True for %s: the stand-in serves its imports", caller)
        return True
    except Exception as error:
        _faults.report("the remote-code availability check", error, "transformers' answer stands")
        return answer


def _open(label: str, also_serves: str = "", dtype: str | None = None) -> _Window | None:
    global _open_windows
    try:
        if not is_active():
            return None
        status = flash_status(IMPLEMENTATION)  # before any import lock is held by the window's imports
        if status.usable:
            return None
        standin_import.install(should_serve)
        window = _Window(label, status, also_serves=also_serves, dtype=dtype)
        with _lock:
            if _open_windows == 0:
                _hidden.update(standin_import.hide_real())
            _open_windows += 1
        _windows().append(window)
        return window
    except Exception as error:
        _faults.report("opening a remote-code load", error, "flash_attn is imported as without the shim")
        return None


def _close(window: _Window) -> None:
    global _open_windows
    try:
        windows = _windows()
        for index, open_window in enumerate(windows):
            if open_window is window:
                del windows[index]
                break
        with _lock:
            _open_windows -= 1
            if _open_windows == 0:
                if not _serves_everywhere(window.status):
                    dropped = standin_import.drop_standin()
                    logger.debug("stand-in left sys.modules: %s", ", ".join(dropped) or "nothing served")
                standin_import.restore(_hidden)
                _hidden.clear()
        _settle(window)
    except Exception as error:
        _faults.report("closing a remote-code load", error, "the stand-in may stay in sys.modules")


def _settle(window: _Window) -> None:
    """Announce a model window (with its package's pending importers); park a config window's importers."""
    if not window.label:
        if window.package and window.importers:
            with _lock:
                pending = _pending.setdefault(window.package, [])
                pending += [name for name in window.importers if name not in pending]
            logger.debug("flash_attn served to %s before its model class", ", ".join(window.importers))
        return
    with _lock:
        pending = _pending.pop(window.package, []) if window.package else []
    if not (window.importers or pending):
        return
    importers = list(dict.fromkeys(window.importers + pending))
    importers += [name for name in _holders(window.package) if name not in importers]
    _announce(window, importers)


def _holders(package: str) -> list[str]:
    """Remote modules of ``package`` whose globals hold the stand-in (bound from ``sys.modules``)."""
    if not package:
        return []
    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith(package + ".") or module is None:
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        if any(
            standin_import.is_standin(value)
            or str(getattr(value, "__module__", None) or "").startswith(standin_import.STANDIN)
            for value in values
            if not isinstance(value, type)
        ):
            found.append(name)
    return sorted(found)


def _announce(window: _Window, importers: list[str]) -> None:
    use = StandinUse(window.label, tuple(importers), window.status.reason)
    files = ", ".join(name.rpartition(".")[2] for name in use.importers)
    key = (use.model, files, use.reason)  # the same model code from another directory is the same model
    with _lock:
        _uses.append(use)
        first = key not in _announced
        _announced.add(key)
    (get_logger().warning if first else get_logger().debug)(
        "%s imports flash_attn (%s); serving it with sdpa_shim's PyTorch stand-in: %s",
        use.model,
        files,
        use.reason,
    )


def _announce_everywhere(status: FlashStatus) -> None:
    global _everywhere_announced
    with _lock:
        first = not _everywhere_announced
        _everywhere_announced = True
    if first:
        get_logger().warning(
            "SDPA_SHIM_STANDIN=1: serving `import flash_attn` with sdpa_shim's PyTorch stand-in "
            "in this whole process: %s",
            status.reason,
        )


def _serves_everywhere(status: FlashStatus) -> bool:
    """Opted in, and ``import flash_attn`` would fail (missing or broken; not merely unable to run)."""
    if status.usable or not read_settings().standin_everywhere:
        return False
    return status.version is None or status.reason.startswith(
        f"{PACKAGES[IMPLEMENTATION].module} import failed"
    )


def _windows() -> list[_Window]:
    windows = getattr(_local, "windows", None)
    if windows is None:
        windows = _local.windows = []
    return windows
