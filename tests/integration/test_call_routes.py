"""Per-call routes of models kept on the flash path (transformers 4.56+): each attention call is served by
what it is, with the same numbers as plain sdpa, and host reads paid once per forward, not per layer.

Which route ran is observed through ``sdpa_shim._runtime.routes.COUNTS`` (one count per attention
call); host reads are counted by wrapping ``Tensor.item`` / ``tolist`` / ``nonzero`` / ``__bool__``
and ``torch.nonzero`` for the duration of one forward (the only thing faked: a counter around torch's
own methods, which still run).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import pytest
import torch

from helpers.models import TINY_LLAMA
from sdpa_shim._runtime import forward_meta
from sdpa_shim._runtime import routes as _routes
from sdpa_shim._runtime.routes import Route

transformers = pytest.importorskip("transformers")
from sdpa_shim._core.detect import version_tuple  # noqa: E402

if version_tuple(transformers.__version__) < (4, 56):
    pytest.skip("models are kept on the flash path from transformers 4.56", allow_module_level=True)


def _model(implementation: str, layers: int = 2, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": layers, **overrides})
    return LlamaForCausalLM._from_config(config, attn_implementation=implementation).eval()


def _pair(layers: int = 2, **overrides):
    """(plain sdpa, served flash_attention_2) with identical weights."""
    reference = _model("sdpa", layers, **overrides)
    served = _model("flash_attention_2", layers, **overrides)
    served.load_state_dict(reference.state_dict())
    assert served.config._attn_implementation == "flash_attention_2"
    return reference, served


def _left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    longest = max(lengths)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (len(lengths), longest))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, longest - n :] = 1
    return ids, mask


@contextlib.contextmanager
def routes_taken() -> Iterator[collections.Counter]:
    """The routes the attention calls inside the block took (a snapshot taken when it ends)."""
    _routes.reset_counts()
    taken: collections.Counter = collections.Counter()
    yield taken
    taken.update(_routes.COUNTS)


@contextlib.contextmanager
def host_reads() -> Iterator[collections.Counter]:
    """Counts of host reads of tensor values while the block runs."""
    counts: collections.Counter = collections.Counter()
    names = ("item", "tolist", "nonzero", "__bool__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    original_nonzero = torch.nonzero

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name, function in originals.items():
        setattr(torch.Tensor, name, counted(name, function))
    torch.nonzero = counted("nonzero", original_nonzero)
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(torch.Tensor, name, function)
        torch.nonzero = original_nonzero


def test_padded_prefill_and_decode_take_sdpa_with_the_same_tokens_as_plain_sdpa():
    reference, served = _pair()
    ids, mask = _left_padded([3, 8, 5])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        with routes_taken() as taken:
            got = served(ids, attention_mask=mask).logits
    assert taken == {Route.PADDED_SDPA: 2}
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected_tokens = reference.generate(ids, attention_mask=mask, **generate)
        with routes_taken() as taken:
            tokens = served.generate(ids, attention_mask=mask, **generate)
    assert torch.equal(tokens, expected_tokens)
    assert taken == {Route.PADDED_SDPA: 2 * 5}  # prefill and every decode step, never an unpad


@pytest.mark.parametrize("torch_before_2_5", [False, True])
def test_right_padded_batch_matches_plain_sdpa_and_padding_rows_are_zero_like_flash_attn(
    torch_before_2_5, monkeypatch
):
    """Padding queries come back as zeros, as flash-attn leaves them: SDPA gives 0 for a row that sees
    no key from torch 2.5; before, the row is opened and zeroed (that path forced on this torch)."""
    monkeypatch.setattr(forward_meta, "EMPTY_ROWS_ARE_ZERO", not torch_before_2_5)
    reference, served = _pair()
    ids, mask = _left_padded([8, 3, 6])
    mask = mask.flip(-1)
    attention_outputs = []
    hook = served.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, output: attention_outputs.append(output[0])
    )
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = served(ids, attention_mask=mask).logits
    hook.remove()
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    # o_proj has no bias: an attention row flash-attn leaves at zero stays zero
    assert attention_outputs[0][~real].abs().max() == 0


def test_dense_calls_take_sdpa_and_packed_rows_the_flash_code_with_bounds_once_per_forward():
    reference, served = _pair()
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (1, 12))
    with torch.no_grad(), routes_taken() as taken:
        torch.testing.assert_close(served(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert taken == {Route.DENSE: 2}
    positions = torch.cat([torch.arange(n) for n in (5, 4, 3)]).unsqueeze(0)
    with torch.no_grad(), routes_taken() as taken:
        packed = served(ids, position_ids=positions).logits
    assert taken == {Route.VARLEN: 2}
    start = 0
    for n in (5, 4, 3):  # each document as if alone
        with torch.no_grad():
            alone = reference(ids[:, start : start + n]).logits
        torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_collator_cu_seqlens_go_straight_to_the_varlen_engine():
    reference, served = _pair()
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (1, 9))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad(), routes_taken() as taken:
        got = served(
            ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5
        ).logits
    assert taken == {Route.VARLEN: 2}
    with torch.no_grad():
        first, second = reference(ids[:, :4]).logits, reference(ids[:, 4:]).logits
    torch.testing.assert_close(got, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-5)


def test_sliding_window_beyond_the_keys_takes_the_flash_code_and_matches_plain_sdpa():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    # one config object per model: a model reads its attention function from its own
    reference = MistralForCausalLM._from_config(
        MistralConfig(**TINY_LLAMA, sliding_window=4), attn_implementation="sdpa"
    ).eval()
    served = MistralForCausalLM._from_config(
        MistralConfig(**TINY_LLAMA, sliding_window=4), attn_implementation="flash_attention_2"
    ).eval()
    assert reference.config._attn_implementation == "sdpa"
    served.load_state_dict(reference.state_dict())
    ids, mask = _left_padded([10, 7])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        with routes_taken() as taken:
            got = served(ids, attention_mask=mask).logits
        ids_dense = ids[:1]
        with routes_taken() as dense_taken:
            dense = served(ids_dense).logits
        dense_expected = reference(ids_dense).logits
    assert taken == {Route.PADDED_SDPA: 2}  # the window is in the mask built once per forward
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert dense_taken == {Route.FLASH_DENSE: 2}  # no mask to put the window in: flash-attn's window
    torch.testing.assert_close(dense, dense_expected, atol=1e-5, rtol=1e-5)


def test_softcap_generation_matches_eager_on_the_runtime_block_attention():
    """Gemma2 (logit softcap, sliding window): SDPA cannot serve it; unpadded calls run the runtime's
    block attention directly, padded ones transformers' flash code; the tokens are eager's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def config():  # one config object per model: a model reads its attention function from its own
        return Gemma2Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=6,
        )  # fmt: skip

    torch.manual_seed(0)
    eager = Gemma2ForCausalLM._from_config(config(), attn_implementation="eager").eval()
    served = Gemma2ForCausalLM._from_config(config(), attn_implementation="flash_attention_2").eval()
    assert eager.config._attn_implementation == "eager"
    served.load_state_dict(eager.state_dict())
    assert served.config._attn_implementation == "flash_attention_2"
    ids = torch.randint(3, 128, (1, 9))
    generate = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad(), routes_taken() as taken:
        tokens = served.generate(ids, **generate)
    with torch.no_grad():
        assert torch.equal(tokens, eager.generate(ids, **generate))
        torch.testing.assert_close(served(tokens).logits, eager(tokens).logits, atol=1e-5, rtol=1e-5)
    assert taken == {Route.FLASH_DENSE: 2 * 6}
    batch, mask = _left_padded([9, 5])
    with torch.no_grad(), routes_taken() as taken:
        got = served(batch, attention_mask=mask).logits
        expected = eager(batch, attention_mask=mask).logits
    assert taken == {Route.FLASH_CODE: 2}
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["padded", "packed", "dense"])
def test_host_reads_per_forward_do_not_grow_with_layers(kind):
    reads = {}
    for layers in (2, 8):
        ids, mask = _left_padded([12, 7, 9])  # new tensors: nothing derived from the last model's run
        positions = torch.cat([torch.arange(n) for n in (5, 4, 3)]).unsqueeze(0)
        _, served = _pair(layers)
        with torch.no_grad(), host_reads() as counts:
            if kind == "padded":
                served(ids, attention_mask=mask)
            elif kind == "packed":
                served(ids[:1], position_ids=positions)
            else:
                served(ids[:1])
        reads[layers] = sum(counts.values())
    assert reads[2] == reads[8], reads
    assert reads[8] <= 4, reads  # once per forward: the bounds of a packed row, nothing per layer


