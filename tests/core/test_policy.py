"""The pure policy and the environment parsing: examples plus property tests (hypothesis)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdpa_shim._core.detect import FlashStatus
from sdpa_shim._core.policy import (
    FLASH_PATH,
    Decision,
    ModelFacts,
    decide,
    flash_implementation,
    served_name,
)
from sdpa_shim._core.settings import (
    BACKEND_VALUES,
    FALLBACK_VALUES,
    FALSE_VALUES,
    TRUE_VALUES,
    Settings,
    read_settings,
    reset_warnings,
)

MISSING = FlashStatus("flash_attention_2", False, "flash-attn is not installed")
USABLE = FlashStatus("flash_attention_2", True, "", "2.7.4")
LLAMA = ModelFacts("LlamaForCausalLM", supports_sdpa=True, dtype="bfloat16")


def ok() -> str:
    return ""


def forbidden() -> str:
    raise AssertionError("the SDPA probe must not run for this decision")


def test_examples():
    assert decide("flash_attention_2", MISSING, LLAMA, Settings(), ok) == Decision(
        "LlamaForCausalLM", "flash_attention_2", "sdpa", "flash-attn is not installed"
    )
    assert decide("flash_attention_2", USABLE, LLAMA, Settings(), ok) is None
    no_sdpa = ModelFacts("LlamaFooModel", supports_sdpa=False)
    assert decide("flash_attention_2", MISSING, no_sdpa, Settings(), ok).reason == (
        "flash-attn is not installed; LlamaFooModel has no SDPA path"
    )
    failing = decide("flash_attention_2", MISSING, LLAMA, Settings(), lambda: "RuntimeError: no kernel")
    assert (failing.chosen, failing.reason) == (
        "eager",
        "flash-attn is not installed; SDPA failed here: RuntimeError: no kernel",
    )
    fp32 = decide("flash_attention_2", USABLE, ModelFacts("M", True, dtype="float32"), Settings(), ok)
    assert (fp32.chosen, fp32.reason) == ("sdpa", "float32 weights: flash-attn runs only float16/bfloat16")
    unsupported = decide(
        "flash_attention_2", USABLE, ModelFacts("M", True, supports_flash=False), Settings(), ok
    )
    assert unsupported.reason == "M does not support flash attention"
    paged = ModelFacts("M", True, registered=frozenset({"paged|sdpa"}))
    assert decide("paged|flash_attention_2", MISSING, paged, Settings(), ok).chosen == "paged|sdpa"
    assert decide("paged|flash_attention_2", MISSING, LLAMA, Settings(), ok).chosen == "sdpa"


def test_probe_only_called_when_sdpa_is_a_candidate():
    def forbidden() -> str:
        raise AssertionError("probe must not run")

    assert decide("flash_attention_2", USABLE, LLAMA, Settings(), forbidden) is None
    assert decide("sdpa", MISSING, LLAMA, Settings(), forbidden) is None
    assert (
        decide("flash_attention_2", MISSING, LLAMA, Settings(fallback="eager"), forbidden).chosen == "eager"
    )
    assert (
        decide("flash_attention_2", MISSING, ModelFacts("M", False), Settings(), forbidden).chosen == "eager"
    )


requests = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "flash_attention_2",
            "flash_attention_3",
            "flash_attention_4",
            "paged|flash_attention_2",
            "sdpa",
            "eager",
            "flex_attention",
            "paged|sdpa",
            "kernels-community/flash-attn2",
            "",
        ]
    ),
    st.text(max_size=30),
)
statuses = st.builds(
    FlashStatus, st.just("flash_attention_2"), st.booleans(), st.text(min_size=1, max_size=40)
)
facts = st.builds(
    ModelFacts,
    st.from_regex(r"[A-Z][A-Za-z]{0,20}", fullmatch=True),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, "float16", "bfloat16", "float32"]),
    st.frozensets(st.sampled_from(["sdpa", "paged|sdpa", "paged|eager", "flash_attention_2"])),
    st.booleans(),
    st.sampled_from(["", "_supports_sdpa is computed (property), not a plain class attribute"]),
)
settings_values = st.builds(Settings, st.sampled_from([None, True]), st.sampled_from(FALLBACK_VALUES))
probe_results = st.sampled_from(["", "RuntimeError: boom"])


@settings(max_examples=400, deadline=None)
@given(requests, statuses, facts, settings_values, probe_results)
def test_policy_properties(requested, status, model, shim_settings, probe_result):
    decision = decide(requested, status, model, shim_settings, lambda: probe_result)
    if flash_implementation(requested) is None:
        assert decision is None  # non-flash requests are never touched
        return
    would_work = status.usable and model.supports_flash and model.dtype in (None, "float16", "bfloat16")
    if would_work:
        assert decision is None  # requests that would work are never touched
        return
    assert decision is not None
    assert decision.model == model.name and decision.requested == requested
    if decision.chosen == FLASH_PATH:  # kept on the flash path: only when asked (auto), possible, and needed
        assert shim_settings.fallback == "auto" and model.flash_paths and not status.usable
        assert decision.reason == status.reason
        return
    base = decision.chosen.removeprefix("paged|")
    assert base in ("sdpa", "eager")
    assert not (shim_settings.fallback == "auto" and model.flash_paths and not status.usable)
    if base == "sdpa":
        assert model.supports_sdpa and shim_settings.fallback in ("auto", "sdpa") and probe_result == ""
        assert not model.facts_error
    else:
        assert (
            not model.supports_sdpa or shim_settings.fallback == "eager" or probe_result or model.facts_error
        )
    assert decision.reason.startswith(status.reason if not status.usable else "")
    if decision.chosen.startswith("paged|"):
        assert requested.startswith("paged|") and decision.chosen in model.registered


VARIABLES = {
    "SDPA_SHIM": ("enabled", None),
    "SDPA_SHIM_FALLBACK": ("fallback", "auto"),
    "SDPA_SHIM_BACKEND": ("backend", "auto"),
    "SDPA_SHIM_STANDIN": ("standin_everywhere", False),
}
VALID = {
    "SDPA_SHIM": TRUE_VALUES | FALSE_VALUES,
    "SDPA_SHIM_FALLBACK": set(FALLBACK_VALUES),
    "SDPA_SHIM_BACKEND": set(BACKEND_VALUES),
    "SDPA_SHIM_STANDIN": TRUE_VALUES | FALSE_VALUES,
}


@pytest.mark.parametrize("name", sorted(VARIABLES))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.text(max_size=20))
def test_env_fuzz_never_raises_and_warns_once(name, raw, caplog):
    attribute, default = VARIABLES[name]
    reset_warnings()
    caplog.clear()  # the fixture is shared by all examples: start each one empty
    with caplog.at_level(logging.WARNING, logger="sdpa_shim"):
        first = read_settings({name: raw})
        second = read_settings({name: raw})
    value = getattr(first, attribute)
    assert first == second
    warnings = [r for r in caplog.records if r.name.startswith("sdpa_shim")]
    if raw.strip().lower() in VALID[name] or not raw.strip():
        assert warnings == []
    else:
        assert value == default
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert message.startswith(f"{name}={raw!r} is not valid; accepted values: ")
        assert "using " in message


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("1", True),
        ("TRUE", True),
        (" on ", True),
        ("yes", True),
        ("0", False),
        ("False", False),
        ("off", False),
        ("NO", False),
        ("", None),
    ],
)
def test_enabled_values(raw, expected):
    assert read_settings({"SDPA_SHIM": raw}).enabled is expected


def test_flash_path_kept_where_the_release_and_class_allow():
    servable = ModelFacts("LlamaForCausalLM", supports_sdpa=True, flash_paths=True)
    decision = decide("flash_attention_2", MISSING, servable, Settings(), forbidden)
    assert decision == Decision("LlamaForCausalLM", "flash_attention_2", FLASH_PATH, MISSING.reason)
    # the plain downgrade when asked for, and wherever the flash path cannot be served
    assert decide("flash_attention_2", MISSING, servable, Settings(fallback="sdpa"), ok).chosen == "sdpa"
    assert decide("flash_attention_2", MISSING, LLAMA, Settings(), ok).chosen == "sdpa"


def test_flash_path_never_replaces_a_usable_flash_attn_that_cannot_take_float32():
    """flash-attn usable but float32 weights: its kernels would be the ones called, so sdpa instead."""
    fp32 = ModelFacts("M", True, dtype="float32", flash_paths=True)
    assert decide("flash_attention_2", USABLE, fp32, Settings(), ok).chosen == "sdpa"


def test_unreadable_sdpa_support_chooses_eager_and_says_why():
    computed = ModelFacts(
        "Florence2", supports_sdpa=False, facts_error="_supports_sdpa is computed (property)"
    )
    decision = decide("flash_attention_2", MISSING, computed, Settings(fallback="sdpa"), forbidden)
    assert decision.chosen == "eager"
    assert "SDPA support could not be read (_supports_sdpa is computed (property))" in decision.reason


def test_served_name_keeps_paged_only_where_registered():
    assert served_name("flash_attention_3", frozenset()) == "flash_attention_2"
    assert served_name("paged|flash_attention_2", frozenset()) == "flash_attention_2"
    registered = frozenset({"paged|flash_attention_2"})
    assert served_name("paged|flash_attention_2", registered) == "paged|flash_attention_2"
