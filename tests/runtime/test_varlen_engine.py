"""The runtime's varlen engine (sdpa_shim._runtime.varlen) against a float64 per-sequence reference.

Every route runs on CPU: features of newer torch are hidden with ``kernels.override_features`` and
routes pinned with ``varlen.force_route``. torch's varlen_attn has no CPU kernel, so its keyword
handling per torch release is checked against stand-ins with 2.10 / 2.11 / 2.12 signatures that
compute the float64 reference (the kernel's numbers are checked by bench/engine_check.py on a GPU).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sdpa_shim._runtime import kernels, varlen
from sdpa_shim._runtime.varlen import route_for, varlen_attention

FP32 = {"atol": 1e-4, "rtol": 1e-4}
BF16 = {"atol": 4e-2, "rtol": 4e-2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- reference


def reference(
    q, k, v, cu_q, cu_k, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None, max_k=None
):
    """float64, one explicit softmax per sequence; out (Tq, H, Dv) with zeros outside, lse (H, Tq)."""
    q, k, v = q.double(), k.double(), v.double()
    tq, h, d = q.shape
    hk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    limit = max_k if max_k is not None else max([b - a for a, b in itertools.pairwise(cu_k)] or [0])
    left, right = window
    right = 0 if causal else right
    left = -1 if left < 0 or left >= limit else left
    right = -1 if right < 0 or right >= limit else right
    outs = [torch.zeros(cu_q[0], h, v.shape[-1], dtype=torch.float64)]
    lses = [torch.full((h, cu_q[0]), math.inf, dtype=torch.float64)]
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b] : cu_q[b + 1]]
        ks = k[cu_k[b] : cu_k[b + 1]].repeat_interleave(h // hk, dim=1)
        vs = v[cu_k[b] : cu_k[b + 1]].repeat_interleave(h // hk, dim=1)
        lq, lk = qs.shape[0], ks.shape[0]
        s = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        diag = torch.arange(lq).view(-1, 1) + lk - lq
        j = torch.arange(lk).view(1, -1)
        if alibi is not None:
            slopes = (alibi[b] if alibi.dim() == 2 else alibi).double().view(h, 1, 1)
            s = s - slopes * (diag - j).abs().double()
        ok = torch.ones(lq, lk, dtype=torch.bool)
        if right >= 0:
            ok &= j <= diag + right
        if left >= 0:
            ok &= j >= diag - left
        row_ok = ok.any(-1)
        s = s.masked_fill(~(ok | ~row_ok.view(-1, 1)), -math.inf)
        p = torch.softmax(s, -1) * row_ok.view(1, -1, 1)
        outs.append(torch.einsum("hij,jhd->ihd", p, vs))
        lse = torch.logsumexp(s, -1) if lk else torch.full((h, lq), math.inf, dtype=torch.float64)
        lses.append(lse.masked_fill(~row_ok.view(1, -1), math.inf))
    rest = tq - cu_q[-1]
    outs.append(torch.zeros(rest, h, v.shape[-1], dtype=torch.float64))
    lses.append(torch.full((h, rest), math.inf, dtype=torch.float64))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _cu(lengths):
    return [0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()]


def _inputs(lq, lk, h=4, hk=2, d=16, dv=None, extra_q=0):
    tq, tk = sum(lq) + extra_q, sum(lk)
    return torch.randn(tq, h, d), torch.randn(tk, hk, d), torch.randn(tk, hk, dv or d)


def _check_fwd_bwd(inputs, cu_q, cu_k, max_q, max_k, tol=FP32, dtype=torch.float32, ref_kw=None, **kw):
    """Run the engine in ``dtype`` and the reference in float64 on the same inputs and upstream grad."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    res = varlen_attention(*xs, torch.tensor(cu_q), torch.tensor(cu_k), max_q, max_k, **kw)
    out, lse = res if kw.get("return_lse") else (res, None)
    assert out.dtype == dtype and out.shape == (xs[0].shape[0], xs[0].shape[1], xs[2].shape[-1])
    grad = torch.randn_like(out)
    out.backward(grad)
    xr = [x.detach().double().requires_grad_() for x in inputs]
    rkw = {n: kw[n] for n in ("scale", "causal", "window", "softcap") if n in kw}
    rkw["alibi"] = kw.get("alibi_slopes")
    ref_out, ref_lse = reference(*xr, cu_q, cu_k, max_k=max_k, **rkw, **(ref_kw or {}))
    ref_out.backward(grad.double())
    torch.testing.assert_close(out.double(), ref_out, **tol)
    for mine, theirs in zip(xs, xr, strict=True):
        assert torch.isfinite(mine.grad).all()
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **tol)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse.double()[fin], ref_lse.detach()[fin], **tol)
    return out


