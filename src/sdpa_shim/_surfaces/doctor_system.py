"""``doctor``'s facts about this machine: versions, CUDA devices, flash-attn, one tiny call per SDPA backend.

Each function returns a JSON-able section; ``doctor`` guards every call, so a machine where torch is
missing or broken still gets a report.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any

from .._core.detect import PACKAGES, FlashStatus, flash_status
from .._core.names import FLASH_ATTENTION_2
from .._core.probe import run_probe

Report = dict[str, Any]

#: SDPA backends that exist only on CUDA devices (or, OVERRIDEABLE, only on out-of-tree accelerators):
#: probing them on the CPU says nothing about this machine.
_NOT_ON_CPU = {
    "EFFICIENT_ATTENTION": "n/a (CUDA only)",
    "CUDNN_ATTENTION": "n/a (CUDA only)",
    "OVERRIDEABLE": "n/a (CUDA only; other accelerators' own kernels)",
}


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:
            return None
    return None


def versions() -> Report:
    return {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "torch": _distribution_version("torch"),
        "transformers": _distribution_version("transformers"),
        "wrapt": _distribution_version("wrapt"),
        "flash-attn": _distribution_version(*PACKAGES[FLASH_ATTENTION_2].distributions),
        "flash-attn-3": _distribution_version(*PACKAGES["flash_attention_3"].distributions),
    }


def _torch() -> Any:
    """torch, or None when it is not installed (any other import error is doctor's to report)."""
    try:
        import torch
    except ModuleNotFoundError:
        return None
    return torch


def cuda() -> Report:
    torch = _torch()
    if torch is None:
        return {"available": False, "note": "torch is not installed", "devices": []}
    built_with = getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None)
    if not built_with:
        return {"available": False, "note": f"torch {torch.__version__} is a CPU-only build", "devices": []}
    if not torch.cuda.is_available():
        return {
            "available": False,
            "note": f"torch is built for CUDA {built_with} but sees no device",
            "devices": [],
        }
    devices = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        devices.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "compute_capability": f"{major}.{minor}",
            }
        )
    return {"available": True, "note": f"CUDA {built_with}", "devices": devices}


def flash() -> Report:
    section: Report = {}
    for implementation in PACKAGES:
        status: FlashStatus = flash_status(implementation)
        section[implementation] = {
            "usable": status.usable,
            "reason": status.reason,
            "version": status.version,
        }
    return section


def _probe_targets(torch: Any) -> list[tuple[str, str]]:
    targets = [("cpu", "float32")]
    if torch.cuda.is_available():
        targets.append(("cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"))
    return targets


def sdpa_backends() -> Report:
    """Run one tiny attention call per SDPA backend, device and dtype."""
    torch = _torch()
    if torch is None:
        return {"note": "torch is not installed", "results": []}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401 - both needed by the probe
    except ImportError:
        return {"note": f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel", "results": []}
    backends = [name for name in SDPBackend.__members__ if name != "ERROR"]
    results = []
    for device, dtype in _probe_targets(torch):
        for name in backends:
            if device == "cpu" and name in _NOT_ON_CPU:
                results.append(
                    {
                        "backend": name,
                        "device": device,
                        "dtype": dtype,
                        "works": None,
                        "error": "",
                        "applicable": False,
                        "note": _NOT_ON_CPU[name],
                    }
                )
                continue
            error = _probe_backend(SDPBackend.__members__[name], device, dtype)
            results.append(
                {
                    "backend": name,
                    "device": device,
                    "dtype": dtype,
                    "works": not error,
                    "error": error,
                    "applicable": True,
                    "note": "",
                }
            )
    return {"note": "", "results": results}


def _probe_backend(backend: Any, device: str, dtype_name: str) -> str:
    """The shim's own SDPA probe, forced onto one backend; the error's first sentence."""
    return run_probe(device, dtype_name, backend).split(". ")[0]
