"""The varlen engine's flex_attention route (sdpa_shim._runtime.flex) against a float64 per-document reference.

Runs on CPU with eager flex_attention (``flex.allow_cpu``), float32. torch refuses flex's backward on
CPU only in its public entry's device check (its fused CPU kernel has none); the eager dense backward
exists, so gradient tests lift that check. The compiled CUDA kernel is checked by benchmarks on a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdpa_shim._runtime import flex, forward_meta
from sdpa_shim._runtime.bucketed import Options

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FP32 = {"atol": 2e-5, "rtol": 2e-5}
FP32_GRAD = {"atol": 1e-4, "rtol": 1e-4}
D = 16
HEADS = [(4, 4), (4, 2), (4, 1)]
# (left, right) after flash-attn's normalisation: full, causal, left only, symmetric, sliding causal
WINDOWS = [(-1, -1), (-1, 0), (7, -1), (5, 5), (9, 0)]


@pytest.fixture(autouse=True)
def _flex_on_cpu(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(flex, "allow_cpu", True)
    flex.reset()
    yield
    flex.reset()


@contextlib.contextmanager
def cpu_backward():
    """Lift flex_attention's CPU backward refusal: the eager dense backward runs on any device."""
    import torch.nn.attention.flex_attention as fa

    with mock.patch.object(fa, "_validate_device", lambda *args: None):
        yield


def options(left: int = -1, right: int = -1, *, scale: float = D**-0.5, **kw) -> Options:
    base = {"softcap": 0.0, "alibi": None, "dropout_p": 0.0, "want_lse": False, "max_k": 1 << 20}
    return Options(scale=scale, left=left, right=right, **{**base, **kw})


