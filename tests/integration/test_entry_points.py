"""Every entry point by which transformers (4.54+) receives an attention request, under every
failure mode a CPU machine can produce: the model loads, runs, matches the SDPA reference, and
exactly one WARNING names the model class, the request, the choice and the reason."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from helpers.expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION, SERVES_FLASH_PATH
from helpers.loading import (
    assert_one_warning,
    load_auto,
    load_config_json,
    load_direct,
    load_with_config_object,
    reference,
    without_shim,
)
from helpers.models import input_ids, logits, tiny_llama_config

TRANSFORMERS = Version(transformers.__version__)
pytestmark = pytest.mark.skipif(
    Version("4.54") > TRANSFORMERS, reason="bands A/B are covered by test_legacy_*"
)


@pytest.mark.parametrize("load", [load_direct, load_auto, load_config_json, load_with_config_object])
def test_from_pretrained_paths(load, tiny_llama, flash_failure, shim_records):
    _mode, reason = flash_failure
    expected = reference(tiny_llama)
    model = load(tiny_llama)
    assert model.config._attn_implementation == EXPECTED_IMPLEMENTATION
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=0)
    assert_one_warning(shim_records, "LlamaForCausalLM", "flash_attention_2", EXPECTED_CHOSEN, reason)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda cfg: AutoModelForCausalLM.from_config(cfg, attn_implementation="flash_attention_2"),
            id="Auto.from_config",
        ),
        pytest.param(
            lambda cfg: LlamaForCausalLM._from_config(cfg, attn_implementation="flash_attention_2"),
            id="_from_config",
        ),
        pytest.param(lambda cfg: LlamaForCausalLM(_with_request(cfg)), id="Model(config)"),
    ],
)
def test_config_paths(build, flash_failure, shim_records):
    _mode, reason = flash_failure
    model = build(tiny_llama_config())
    expected = without_shim(lambda: LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")))
    expected.load_state_dict(model.state_dict())  # same weights, attention chosen without the shim
    assert model.config._attn_implementation == EXPECTED_IMPLEMENTATION
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=0)
    assert_one_warning(shim_records, "LlamaForCausalLM", "flash_attention_2", EXPECTED_CHOSEN, reason)


def _with_request(config):
    config._attn_implementation = "flash_attention_2"
    return config


def test_set_attn_implementation(tiny_llama, flash_failure, shim_records):
    _mode, reason = flash_failure
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    model.set_attn_implementation("flash_attention_2")
    assert model.config._attn_implementation == EXPECTED_IMPLEMENTATION
    torch.testing.assert_close(logits(model), logits(reference(tiny_llama)), rtol=0, atol=0)
    assert_one_warning(shim_records, "LlamaForCausalLM", "flash_attention_2", EXPECTED_CHOSEN, reason)


def test_paged_prefix(tiny_llama, shim_records):
    registry = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS
    if "paged|sdpa" not in registry and Version("5.23") > TRANSFORMERS:
        pytest.skip(f"transformers {TRANSFORMERS} has no paged attention names")
    target = "flash_attention_2" if SERVES_FLASH_PATH else "sdpa"
    expected_name = f"paged|{target}" if f"paged|{target}" in registry else target
    model = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="paged|flash_attention_2")
    assert model.config._attn_implementation == expected_name
    assert_one_warning(
        shim_records,
        "LlamaForCausalLM",
        "paged|flash_attention_2",
        EXPECTED_CHOSEN if SERVES_FLASH_PATH else expected_name,
        "flash-attn is not installed",
    )


def test_pipeline_model_kwargs(tiny_llama, shim_records):
    from helpers.models import save_tiny_tokenizer

    save_tiny_tokenizer(tiny_llama)
    generator = transformers.pipeline(
        "text-generation", model=str(tiny_llama), model_kwargs={"attn_implementation": "flash_attention_2"}
    )
    assert generator.model.config._attn_implementation == EXPECTED_IMPLEMENTATION
    out = generator("a b c", max_new_tokens=3, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)
    assert_one_warning(
        shim_records, "LlamaForCausalLM", "flash_attention_2", EXPECTED_CHOSEN, "flash-attn is not installed"
    )


@pytest.mark.parametrize("version", ["flash_attention_3", "flash_attention_4"])
def test_newer_flash_versions_when_missing(tiny_llama, version, shim_records):
    registry = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS
    if version not in registry:
        pytest.skip(f"transformers {TRANSFORMERS} does not know {version}")
    model = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation=version)
    assert model.config._attn_implementation == EXPECTED_IMPLEMENTATION
    label = {"flash_attention_3": "flash-attn 3", "flash_attention_4": "flash-attn 4"}[version]
    assert_one_warning(
        shim_records, "LlamaForCausalLM", version, EXPECTED_CHOSEN, f"{label} is not installed"
    )


def test_generate_after_downgrade(tiny_llama):
    model = load_direct(tiny_llama)
    expected = reference(tiny_llama)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(input_ids(), **kwargs), expected.generate(input_ids(), **kwargs))
