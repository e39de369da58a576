"""``sdpa-shim doctor``: why is flash-attn unusable here, and will the shim do its job?

The report is a plain JSON-able dict (``collect``), rendered as text (``doctor_render``) or JSON.
Every section is gathered defensively: a machine where torch or transformers is missing or broken
still gets a full report, and doctor's own failures become warnings, never tracebacks.
``problems`` lists what breaks the shim's own set-up (the exit code is 1 when there are any);
``warnings`` lists what is worth knowing but does not stop the shim.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .._core.detect import PACKAGES, FlashStatus, flash_status, version_tuple
from .._core.settings import (
    BACKEND_VALUES,
    BOOL_ACCEPTED,
    ENV_BACKEND,
    ENV_ENABLED,
    ENV_FALLBACK,
    ENV_STANDIN,
    FALLBACK_VALUES,
    FALSE_VALUES,
    TRUE_VALUES,
    bad_value_message,
)
from .._version import __version__
from . import startup as _startup
from .doctor_render import default_text, render

Report = dict[str, Any]

#: The model class a "what would a request become" answer is given for: a typical decoder that
#: supports both flash attention and SDPA.
REPRESENTATIVE_MODEL = "LlamaForCausalLM"
_BOOL_TEXT = BOOL_ACCEPTED
#: The transformers releases the nox matrix tests (noxfile.py's RELEASES; docs/versions.md): the oldest
#: supported one (older: no ``attn_implementation``, a PROBLEM) and the newest tested one (newer: a warning).
OLDEST_SUPPORTED = (4, 36)
NEWEST_TESTED = (5, 25)
#: SDPA backends that exist only on CUDA devices (or, OVERRIDEABLE, only on out-of-tree accelerators):
#: probing them on the CPU says nothing about this machine.
_NOT_ON_CPU = {
    "EFFICIENT_ATTENTION": "n/a (CUDA only)",
    "CUDNN_ATTENTION": "n/a (CUDA only)",
    "OVERRIDEABLE": "n/a (CUDA only; other accelerators' own kernels)",
}


def collect() -> Report:
    """Gather every section of the report (imports torch and transformers when they are installed)."""
    report: Report = {"sdpa_shim": {"version": __version__, "location": str(Path(__file__).parent.parent)}}
    notes: list[str] = []
    report["versions"] = _versions()
    report["cuda"] = _guard(_cuda, notes, "CUDA")
    report["flash_attention"] = _guard(_flash, notes, "flash-attn")
    report["sdpa_backends"] = _guard(_sdpa_backends, notes, "SDPA backends")
    report["environment"] = _environment()
    report["shim"] = _guard(_shim, notes, "the shim's hooks")
    report["request"] = _guard(
        lambda: _request(report["environment"]), notes, "the flash_attention_2 request"
    )
    report["startup"] = _startup_section()
    report["transformers_range"] = _transformers_range(report["versions"]["transformers"])
    problems, advice = _assess(report)
    report["problems"] = problems
    report["warnings"] = notes + advice
    report["ok"] = not problems
    return report


def main(as_json: bool = False) -> int:
    """Print the report; 0 when the shim can do its job here, 1 when its own set-up is broken."""
    report = collect()
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["ok"] else 1


def _guard(section: Any, notes: list[str], what: str) -> Any:
    try:
        return section()
    except Exception as exc:
        notes.append(f"doctor could not check {what}: {_one_line(exc)}")
        return {"error": _one_line(exc)}


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:
            return None
    return None


def _versions() -> Report:
    return {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "torch": _distribution_version("torch"),
        "transformers": _distribution_version("transformers"),
        "wrapt": _distribution_version("wrapt"),
        "flash-attn": _distribution_version(*PACKAGES["flash_attention_2"].distributions),
        "flash-attn-3": _distribution_version(*PACKAGES["flash_attention_3"].distributions),
    }


def _torch() -> Any:
    """torch, or None when it is not installed (any other import error is doctor's to report)."""
    try:
        import torch
    except ModuleNotFoundError:
        return None
    return torch


def _cuda() -> Report:
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


def _flash() -> Report:
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


def _sdpa_backends() -> Report:
    """Run one tiny attention call per SDPA backend, device and dtype."""
    torch = _torch()
    if torch is None:
        return {"note": "torch is not installed", "results": []}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
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
            error = _probe_backend(torch, sdpa_kernel, SDPBackend.__members__[name], device, dtype)
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


def _probe_backend(torch: Any, sdpa_kernel: Any, backend: Any, device: str, dtype_name: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch explains each refused kernel in a UserWarning
            with sdpa_kernel(backend):
                q = torch.randn(1, 2, 8, 16, device=device, dtype=getattr(torch, dtype_name))
                out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        if not bool(torch.isfinite(out).all()):
            return "returned non-finite values"
    except Exception as exc:
        text = _one_line(exc)
        return text.split(". ")[0]
    return ""


def _environment() -> list[Report]:
    variables = [
        (ENV_ENABLED, TRUE_VALUES | FALSE_VALUES, _BOOL_TEXT, _enabled_meaning),
        (ENV_FALLBACK, frozenset(FALLBACK_VALUES), "/".join(FALLBACK_VALUES), _fallback_meaning),
        (ENV_BACKEND, frozenset(BACKEND_VALUES), "/".join(BACKEND_VALUES), _backend_meaning),
        (ENV_STANDIN, TRUE_VALUES | FALSE_VALUES, _BOOL_TEXT, _standin_meaning),
    ]
    rows = []
    for name, accepted, accepted_text, meaning in variables:
        raw = os.environ.get(name)
        value = None if raw is None or not raw.strip() else raw.strip().lower()
        valid = value is None or value in accepted
        rows.append(
            {
                "name": name,
                "raw": raw,
                "value": value if valid else None,
                "valid": valid,
                "accepted": accepted_text,
                "meaning": meaning(value if valid else None),
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


def _shim() -> Report:
    from .._integration import patch as _patch

    section: Report = {"active": _patch.is_active(), "activated_at_startup": _startup.activated_at_startup()}
    try:
        import wrapt
    except ImportError as exc:
        section.update(wrapt_error=_one_line(exc), transformers_imported=False, patched=[])
        return section
    section["wrapt_error"] = ""
    section["wrapt_version"] = getattr(wrapt, "__version__", None)
    try:
        import transformers.modeling_utils  # noqa: F401 - fires the post-import hook that patches
    except ImportError as exc:
        section.update(transformers_imported=False, transformers_error=_one_line(exc), patched=[])
        return section
    section.update(transformers_imported=True, transformers_error="", patched=_patch.patched_methods())
    return section


def _request(environment: list[Report]) -> Report:
    """What ``attn_implementation="flash_attention_2"`` on a typical model becomes right now, under the
    current ``SDPA_SHIM_FALLBACK`` and under each of its values, decided by the code a real load runs
    (``_integration.resolve.model_facts`` on transformers' own ``LlamaForCausalLM`` where it imports)."""
    from .._core import probe as _probe
    from .._core.policy import FLASH_PATH, decide, served_name
    from .._core.settings import read_settings
    from .._integration.resolve import probe_target

    if any(row["name"] == ENV_ENABLED and row["value"] in FALSE_VALUES for row in environment):
        return {
            "model": REPRESENTATIVE_MODEL,
            "requested": "flash_attention_2",
            "becomes": "flash_attention_2",
            "config_reads": "flash_attention_2",
            "reason": "SDPA_SHIM is off: the request reaches transformers unchanged",
            "by_fallback": {},
        }
    facts, facts_note = _representative_facts()
    device, dtype = probe_target(facts)
    status = flash_status("flash_attention_2")
    settings = read_settings()
    by_fallback: Report = {}
    for mode in FALLBACK_VALUES:
        decision = decide(
            "flash_attention_2",
            status,
            facts,
            settings._replace(fallback=mode),
            lambda: _probe.sdpa_error(device, dtype),
        )
        if decision is None:
            by_fallback[mode] = {"becomes": "flash_attention_2", "config_reads": "flash_attention_2"}
            continue
        config_reads = (
            served_name(decision.requested, facts.registered)
            if decision.chosen == FLASH_PATH
            else decision.chosen
        )
        by_fallback[mode] = {
            "becomes": decision.chosen,
            "config_reads": config_reads,
            "reason": decision.reason,
        }
    current = by_fallback[settings.fallback]
    if "reason" not in current:
        reason = f"flash-attn {status.version} is usable here: the shim leaves the request alone"
    else:
        reason = current["reason"]
    return {
        "model": REPRESENTATIVE_MODEL,
        "requested": "flash_attention_2",
        "becomes": current["becomes"],
        "config_reads": current["config_reads"],
        "reason": reason,
        "fallback": settings.fallback,
        "by_fallback": by_fallback,
        "facts": facts_note,
        "device": device,
        "dtype": dtype,
    }


def _representative_facts() -> tuple[Any, str]:
    """The facts a real load of ``LlamaForCausalLM`` gathers (flash paths included), and their source."""
    from .._core.policy import ModelFacts
    from .._integration.resolve import _registered_names, model_facts

    try:
        import transformers.modeling_utils  # noqa: F401 - the shim's hooks and registry entries install now
        from transformers import LlamaForCausalLM
    except Exception as exc:
        facts = ModelFacts(name=REPRESENTATIVE_MODEL, supports_sdpa=True, registered=_registered_names())
        return facts, f"transformers' {REPRESENTATIVE_MODEL} could not be imported ({_one_line(exc)})"
    return model_facts(LlamaForCausalLM), f"read from transformers' {REPRESENTATIVE_MODEL} class"


def _transformers_range(version: str | None) -> Report:
    """Where the installed transformers sits against the releases this sdpa_shim is tested with."""
    oldest = ".".join(map(str, OLDEST_SUPPORTED))
    newest = ".".join(map(str, NEWEST_TESTED))
    section: Report = {"oldest_supported": oldest, "newest_tested": newest, "status": "not installed"}
    if version is None:
        return section
    release = _release(version)
    if release is None:
        section["status"] = "unknown"
    elif release < OLDEST_SUPPORTED:
        section["status"] = "unsupported"
    elif release > NEWEST_TESTED:
        section["status"] = "untested"
    else:
        section["status"] = "tested"
    return section


def _release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as ``5.24.0`` or ``5.25.0.dev0``; None when unreadable."""
    parts = version_tuple(version)
    return (parts[0], parts[1]) if len(parts) >= 2 else None


def _run_files() -> Report:
    """Where ``sdpa-shim run`` writes its ``sitecustomize.py`` (only where no start-up file is installed)."""
    return {
        "sitecustomize_directory": _startup.sitecustomize_location(),
        "written": not _startup.startup_installed(),
    }


def _startup_section() -> Report:
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


def _assess(report: Report) -> tuple[list[str], list[str]]:
    """(problems: the shim's own set-up is broken; warnings: worth knowing, not fatal)."""
    problems: list[str] = []
    advice: list[str] = []
    env = {row["name"]: row for row in report["environment"]}
    for row in report["environment"]:
        if not row["valid"]:
            problems.append(bad_value_message(row["name"], row["raw"], row["accepted"], default_text(row)))
    shim = report["shim"]
    versions = report["versions"]
    if shim.get("wrapt_error"):
        problems.append(
            f"wrapt cannot be imported ({shim['wrapt_error']}): pip install 'wrapt>=1.14,!=2.2.0'"
        )
    elif versions["wrapt"] == "2.2.0":
        problems.append("wrapt 2.2.0 is excluded (known broken): pip install 'wrapt!=2.2.0'")
    span = report["transformers_range"]
    if span["status"] == "unsupported":
        problems.append(
            f"transformers {versions['transformers']} is not supported: the oldest supported release is "
            f"{span['oldest_supported']} (no attn_implementation before); pip install 'transformers>="
            f"{span['oldest_supported']}'"
        )
    elif span["status"] == "untested":
        advice.append(
            f"transformers {versions['transformers']} is untested; newest tested is {span['newest_tested']}"
        )
    if versions["transformers"] is None:
        advice.append("transformers is not installed: there is nothing for the shim to patch")
    elif shim.get("transformers_error"):
        advice.append(f"transformers cannot be imported: {shim['transformers_error']}")
    elif (
        span["status"] != "unsupported"
        and shim.get("active")
        and shim.get("transformers_imported")
        and not shim.get("patched")
    ):
        problems.append(
            f"sdpa_shim found no attention hook in transformers {versions['transformers']}: "
            "requests pass unchanged"
        )
    startup = report["startup"]
    if env[ENV_ENABLED]["value"] in TRUE_VALUES:
        if not startup["installed"]:
            problems.append(
                "SDPA_SHIM is on but no sdpa_shim start-up file is installed for this Python "
                f"({sys.executable}): reinstall sdpa_shim with pip, or use `sdpa-shim run -- CMD`"
            )
        elif not shim.get("activated_at_startup") and not startup["no_site"]:
            advice.append(
                "SDPA_SHIM is on and the start-up file is installed, but it did not run in this process"
            )
    request = report["request"]
    if request.get("becomes") == "eager":
        advice.append(f"a flash_attention_2 request would fall back to eager: {request['reason']}")
    return problems, advice