# --------------------------------------------------------------------------- properties

lengths = st.lists(st.tuples(st.integers(0, 19), st.integers(0, 23)), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(
    lens=lengths,
    heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    causal=st.booleans(),
    window=st.sampled_from([(-1, -1), (3, -1), (2, 1), (0, 4)]),
    extra=st.sampled_from(["none", "softcap", "alibi", "alibi_batch", "lse"]),
    extra_q=st.integers(0, 3),
    bound=st.integers(0, 5),
)
def test_random_boundaries_match_reference(lens, heads, causal, window, extra, extra_q, bound):
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    h, hk = heads
    kw = {"causal": causal, "window": window}
    if extra == "softcap":
        kw["softcap"] = 2.0
    elif extra == "alibi":
        kw["alibi_slopes"] = torch.rand(h)
    elif extra == "alibi_batch":
        kw["alibi_slopes"] = torch.rand(len(lens), h)
    elif extra == "lse":
        kw["return_lse"] = True
    # max_seqlen may be an upper bound above the real maximum (transformers CB pads it).
    _check_fwd_bwd(_inputs(lq, lk, h, hk, extra_q=extra_q), _cu(lq), _cu(lk), max(lq) + bound,
                   max(lk) + bound, **kw)  # fmt: skip


@pytest.mark.parametrize("route", ["uniform_sdpa", "uniform_explicit", "bucketed_sdpa", "bucketed_explicit"])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (2, 3)}, {"alibi": True}])
def test_every_cpu_route_matches_reference(route, kw):
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(4)
    lq = lk = [6, 6, 6] if route.startswith("uniform") else [6, 1, 9]
    with varlen.force_route(route):
        assert route_for(*_inputs(lq, lk), torch.tensor(_cu(lq)), torch.tensor(_cu(lk)), 9, 9, **kw) == route
        _check_fwd_bwd(_inputs(lq, lk), _cu(lq), _cu(lk), max(lq), max(lk), **kw)


def test_route_choice_on_cpu():
    q, k, v = _inputs([5, 5], [5, 5])
    cu = torch.tensor([0, 5, 10])
    assert route_for(q, k, v, cu, cu, 5, 5, causal=True) == "uniform_sdpa"
    assert route_for(q, k, v, cu, cu, 5, 5, softcap=3.0) == "uniform_explicit"
    cu2 = torch.tensor([0, 3, 10])
    assert route_for(q, k, v, cu2, cu2, 7, 7, causal=True) == "bucketed_sdpa"
    assert route_for(q, k, v, cu2, cu2, 7, 7, return_lse=True) == "bucketed_explicit"
    with pytest.raises(ValueError, match="varlen_attn"), varlen.force_route("varlen_attn"):
        route_for(q, k, v, cu, cu, 5, 5)
    with pytest.raises(ValueError, match="softcap"), varlen.force_route("bucketed_sdpa"):
        route_for(q, k, v, cu, cu, 5, 5, softcap=1.0)


def test_cu_q_differs_from_cu_k_bottom_right():
    """Queries against more cached keys (chunked prefill / decode), and more queries than keys."""
    lq, lk = [1, 4, 9, 3], [17, 4, 12, 1]
    for kw in ({"causal": True}, {"causal": True, "window": (5, -1)}, {"window": (1, 1)}):
        _check_fwd_bwd(_inputs(lq, lk), _cu(lq), _cu(lk), 9, 17, **kw)


def test_zero_length_sequences_plateaus_and_trailing_rows():
    lq, lk = [0, 5, 0, 3, 2], [4, 5, 0, 0, 6]  # no query, plateau, no key, ...
    out = _check_fwd_bwd(_inputs(lq, lk, extra_q=4), _cu(lq), _cu(lk), 8, 8, causal=True, return_lse=True)
    assert out[sum(lq) :].abs().max() == 0  # rows past cu_seqlens_q[-1]
    assert out[5:8].abs().max() == 0  # the sequence without keys


