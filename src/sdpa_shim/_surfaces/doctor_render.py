"""``sdpa-shim doctor``'s text rendering of the report ``doctor.collect`` gathers (a JSON-able dict).

Kept apart from gathering: the facts are tested as data (``--json``), the wording here as text.
"""

from __future__ import annotations

from typing import Any

from .._core.settings import ENABLED_DEFAULT_TEXT, ENV_ENABLED, ENV_FALLBACK, ENV_STANDIN

Report = dict[str, Any]


def default_text(row: Report) -> str:
    if row["name"] == ENV_ENABLED:
        return ENABLED_DEFAULT_TEXT
    if row["name"] == ENV_STANDIN:
        return "off"
    return "auto"


def render(report: Report) -> str:
    """The report as concise text for a terminal."""
    out: list[str] = []
    add = out.append
    add(f"sdpa_shim {report['sdpa_shim']['version']} doctor ({report['sdpa_shim']['location']})")
    versions = report["versions"]
    add("\nVersions")
    add(_row("python", f"{versions['python']}  {versions['python_executable']}"))
    span = report["transformers_range"]
    for name in ("torch", "transformers", "wrapt", "flash-attn", "flash-attn-3"):
        text = versions[name] or "not installed"
        if name == "transformers" and versions[name]:
            tested = f"{span['oldest_supported']} ... {span['newest_tested']}"
            text += f"  (tested: {tested}; this one: {span['status']})"
        add(_row(name, text))
    add("\nCUDA")
    cuda = report["cuda"]
    if cuda.get("error"):
        add(f"  could not check: {cuda['error']}")
    elif not cuda["devices"]:
        add(f"  no device: {cuda['note']}")
    for device in cuda.get("devices", []):
        add(
            _row(
                f"cuda:{device['index']}",
                f"{device['name']}, compute capability {device['compute_capability']}",
            )
        )
    add("\nFlash attention")
    flash = report["flash_attention"]
    if flash.get("error"):
        add(f"  could not check: {flash['error']}")
    else:
        for implementation, status in flash.items():
            text = (
                f"usable (version {status['version']})"
                if status["usable"]
                else f"not usable: {status['reason']}"
            )
            add(_row(implementation, text))
    add("\nSDPA backends (one tiny call each)")
    backends = report["sdpa_backends"]
    if backends.get("error") or backends.get("note"):
        add(f"  {backends.get('error') or backends.get('note')}")
    for result in backends.get("results", []):
        where = f"{result['backend']} {result['device']}/{result['dtype']}"
        if result.get("applicable") is False:
            text = result["note"]
        else:
            text = "works" if result["works"] else f"fails: {result['error']}"
        add(_row(where, text, width=36))
    add("\nA flash_attention_2 request now")
    request = report["request"]
    if request.get("error"):
        add(f"  could not check: {request['error']}")
    else:
        add(f"  {request['model']}: {request['requested']} -> {request['becomes']} ({request['reason']})")
        if request["becomes"] != request["config_reads"]:
            add(f"  the model's config reads {request['config_reads']!r}")
        if request.get("by_fallback"):
            add(f"  with {ENV_FALLBACK}= (* now):")
            for mode, outcome in request["by_fallback"].items():
                mark = "*" if mode == request["fallback"] else " "
                add(_row(f"{mark} {mode}", f"-> {outcome['becomes']}", width=8))
        if request.get("facts"):
            add(f"  model facts: {request['facts']}")
    add("\nEnvironment")
    for row in report["environment"]:
        shown = "unset" if row["raw"] is None else repr(row["raw"])
        meaning = (
            row["meaning"] if row["valid"] else f"INVALID (accepted: {row['accepted']}); treated as unset"
        )
        add(_row(row["name"], f"{shown:<8} {meaning}", width=20))
    add("\nShim")
    shim = report["shim"]
    if shim.get("error"):
        add(f"  could not check: {shim['error']}")
    else:
        how = "at Python start" if shim["activated_at_startup"] else "by import"
        add(_row("active here", f"yes ({how})" if shim["active"] else "no"))
        if shim.get("patched"):
            add(_row("hooks", ", ".join(shim["patched"])))
    startup = report["startup"]
    files = ", ".join(startup["files"]) or "none found"
    add(_row("start-up file", f"{'installed' if startup['installed'] else 'not installed'} ({files})"))
    run_files = startup.get("run_files", {})
    if run_files:
        when = "writes" if run_files["written"] else "would write (only where no start-up file is installed)"
        add(_row("sdpa-shim run", f"{when} sitecustomize.py in {run_files['sitecustomize_directory']}"))
    out.append("")
    for warning in report["warnings"]:
        add(f"note: {warning}")
    for problem in report["problems"]:
        add(f"PROBLEM: {problem}")
    if report["ok"]:
        add("OK: sdpa_shim can do its job here.")
    else:
        count = len(report["problems"])
        add(f"FAILED: {count} problem{'s' if count > 1 else ''} with sdpa_shim's own set-up.")
    return "\n".join(out)


def _row(label: str, text: str, width: int = 18) -> str:
    return f"  {label:<{width}} {text}"
