"""Numerics of the flash_attn stand-in against float64 references (tests/helpers/standin_reference.py).

Forward and backward run in float32 with tight tolerances; a bf16 smoke test checks the dtype
round trip. Everything runs on CPU with real torch.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import sdpa_shim.standin as fa
from helpers.standin_reference import reference_attention, reference_rotary, reference_varlen
from sdpa_shim.standin import bert_padding, flash_attn_interface
from sdpa_shim.standin.layers import rotary

TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _close(actual: torch.Tensor, expected: torch.Tensor, **tol: float) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **(tol or TOL))


def _fwd_bwd(ours, ref, inputs, **tol):
    """Run ours in float32 and ref in float64 on the same inputs and upstream gradient; compare all."""
    xs = [x.detach().float().requires_grad_() for x in inputs]
    out = ours(*xs)
    grad = torch.randn_like(out)
    out.backward(grad)
    xr = [x.detach().double().requires_grad_() for x in inputs]
    expected = ref(*xr)
    expected.backward(grad.double())
    _close(out, expected, **tol)
    for mine, theirs in zip(xs, xr, strict=True):
        _close(mine.grad, theirs.grad, **tol)
    return out


# --------------------------------------------------------------------------- API surface

EXPECTED_PARAMS = {
    "flash_attn_func": "q k v dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
    "return_attn_probs",
    "flash_attn_qkvpacked_func": "qkv dropout_p softmax_scale causal window_size softcap alibi_slopes "
    "deterministic return_attn_probs",
    "flash_attn_kvpacked_func": "q kv dropout_p softmax_scale causal window_size softcap alibi_slopes "
    "deterministic return_attn_probs",
    "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
    "softmax_scale causal window_size softcap alibi_slopes deterministic return_attn_probs block_table",
    "flash_attn_varlen_qkvpacked_func": "qkv cu_seqlens max_seqlen dropout_p softmax_scale causal "
    "window_size softcap alibi_slopes deterministic return_attn_probs",
    "flash_attn_varlen_kvpacked_func": "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
    "softmax_scale causal window_size softcap alibi_slopes deterministic return_attn_probs",
    "flash_attn_with_kvcache": "q k_cache v_cache k v rotary_cos rotary_sin cache_seqlens cache_batch_idx "
    "cache_leftpad block_table softmax_scale causal window_size softcap rotary_interleaved alibi_slopes "
    "num_splits return_softmax_lse",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_signatures_match_flash_attn_2_8_3(name):
    fn = getattr(fa, name)
    assert fn is getattr(flash_attn_interface, name)
    params = inspect.signature(fn).parameters
    assert list(params) == EXPECTED_PARAMS[name].split()
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    expected = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1)}
    expected |= {"softcap": 0.0, "alibi_slopes": None, "deterministic": False, "return_attn_probs": False}
    expected |= {
        "block_table": None,
        "rotary_interleaved": True,
        "num_splits": 0,
        "return_softmax_lse": False,
    }
    for key, value in defaults.items():
        if key in expected:
            assert value == expected[key], key


def test_package_surface():
    assert fa.__version__ == "2.8.3"
    assert "stand-in" in (fa.__doc__ or "")
    assert "window_size" in inspect.signature(fa.flash_attn_func).parameters
    assert fa.flash_attn_unpadded_qkvpacked_func is fa.flash_attn_varlen_qkvpacked_func
    assert rotary.apply_rotary_emb_func is rotary.apply_rotary_emb
    assert list(inspect.signature(rotary.apply_rotary_emb).parameters) == [
        "x", "cos", "sin", "interleaved", "inplace", "seqlen_offsets", "cu_seqlens", "max_seqlen",
    ]  # fmt: skip
    assert list(inspect.signature(bert_padding.unpad_input).parameters) == [
        "hidden_states", "attention_mask", "unused_mask",
    ]  # fmt: skip


# --------------------------------------------------------------------------- dense


def _qkv(b, sq, sk, h, hk, d=16, dv=None):
    return torch.randn(b, sq, h, d), torch.randn(b, sk, hk, d), torch.randn(b, sk, hk, dv or d)


DENSE_CASES = {
    # name: (sq, sk, h, hk, kwargs)
    "plain": (16, 16, 4, 4, {}),
    "causal_gqa": (16, 16, 4, 2, {"causal": True}),
    "causal_sq_lt_sk_mqa": (6, 19, 4, 1, {"causal": True}),
    "causal_sq_gt_sk": (19, 6, 4, 2, {"causal": True}),
    "decode_causal": (1, 23, 4, 2, {"causal": True}),
    "window": (16, 16, 2, 2, {"window_size": (3, 2)}),
    "window_causal_sq_lt_sk": (9, 20, 4, 2, {"causal": True, "window_size": (4, -1)}),
    "window_sq_gt_sk": (20, 9, 2, 1, {"window_size": (2, 5)}),
    "window_left_only": (12, 12, 2, 2, {"window_size": (0, -1)}),
    "softcap_causal": (7, 13, 4, 2, {"causal": True, "softcap": 3.0}),
    "alibi": (11, 11, 4, 4, {"alibi": "h"}),
    "alibi_batch_causal_window": (13, 8, 4, 2, {"alibi": "bh", "causal": True, "window_size": (3, -1)}),
    "everything": (10, 14, 6, 2, {"alibi": "h", "softcap": 2.0, "window_size": (5, 1), "softmax_scale": 0.4}),
    "scale": (8, 8, 2, 2, {"softmax_scale": 1.3, "causal": True}),
}


def _dense_kwargs(spec, b, h):
    kw = dict(spec)
    alibi = kw.pop("alibi", None)
    if alibi == "h":
        kw["alibi_slopes"] = torch.rand(h) * 0.5
    elif alibi == "bh":
        kw["alibi_slopes"] = torch.rand(b, h) * 0.5
    return kw


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_flash_attn_func_matches_reference(case):
    sq, sk, h, hk, spec = DENSE_CASES[case]
    kw = _dense_kwargs(spec, 2, h)
    out = _fwd_bwd(
        lambda q, k, v: fa.flash_attn_func(q, k, v, **kw),
        lambda q, k, v: reference_attention(q, k, v, **kw)[0],
        _qkv(2, sq, sk, h, hk),
    )
    assert out.shape == (2, sq, h, 16) and out.dtype == torch.float32 and out.is_contiguous()


def test_rows_without_keys_are_zero_with_zero_grad():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 7, 3, 2, 2))
    out = fa.flash_attn_func(q, k, v, causal=True)  # bottom-right: rows 0..3 see no key
    assert torch.isfinite(out).all()
    assert out[:, :4].abs().max() == 0 and out[:, 4:].abs().min() > 0
    out.sum().backward()
    assert q.grad[:, :4].abs().max() == 0 and torch.isfinite(q.grad).all()


def test_value_head_dim_may_differ():
    q, k, v = _qkv(2, 5, 9, 4, 2, d=16, dv=8)
    out = fa.flash_attn_func(q, k, v, causal=True)
    _close(out, reference_attention(q, k, v, causal=True)[0])
    assert out.shape == (2, 5, 4, 8)


def test_packed_dense_variants_equal_unpacked():
    q, k, v = _qkv(2, 9, 9, 4, 4)
    kw = {"causal": True, "window_size": (3, -1), "softcap": 4.0}
    base = fa.flash_attn_func(q, k, v, **kw)
    _close(fa.flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2), **kw), base, atol=0, rtol=0)
    q2, k2, v2 = _qkv(2, 5, 9, 4, 2)
    base2 = fa.flash_attn_func(q2, k2, v2, **kw)
    _close(fa.flash_attn_kvpacked_func(q2, torch.stack((k2, v2), dim=2), **kw), base2, atol=0, rtol=0)


def test_qkvpacked_gradient_reaches_packed_tensor():
    qkv = torch.randn(2, 6, 3, 2, 8)
    _fwd_bwd(
        lambda x: fa.flash_attn_qkvpacked_func(x, causal=True),
        lambda x: reference_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], causal=True)[0],
        [qkv],
    )


@pytest.mark.parametrize("case", ["plain", "causal_sq_gt_sk", "everything"])
def test_return_attn_probs_gives_exact_lse(case):
    sq, sk, h, hk, spec = DENSE_CASES[case]
    kw = _dense_kwargs(spec, 2, h)
    q, k, v = _qkv(2, sq, sk, h, hk)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    ref_out, ref_lse, _ = reference_attention(q, k, v, **kw)
    _close(out, ref_out)
    assert lse.dtype == torch.float32 and lse.shape == (2, h, sq)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    _close(lse[finite], ref_lse[finite])
    assert s_dmask.numel() == 0  # flash-attn returns S_dmask only with dropout


def test_return_attn_probs_with_dropout_encodes_the_dropout_pattern():
    q, k, v = _qkv(1, 12, 12, 2, 2)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    _, ref_lse, ref_probs = reference_attention(q, k, v, causal=True)
    assert s_dmask.shape == (1, 2, 12, 12)
    _close(s_dmask.abs(), ref_probs)
    dropped = (s_dmask < 0).sum().item()
    assert 0 < dropped < ref_probs.gt(0).sum().item()
    kept = torch.where(s_dmask >= 0, s_dmask, 0).double() / 0.7
    _close(out, torch.einsum("bhij,bjhd->bihd", kept, v.double()))
    _close(lse, ref_lse)


def test_dropout_on_the_fast_path_is_unbiased():
    q = torch.zeros(1, 4, 1, 8)  # uniform attention over 4096 keys whose values are all 1
    k = torch.randn(1, 4096, 1, 8)
    v = torch.ones(1, 4096, 1, 8)
    out = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    assert (out - 1).abs().max() < 0.1  # std of the mean is 0.016
    assert (out - 1).abs().max() > 1e-4  # and dropout did happen


def test_invalid_inputs_raise_clear_errors():
    q, k, v = _qkv(1, 4, 4, 3, 2)
    with pytest.raises(ValueError, match="heads"):
        fa.flash_attn_func(q, k, v)
    q, k, v = _qkv(1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="dtype"):
        fa.flash_attn_func(q, k.double(), v)
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attn_func(q, k, v, window_size=(1, 2, 3))


def test_bf16_smoke():
    q, k, v = (x.bfloat16() for x in _qkv(2, 9, 17, 4, 2))
    out = fa.flash_attn_func(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    _close(out, reference_attention(q, k, v, causal=True)[0], atol=3e-2, rtol=3e-2)
    kw = {"causal": True, "softcap": 5.0, "alibi_slopes": torch.rand(4), "window_size": (4, 0)}
    out = fa.flash_attn_func(q, k, v, **kw)
    assert out.dtype == torch.bfloat16
    _close(out, reference_attention(q, k, v, **kw)[0], atol=3e-2, rtol=3e-2)
    qp, kp, vp = (x.flatten(0, 1) for x in _qkv(1, 12, 12, 4, 2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = fa.flash_attn_varlen_func(qp.bfloat16(), kp.bfloat16(), vp.bfloat16(), cu, cu, 7, 7, causal=True)
    assert out.dtype == torch.bfloat16
    _close(out, reference_varlen(qp, kp, vp, [0, 5, 12], [0, 5, 12], causal=True)[0], atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------- fast paths


class SdpaRecorder:
    """Wraps torch's SDPA (a fake for bookkeeping only; the real kernel still runs) to log each call."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        self._real = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        mask_shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else None
        self.calls.append(
            {
                "q": tuple(q.shape),
                "k": tuple(k.shape),
                "mask": mask_shape,
                "mask_obj": attn_mask,
                "causal": is_causal,
            }
            | {"gqa": kw.get("enable_gqa", False)}
        )
        return self._real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)