def reference(q, k, v, bounds, left, right, scale):
    """float64 explicit softmax per document; zeros outside ``bounds``."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    pieces = [torch.zeros(bounds[0], q.shape[1], v.shape[-1], dtype=torch.float64)]
    for a, b in itertools.pairwise(bounds):
        if b == a:
            continue
        qs, ks, vs = q[a:b], k[a:b].repeat_interleave(rep, 1), v[a:b].repeat_interleave(rep, 1)
        s = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        i, j = torch.arange(b - a).view(-1, 1), torch.arange(b - a).view(1, -1)
        ok = torch.ones(b - a, b - a, dtype=torch.bool)
        if right >= 0:
            ok &= j <= i + right
        if left >= 0:
            ok &= j >= i - left
        p = s.masked_fill(~ok, float("-inf")).softmax(-1)
        pieces.append(torch.einsum("hij,jhd->ihd", p, vs))
    pieces.append(torch.zeros(q.shape[0] - bounds[-1], q.shape[1], v.shape[-1], dtype=torch.float64))
    return torch.cat(pieces)


def packed(lengths, lead, trail, hq, hk, *, grad=False):
    bounds = [lead]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    t = bounds[-1] + trail
    q, k, v = torch.randn(t, hq, D), torch.randn(t, hk, D), torch.randn(t, hk, D)
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, torch.tensor(bounds, dtype=torch.int32), bounds


documents = st.lists(st.integers(1, 70), min_size=1, max_size=40)


# --------------------------------------------------------------------------- numerics


@settings(max_examples=20, deadline=None)
@given(
    lengths=documents,
    lead=st.integers(0, 4),
    trail=st.integers(0, 4),
    heads=st.sampled_from(HEADS),
    window=st.sampled_from(WINDOWS),
)
def test_matches_per_document_reference(lengths, lead, trail, heads, window):
    q, k, v, cu, bounds = packed(lengths, lead, trail, *heads)
    left, right = window
    with torch.no_grad():
        out = flex.run_flex(q, k, v, cu, bounds, options(left, right))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), reference(q, k, v, bounds, left, right, D**-0.5), **FP32)
    assert out[: bounds[0]].eq(0).all() and out[bounds[-1] :].eq(0).all()


@pytest.mark.parametrize("lengths", [[1] * 33, [1, 64, 1, 2, 130, 1], [200, 3, 1]])
def test_length_one_documents_and_tile_crossing(lengths):
    q, k, v, cu, bounds = packed(lengths, 3, 2, 4, 2)
    with torch.no_grad():
        out = flex.run_flex(q, k, v, cu, bounds, options(-1, 0, scale=0.3))
    torch.testing.assert_close(out.double(), reference(q, k, v, bounds, -1, 0, 0.3), **FP32)


def test_no_document_tokens_gives_zeros_on_the_graph():
    q, k, v, cu, _ = packed([], 5, 0, 4, 2, grad=True)
    out = flex.run_flex(q, k, v, cu, [5], options())
    assert out.eq(0).all()
    out.sum().backward()
    assert q.grad is not None and q.grad.eq(0).all()


@settings(max_examples=8, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    lead=st.integers(0, 3),
    heads=st.sampled_from(HEADS[1:]),
    window=st.sampled_from(WINDOWS),
)
def test_gradients_match_reference(lengths, lead, heads, window):
    q, k, v, cu, bounds = packed(lengths, lead, 2, *heads, grad=True)
    left, right = window
    with cpu_backward():
        out = flex.run_flex(q, k, v, cu, bounds, options(left, right))
        g = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, bounds, left, right, D**-0.5)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), want, **FP32_GRAD)
    outside = [*range(bounds[0]), *range(bounds[-1], q.shape[0])]
    assert dq[outside].eq(0).all() and dk[outside].eq(0).all() and dv[outside].eq(0).all()


# --------------------------------------------------------------------------- block mask


def _tiles(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """flex's (1, 1, nb) counts + (1, 1, nb, nb) indices -> (nb, nb) bool tiles."""
    nb = idx.shape[-1]
    dense = torch.zeros(nb, nb, dtype=torch.bool)
    for r in range(nb):
        dense[r, idx[0, 0, r, : num[0, 0, r]].long()] = True
    return dense


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    lead=st.integers(0, 200),
    window=st.sampled_from([*WINDOWS, (130, 0), (200, 200)]),
)
def test_tile_mask_covers_every_visible_pair(lengths, lead, window):
    """Our tile-level mask against torch's element-level create_block_mask of the same mask_mod:
    every tile with a visible pair is kept, every tile we call full is full; exact without a window."""
    from torch.nn.attention.flex_attention import create_block_mask

    bounds = [lead]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    p = flex.padded_len(bounds[-1] + 1)
    ours = flex.build_block_mask(bounds, p, *window, torch.device("cpu"))
    truth = create_block_mask(ours.mask_mod, None, None, p, p, device="cpu")
    kept = _tiles(ours.kv_num_blocks, ours.kv_indices) | _tiles(ours.full_kv_num_blocks, ours.full_kv_indices)
    true_kept = _tiles(truth.kv_num_blocks, truth.kv_indices) | _tiles(
        truth.full_kv_num_blocks, truth.full_kv_indices
    )
    full = _tiles(ours.full_kv_num_blocks, ours.full_kv_indices)
    true_full = _tiles(truth.full_kv_num_blocks, truth.full_kv_indices)
    assert (true_kept & ~kept).sum() == 0
    assert (full & ~true_full).sum() == 0
    if window == (-1, -1):
        assert torch.equal(kept, true_kept) and torch.equal(full, true_full)


def test_block_mask_built_once_per_cu_tensor():
    q, k, v, cu, bounds = packed([5, 9, 1, 30], 2, 3, 4, 2)
    before = forward_meta.CACHE.builds
    with torch.no_grad():
        outs = [flex.run_flex(q, k, v, cu, bounds, options(-1, 0)) for _ in range(3)]
    assert forward_meta.CACHE.builds - before == 1
    torch.testing.assert_close(outs[0], outs[2])
    with torch.no_grad():  # another window: another mask for the same tensor
        flex.run_flex(q, k, v, cu, bounds, options(4, 0))
    assert forward_meta.CACHE.builds - before == 2


def test_padded_lengths_are_few_and_tight():
    for t in (1, 100, 1024, 1025, 4096, 5000, 16384, 20000, 100_000):
        p = flex.padded_len(t)
        assert p >= t and p % flex.BLOCK == 0 and p % flex.MIN_PAD == 0
        assert p - t < max(flex.MIN_PAD, t // 8 + 1)
    assert len({flex.padded_len(t) for t in range(8193, 16385)}) == 8


# --------------------------------------------------------------------------- refusals and fallback


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"softcap": 5.0}, "softcap"),
        ({"want_lse": True}, "lse"),
        ({"alibi": torch.ones(4)}, "alibi"),
        ({"dropout_p": 0.1}, "dropout"),
        ({"scale": 0.0}, "scale"),
    ],
)
def test_refuses_what_flex_cannot_give(change, expect):
    q, k, v, *_ = packed([4, 4], 0, 0, 4, 2)
    assert flex.flex_refusal(q, k, v, options(), True) is None
    assert expect in flex.flex_refusal(q, k, v, options(**change), True)
    with pytest.raises(flex.FlexUnavailable, match=expect):
        flex.run_flex(q, k, v, torch.tensor([0, 4, 8]), [0, 4, 8], options(**change))


