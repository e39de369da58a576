"""``import flash_attn`` answered by ``sdpa_shim.standin``, only when the installed policy says so.

A meta path finder maps ``flash_attn`` and ``flash_attn.X`` onto the module objects
``sdpa_shim.standin`` and ``sdpa_shim.standin.X``: aliases, not copies, so both names give the same
functions. It is inserted once and then left on ``sys.meta_path``: removing a finder while another
thread iterates ``sys.meta_path`` can make that thread skip the next finder. For every lookup it asks
the policy given to ``install`` (``remote_window.should_serve``); when the answer is no it
returns None and the import goes on exactly as without the shim.

What the finder serves lands in ``sys.modules`` under the ``flash_attn`` names. ``drop_standin``
takes it out again, and ``hide_real``/``restore`` park a real but unusable flash_attn (importable, no
CUDA device) while the stand-in serves. Stdlib only: installing the finder costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .._core import faults as _faults

logger = logging.getLogger(__name__)

ALIAS = "flash_attn"
STANDIN = "sdpa_shim.standin"

_lock = threading.Lock()
#: Set while this thread is inside the finder: imports made meanwhile (detection importing the real
#: flash_attn, the stand-in importing torch) must not come back to it.
_busy = threading.local()


#: The question asked for every ``flash_attn*`` lookup: serve this name from the stand-in?
def _never(fullname: str) -> bool:
    return False


_policy: Callable[[str], bool] = _never


def is_flash_name(name: str) -> bool:
    return name == ALIAS or name.startswith(ALIAS + ".")


def is_standin(module: object) -> bool:
    name = getattr(module, "__name__", None)
    return isinstance(name, str) and (name == STANDIN or name.startswith(STANDIN + "."))


class StandinFinder:
    """Finds ``flash_attn*`` in the stand-in when the policy asks for it; finds nothing otherwise."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not is_flash_name(fullname) or getattr(_busy, "on", False):
            return None
        _busy.on = True
        try:
            if not (_parent_is_standin(fullname) or _policy(fullname)):
                return None
            return spec_for(fullname)
        except ModuleNotFoundError:
            raise
        except Exception as error:
            _faults.report(
                "the flash_attn stand-in finder", error, f"{fullname} is imported as without the shim"
            )
            return None
        finally:
            _busy.on = False

    def __repr__(self) -> str:
        return "<sdpa_shim flash_attn stand-in finder>"


class _AliasLoader:
    """Loads ``flash_attn.X`` as the already importable ``sdpa_shim.standin.X`` object."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.spec: Any = None

    def create_module(self, spec: Any) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system just stamped our alias spec on the module; give it its own spec back.
        module.__spec__ = self.spec


def spec_for(fullname: str) -> Any:
    """The alias spec for ``fullname``; ModuleNotFoundError for what the stand-in does not provide."""
    target = STANDIN + fullname[len(ALIAS) :]
    private = any(part.startswith("_") for part in fullname.split(".")[1:])
    found = None if private else importlib.util.find_spec(target)
    if found is None:
        raise ModuleNotFoundError(
            f"No module named {fullname!r} (sdpa_shim's flash_attn stand-in does not provide it)",
            name=fullname,
        )
    return importlib.machinery.ModuleSpec(
        fullname,
        _AliasLoader(target),
        origin=found.origin,
        is_package=found.submodule_search_locations is not None,
    )


def install(policy: Callable[[str], bool]) -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent) and ask ``policy`` from now on. Never raises."""
    global _policy
    try:
        with _lock:
            _policy = policy
            if not any(isinstance(finder, StandinFinder) for finder in sys.meta_path):
                sys.meta_path.insert(0, StandinFinder())
    except Exception as error:
        _faults.report("installing the flash_attn stand-in finder", error, "flash_attn is left alone")


def hide_real() -> dict[str, ModuleType | None]:
    """Take a real flash_attn (or a ``None`` blocker) out of ``sys.modules``; return it for ``restore``."""
    hidden = {}
    for name, module in list(sys.modules.items()):
        if is_flash_name(name) and not is_standin(module):
            hidden[name] = sys.modules.pop(name)
    return hidden


def drop_standin() -> list[str]:
    """Remove every ``flash_attn*`` entry that is the stand-in; return the names removed."""
    dropped = [
        name for name, module in list(sys.modules.items()) if is_flash_name(name) and is_standin(module)
    ]
    for name in dropped:
        sys.modules.pop(name, None)
    return dropped


def restore(hidden: dict[str, ModuleType | None]) -> None:
    """Put back what ``hide_real`` took (the very same objects)."""
    sys.modules.update(hidden)


def _parent_is_standin(fullname: str) -> bool:
    """A child of a stand-in already in ``sys.modules`` must be the stand-in's child too (no duplicates)."""
    parent = fullname.rpartition(".")[0]
    return bool(parent) and is_standin(sys.modules.get(parent))