def test_metadata_follows_a_mask_changed_in_place_and_new_shapes():
    reference, served = _pair()
    ids, mask = _left_padded([8, 8, 8])
    mask[0, :3] = 0
    for step in range(2):
        with torch.no_grad():
            got = served(ids, attention_mask=mask).logits
            expected = reference(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
        mask[step + 1, : step + 2] = 0  # the same tensor object, changed in place
    builds = forward_meta.CACHE.builds
    smaller_ids, smaller_mask = ids[:2, 2:], mask[:2, 2:].clone()  # new batch size and length
    with torch.no_grad():
        got = served(smaller_ids, attention_mask=smaller_mask).logits
        expected = reference(smaller_ids, attention_mask=smaller_mask).logits
    assert forward_meta.CACHE.builds == builds + 1  # one mask for the forward, shared by both layers
    real = smaller_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_a_fault_while_choosing_the_route_falls_back_to_the_flash_code(monkeypatch, shim_records):
    from sdpa_shim._integration import flash_calls

    _, served = _pair()
    ids, mask = _left_padded([5, 8])
    with torch.no_grad():
        expected = served(ids, attention_mask=mask).logits

    def broken(*args, **kwargs):
        raise RuntimeError("planted fault")

    monkeypatch.setattr(flash_calls, "_route", broken)  # the shim's own code, not transformers
    with torch.no_grad():
        got = served(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert any("planted fault" in r.getMessage() for r in shim_records())


def test_the_rule():
    def facts(**changes):
        base = dict(device="cuda", half=True, q_len=2048, kv_len=2048, masked=True, flash_only=False,
                    packed_row=False)  # fmt: skip
        return _routes.CallFacts(**{**base, **changes})

    assert _routes.choose(facts(flash_only=True)) is Route.FLASH_CODE
    assert _routes.choose(facts(padding_share=0.5)) is Route.PADDED_VARLEN
    assert _routes.choose(facts(padding_share=0.05)) is Route.PADDED_SDPA
    assert _routes.choose(facts(device="cpu", padding_share=0.5)) is Route.PADDED_SDPA
    assert _routes.choose(facts(half=False, padding_share=0.5)) is Route.PADDED_SDPA
    assert _routes.choose(facts(q_len=1, padding_share=0.5)) is Route.PADDED_SDPA  # decode never unpads
    assert _routes.choose(facts(mask_covers_keys=False, padding_share=0.5)) is Route.PADDED_SDPA
    assert _routes.choose(facts(masked=False, packed_row=True)) is Route.VARLEN
    assert _routes.choose(facts(masked=False, softcap=True)) is Route.FLASH_DENSE
    assert _routes.choose(facts(softcap=True)) is Route.FLASH_CODE  # padded softcap: the flash code unpads
    assert _routes.choose(facts(masked=False)) is Route.DENSE
    assert _routes.choose(facts(masked=False, q_len=1)) is Route.DENSE
    assert _routes.choose(facts(masked=False, q_len=4)) is Route.FLASH_DENSE  # cached keys: bottom-right
    assert _routes.choose(facts(masked=False, windowed_without_mask=True)) is Route.FLASH_DENSE
