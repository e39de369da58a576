"""Flash requests kept on transformers' flash code paths, run on PyTorch kernels (transformers 4.56+).

What a user notices: the model loads, its config reads "flash_attention_2" (so TRL and every flash check
hold), one WARNING says what runs, logits equal a plain sdpa load, padded batches, packed rows of
hundreds of documents and vision towers give the same numbers as each sequence/image alone, a vision
tower makes one attention call per layer, and ``save_pretrained`` writes what a plain load writes.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import sdpa_shim
from helpers.loading import reference, without_shim
from helpers.models import input_ids, logits, save_tiny_llama, tiny_llama_config
from sdpa_shim._core.policy import FLASH_PATH

TRANSFORMERS = Version(transformers.__version__)
pytestmark = pytest.mark.skipif(
    Version("4.56") > TRANSFORMERS, reason="flash paths are served from 4.56 on (sdpa downgrade before)"
)


def global_mapping():
    registry = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS
    return type(registry)._global_mapping


def counting(monkeypatch, name: str) -> list[int]:
    """Count calls into the registry entry ``name`` (one per attention layer call)."""
    mapping = global_mapping()
    original = mapping[name]
    calls: list[int] = []

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setitem(mapping, name, counted)
    return calls


def flash_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="flash_attention_2")


def test_flash_request_keeps_the_flash_path(tmp_path, shim_records, flash_failure):
    _, reason = flash_failure
    directory = save_tiny_llama(tmp_path / "m")
    model = flash_model(directory)
    assert model.config._attn_implementation == "flash_attention_2"
    warnings = shim_records(logging.WARNING)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert f"LlamaForCausalLM requested flash_attention_2; using {FLASH_PATH} instead: {reason}" in message
    decisions = sdpa_shim.decisions()
    assert [(d.model, d.requested, d.chosen) for d in decisions] == [
        ("LlamaForCausalLM", "flash_attention_2", FLASH_PATH)
    ]
    torch.testing.assert_close(logits(model), logits(reference(directory)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda d: LlamaForCausalLM.from_pretrained(d, attn_implementation="flash_attention_2"),
        lambda d: LlamaForCausalLM(tiny_llama_config(attn_implementation="flash_attention_2")),
        lambda d: AutoModelForCausalLM.from_config(
            tiny_llama_config(), attn_implementation="flash_attention_2"
        ),
    ],
    ids=["from_pretrained", "Model(config)", "from_config"],
)
def test_every_entry_point_keeps_the_flash_path(tmp_path, build):
    model = build(save_tiny_llama(tmp_path / "m"))
    assert model.config._attn_implementation == "flash_attention_2"
    assert [d.chosen for d in sdpa_shim.decisions()] == [FLASH_PATH]
    assert torch.isfinite(logits(model)).all()


def test_set_attn_implementation_keeps_the_flash_path(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "m"), attn_implementation="eager")
    model.set_attn_implementation("flash_attention_2")
    assert model.config._attn_implementation == "flash_attention_2"
    assert [d.chosen for d in sdpa_shim.decisions()] == [FLASH_PATH]
    torch.testing.assert_close(logits(model), logits(reference(tmp_path / "m")), rtol=1e-5, atol=1e-5)


def test_one_decision_per_load(tmp_path):
    """from_pretrained validates twice (construction, then after the weights): one decision, one WARNING."""
    flash_model(save_tiny_llama(tmp_path / "m"))
    assert len(sdpa_shim.decisions()) == 1


def test_fallback_sdpa_forces_the_plain_downgrade(tmp_path, monkeypatch, shim_records):
    monkeypatch.setenv("SDPA_SHIM_FALLBACK", "sdpa")
    model = flash_model(save_tiny_llama(tmp_path / "m"))
    assert model.config._attn_implementation == "sdpa"
    assert [d.chosen for d in sdpa_shim.decisions()] == ["sdpa"]


def test_padded_batch_and_generate_equal_plain_sdpa(tmp_path):
    directory = save_tiny_llama(tmp_path / "m")
    model, plain = flash_model(directory), reference(directory)
    ids = torch.tensor([[0, 0, 0, 5, 9, 17, 33], [4, 8, 15, 16, 23, 42, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 3:], want[0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert model.generate(ids, **kwargs).tolist() == plain.generate(ids, **kwargs).tolist()


def test_save_pretrained_writes_what_a_plain_load_writes(tmp_path):
    directory = save_tiny_llama(tmp_path / "m")
    flash_model(directory).save_pretrained(tmp_path / "served")
    reference(directory).save_pretrained(tmp_path / "plain")
    served = json.loads((tmp_path / "served" / "config.json").read_text())
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert served == plain
    reloaded = without_shim(lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "served"))
    assert reloaded.config._attn_implementation == "sdpa"  # transformers' own default, nothing of ours


def documents(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (count,), generator=generator).tolist()
    return [torch.randint(4, 120, (n,), generator=generator).tolist() for n in lengths]


def test_packed_row_of_300_documents_equals_each_alone(tmp_path, monkeypatch):
    """Padding-free training rows: position_ids restart per document; the flash path makes cu_seqlens."""
    directory = save_tiny_llama(tmp_path / "m", max_position_embeddings=2048)
    model, plain = flash_model(directory), reference(directory)
    docs = documents(300)
    ids = torch.tensor([[t for doc in docs for t in doc]])
    positions = torch.tensor([[p for doc in docs for p in range(len(doc))]])
    sdpa_calls: list[int] = []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted_sdpa(*args, **kwargs):
        sdpa_calls.append(args[1].shape[-2])
        return original_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
    with torch.no_grad():
        packed = model(ids, position_ids=positions, use_cache=False).logits[0]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", original_sdpa)
    layers = model.config.num_hidden_layers
    assert len(sdpa_calls) <= 8 * layers, f"{len(sdpa_calls)} SDPA calls for {len(docs)} documents"
    assert max(sdpa_calls) <= max(len(doc) for doc in docs)  # never a key span across documents
    with torch.no_grad():
        alone = torch.cat([plain(torch.tensor([doc])).logits[0] for doc in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_packed_training_step_matches_padded_sdpa(tmp_path):
    """Loss and gradients of a padding-free row equal a padded batch on plain sdpa (relative 1e-5)."""
    directory = save_tiny_llama(tmp_path / "m")
    model, plain = flash_model(directory), reference(directory)
    docs = documents(12, seed=1)
    ids = torch.tensor([[t for doc in docs for t in doc]])
    positions = torch.tensor([[p for doc in docs for p in range(len(doc))]])
    labels = ids.clone()
    starts = torch.tensor([0, *torch.cumsum(torch.tensor([len(d) for d in docs]), 0)[:-1].tolist()])
    labels[0, starts] = -100  # no target across a document boundary, as DataCollatorWithFlattening does
    model.train()
    model(ids, position_ids=positions, labels=labels, use_cache=False).loss.backward()
    width = max(len(doc) for doc in docs)
    padded = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, doc in enumerate(docs):
        padded[row, : len(doc)] = torch.tensor(doc)
        mask[row, : len(doc)] = 1
    padded_labels = padded.masked_fill(mask == 0, -100)
    plain.train()
    out = plain(padded, attention_mask=mask, labels=padded_labels)
    # transformers averages over all targets of the batch either way: same targets, same mean
    torch.testing.assert_close(
        model(ids, position_ids=positions, labels=labels, use_cache=False).loss,
        out.loss,
        rtol=1e-5,
        atol=1e-6,
    )
    out.loss.backward()
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def tiny_qwen_vision(implementation: str):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=32,
        patch_size=2,
        temporal_patch_size=1,
        window_size=8,
        fullatt_block_indexes=[3],
        attn_implementation=implementation,
    )
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel(config).eval()


def vision_inputs():
    grid = torch.tensor([[1, 8, 8], [1, 4, 12], [1, 16, 4]])  # three images of different sizes
    patches = int(grid.prod(dim=1).sum())
    torch.manual_seed(1)
    return torch.randn(patches, 3 * 1 * 2 * 2), grid


def vision_output(model, pixels, grid):
    with torch.no_grad():
        out = model(pixels, grid_thw=grid)
    return getattr(out, "pooler_output", None) if not torch.is_tensor(out) else out


def test_vision_tower_one_attention_call_per_layer(monkeypatch):
    served = tiny_qwen_vision("flash_attention_2")
    assert served.config._attn_implementation == "flash_attention_2"
    plain = without_shim(lambda: tiny_qwen_vision("sdpa"))
    eager = without_shim(lambda: tiny_qwen_vision("eager"))
    plain.load_state_dict(served.state_dict())
    eager.load_state_dict(served.state_dict())
    pixels, grid = vision_inputs()
    flash_calls = counting(monkeypatch, "flash_attention_2")
    sdpa_calls = counting(monkeypatch, "sdpa")
    got = vision_output(served, pixels, grid)
    assert len(flash_calls) == served.config.depth  # one call per layer, every window at once
    want = vision_output(plain, pixels, grid)
    assert len(sdpa_calls) > 2 * plain.config.depth  # the sdpa path loops over windows and images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, vision_output(eager, pixels, grid), rtol=1e-5, atol=1e-5)


def test_softcap_and_sliding_window_model_packed_rows(tmp_path):
    """Gemma2 (softcap, sliding windows, no plain-SDPA softcap): packed rows equal sequences alone."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "g")
    served = Gemma2ForCausalLM.from_pretrained(tmp_path / "g", attn_implementation="flash_attention_2")
    assert served.config._attn_implementation == "flash_attention_2"
    eager = reference(tmp_path / "g", "eager", Gemma2ForCausalLM)
    docs = [[5, 9, 17, 33, 2, 70], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46]]
    ids = torch.tensor([[t for doc in docs for t in doc]])
    positions = torch.tensor([[p for doc in docs for p in range(len(doc))]])
    with torch.no_grad():
        packed = served(ids, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([eager(torch.tensor([doc]), use_cache=False).logits[0] for doc in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(served, input_ids()).argmax(-1), logits(eager, input_ids()).argmax(-1))
