"""Packed rows on releases without the attention registry (< 4.48): refused loudly, with the fix."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LlamaForCausalLM

import sdpa_shim
from helpers.loading import without_shim
from helpers.models import tiny_llama_config

TRANSFORMERS = Version(transformers.__version__)
pytestmark = pytest.mark.skipif(
    Version("4.48") <= TRANSFORMERS, reason="4.48+ computes packed rows per sequence (test_packed.py)"
)


def downgraded():
    torch.manual_seed(0)
    config = tiny_llama_config()
    config._attn_implementation = "flash_attention_2"
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_rows_are_refused(use_cache):
    model = downgraded()
    ids = torch.tensor([[5, 9, 17, 33, 2, 70, 3]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"Upgrade transformers to 4\.48 or newer") as info:
        model(ids, position_ids=positions, use_cache=use_cache)
    assert "this batch is packed (position_ids restart per sequence)" in str(info.value)


def test_ordinary_batches_still_run():
    """Unpacked batches are not refused, and give the logits of the same model built without the shim."""
    model = downgraded()
    chosen = model.config._attn_implementation
    reference = without_shim(lambda: LlamaForCausalLM(tiny_llama_config(attn_implementation=chosen)))
    reference.load_state_dict(model.state_dict())
    ids = torch.tensor([[5, 9, 17, 33], [2, 70, 3, 11]])
    with torch.no_grad():
        batch = model(ids, position_ids=torch.arange(4).expand(2, 4)).logits
        one = model(ids[:1]).logits
        assert batch.shape == (2, 4, 128)
        assert one.shape == (1, 4, 128)
        torch.testing.assert_close(batch, reference(ids, position_ids=torch.arange(4).expand(2, 4)).logits)
        torch.testing.assert_close(one, reference(ids[:1]).logits)


def test_models_the_shim_did_not_touch_are_not_guarded():
    """No flash request: packed rows run as in transformers without the shim (no refusal, same logits)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ids = torch.tensor([[5, 9, 17, 33, 2, 70, 3]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        served = model(ids, position_ids=positions).logits
        plain = without_shim(lambda: model(ids, position_ids=positions).logits)
    assert sdpa_shim.decisions() == []
    torch.testing.assert_close(served, plain, rtol=0, atol=0)
