"""``sdpa-shim doctor``: why is flash-attn unusable here, and will the shim do its job?

The report is a plain JSON-able dict (``collect``), rendered as text (``doctor_render``) or JSON.
Every section is gathered defensively: a machine where torch or transformers is missing or broken
still gets a full report, and doctor's own failures become warnings, never tracebacks.
``problems`` lists what stops the shim from doing its job here (the exit code is 1 when there are
any): its own set-up, and an environment where no model can be built at all; ``warnings`` lists what
is worth knowing but does not stop the shim. Sections: ``doctor_system`` (the machine),
``doctor_env`` (variables, start-up), ``doctor_model`` (building a model, what a request becomes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .._core.faults import one_line
from .._core.settings import ENV_ENABLED, TRUE_VALUES, bad_value_message
from .._core.versions import release
from .._version import __version__
from . import doctor_env, doctor_model, doctor_system
from . import startup as _startup
from .doctor_render import default_text, render

Report = dict[str, Any]

REPRESENTATIVE_MODEL = doctor_model.REPRESENTATIVE_MODEL
#: The transformers releases the nox matrix tests (noxfile.py's RELEASES; docs/versions.md): the oldest
#: supported one (older: no ``attn_implementation``, a PROBLEM) and the newest tested one (newer: a warning).
OLDEST_SUPPORTED = (4, 36)
NEWEST_TESTED = (5, 25)


def collect() -> Report:
    """Gather every section of the report (imports torch and transformers when they are installed)."""
    report: Report = {"sdpa_shim": {"version": __version__, "location": str(Path(__file__).parent.parent)}}
    notes: list[str] = []
    report["versions"] = doctor_system.versions()
    report["cuda"] = _guard(doctor_system.cuda, notes, "CUDA")
    report["flash_attention"] = _guard(doctor_system.flash, notes, "flash-attn")
    report["sdpa_backends"] = _guard(doctor_system.sdpa_backends, notes, "SDPA backends")
    report["environment"] = doctor_env.environment()
    report["shim"] = _guard(_shim, notes, "the shim's hooks")
    report["model"] = _guard(doctor_model.build_check, notes, "building a model")
    report["request"] = _guard(
        lambda: doctor_model.request(report["environment"], report["model"]),
        notes,
        "the flash_attention_2 request",
    )
    report["startup"] = doctor_env.startup_section()
    report["transformers_range"] = _transformers_range(report["versions"]["transformers"])
    problems, advice = _assess(report)
    report["problems"] = problems
    report["warnings"] = notes + advice
    report["ok"] = not problems
    return report


def main(as_json: bool = False) -> int:
    """Print the report; 0 when the shim can do its job here, 1 when it cannot."""
    report = collect()
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["ok"] else 1


def _guard(section: Any, notes: list[str], what: str) -> Any:
    try:
        return section()
    except Exception as exc:
        notes.append(f"doctor could not check {what}: {one_line(exc)}")
        return {"error": one_line(exc)}


def _shim() -> Report:
    from .._integration import patch as _patch

    section: Report = {"active": _patch.is_active(), "activated_at_startup": _startup.activated_at_startup()}
    try:
        import wrapt
    except ImportError as exc:
        section.update(wrapt_error=one_line(exc), transformers_imported=False, patched=[])
        return section
    section["wrapt_error"] = ""
    section["wrapt_version"] = getattr(wrapt, "__version__", None)
    try:
        import transformers.modeling_utils  # noqa: F401 - fires the post-import hook that patches
    except ImportError as exc:
        section.update(transformers_imported=False, transformers_error=one_line(exc), patched=[])
        return section
    section.update(transformers_imported=True, transformers_error="", patched=_patch.patched_methods())
    return section


def _transformers_range(version: str | None) -> Report:
    """Where the installed transformers sits against the releases this sdpa_shim is tested with."""
    oldest = ".".join(map(str, OLDEST_SUPPORTED))
    newest = ".".join(map(str, NEWEST_TESTED))
    section: Report = {"oldest_supported": oldest, "newest_tested": newest, "status": "not installed"}
    if version is None:
        return section
    minor = release(version)
    if minor is None:
        section["status"] = "unknown"
    elif minor < OLDEST_SUPPORTED:
        section["status"] = "unsupported"
    elif minor > NEWEST_TESTED:
        section["status"] = "untested"
    else:
        section["status"] = "tested"
    return section


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
    if versions["torch"] is None:
        problems.append("torch is not installed: transformers cannot build a model; pip install torch")
    if versions["transformers"] is None:
        problems.append(
            "transformers is not installed: there is nothing for the shim to patch; pip install transformers"
        )
    elif shim.get("transformers_error"):
        problems.append(f"transformers cannot be imported: {shim['transformers_error']}")
    elif versions["torch"] is not None and report["model"].get("ok") is False:
        model = report["model"]
        cause = f"; cause: {model['cause']}" if model.get("cause") else ""
        where = f", raised in {model['raised_in']}" if model.get("raised_in") else ""
        problems.append(
            f"transformers cannot build a model here ({model['error']}{cause}{where}): every model load "
            "fails, with or without the shim; repair or uninstall that package"
        )
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