def test_fast_paths_call_sdpa_without_a_mask(monkeypatch):
    rec = SdpaRecorder(monkeypatch)
    q, k, v = _qkv(2, 16, 16, 8, 2)
    fa.flash_attn_func(q, k, v, causal=True)
    fa.flash_attn_func(q, k, v)
    fa.flash_attn_func(q, k, v, causal=True, window_size=(15, -1))  # the window covers everything
    fa.flash_attn_func(q[:, :1], k, v, causal=True)  # decode step: bottom-right causal is no mask at all
    assert [c["mask_obj"] for c in rec.calls] == [None] * 4
    assert [c["causal"] for c in rec.calls] == [True, False, True, False]
    assert all(c["gqa"] and c["k"][1] == 2 for c in rec.calls)  # GQA without repeating K/V


def test_masks_are_built_per_block_only(monkeypatch):
    rec = SdpaRecorder(monkeypatch)
    q, k, v = _qkv(2, 16, 24, 4, 4)
    fa.flash_attn_func(q, k, v, window_size=(3, 3))
    assert rec.calls[0]["mask"] == (1, 1, 16, 24)


# --------------------------------------------------------------------------- varlen


def _cu(lengths):
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


def _packed(lq, lk, h, hk, d=16):
    return torch.randn(sum(lq), h, d), torch.randn(sum(lk), hk, d), torch.randn(sum(lk), hk, d)


