"""Bands A (4.36-4.45) and B (4.46-4.53): every entry point by which these releases receive a flash
request, under every failure mode a CPU machine can produce (missing / broken / no CUDA), through the
``_autoset_attn_implementation`` classmethod and what bypasses it. Each load must work, run, give the
logits of the SDPA (or eager) reference exactly, and log exactly one WARNING."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import sdpa_shim
from helpers.loading import (
    assert_one_warning,
    load_auto,
    load_config_json,
    load_direct,
    load_with_config_object,
    reference,
    without_shim,
)
from helpers.models import logits, save_tiny_tokenizer, tiny_llama_config, tiny_llava_config

TRANSFORMERS = Version(transformers.__version__)
pytestmark = pytest.mark.skipif(
    Version("4.54") <= TRANSFORMERS, reason="4.54+ entry points are covered by test_entry_points.py"
)
BAND_B = Version("4.46") <= TRANSFORMERS
HAS_USE_FA2 = Version("4.53") > TRANSFORMERS  # removed in 4.53: TypeError from then on


class NoSdpaLlama(LlamaForCausalLM):
    """A class without an SDPA path: an explicit "sdpa" raises for it, so the shim must choose eager."""

    _supports_sdpa = False


def load_pipeline(directory):
    save_tiny_tokenizer(directory)
    generator = transformers.pipeline(
        "text-generation", model=str(directory), model_kwargs={"attn_implementation": "flash_attention_2"}
    )
    out = generator("a b c", max_new_tokens=2, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)
    return generator.model


@pytest.mark.parametrize(
    "load", [load_direct, load_auto, load_config_json, load_with_config_object, load_pipeline]
)
def test_from_pretrained_paths(load, tiny_llama, flash_failure, shim_records):
    _mode, reason = flash_failure
    expected = reference(tiny_llama)
    model = load(tiny_llama)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=0)
    assert_one_warning(shim_records, "LlamaForCausalLM", "flash_attention_2", "sdpa", reason)


def _requested(config):
    config._attn_implementation = "flash_attention_2"
    return config


CONFIG_PATHS = [
    pytest.param(
        lambda cfg: AutoModelForCausalLM.from_config(cfg, attn_implementation="flash_attention_2"),
        id="Auto.from_config",
    ),
    pytest.param(
        lambda cfg: LlamaForCausalLM._from_config(cfg, attn_implementation="flash_attention_2"),
        id="_from_config",
    ),
    pytest.param(lambda cfg: LlamaForCausalLM(_requested(cfg)), id="Model(config)"),
]


def _assert_sdpa_equivalent(model):
    """Same weights in a model whose attention transformers chose without the shim: equal logits."""
    expected = without_shim(lambda: LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")))
    expected.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=0)


@pytest.mark.parametrize("build", CONFIG_PATHS)
def test_config_paths(build, flash_failure, shim_records):
    _mode, reason = flash_failure
    model = build(tiny_llama_config())
    _assert_sdpa_equivalent(model)
    assert_one_warning(shim_records, "LlamaForCausalLM", "flash_attention_2", "sdpa", reason)


@pytest.mark.skipif(not BAND_B, reason="the _attn_implementation_autoset flag exists from 4.46")
@pytest.mark.parametrize("build", CONFIG_PATHS)
def test_reused_config_is_still_validated(build, flash_failure, shim_records):
    """4.46-4.53: a config that built one model skips validation; the shim must still see the request."""
    _mode, reason = flash_failure
    config = tiny_llama_config()
    LlamaForCausalLM(config)
    assert config._attn_implementation_autoset is True
    model = build(config)
    _assert_sdpa_equivalent(model)
    assert_one_warning(shim_records, "LlamaForCausalLM", "flash_attention_2", "sdpa", reason)


@pytest.mark.skipif(not BAND_B, reason="the _attn_implementation_autoset flag exists from 4.46")
def test_reused_config_bypass_exists_without_the_shim():
    """What the __init__ hook closes: without the shim the re-used config silently builds FA2."""
    config = tiny_llama_config()
    LlamaForCausalLM(config)
    model = without_shim(
        lambda: AutoModelForCausalLM.from_config(config, attn_implementation="flash_attention_2")
    )
    assert model.config._attn_implementation == "flash_attention_2"


@pytest.mark.skipif(not BAND_B, reason="the _attn_implementation_autoset flag exists from 4.46")
def test_reused_config_with_from_pretrained(tiny_llama, shim_records):
    config = transformers.AutoConfig.from_pretrained(tiny_llama)
    LlamaForCausalLM(config)
    model = LlamaForCausalLM.from_pretrained(
        tiny_llama, config=config, attn_implementation="flash_attention_2"
    )
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model), logits(reference(tiny_llama)), rtol=0, atol=0)
    assert_one_warning(
        shim_records, "LlamaForCausalLM", "flash_attention_2", "sdpa", "flash-attn is not installed"
    )


def _from_config_use_fa2(directory):
    config = transformers.AutoConfig.from_pretrained(directory)
    return AutoModelForCausalLM.from_config(config, use_flash_attention_2=True)


USE_FA2_LOADS = [
    pytest.param(
        lambda d: LlamaForCausalLM.from_pretrained(d, use_flash_attention_2=True), id="from_pretrained"
    ),
    pytest.param(
        lambda d: AutoModelForCausalLM.from_pretrained(d, use_flash_attention_2=True),
        id="Auto.from_pretrained",
    ),
    pytest.param(_from_config_use_fa2, id="Auto.from_config"),
]


@pytest.mark.parametrize("load", USE_FA2_LOADS)
def test_use_flash_attention_2(load, tiny_llama, flash_failure, shim_records):
    """The deprecated flag is decided like attn_implementation="flash_attention_2" and never passed on
    (4.53 removed it: there it would be a TypeError)."""
    _mode, reason = flash_failure
    model = load(tiny_llama)
    if load is _from_config_use_fa2:
        _assert_sdpa_equivalent(model)  # fresh random weights: compare with the same weights under sdpa
    else:
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(logits(model), logits(reference(tiny_llama)), rtol=0, atol=0)
    assert_one_warning(shim_records, "LlamaForCausalLM", "flash_attention_2", "sdpa", reason)


@pytest.mark.skipif(HAS_USE_FA2, reason="use_flash_attention_2 is accepted before 4.53")
def test_use_flash_attention_2_is_a_type_error_without_the_shim(tiny_llama):
    with pytest.raises(TypeError, match="use_flash_attention_2"):
        without_shim(lambda: LlamaForCausalLM.from_pretrained(tiny_llama, use_flash_attention_2=True))


def test_class_without_sdpa_gets_eager(tiny_llama, shim_records):
    """An explicit "sdpa" raises for classes without SDPA on these releases: the shim picks per class."""
    model = NoSdpaLlama.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "eager"
    expected = reference(tiny_llama, "eager", NoSdpaLlama)
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=0)
    [decision] = sdpa_shim.decisions()
    assert (decision.model, decision.chosen) == ("NoSdpaLlama", "eager")
    assert len(shim_records(logging.WARNING)) == 1


def _implementations(model):
    """{class name: implementation} for the model and every PreTrainedModel inside it."""
    return {
        type(module).__name__: module.config._attn_implementation
        for module in model.modules()
        if isinstance(module, transformers.PreTrainedModel)
    }


def test_composite_string_request(shim_records):
    """A string on a composite reaches every sub-config: the shim downgrades it once, for the composite,
    and leaves each sub-model to transformers' "sdpa where this class can, else eager"."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration._from_config(
        tiny_llava_config(), attn_implementation="flash_attention_2"
    )
    implementations = _implementations(model)
    assert "flash_attention_2" not in implementations.values(), implementations
    [decision] = sdpa_shim.decisions()
    chosen = "sdpa" if LlavaForConditionalGeneration._supports_sdpa else "eager"  # no SDPA path in 4.36
    assert (decision.model, decision.chosen) == ("LlavaForConditionalGeneration", chosen)
    assert len(shim_records(logging.WARNING)) == 1


