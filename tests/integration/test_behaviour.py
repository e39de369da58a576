"""What the shim does beyond the plain downgrade: composite models, classes without SDPA, the
environment switches, requests it must leave alone, and faithful pass-through of transformers'
own errors when it is off."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import sdpa_shim
from helpers.expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION
from helpers.loading import without_shim, write_config_request
from helpers.models import input_ids, logits, save_tiny_llava, tiny_llama_config

TRANSFORMERS = Version(transformers.__version__)
pytestmark = pytest.mark.skipif(
    Version("4.54") > TRANSFORMERS, reason="bands A/B are covered by test_legacy_*"
)


class NoSdpaLlama(LlamaForCausalLM):
    """A real transformers model class that declares no SDPA path (like many older architectures)."""

    _supports_sdpa = False


def load_error(load) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        load()
    return type(info.value), str(info.value)


def test_class_without_sdpa_gets_eager(tiny_llama, flash_failure, shim_records):
    _, reason = flash_failure
    model = NoSdpaLlama.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "eager"
    expected = without_shim(lambda: LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager"))
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=0)
    [warning] = shim_records()
    assert f"NoSdpaLlama requested flash_attention_2; using eager instead: {reason}" in warning.getMessage()
    assert "NoSdpaLlama has no SDPA path" in warning.getMessage()


def test_fallback_eager_from_env(tiny_llama, monkeypatch, shim_records):
    monkeypatch.setenv("SDPA_SHIM_FALLBACK", "EAGER")
    model = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "eager"
    [warning] = shim_records()
    assert warning.getMessage().endswith(
        "LlamaForCausalLM requested flash_attention_2; using eager instead: "
        "flash-attn is not installed; SDPA_SHIM_FALLBACK=eager"
    )


@pytest.mark.parametrize("requested", ["sdpa", "eager", None])
def test_other_requests_untouched(tiny_llama, requested, shim_records, caplog):
    kwargs = {} if requested is None else {"attn_implementation": requested}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, **kwargs)
    assert model.config._attn_implementation == (requested or "sdpa")
    assert shim_records(logging.DEBUG) == []
    assert sdpa_shim.decisions() == []


@pytest.mark.parametrize("off", ["0", "false", "OFF", "No"])
def test_env_off_gives_transformers_own_error(tiny_llama, monkeypatch, off, shim_records):
    sdpa_shim.deactivate()
    original = load_error(
        lambda: LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    )
    monkeypatch.setenv("SDPA_SHIM", off)
    assert sdpa_shim.activate() is False
    assert not sdpa_shim.is_active()
    again = load_error(
        lambda: LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    )
    assert again == original
    assert "flash" in original[1].lower() or "Flash" in original[1]
    assert shim_records() == []


def test_env_off_while_active_passes_through(tiny_llama, monkeypatch):
    """SDPA_SHIM is read per decision: turning it off in a running process stops the downgrades."""
    monkeypatch.setenv("SDPA_SHIM", "0")
    with pytest.raises((ImportError, ValueError)):
        LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")


def test_deactivate_restores_identity_and_error(tiny_llama):
    owner = transformers.modeling_utils.PreTrainedModel
    names = ["_check_and_adjust_attn_implementation", "get_correct_attn_implementation"]
    patched = {name: vars(owner).get(name) for name in names}
    sdpa_shim.deactivate()
    restored = {name: vars(owner).get(name) for name in names}
    for name in names:
        if patched[name] is not None:
            assert patched[name] is not restored[name]
            assert patched[name].__wrapped__ is restored[name]
    registry = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS
    assert not hasattr(registry["sdpa"], "__sdpa_shim_original__")
    with pytest.raises((ImportError, ValueError)):
        LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    sdpa_shim.activate()
    assert vars(owner)[names[0]].__wrapped__ is restored[names[0]]
    assert LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")


def test_activate_twice_wraps_once():
    owner = transformers.modeling_utils.PreTrainedModel
    before = vars(owner)["_check_and_adjust_attn_implementation"]
    sdpa_shim.activate()
    sdpa_shim.activate()
    after = vars(owner)["_check_and_adjust_attn_implementation"]
    assert after is before
    assert not hasattr(after.__wrapped__, "__wrapped__")  # one layer only


@pytest.mark.skipif(
    Version("4.56") > TRANSFORMERS,
    reason="dict requests on Llava raise AttributeError in transformers <= 4.55 itself",
)
def test_composite_dict_request_decides_each_sub_model(tmp_path, shim_records):
    from transformers import LlavaForConditionalGeneration

    directory = save_tiny_llava(tmp_path / "llava")
    request = {"text_config": "flash_attention_2", "vision_config": "sdpa", "": "flash_attention_2"}
    caller_dict = dict(request)
    model = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation=caller_dict)
    assert caller_dict == request  # never mutated
    assert model.config._attn_implementation == EXPECTED_IMPLEMENTATION
    assert model.config.text_config._attn_implementation == EXPECTED_IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"
    decided = sorted((d.model, d.requested, d.chosen) for d in sdpa_shim.decisions())
    assert decided == [
        ("LlamaModel", "flash_attention_2", EXPECTED_CHOSEN),
        ("LlavaForConditionalGeneration", "flash_attention_2", EXPECTED_CHOSEN),
    ]
    assert len(shim_records()) == 1  # one WARNING per composite load (sub-models at DEBUG)
    expected = without_shim(
        lambda: LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa")
    )
    pixel_values = torch.randn(1, 3, 28, 28)
    ids = torch.tensor([[1, 100, 100, 100, 100, 5, 9]])  # 4 image tokens: (28 / 14) ** 2 patches
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixel_values).logits
        want = expected(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_composite_sub_config_request_uses_sub_model_class(tmp_path, shim_records):
    """A sub-config asking for flash attention is decided on its own class's facts."""
    from transformers import LlavaForConditionalGeneration

    from helpers.models import tiny_llava_config

    config = tiny_llava_config()
    config.vision_config._attn_implementation = "flash_attention_2"
    model = LlavaForConditionalGeneration(config)
    assert model.config.vision_config._attn_implementation == EXPECTED_IMPLEMENTATION
    assert [(d.model, d.chosen) for d in sdpa_shim.decisions()] == [("CLIPVisionModel", EXPECTED_CHOSEN)]