VARLEN_CASES = {
    "one_segment": ([11], [11], 4, 4, {}),
    "three_segments_causal_gqa": ([5, 1, 9], [5, 1, 9], 4, 2, {"causal": True}),
    "three_segments_plain": ([5, 1, 9], [5, 1, 9], 2, 2, {}),
    "bottom_right_per_segment": ([3, 1, 8], [7, 1, 4], 4, 2, {"causal": True}),
    "window": ([6, 1, 10], [6, 1, 10], 2, 1, {"window_size": (2, 1)}),
    "softcap_causal": ([4, 9, 1], [4, 9, 1], 2, 2, {"softcap": 2.5, "causal": True}),
    "alibi_per_segment": ([5, 1, 9], [8, 2, 9], 4, 2, {"alibi": "bh", "causal": True}),
    "equal_lengths": ([6, 6, 6], [6, 6, 6], 4, 2, {"causal": True, "window_size": (2, -1)}),
    "repeated_lengths": ([4, 7, 4, 7, 1], [4, 7, 4, 7, 1], 2, 2, {"causal": True, "alibi": "h"}),
}


@pytest.mark.parametrize("case", sorted(VARLEN_CASES))
def test_flash_attn_varlen_func_matches_reference(case):
    lq, lk, h, hk, spec = VARLEN_CASES[case]
    kw = _dense_kwargs(spec, len(lq), h)
    cq, ck = _cu(lq), _cu(lk)
    cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    out = _fwd_bwd(
        lambda q, k, v: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw),
        lambda q, k, v: reference_varlen(q, k, v, cq, ck, **kw)[0],
        _packed(lq, lk, h, hk),
    )
    assert out.shape == (sum(lq), h, 16)