def test_fully_masked_rows_give_zero_forward_and_backward():
    lq, lk = [7], [3]  # bottom-right causal: the first 4 queries see no key
    q, k, v = (x.requires_grad_() for x in _inputs(lq, lk))
    for route in ("bucketed_sdpa", "bucketed_explicit", "uniform_sdpa"):
        for x in (q, k, v):
            x.grad = None
        with varlen.force_route(route):
            out = varlen_attention(q, k, v, torch.tensor([0, 7]), torch.tensor([0, 3]), 7, 3, causal=True)
        out.sum().backward()
        assert out[:4].abs().max() == 0 and out[4:].abs().min() > 0
        assert q.grad[:4].abs().max() == 0 and torch.isfinite(q.grad).all()


def test_zero_dim_tensor_max_seqlen():
    lq = [4, 9]
    q, k, v = _inputs(lq, lq)
    cu = torch.tensor(_cu(lq), dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, cu, torch.tensor(9), torch.tensor(9), causal=True)
    torch.testing.assert_close(out.double(), reference(q, k, v, _cu(lq), _cu(lq), causal=True)[0], **FP32)


def test_bf16_forward_and_backward():
    lq, lk = [5, 13, 1], [9, 13, 4]
    _check_fwd_bwd(_inputs(lq, lk), _cu(lq), _cu(lk), 13, 13, tol=BF16, dtype=torch.bfloat16, causal=True)
    _check_fwd_bwd(_inputs(lq, lk), _cu(lq), _cu(lk), 13, 13, tol=BF16, dtype=torch.bfloat16, softcap=4.0)


def test_value_head_dim_may_differ():
    lq = [3, 8]
    _check_fwd_bwd(_inputs(lq, lq, dv=8), _cu(lq), _cu(lq), 8, 8, causal=True)


# --------------------------------------------------------------------------- paged and seqused_k