def test_save_pretrained_keeps_the_users_request(tiny_llama, tmp_path):
    import json

    write_config_request(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config._attn_implementation == EXPECTED_IMPLEMENTATION
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved.get("_attn_implementation") in (None, "flash_attention_2")
    assert saved.get("attn_implementation") in (None, "flash_attention_2")


def test_generate_runs(tiny_llama):
    model = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    out = model.generate(input_ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, input_ids().shape[1] + 4)


def test_config_object_is_the_callers(tiny_llama):
    """From 4.54 transformers writes the resolved name into the caller's config; the shim only
    changes what transformers itself would have written (the chosen implementation)."""
    config = tiny_llama_config(attn_implementation="flash_attention_2")
    LlamaForCausalLM(config)
    assert config._attn_implementation == EXPECTED_IMPLEMENTATION


def test_eager_downgrade_refuses_packed_rows_with_the_fix(tiny_llama, monkeypatch):
    """Eager attention can mix the sequences of a packed row (transformers masks them apart only in some
    cases): a model the shim downgraded to eager refuses such a batch, on every release."""
    from sdpa_shim._runtime.packed import PackedSequenceError

    monkeypatch.setenv("SDPA_SHIM_FALLBACK", "eager")
    model = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "eager"
    ids = torch.tensor([[5, 9, 17, 33, 2, 70]])
    with pytest.raises(PackedSequenceError, match=r"downgraded from flash attention to eager.*Pad the batch"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    padded = torch.tensor([[0, 0, 5, 9], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions = torch.tensor([[1, 1, 0, 1], [0, 1, 2, 3]])
    assert torch.isfinite(model(padded, attention_mask=mask, position_ids=positions).logits).all()
    assert torch.isfinite(model(ids).logits).all()