def test_varlen_return_attn_probs_gives_lse_per_token():
    lq, lk = [3, 1, 8], [7, 1, 4]
    q, k, v = _packed(lq, lk, 4, 2)
    cu_q, cu_k = torch.tensor(_cu(lq), dtype=torch.int32), torch.tensor(_cu(lk), dtype=torch.int32)
    out, lse, s_dmask = fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 8, 7, causal=True, return_attn_probs=True
    )
    ref_out, ref_lse = reference_varlen(q, k, v, _cu(lq), _cu(lk), causal=True)
    _close(out, ref_out)
    assert lse.shape == (4, 12) and s_dmask.numel() == 0
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    _close(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)])
    *_, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 7, dropout_p=0.2, return_attn_probs=True)
    assert probs.shape == (3, 4, 8, 7)
    assert probs[1, :, 1:].abs().max() == 0 and probs[1, :, :1, :1].abs().min() == 1  # 1x1 segment


def test_varlen_packed_variants_equal_unpacked():
    lens = [5, 1, 9]
    cu = torch.tensor(_cu(lens), dtype=torch.int32)
    q, k, v = _packed(lens, lens, 4, 4)
    kw = {"causal": True, "softcap": 3.0}
    base = fa.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, **kw)
    qkv = torch.stack((q, k, v), dim=1)
    _close(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 9, **kw), base, atol=0, rtol=0)
    _close(fa.flash_attn_unpadded_qkvpacked_func(qkv, cu, 9, **kw), base, atol=0, rtol=0)
    _close(
        fa.flash_attn_varlen_kvpacked_func(q, torch.stack((k, v), dim=1), cu, cu, 9, 9, **kw),
        base,
        atol=0,
        rtol=0,
    )


def test_varlen_equals_dense_per_image():
    """dots.ocr's call: same-size images packed, non-causal, cu_seqlens passed twice."""
    imgs = torch.randn(3, 20, 4, 16), torch.randn(3, 20, 4, 16), torch.randn(3, 20, 4, 16)
    cu = torch.tensor([0, 20, 40, 60], dtype=torch.int32)
    out = fa.flash_attn_varlen_func(*(x.flatten(0, 1) for x in imgs), cu, cu, 20, 20, causal=False)
    _close(out.view(3, 20, 4, 16), fa.flash_attn_func(*imgs), atol=1e-6, rtol=1e-6)


def test_varlen_rows_past_the_last_segment_are_zero():
    q, k, v = _packed([10], [10], 2, 2)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4)
    _close(out[:7], reference_varlen(q, k, v, [0, 4, 7], [0, 4, 7])[0])
    assert out[7:].abs().max() == 0