def test_refuses_cross_bounds_shapes_and_devices(monkeypatch):
    q, k, v, *_ = packed([4, 4], 0, 0, 4, 2)
    assert "cross" in flex.flex_refusal(q, k, v, options(), False)
    assert "key rows" in flex.flex_refusal(q, k[:7], v[:7], options(), True)
    assert "head dims" in flex.flex_refusal(q[..., :12], k[..., :12], v[..., :12], options(), True)
    assert "head dims" in flex.flex_refusal(q, k, v[..., :8], options(), True)
    assert "fp16/bf16" in flex.flex_refusal(q, k, v.double(), options(), True)
    with torch.no_grad():
        half = flex.flex_refusal(q.bfloat16(), k.bfloat16(), v.bfloat16(), options(), True)
    assert half is None
    monkeypatch.setattr(flex, "allow_cpu", False)
    assert "CUDA" in flex.flex_refusal(q, k, v, options(), True)
    monkeypatch.setattr(flex, "allow_cpu", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "torch.compile" in flex.flex_refusal(q, k, v, options(), True)


def test_hidden_flex_is_refused(monkeypatch):
    q, k, v, *_ = packed([4, 4], 0, 0, 4, 2)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # import fails
    assert flex.flex_refusal(q, k, v, options(), True) == "torch has no flex_attention"
    with pytest.raises(flex.FlexUnavailable, match="no flex_attention"):
        flex.run_flex(q, k, v, torch.tensor([0, 4, 8]), [0, 4, 8], options())


def test_compile_failure_turns_the_route_off(monkeypatch, caplog):
    q, k, v, cu, bounds = packed([4, 4], 0, 0, 4, 2)

    def broken(*args, **kwargs):
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setattr(flex, "_kernel", lambda device: broken)
    caplog.set_level("DEBUG", logger="sdpa_shim")
    with pytest.raises(flex.FlexUnavailable, match="triton"):
        flex.run_flex(q, k, v, cu, bounds, options())
    assert "triton" in flex.flex_refusal(q, k, v, options(), True)
    assert any("unusable" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    monkeypatch.setattr(flex, "allow_cpu", True)
    with pytest.raises(flex.FlexUnavailable):  # stays off for the process, even with a working kernel
        flex.run_flex(q, k, v, cu, bounds, options())
    flex.reset()
    with torch.no_grad():
        flex.run_flex(q, k, v, cu, bounds, options())


def test_error_on_a_shape_that_ran_before_is_not_hidden(monkeypatch):
    q, k, v, cu, bounds = packed([4, 4], 0, 0, 4, 2)
    with torch.no_grad():
        flex.run_flex(q, k, v, cu, bounds, options())

    def broken(*args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(flex, "_kernel", lambda device: broken)
    with torch.no_grad(), pytest.raises(RuntimeError, match="genuine"):
        flex.run_flex(q, k, v, cu, bounds, options())
    assert flex.flex_refusal(q, k, v, options(), True) is None


def test_shape_cap_refuses_new_shapes(monkeypatch):
    monkeypatch.setattr(flex, "MAX_SHAPES", 1)
    q, k, v, cu, bounds = packed([40] * 3, 0, 0, 4, 2)
    with torch.no_grad():
        flex.run_flex(q, k, v, cu, bounds, options())
        q2, k2, v2, cu2, bounds2 = packed([40] * 30, 0, 0, 4, 2)  # 1200 tokens: the next bucket
        assert "MAX_SHAPES" in flex.flex_refusal(q2, k2, v2, options(), True)
        with pytest.raises(flex.FlexUnavailable, match="MAX_SHAPES"):
            flex.run_flex(q2, k2, v2, cu2, bounds2, options())
        q3, k3, v3, cu3, bounds3 = packed([7] * 20, 1, 0, 4, 2)  # same bucket as the first: still served
        flex.run_flex(q3, k3, v3, cu3, bounds3, options())