def _to_pages(packed, lengths, page, table):
    """Pages (num_pages, page, H, D) holding each sequence's tokens where ``table`` says, noise elsewhere."""
    pages = torch.randn(int(table.max()) + 3, page, *packed.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        for t in range(n):
            pages[table[b, t // page], t % page] = packed[start + t]
        start += n
    return pages


def _shuffled_table(lengths, page):
    per_seq = [max(1, -(-n // page)) for n in lengths]
    ids = torch.randperm(sum(per_seq) + 4)[: sum(per_seq)]
    table = torch.zeros(len(lengths), max(per_seq) + 1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = ids[start : start + n]
        start += n
    return table


@pytest.mark.parametrize("page", [1, 3, 5, 16])
@pytest.mark.parametrize("how", ["cu_seqlens_k", "seqused_k"])
def test_paged_shuffled_block_table(page, how):
    lq, lk = [1, 4, 1, 3], [11, 4, 0, 19]
    q, k, v = _inputs(lq, lk)
    table = _shuffled_table(lk, page)
    kp, vp = _to_pages(k, lk, page, table), _to_pages(v, lk, page, table)
    cu_k = torch.tensor(_cu(lk), dtype=torch.int32) if how == "cu_seqlens_k" else None
    used = torch.tensor(lk, dtype=torch.int32) if how == "seqused_k" else None
    kpr, vpr = kp.clone().requires_grad_(), vp.clone().requires_grad_()
    qr = q.clone().requires_grad_()
    out, lse = varlen_attention(
        qr, kpr, vpr, torch.tensor(_cu(lq)), cu_k, 4, 19, causal=True, block_table=table, seqused_k=used,
        return_lse=True,
    )  # fmt: skip
    ref_out, ref_lse = reference(q, k, v, _cu(lq), _cu(lk), causal=True, max_k=19)
    torch.testing.assert_close(out.double(), ref_out, **FP32)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], **FP32)
    out.sum().backward()  # autograd reaches the pages that were used, and only those
    used_pages = {int(table[b, j]) for b, n in enumerate(lk) for j in range(-(-n // page))}
    unused = [i for i in range(kp.shape[0]) if i not in used_pages]
    assert kpr.grad[unused].abs().max() == 0 and torch.isfinite(kpr.grad).all()


def test_paged_gathers_used_pages_only(monkeypatch):
    """Memory O(used pages): the gather reads sum(lengths) rows, not every page times the batch."""
    lk = [3, 2]
    q, k, v = _inputs([1, 1], lk)
    table = torch.tensor([[7, 0], [2, 0]], dtype=torch.int32)
    kp, vp = _to_pages(k, lk, 4, table), _to_pages(v, lk, 4, table)
    kp = torch.cat([kp, torch.randn(1000, 4, 2, 16)])
    sizes = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(
        torch.Tensor, "index_select", lambda x, d, i: sizes.append((x.shape[0], i.numel())) or real(x, d, i)
    )
    out = varlen_attention(q, kp, torch.cat([vp, torch.randn(1000, 4, 2, 16)]), torch.tensor([0, 1, 2]),
                           torch.tensor(_cu(lk)), 1, 3, block_table=table)  # fmt: skip
    from_pages = [n for rows, n in sizes if rows == kp.shape[0] * 4]
    assert len(from_pages) == 2 and max(from_pages) == sum(lk)  # k and v: the used tokens only
    torch.testing.assert_close(out.double(), reference(q, k, v, [0, 1, 2], _cu(lk))[0], **FP32)


def test_seqused_k_without_pages():
    """Keys of sequence b are k[cu_k[b] : cu_k[b] + seqused_k[b]]; the rest of its slots are unused."""
    slots, used = [8, 8, 8], [3, 8, 0]
    q, k, v = _inputs([2, 2, 2], slots)
    cu_k = torch.tensor(_cu(slots))
    out = varlen_attention(q, k, v, torch.tensor([0, 2, 4, 6]), cu_k, 2, 8, causal=True,
                           seqused_k=torch.tensor(used))  # fmt: skip
    keep = torch.cat([torch.arange(0, 3), torch.arange(8, 16)])
    ref = reference(q, k[keep], v[keep], [0, 2, 4, 6], _cu(used), causal=True, max_k=8)[0]
    torch.testing.assert_close(out.double(), ref, **FP32)
    # cu_seqlens_k None: keys packed back to back.
    out2 = varlen_attention(q, k[keep], v[keep], torch.tensor([0, 2, 4, 6]), None, 2, 8, causal=True,
                            seqused_k=torch.tensor(used))  # fmt: skip
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


# --------------------------------------------------------------------------- bounded work


class SdpaRecorder:
    """Wraps torch's SDPA (bookkeeping only; the real kernel runs) to record every call's shapes."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        self._real = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, attn_mask=None, **kw):
        mask = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else None
        self.calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "mask": mask, **kw})
        return self._real(q, k, v, attn_mask=attn_mask, **kw)


@pytest.mark.parametrize("kw", [{"causal": True}, {}, {"window": (8, 0)}])
def test_a_row_of_many_documents_costs_few_sdpa_calls(monkeypatch, kw):
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 65, (320,), generator=gen).tolist()
    lens[7] = 200  # one longer document
    q, k, v = (x.requires_grad_() for x in _inputs(lens, lens, h=4, hk=1, d=8))
    cu = torch.tensor(_cu(lens), dtype=torch.int32)
    rec = SdpaRecorder(monkeypatch)
    out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), **kw)
    out.sum().backward()
    assert 1 <= len(rec.calls) <= 5  # buckets 16, 32, 64, 256: O(log max_len), not one per document
    assert all(c["k"][2] <= max(lens) and c["q"][2] <= max(lens) for c in rec.calls)
    assert all(c["mask"] is None or c["mask"][-1] <= max(lens) for c in rec.calls)
    if kw == {"causal": True}:  # causal self-attention needs no mask and keeps GQA unexpanded
        assert all(c["mask"] is None and c["is_causal"] and c["k"][1] == 1 for c in rec.calls)
    sel = slice(sum(lens[:7]), sum(lens[:8]))
    ref = reference(q[sel].detach(), k[sel].detach(), v[sel].detach(), [0, 200], [0, 200], **kw)[0]
    torch.testing.assert_close(out[sel].double(), ref, **FP32)


def test_equal_lengths_are_one_call_on_a_view(monkeypatch):
    rec = SdpaRecorder(monkeypatch)
    q, k, v = _inputs([32] * 8, [32] * 8)
    cu = torch.arange(9) * 32
    varlen_attention(q, k, v, cu, cu, 32, 32, causal=True)
    assert len(rec.calls) == 1 and rec.calls[0]["q"][0] == 8 and rec.calls[0]["mask"] is None


# --------------------------------------------------------------------------- older torch


def test_without_sdpa_enable_gqa_keys_are_expanded(monkeypatch):
    lens = [5, 9, 30]
    with kernels.override_features(sdpa_enable_gqa=False):
        rec = SdpaRecorder(monkeypatch)
        _check_fwd_bwd(_inputs(lens, lens, h=4, hk=2), _cu(lens), _cu(lens), 30, 30, causal=True)
    assert rec.calls and all("enable_gqa" not in c and c["k"][1] == 4 for c in rec.calls)


def test_without_causal_lower_right_a_mask_is_built(monkeypatch):
    lq, lk = [3, 3], [9, 9]
    with kernels.override_features(causal_lower_right=None):
        rec = SdpaRecorder(monkeypatch)
        _check_fwd_bwd(_inputs(lq, lk), _cu(lq), _cu(lk), 3, 9, causal=True)
    assert rec.calls and rec.calls[0]["mask"] is not None


def _fake_varlen_attn(signature: str):
    """Stand-ins with the signatures of torch 2.10 / 2.11 / 2.12 varlen_attn, computing the reference."""
    seen: list[dict] = []

    def compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, window, scale, lse):
        assert isinstance(max_q, int) and isinstance(max_k, int)
        out, ref_lse = reference(query, key, value, cu_seq_q.tolist(), cu_seq_k.tolist(), scale=scale,
                                 causal=causal, window=window, max_k=max_k)  # fmt: skip
        out = out.to(query.dtype)
        junk = torch.full_like(out[cu_seq_q[-1] :], float("nan"))  # FA2 leaves these rows unwritten
        out = torch.cat([out[: cu_seq_q[-1]], junk])
        return (out, ref_lse.float()) if lse else out

    if signature == "2.10":

        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            seen.append({"is_causal": is_causal})
            lse = return_aux is not None and return_aux.lse
            return compute(
                query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, (-1, -1), None, lse
            )

    elif signature == "2.11":

        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):  # fmt: skip
            assert isinstance(window_size, tuple)
            seen.append({"window_size": window_size, "scale": scale})
            lse = return_aux is not None and return_aux.lse
            return compute(
                query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, False, window_size, scale, lse
            )

    else:

        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
            if query.shape[1] != key.shape[1] and not enable_gqa:
                raise ValueError("Try setting enable_gqa=True for GQA.")
            seen.append({"window_size": window_size, "enable_gqa": enable_gqa})
            lse = return_aux is not None and return_aux.lse
            return compute(
                query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, False, window_size, scale, lse
            )

    import inspect

    from torch.nn.attention.varlen import AuxRequest

    params = frozenset(inspect.signature(fn).parameters)
    return seen, {"varlen_attn": fn, "varlen_params": params, "aux_request": AuxRequest,
                  "varlen_attn_devices": frozenset({"cpu"})}  # fmt: skip


@pytest.mark.parametrize("signature", ["2.10", "2.11", "2.12"])
def test_varlen_attn_keywords_per_torch_release(signature):
    seen, feats = _fake_varlen_attn(signature)
    lq, lk = [3, 7, 0], [5, 7, 2]
    q, k, v = (x.bfloat16() for x in _inputs(lq, lk, extra_q=2))
    cu_q, cu_k = torch.tensor(_cu(lq), dtype=torch.int32), torch.tensor(_cu(lk), dtype=torch.int32)
    with kernels.override_features(**feats):
        assert route_for(q, k, v, cu_q, cu_k, 7, 7, causal=True) == "varlen_attn"
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, 7, 7, causal=True, return_lse=True)
        ref_out, _ = reference(q, k, v, _cu(lq), _cu(lk), causal=True)
        torch.testing.assert_close(out.double(), ref_out, **BF16)
        assert out[sum(lq) :].abs().max() == 0 and torch.isinf(lse[:, sum(lq) :]).all()  # rows FA2 skips
        expect_windowed = signature != "2.10"
        assert route_for(q, k, v, cu_q, cu_k, 7, 7, window=(2, 1)) == (
            "varlen_attn" if expect_windowed else "bucketed_sdpa"
        )
        assert route_for(q, k, v, cu_q, cu_k, 7, 7, scale=0.3) == (
            "varlen_attn" if expect_windowed else "bucketed_sdpa"
        )
        assert route_for(q, k, v, cu_q, cu_k, 7, 7, softcap=1.0) == "bucketed_explicit"
        assert route_for(q.float(), k.float(), v.float(), cu_q, cu_k, 7, 7) == "bucketed_sdpa"
    if signature == "2.10":
        assert seen[0] == {"is_causal": True}
    elif signature == "2.11":
        assert seen[0] == {"window_size": (-1, 0), "scale": 16**-0.5}
    else:
        assert seen[0] == {"window_size": (-1, 0), "enable_gqa": True}


# --------------------------------------------------------------------------- determinism, logging


def test_deterministic_backward_is_bit_identical_and_restores_torch_state():
    lq, lk = [5, 30, 1, 17], [9, 30, 4, 17]
    inputs = _inputs(lq, lk)
    cu_q, cu_k = torch.tensor(_cu(lq)), torch.tensor(_cu(lk))
    grad = torch.randn(sum(lq), 4, 16)
    grads = []
    for _ in range(5):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = varlen_attention(*xs, cu_q, cu_k, 30, 30, causal=True, deterministic=True)
        out.backward(grad)
        grads.append([x.grad for x in xs])
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(g, grads[0], strict=True))
    assert not torch.are_deterministic_algorithms_enabled()
    plain = varlen_attention(*inputs, cu_q, cu_k, 30, 30, causal=True)
    torch.testing.assert_close(out.detach(), plain, atol=0, rtol=0)


@pytest.mark.parametrize("route", [*varlen.ROUTES, "dense"])
def test_deterministic_backward_survives_repeated_backward_passes(route):
    """flash-attn's determinism tests (and gradient penalties) run backward several times through one
    forward with ``retain_graph=True``: every pass gives the same gradients, bit for bit."""
    from sdpa_shim.standin import flash_attn_func

    if route == "flex":
        pytest.skip("flex_attention has no backward on CPU; bench/engine_check.py checks it on a GPU")
    lq = [6, 6, 6] if route.startswith("uniform") or route == "dense" else [5, 30, 1, 17]
    inputs = [x.clone().requires_grad_() for x in _inputs(lq, lq)]
    cu = torch.tensor(_cu(lq))
    want_lse = route.endswith("_explicit")
    feats = _fake_varlen_attn("2.12")[1] if route == "varlen_attn" else {}
    if route == "varlen_attn":
        inputs = [x.detach().bfloat16().requires_grad_() for x in inputs]
    with kernels.override_features(**feats), contextlib.ExitStack() as stack:
        if route == "dense":
            q, k, v = (x.unflatten(0, (3, 6)) for x in inputs)
            out = flash_attn_func(q, k, v, causal=True, deterministic=True)
        else:
            stack.enter_context(varlen.force_route(route))
            res = varlen_attention(
                *inputs, cu, cu, 30, 30, causal=True, deterministic=True, return_lse=want_lse
            )
            out = res[0] if want_lse else res
    grad = torch.randn_like(out)
    passes = [torch.autograd.grad(out, inputs, grad, retain_graph=True) for _ in range(3)]
    assert all(g.abs().sum() > 0 for g in passes[0])
    for later in passes[1:]:
        assert all(torch.equal(a, b) for a, b in zip(passes[0], later, strict=True))


def test_debug_log_once_per_route_device_dtype(caplog):
    varlen._LOGGED.clear()
    q, k, v = _inputs([3, 4], [3, 4])
    cu = torch.tensor([0, 3, 7])
    with caplog.at_level(logging.DEBUG, logger="sdpa_shim._runtime.varlen"):
        varlen_attention(q, k, v, cu, cu, 4, 4)
        varlen_attention(q, k, v, cu, cu, 4, 4)
    lines = [r.getMessage() for r in caplog.records if "route" in r.getMessage()]
    assert lines == ["varlen attention: route bucketed_sdpa on cpu torch.float32"]


def test_invalid_inputs_raise():
    q, k, v = _inputs([4], [4], h=3, hk=2)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, v, torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4)
    q, k, v = _inputs([4], [4])
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, torch.tensor([0, 3, 2]), torch.tensor([0, 2, 4]), 4, 4)
    with pytest.raises(ValueError, match="past"):
        varlen_attention(q, k, v, torch.tensor([0, 9]), torch.tensor([0, 4]), 9, 4)
    with pytest.raises(ValueError, match="seqused_k"):
        varlen_attention(q, k, v, torch.tensor([0, 4]), None, 4, 4)


def test_flex_is_chosen_for_many_short_documents_only(monkeypatch):
    """The engine takes the flex route for a packed self-attention row of many short documents (when
    enabled; CPU runs flex eagerly for tests) and the other routes otherwise or when flex is missing."""
    from sdpa_shim._runtime import flex

    monkeypatch.setattr(flex, "allow_cpu", True)
    short = [10] * 40
    q, k, v = _inputs(short, short)
    cu = torch.tensor(_cu(short), dtype=torch.int32)
    assert route_for(q, k, v, cu, cu, 10, 10, causal=True) != "flex"  # off by default
    monkeypatch.setattr(varlen, "FLEX_UP_TO_MEAN_LENGTH", 64)
    assert route_for(q, k, v, cu, cu, 10, 10, causal=True) == "flex"
    with torch.no_grad():
        out = varlen_attention(q, k, v, cu, cu, 10, 10, causal=True)
    torch.testing.assert_close(
        out.double(), reference(q, k, v, _cu(short), _cu(short), causal=True)[0], **FP32
    )
    few, long = [10] * 8, [100] * 40
    for lens in (few, long):
        qq, kk, vv = _inputs(lens, lens)
        cc = torch.tensor(_cu(lens), dtype=torch.int32)
        assert route_for(qq, kk, vv, cc, cc, max(lens), max(lens), causal=True) != "flex"
    monkeypatch.setattr(flex, "_flex_module", lambda: None)  # a torch without flex_attention
    assert route_for(q, k, v, cu, cu, 10, 10, causal=True) == "uniform_sdpa"


def test_torch_2_15_varlen_attn_backend_flags_and_scale():
    """torch 2.15's varlen_attn picks its kernel from SDPA's backend flags and raises "No viable backend"
    when flash and cuDNN are both off (as the backend policy's "efficient"/"math" pins leave them), and
    refuses ``scale <= 0``. Faked here (no CUDA kernel on a CPU box) with a stand-in of that behaviour:
    the engine keeps varlen_attn (never the slow bucketed fallback) and restores the flags."""
    seen, feats = _fake_varlen_attn("2.12")
    inner = feats["varlen_attn"]
    cuda = torch.backends.cuda

    def like_2_15(*args, scale=None, **kwargs):
        if not (cuda.flash_sdp_enabled() or cuda.cudnn_sdp_enabled()):
            raise RuntimeError("No viable backend for varlen_attn")
        if scale is not None and scale <= 0:
            raise ValueError("scale must be positive")
        return inner(*args, scale=scale, **kwargs)

    feats = {**feats, "varlen_attn": like_2_15, "varlen_params": feats["varlen_params"] | {"scale"}}
    lens = [3, 7, 5]
    q, k, v = (x.bfloat16() for x in _inputs(lens, lens))
    cu = torch.tensor(_cu(lens), dtype=torch.int32)
    flags = (cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled())
    cuda.enable_flash_sdp(False)
    cuda.enable_cudnn_sdp(False)
    try:
        with kernels.override_features(**feats), varlen.force_route("varlen_attn"):
            out = varlen_attention(q, k, v, cu, cu, 7, 7, causal=True)
        assert (cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled()) == (False, False)  # restored
    finally:
        cuda.enable_flash_sdp(flags[0])
        cuda.enable_cudnn_sdp(flags[1])
    assert len(seen) == 1  # varlen_attn ran (under the flash flag), not a fallback
    torch.testing.assert_close(out.double(), reference(q, k, v, _cu(lens), _cu(lens), causal=True)[0], **BF16)
    with kernels.override_features(**feats):
        assert route_for(q, k, v, cu, cu, 7, 7, causal=True, scale=0.0) == "bucketed_sdpa"
        zero = varlen_attention(q, k, v, cu, cu, 7, 7, causal=True, scale=0.0)  # uniform weights
    expected = reference(q, k, v, _cu(lens), _cu(lens), causal=True, scale=0.0)[0]
    torch.testing.assert_close(zero.double(), expected, **BF16)