@pytest.mark.skipif(not BAND_B, reason="dict values for sub-configs exist from 4.46")
def test_dict_request_is_decided_per_sub_model(shim_records):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration._from_config(
        tiny_llava_config(),
        attn_implementation={"text_config": "flash_attention_2", "vision_config": "eager"},
    )
    implementations = _implementations(model)
    assert "flash_attention_2" not in implementations.values(), implementations
    [decision] = sdpa_shim.decisions()
    assert decision.model.startswith("Llama") and decision.chosen == "sdpa"
    assert implementations[decision.model] == "sdpa"
    assert implementations["CLIPVisionModel"] == "eager"
    assert len(shim_records(logging.WARNING)) == 1


def test_hooked_methods_are_the_band_a_b_choke_points():
    from sdpa_shim._integration.patch import patched_methods

    patched = patched_methods()
    assert "PreTrainedModel._autoset_attn_implementation" in patched
    assert ("PreTrainedModel.__init__" in patched) == BAND_B
    assert ("PreTrainedModel.from_pretrained" in patched) == (not HAS_USE_FA2)


def _usable_flash(monkeypatch):
    from sdpa_shim._core import detect as _detect

    usable = _detect.FlashStatus("flash_attention_2", True, "", "2.7.4")
    monkeypatch.setitem(_detect._cache, "flash_attention_2", usable)


def test_usable_flash_in_half_precision_is_left_to_transformers(monkeypatch):
    """Detection faked usable: autoset's ``torch_dtype`` (the dtype the model is built in) is what counts,
    not a float32 config, so the request reaches transformers, whose own check then fails on this CPU."""
    _usable_flash(monkeypatch)
    config = tiny_llama_config(attn_implementation="flash_attention_2", torch_dtype="float32")
    with pytest.raises((ImportError, ValueError)):
        LlamaForCausalLM._autoset_attn_implementation(config, torch_dtype=torch.float16)
    assert sdpa_shim.decisions() == []


def test_usable_flash_in_float32_is_downgraded(monkeypatch):
    _usable_flash(monkeypatch)
    config = tiny_llama_config(attn_implementation="flash_attention_2")
    config = LlamaForCausalLM._autoset_attn_implementation(config, torch_dtype=torch.float32)
    assert config._attn_implementation == "sdpa"
    [decision] = sdpa_shim.decisions()
    assert decision.reason == "float32 weights: flash-attn runs only float16/bfloat16"


def test_requests_that_work_are_left_alone(tiny_llama, shim_records):
    model = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert sdpa_shim.decisions() == []
    assert shim_records(logging.WARNING) == []
