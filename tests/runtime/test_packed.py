"""Packed, padding-free batches on a model downgraded to sdpa: each sequence's logits equal those of the
sequence run alone, with and without KV cache, in eval and train mode; or a loud refusal.

The sdpa downgrade is the default before 4.56 and ``SDPA_SHIM_FALLBACK=sdpa`` after; the flash path's
packed rows are tested in test_flash_paths.py."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LlamaForCausalLM

from helpers.loading import without_shim
from helpers.models import tiny_llama_config

TRANSFORMERS = Version(transformers.__version__)
pytestmark = [
    pytest.mark.skipif(
        Version("4.48") > TRANSFORMERS, reason="before 4.48 there is no attention registry; see test_legacy_*"
    ),
    pytest.mark.usefixtures("plain_sdpa_downgrade"),  # the flash path's packed rows: test_flash_paths.py
]

SEQUENCES = [[5, 9, 17], [33, 2, 70, 3], [11, 12]]


def downgraded_and_reference():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation="flash_attention_2"))
    assert model.config._attn_implementation == "sdpa"
    reference = without_shim(lambda: LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")))
    reference.load_state_dict(model.state_dict())
    return model, reference


def packed_inputs():
    ids = torch.tensor([[t for seq in SEQUENCES for t in seq]])
    positions = torch.tensor([[p for seq in SEQUENCES for p in range(len(seq))]])
    return ids, positions


def alone(reference, use_cache):
    with torch.no_grad():
        return torch.cat([reference(torch.tensor([seq]), use_cache=use_cache).logits[0] for seq in SEQUENCES])


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "all-ones-mask"])
def test_packed_equals_sequences_alone(use_cache, train, with_mask):
    model, reference = downgraded_and_reference()
    model.train(train)
    model.config.attention_dropout = 0.0
    ids, positions = packed_inputs()
    kwargs = {"position_ids": positions, "use_cache": use_cache}
    if with_mask:
        kwargs["attention_mask"] = torch.ones_like(ids)
    with torch.no_grad():
        packed = model(ids, **kwargs).logits[0]
    torch.testing.assert_close(packed, alone(reference, use_cache=False), rtol=1e-5, atol=1e-5)


def test_plain_sdpa_is_wrong_where_the_shim_is_right():
    """The hazard is real: the same packed batch through plain sdpa with use_cache=True mixes sequences."""
    _, reference = downgraded_and_reference()
    ids, positions = packed_inputs()
    with torch.no_grad():
        plain = reference(ids, position_ids=positions, use_cache=True).logits[0]
    assert (plain - alone(reference, use_cache=False)).abs().max() > 1e-3


def test_packed_with_flash_kwargs_and_gradients():
    model, reference = downgraded_and_reference()
    ids, positions = packed_inputs()
    lengths = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    out = model(
        ids,
        position_ids=positions,
        use_cache=False,
        cu_seq_lens_q=lengths,
        cu_seq_lens_k=lengths,
        max_length_q=4,
        max_length_k=4,
        labels=ids,
    )
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(
        out.logits[0].detach(), alone(reference, use_cache=False), rtol=1e-5, atol=1e-5
    )


def test_packed_with_past_tokens_is_refused():
    model, _ = downgraded_and_reference()
    ids, positions = packed_inputs()
    with torch.no_grad():
        past = model(torch.tensor([[1, 2]]), use_cache=True).past_key_values
        with pytest.raises(
            ValueError, match=r"packed sequences cannot share a KV cache\. Pass use_cache=False"
        ):
            model(ids, position_ids=positions, past_key_values=past, use_cache=True)


def test_unpacked_batches_take_the_normal_path():
    model, reference = downgraded_and_reference()
    ids = torch.tensor([[5, 9, 17, 33], [2, 70, 3, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
