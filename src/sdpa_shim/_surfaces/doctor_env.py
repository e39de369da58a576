"""``doctor``'s view of the configuration: each environment variable as the shim parses it, and start-up.

Values are parsed by ``_core.settings.check`` (the one parser), so an INVALID here is exactly what
``import sdpa_shim`` warns about, in the same words.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .._core.settings import (
    ENV_BACKEND,
    ENV_ENABLED,
    ENV_FALLBACK,
    ENV_STANDIN,
    FALSE_VALUES,
    TRUE_VALUES,
    VARIABLES,
    check,
)
from . import startup as _startup

Report = dict[str, Any]


def environment() -> list[Report]:
    """One row per variable: raw value, parsed value, valid?, what is accepted, what it means now."""
    meanings = {
        ENV_ENABLED: _enabled_meaning,
        ENV_FALLBACK: _fallback_meaning,
        ENV_BACKEND: _backend_meaning,
        ENV_STANDIN: _standin_meaning,
    }
    rows = []
    for name, meaning in meanings.items():
        raw = os.environ.get(name)
        value, valid = check(name, raw)
        rows.append(
            {
                "name": name,
                "raw": raw,
                "value": value,
                "valid": valid,
                "accepted": VARIABLES[name][1],
                "meaning": meaning(value),
            }
        )
    return rows


def _enabled_meaning(value: str | None) -> str:
    if value in TRUE_VALUES:
        return "on: every Python start activates the shim (children inherit it)"
    if value in FALSE_VALUES:
        return "off: the shim never acts, even when imported"
    return "unset: `import sdpa_shim` or `%load_ext sdpa_shim` activates; nothing at Python start"


FALLBACK_MEANINGS = {
    "auto": "transformers' flash path on PyTorch kernels where the release (4.56+) and the model class "
    "allow, else sdpa, else eager",
    "sdpa": "sdpa where the model and torch can run it, else eager",
    "eager": "always eager attention",
}


def _fallback_meaning(value: str | None) -> str:
    if value in (None, "auto"):
        return f"auto (default): {FALLBACK_MEANINGS['auto']}"
    return f"{value}: {FALLBACK_MEANINGS[value]}"


def _backend_meaning(value: str | None) -> str:
    if value in (None, "auto"):
        return "auto (default): the shim picks the SDPA backend per call on CUDA"
    return f"{value}: every SDPA call of a downgraded model uses this backend choice"


def _standin_meaning(value: str | None) -> str:
    if value in TRUE_VALUES:
        return "on: `import flash_attn` resolves to the shim's SDPA stand-in"
    return "off (default): `import flash_attn` is left alone"


def _run_files() -> Report:
    """Where ``sdpa-shim run`` writes its ``sitecustomize.py`` (only where no start-up file is installed)."""
    return {
        "sitecustomize_directory": _startup.sitecustomize_location(),
        "written": not _startup.startup_installed(),
    }


def startup_section() -> Report:
    files = _startup.installed_startup_files()
    reads = ".start (PEP 829)" if sys.version_info >= _startup.PEP_829_PYTHON else ".pth"
    return {
        "installed": _startup.startup_installed(files),
        "files": files,
        "python_reads": reads,
        "site_directories": _startup.site_directories(),
        "no_site": bool(sys.flags.no_site),
        "run_files": _run_files(),
    }
