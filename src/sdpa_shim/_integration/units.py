"""The integration units and the transformers releases each applies to: one table, data not ``if`` ladders.

A unit installs itself when the transformers module it patches is imported (``patch`` registers one
post-import hook per module named here) and patches only through the ``ledger``, so ``deactivate()``
undoes every unit at once. A release outside a row's range never sees that unit. Where a new
transformers release plugs in: a row here, or one in ``hooks.HOOKS`` (which ``PreTrainedModel`` methods
are hooked per release).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

from .._core.names import CONTINUOUS_API, DYNAMIC_MODULE_UTILS, FLASH_UTILS, IMPORT_UTILS, MODELING_UTILS
from .._core.versions import transformers_release

Release = tuple[int, int]


class Unit(NamedTuple):
    """One integration: what it is, which module's import installs it, the releases, and how."""

    name: str
    module: str
    first: Release
    last: Release | None  # None: every newer release
    install: Callable[[ModuleType], None]  # given that module; never raises (reports its own faults)
    consequence: str  # what a fault while installing leaves behind (for the one ERROR)

    def applies(self, release: Release | None) -> bool:
        """An unreadable release counts as a new one: the open-ended rows apply, the closed ones do not."""
        if release is None:
            return self.last is None
        return self.first <= release and (self.last is None or release <= self.last)


def _availability(module: ModuleType) -> None:
    from .availability import on_import_utils

    on_import_utils(module)


def _availability_matrix(module: ModuleType) -> None:
    from .availability import on_flash_utils

    on_flash_utils(module)


def _hooks(module: ModuleType) -> None:
    from .hooks import install

    install(module)


def _attention_entries(module: ModuleType) -> None:
    from . import registry

    registry.install(module)


def _flash_path(module: ModuleType) -> None:
    from . import flash_paths

    flash_paths.install()


def _continuous_batching(module: ModuleType) -> None:
    from . import flash_paths

    flash_paths.install_continuous_batching(module)


def _remote_code(module: ModuleType) -> None:
    from . import remote_code

    remote_code.install(module)


#: In installation order. Releases older than 4.36 (no ``attn_implementation``) get none of them.
UNITS: tuple[Unit, ...] = (
    Unit("availability", IMPORT_UTILS, (4, 36), None, _availability, "transformers is left unchanged"),
    Unit("availability", FLASH_UTILS, (5, 4), None, _availability_matrix, "transformers is left unchanged"),
    Unit("hooks", MODELING_UTILS, (4, 36), None, _hooks, "transformers is left unchanged"),
    Unit(
        "attention entries",
        MODELING_UTILS,
        (4, 48),
        None,
        _attention_entries,
        "transformers is left unchanged",
    ),
    Unit("flash path", MODELING_UTILS, (4, 56), None, _flash_path, "models keep the plain sdpa downgrade"),
    Unit(
        "flash path",
        CONTINUOUS_API,
        (4, 56),
        None,
        _continuous_batching,
        "continuous batching runs as without the shim",
    ),
    Unit(
        "remote code",
        DYNAMIC_MODULE_UTILS,
        (4, 36),
        None,
        _remote_code,
        "remote code loads as without the shim",
    ),
)


def watched_modules() -> list[str]:
    """Every module whose import installs a unit, each once, in installation order."""
    return list(dict.fromkeys(unit.module for unit in UNITS))


def units_for(module: str) -> list[Unit]:
    """The units that the import of ``module`` installs with the transformers in use."""
    release = transformers_release()
    return [unit for unit in UNITS if unit.module == module and unit.applies(release)]