def _paged(k, lengths, page, spare=3):
    """Scatter packed keys (sum(lengths), Hk, D) into shuffled pages; returns pages and block table."""
    per_seq = [max(1, -(-n // page)) for n in lengths]
    num_pages = sum(per_seq) + spare
    order = torch.randperm(num_pages)
    pages = torch.randn(num_pages, page, *k.shape[1:])
    table = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32)
    used, start = 0, 0
    for b, n in enumerate(lengths):
        for j in range(per_seq[b]):
            table[b, j] = order[used]
            rows = k[start + j * page : start + min(n, (j + 1) * page)]
            pages[order[used], : rows.shape[0]] = rows
            used += 1
        start += n
    return pages, table


def test_varlen_block_table_matches_packed_keys():
    lq, lk = [3, 1, 8], [7, 1, 12]
    q, k, v = _packed(lq, lk, 4, 2)
    kp, table = _paged(k, lk, page=5)
    vp, _ = _paged(v, lk, page=5)
    # Same shuffle for v: rebuild v's pages from the table k used.
    start = 0
    for b, n in enumerate(lk):
        for t in range(n):
            vp[table[b, t // 5], t % 5] = v[start + t]
        start += n
    cu_q, cu_k = torch.tensor(_cu(lq), dtype=torch.int32), torch.tensor(_cu(lk), dtype=torch.int32)
    out = fa.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 8, 12, causal=True, block_table=table)
    _close(out, reference_varlen(q, k, v, _cu(lq), _cu(lk), causal=True)[0])


class MatmulRecorder:
    """Wraps torch.matmul (bookkeeping only) to see the score blocks of the explicit softmax path."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        self._real = torch.matmul
        monkeypatch.setattr(torch, "matmul", self)

    def __call__(self, a, b, **kw):
        out = self._real(a, b, **kw)
        self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize(
    ("lengths", "kw"),
    [
        ([2048, 2048, 2048], {}),
        ([2048, 1000, 2048], {"causal": True}),
        ([2048, 1000, 2048], {"window_size": (64, 64)}),
        ([2048, 1000, 2048], {"softcap": 5.0}),
    ],
)
def test_varlen_never_builds_a_total_by_total_mask(monkeypatch, lengths, kw):
    """torch's SDPA and matmul are wrapped (a fake, for recording only) to see every block's shape."""
    sdpa = SdpaRecorder(monkeypatch)
    mm = MatmulRecorder(monkeypatch)
    total = sum(lengths)
    q, k, v = torch.randn(total, 1, 8), torch.randn(total, 1, 8), torch.randn(total, 1, 8)
    cu = torch.tensor(_cu(lengths), dtype=torch.int32)
    with torch.no_grad():
        out = fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), **kw)
    assert out.shape == (total, 1, 8) and torch.isfinite(out).all()
    assert sdpa.calls or mm.shapes
    for call in sdpa.calls:  # (B, H, S, D) views
        assert call["q"][2] <= 2048 and call["k"][2] <= 2048
        assert call["mask"] is None or max(call["mask"][-2:]) <= 2048
    assert all(max(s[-2:]) <= 2048 for s in mm.shapes)
    # And the numbers are right on the middle segment.
    mid = slice(lengths[0], lengths[0] + lengths[1])
    ref = reference_attention(q[mid].unsqueeze(0), k[mid].unsqueeze(0), v[mid].unsqueeze(0), **kw)
    _close(out[mid], ref[0][0], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- KV cache


def _cache_setup(b=3, sc=24, hk=2, d=16):
    return torch.randn(b, sc, hk, d), torch.randn(b, sc, hk, d)


def _kvcache_reference(q, k_cache, v_cache, ends, starts=None, **kw):
    outs, lses = [], []
    for i in range(q.shape[0]):
        s = 0 if starts is None else int(starts[i])
        out, lse, _ = reference_attention(
            q[i : i + 1], k_cache[i : i + 1, s : int(ends[i])], v_cache[i : i + 1, s : int(ends[i])],
            window_seqlen_k=k_cache.shape[1], **kw,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("sq", [1, 3])
def test_with_kvcache_appends_in_place_and_matches_reference(sq):
    k_cache, v_cache = _cache_setup()
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(3, sq, 4, 16)
    k_new, v_new = torch.randn(3, sq, 2, 16), torch.randn(3, sq, 2, 16)
    seqlens = torch.tensor([5, 0, 20], dtype=torch.int32)
    out, lse = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True, return_softmax_lse=True
    )
    for b, n in enumerate(seqlens.tolist()):
        torch.testing.assert_close(k_cache[b, n : n + sq], k_new[b], atol=0, rtol=0)
        torch.testing.assert_close(v_cache[b, n : n + sq], v_new[b], atol=0, rtol=0)
        torch.testing.assert_close(k_cache[b, :n], before_k[b, :n], atol=0, rtol=0)
        torch.testing.assert_close(k_cache[b, n + sq :], before_k[b, n + sq :], atol=0, rtol=0)
    ref_out, ref_lse = _kvcache_reference(q, k_cache, v_cache, seqlens + sq, causal=True)
    _close(out, ref_out)
    _close(lse, ref_lse)
    assert not torch.equal(v_cache, before_v)


def test_with_kvcache_equals_full_attention_over_the_prefix():
    k_cache, v_cache = _cache_setup(b=2, sc=16)
    q, k_new, v_new = torch.randn(2, 4, 4, 16), torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=7, causal=True)
    k_full, v_full = k_cache[:, :11], v_cache[:, :11]
    _close(out, fa.flash_attn_func(q, k_full, v_full, causal=True), atol=1e-6, rtol=1e-6)
    _close(out, reference_attention(q, k_full, v_full, causal=True)[0])


def test_with_kvcache_options():
    k_cache, v_cache = _cache_setup(b=3, sc=20)
    q = torch.randn(3, 2, 4, 16)
    seqlens = torch.tensor([9, 14, 3])
    leftpad = torch.tensor([2, 0, 1])
    batch_idx = torch.tensor([2, 0, 1], dtype=torch.int32)
    kw = {"causal": True, "window_size": (5, -1), "softcap": 3.0, "alibi_slopes": torch.rand(4)}
    out = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=leftpad, cache_batch_idx=batch_idx, **kw
    )
    ref, _ = _kvcache_reference(
        q, k_cache[batch_idx.long()], v_cache[batch_idx.long()], seqlens, leftpad, **kw
    )
    _close(out, ref)
    # No cache_seqlens: the whole cache is attended to.
    _close(fa.flash_attn_with_kvcache(q, k_cache, v_cache), reference_attention(q, k_cache, v_cache)[0])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_with_kvcache_rotary(interleaved, causal):
    k_cache, v_cache = _cache_setup(b=2, sc=20)
    cache0 = k_cache.clone()
    q, k_new, v_new = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    seqlens = torch.tensor([4, 11], dtype=torch.int32)
    angles = _angles(32, 4)  # rotary_dim 8
    cos, sin = angles.cos().float(), angles.sin().float()
    out = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=seqlens, causal=causal,
        rotary_interleaved=interleaved,
    )  # fmt: skip
    pos = seqlens.long().view(2, 1) + torch.arange(3).view(1, 3)
    k_rot = reference_rotary(k_new, angles[pos].unsqueeze(2), interleaved)
    q_pos = pos if causal else seqlens.long().view(2, 1).expand(2, 3)
    q_rot = reference_rotary(q, angles[q_pos].unsqueeze(2), interleaved)
    for b, n in enumerate(seqlens.tolist()):
        _close(k_cache[b, n : n + 3], k_rot[b])
        _close(k_cache[b, :n], cache0[b, :n], atol=0, rtol=0)
    ref, _ = _kvcache_reference(q_rot, k_cache, v_cache, seqlens + 3, causal=causal)
    _close(out, ref)


def test_with_kvcache_refusals():
    k_cache, v_cache = _cache_setup()
    q = torch.randn(3, 1, 4, 16)
    with pytest.raises(ValueError, match="block_table"):
        fa.flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            block_table=torch.zeros(3, 1, dtype=torch.int32),
            cache_leftpad=torch.zeros(3),
        )
    with pytest.raises(ValueError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, torch.randn(3, 1, 2, 16), torch.randn(3, 1, 2, 16))
    with pytest.raises(ValueError, match="too short"):
        fa.flash_attn_with_kvcache(
            q, k_cache, v_cache, torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 16), cache_seqlens=23
        )


# --------------------------------------------------------------------------- bert_padding


def _padded_batch():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    return torch.randn(3, 6, 5), mask


def test_unpad_pad_round_trip():
    hidden, mask = _padded_batch()
    packed, indices, cu, max_len, used = bert_padding.unpad_input(hidden, mask)
    assert packed.shape == (9, 5)
    assert indices.tolist() == [0, 1, 2, 6, 7, 8, 9, 10, 12]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 9]
    assert max_len == 5 and isinstance(max_len, int)
    assert used.tolist() == [3, 5, 1]
    back = bert_padding.pad_input(packed, indices, 3, 6)
    torch.testing.assert_close(back, hidden * mask.unsqueeze(-1), atol=0, rtol=0)


def test_unpad_input_unused_mask_counts_in_packing_only():
    hidden, mask = _padded_batch()
    unused = torch.zeros_like(mask)
    unused[0, 3] = 1
    packed, _, cu, max_len, used = bert_padding.unpad_input(hidden, mask, unused)
    assert packed.shape[0] == 10 and cu.tolist() == [0, 4, 9, 10] and used.tolist() == [3, 5, 1]
    assert max_len == 5


def test_unpad_input_arity_follows_the_caller():
    hidden, mask = _padded_batch()
    result = bert_padding.unpad_input(hidden, mask)
    assert isinstance(result, tuple) and len(result) == 5  # flash-attn >= 2.7
    a, b, c, d, e = bert_padding.unpad_input(hidden, mask)
    assert e.tolist() == [3, 5, 1]
    a, b, c, d = bert_padding.unpad_input(hidden, mask)  # flash-attn < 2.7 callers
    assert d == 5 and c.tolist() == [0, 3, 8, 9] and a.shape == (9, 5) and b.shape == (9,)
    _, *rest = bert_padding.unpad_input(hidden, mask)
    assert len(rest) == 4


def test_padding_helpers_are_differentiable():
    hidden, mask = _padded_batch()
    hidden.requires_grad_()
    packed, indices, *_ = bert_padding.unpad_input(hidden, mask)
    (packed * 2).sum().backward()
    torch.testing.assert_close(hidden.grad, 2.0 * mask.unsqueeze(-1).expand_as(hidden).float())
    values = torch.randn(9, 5, requires_grad=True)
    bert_padding.pad_input(values, indices, 3, 6).pow(2).sum().backward()
    torch.testing.assert_close(values.grad, 2 * values.detach())
    first = bert_padding.index_first_axis(hidden.detach().flatten(0, 1), torch.tensor([7, 0]))
    torch.testing.assert_close(first, hidden.detach().flatten(0, 1)[[7, 0]])


def test_unpad_input_for_concatenated_sequences():
    hidden = torch.randn(2, 5, 3)
    lengths = torch.tensor([[2, 3, 0, 0, 0], [4, 0, 0, 0, 0]])
    packed, indices, cu, max_len = bert_padding.unpad_input_for_concatenated_sequences(hidden, lengths)
    assert cu.tolist() == [0, 2, 5, 9] and max_len == 4
    assert indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    torch.testing.assert_close(packed, hidden.flatten(0, 1)[:9])


# --------------------------------------------------------------------------- rotary


def _angles(n, half):
    return torch.arange(n).double().view(-1, 1) * (0.5 ** torch.arange(half).double()).view(1, -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_apply_rotary_emb_matches_reference(interleaved, rotary_dim):
    x = torch.randn(2, 7, 3, 16)
    ang = _angles(12, rotary_dim // 2)
    cos, sin = ang.cos().float(), ang.sin().float()
    got = _fwd_bwd(
        lambda t: rotary.apply_rotary_emb(t, cos, sin, interleaved=interleaved),
        lambda t: reference_rotary(t, ang[:7].view(1, 7, 1, -1), interleaved),
        [x],
    )
    offsets = torch.tensor([0, 4])
    out = rotary.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    _close(out[0], got[0].detach())
    _close(out[1], reference_rotary(x[1], ang[4:11].view(7, 1, -1), interleaved))
    shifted = rotary.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=3)
    _close(shifted, reference_rotary(x, ang[3:10].view(1, 7, 1, -1), interleaved))


def test_apply_rotary_emb_varlen_inplace_and_out_of_range():
    ang = _angles(6, 4)
    cos, sin = ang.cos().float(), ang.sin().float()
    x = torch.randn(9, 2, 8)
    cu = torch.tensor([0, 2, 9], dtype=torch.int32)
    out = rotary.apply_rotary_emb(x, cos, sin, cu_seqlens=cu, max_seqlen=7)
    _close(out[:2], reference_rotary(x[:2], ang[:2].view(2, 1, -1), False))
    _close(out[2:8], reference_rotary(x[2:8], ang[:6].view(6, 1, -1), False))
    _close(out[8], x[8])  # position 6 is past cos: left unrotated, as flash-attn's kernel does
    y = x.clone()
    same = rotary.apply_rotary_emb(y, cos, sin, cu_seqlens=cu, max_seqlen=7, inplace=True)
    assert same is y
    _close(y, out, atol=0, rtol=0)


def test_rotary_embedding_module():
    mod = rotary.RotaryEmbedding(8, base=100.0)
    qkv = torch.randn(2, 5, 3, 2, 8)
    expected = qkv.clone()
    inv = 1.0 / (100.0 ** (torch.arange(0, 8, 2).double() / 8))
    ang = torch.arange(5).double().view(-1, 1) * inv.view(1, -1)
    out = mod(qkv)
    assert out is qkv  # in place, like flash-attn
    _close(out[:, :, 0], reference_rotary(expected[:, :, 0], ang.view(1, 5, 1, -1), False))
    _close(out[:, :, 1], reference_rotary(expected[:, :, 1], ang.view(1, 5, 1, -1), False))
    _close(out[:, :, 2], expected[:, :, 2], atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="XPos"):
        rotary.RotaryEmbedding(8, scale_base=512)


# --------------------------------------------------------------------------- CUDA (skipped on CPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("lq", "lk", "kw", "fused"),
    [
        ([64, 1, 200], [64, 1, 200], {}, True),
        ([64, 1, 200], [64, 1, 200], {"causal": True}, True),
        ([64, 1, 200], [64, 1, 200], {"window_size": (16, 3)}, True),
        ([30, 1, 90], [70, 1, 40], {"causal": True}, True),  # FA2 aligns bottom-right per segment
        ([30, 1, 90], [70, 1, 40], {"window_size": (8, 0)}, True),
        ([64, 1, 200], [64, 1, 200], {"softcap": 5.0, "causal": True}, False),
        ([600, 600], [600, 600], {"causal": True}, True),  # uniform: still FA2
        ([96, 96, 96], [96, 96, 96], {"causal": True}, True),
        ([600, 600], [600, 600], {"window_size": (8, 8)}, True),
    ],
)
def test_cuda_varlen_routes_and_numbers(dtype, lq, lk, kw, fused):
    from sdpa_shim._runtime import kernels, varlen

    q, k, v = (x.cuda() for x in _packed(lq, lk, 8, 2, d=64))
    cq, ck = _cu(lq), _cu(lk)
    cu_q = torch.tensor(cq, dtype=torch.int32, device="cuda")
    cu_k = cu_q if lq == lk else torch.tensor(ck, dtype=torch.int32, device="cuda")
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    engine_kw = {"causal": kw.get("causal", False), "window": kw.get("window_size", (-1, -1))}
    engine_kw["softcap"] = kw.get("softcap", 0.0)
    route = varlen.route_for(*xs, cu_q, cu_k, max(lq), max(lk), **engine_kw)
    out = fa.flash_attn_varlen_func(*xs, cu_q, cu_k, max(lq), max(lk), **kw)
    grad = torch.randn_like(out)
    out.backward(grad)
    xr = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    ref = reference_varlen(*xr, cq, ck, **kw)[0]
    ref.backward(grad.double().cpu())
    assert out.dtype == dtype
    has_fused = kernels.features().varlen_attn is not None
    assert (route == "varlen_attn") == (fused and has_fused)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.float16 else {"atol": 5e-2, "rtol": 5e-2}
    _close(out.cpu(), ref, **tol)
    for mine, theirs in zip(xs, xr, strict=True):
        _close(mine.grad.cpu(), theirs.grad, **tol)


@cuda
@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_cuda_dense_matches_reference(case):
    sq, sk, h, hk, spec = DENSE_CASES[case]
    kw = _dense_kwargs(spec, 2, h)
    q, k, v = _qkv(2, sq, sk, h, hk, d=64)
    cuda_kw = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    xs = [x.cuda().bfloat16().requires_grad_() for x in (q, k, v)]
    out = fa.flash_attn_func(*xs, **cuda_kw)
    out.float().sum().backward()
    xr = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*xr, **kw)[0]
    ref.sum().backward()
    _close(out.cpu(), ref, atol=5e-2, rtol=5e-2)
    for mine, theirs in zip(xs, xr, strict=True):
        _close(mine.grad.cpu(), theirs.grad, atol=8e-2, rtol=8e-2)


@cuda
def test_cuda_kvcache_decode():
    k_cache, v_cache = (x.cuda().half() for x in _cache_setup(b=3, sc=40, d=64))
    q = torch.randn(3, 1, 4, 64, device="cuda", dtype=torch.half)
    k_new = torch.randn(3, 1, 2, 64, device="cuda", dtype=torch.half)
    v_new = torch.randn(3, 1, 2, 64, device="cuda", dtype=torch.half)
    seqlens = torch.tensor([5, 0, 38], dtype=torch.int32, device="cuda")
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)
    ref, _ = _kvcache_reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens.cpu() + 1, causal=True)
    _close(out.cpu(), ref, atol=2e-2, rtol=2e-2)
    _close(k_cache[2, 38].cpu(), k_new[2, 0].cpu(), atol=0, rtol=0)
