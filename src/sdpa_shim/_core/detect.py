"""Is flash-attn N usable here, and if not, why?

transformers' own ``is_flash_attn_2_available()`` only reads package metadata, so a flash-attn whose
CUDA extension no longer loads (``undefined symbol`` after a torch upgrade) passes it and fails later.
This module really imports the package, and checks the device and the version, once per process:
the answer is computed at the first flash request and cached.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass

from .faults import one_line
from .names import FLASH_ATTENTION_2, FLASH_ATTN
from .versions import version_tuple

__all__ = ["PACKAGES", "FlashStatus", "clear_cache", "flash_status", "version_tuple"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlashStatus:
    """Whether one flash-attention implementation can run here; ``reason`` says why not."""

    implementation: str  # "flash_attention_2", "flash_attention_3" or "flash_attention_4"
    usable: bool
    reason: str = ""
    version: str | None = None


@dataclass(frozen=True)
class _Package:
    """Where an implementation lives: the import name, its distributions and its needs."""

    label: str  # what users call it in messages
    module: str  # import name to test
    distributions: tuple[str, ...]  # any of these provides it
    min_capability: tuple[int, int]
    min_version: str | None = None  # None: transformers' own minimum is used (FA2)


PACKAGES: dict[str, _Package] = {
    FLASH_ATTENTION_2: _Package("flash-attn", FLASH_ATTN, ("flash-attn", "flash_attn"), (8, 0)),
    "flash_attention_3": _Package(
        "flash-attn 3", "flash_attn_interface", ("flash-attn-3", "flash_attn_3"), (8, 0)
    ),
    "flash_attention_4": _Package("flash-attn 4", "flash_attn.cute", ("flash-attn-4",), (9, 0)),
}

_cache: dict[str, FlashStatus] = {}
_lock = threading.Lock()


def flash_status(implementation: str) -> FlashStatus:
    """The cached answer for ``implementation`` (e.g. "flash_attention_2"); computed on first use."""
    with _lock:
        cached = _cache.get(implementation)
        if cached is None:
            cached = _cache[implementation] = _compute(implementation)
            logger.debug("detection: %s", cached)
        return cached


def clear_cache() -> None:
    """Forget every answer (tests, or after installing flash-attn in a running notebook)."""
    with _lock:
        _cache.clear()


def _compute(implementation: str) -> FlashStatus:
    package = PACKAGES.get(implementation)
    if package is None:
        return FlashStatus(
            implementation, False, f"{implementation} is not an implementation sdpa_shim knows"
        )
    version = _installed_version(package)
    if version is None or not _module_exists(package.module):
        return FlashStatus(implementation, False, f"{package.label} is not installed")
    import_error = _import_error(package.module)
    if import_error:
        return FlashStatus(implementation, False, f"{package.module} import failed: {import_error}", version)
    device_problem = _cuda_problem(package)
    if device_problem:
        return FlashStatus(implementation, False, device_problem, version)
    minimum = package.min_version or transformers_minimum_flash_attn_version()
    if version_tuple(version) < version_tuple(minimum):
        return FlashStatus(
            implementation,
            False,
            f"{package.label} {version} is older than {minimum}, the minimum this transformers accepts",
            version,
        )
    return FlashStatus(implementation, True, "", version)


def _installed_version(package: _Package) -> str | None:
    import importlib.metadata  # deferred: costs ~20 ms, only needed once a flash request arrives

    for name in package.distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # broken metadata counts as "not installed" for transformers too
            logger.debug("reading metadata of %s failed", name, exc_info=True)
    return None


def _module_exists(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # parent package broken, or a module without __spec__
        return False


def _import_error(module: str) -> str:
    """Import ``module`` for real; return the first line of the error, or "" when it imports."""
    try:
        importlib.import_module(module)
    except BaseException as exc:  # a broken extension can raise anything, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        return one_line(exc)
    return ""


def _cuda_problem(package: _Package) -> str:
    """ "" when a CUDA device of sufficient compute capability is the current device, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if getattr(torch.version, "hip", None):
        return ""  # ROCm builds of flash-attn have their own checks; compute capability does not apply
    index = torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability < package.min_capability:
        name = torch.cuda.get_device_name(index)
        need = "{}.{}".format(*package.min_capability)
        return f"{name} has compute capability {capability[0]}.{capability[1]}; {package.label} needs {need}+"
    return ""


def transformers_minimum_flash_attn_version() -> str:
    """The flash-attn version transformers itself requires: 2.3.3 from 5.4, 2.1.0 before."""
    import importlib.metadata

    try:
        transformers_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "2.1.0"
    return "2.3.3" if version_tuple(transformers_version) >= (5, 4) else "2.1.0"
