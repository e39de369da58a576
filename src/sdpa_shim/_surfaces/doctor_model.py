"""``doctor``'s two questions about models: can transformers build one here at all, and what does a
flash request become?

The second is answered by ``_integration.resolve.preview``, the decision a load makes (the hooks act on
the same call), on transformers' own ``LlamaForCausalLM``; so doctor cannot say "sdpa" where a load would
take the flash path. When no model can be built (transformers, torch or something transformers imports
is missing or broken), there is no request to answer: that is the PROBLEM doctor reports, with its cause.
"""

from __future__ import annotations

from typing import Any

from .._core.faults import one_line
from .._core.names import FLASH_ATTENTION_2
from .._core.settings import ENV_ENABLED, FALLBACK_VALUES, FALSE_VALUES, read_settings

Report = dict[str, Any]

#: The model class a "what would a request become" answer is given for: a typical decoder that
#: supports both flash attention and SDPA.
REPRESENTATIVE_MODEL = "LlamaForCausalLM"


def build_check() -> Report:
    """Build a tiny ``LlamaForCausalLM`` in memory (a few kB, no download): ``{"ok": True}``, or
    ``{"ok": False, "error": ..., "cause": ...}`` with the innermost exception it came from."""
    try:
        import transformers.modeling_utils  # noqa: F401 - the shim's hooks install now, as in a script
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        LlamaForCausalLM(config)
    except Exception as error:
        cause = _root_cause(error)
        return {
            "ok": False,
            "error": one_line(error),
            "cause": one_line(cause) if cause is not error else "",
            "raised_in": _raised_in(cause),
        }
    return {"ok": True, "error": "", "cause": "", "raised_in": ""}


def _raised_in(error: BaseException) -> str:
    """The module whose code raised ``error`` (the innermost frame): the package to repair."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return str(traceback.tb_frame.f_globals.get("__name__", "")) if traceback is not None else ""


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of the chain (transformers' lazy import hides the real one in it)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def request(environment: list[Report], buildable: Report) -> Report:
    """What ``attn_implementation="flash_attention_2"`` on a typical model becomes right now, under the
    current ``SDPA_SHIM_FALLBACK`` and under each of its values (``resolve.preview``, the load's own)."""
    if any(row["name"] == ENV_ENABLED and row["value"] in FALSE_VALUES for row in environment):
        return {
            "model": REPRESENTATIVE_MODEL,
            "requested": FLASH_ATTENTION_2,
            "becomes": FLASH_ATTENTION_2,
            "config_reads": FLASH_ATTENTION_2,
            "reason": "SDPA_SHIM is off: the request reaches transformers unchanged",
            "by_fallback": {},
        }
    if not buildable.get("ok"):
        return {"error": "no model can be built here, so no request can be answered (see the PROBLEM below)"}
    from transformers import LlamaForCausalLM

    from .._core.detect import flash_status
    from .._integration.resolve import model_facts, preview, probe_target

    device, dtype = probe_target(model_facts(LlamaForCausalLM))
    status = flash_status(FLASH_ATTENTION_2)
    settings = read_settings()
    by_fallback: Report = {}
    for mode in FALLBACK_VALUES:
        previewed = preview(LlamaForCausalLM, FLASH_ATTENTION_2, settings=settings._replace(fallback=mode))
        if previewed is None:
            by_fallback[mode] = {"becomes": FLASH_ATTENTION_2, "config_reads": FLASH_ATTENTION_2}
            continue
        decision, choice = previewed
        by_fallback[mode] = {
            "becomes": decision.chosen,
            "config_reads": choice.value,
            "reason": decision.reason,
        }
    current = by_fallback[settings.fallback]
    if "reason" not in current:
        reason = f"flash-attn {status.version} is usable here: the shim leaves the request alone"
    else:
        reason = current["reason"]
    return {
        "model": REPRESENTATIVE_MODEL,
        "requested": FLASH_ATTENTION_2,
        "becomes": current["becomes"],
        "config_reads": current["config_reads"],
        "reason": reason,
        "fallback": settings.fallback,
        "by_fallback": by_fallback,
        "facts": f"read from transformers' {REPRESENTATIVE_MODEL} class",
        "device": device,
        "dtype": dtype,
    }
