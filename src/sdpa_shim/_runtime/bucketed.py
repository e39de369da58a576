"""The varlen engine's general route: sequences grouped by length into a few padded SDPA calls.

Sequences are grouped by (ceil_log2 Lq, ceil_log2 Lk), lengths up to ``MIN_BUCKET`` sharing one group,
so a row of any number of documents costs O(log^2 max_len) calls (O(log) when Lq == Lk). Each group is
gathered, right-padded to its own longest sequence and run as one batched call with a mask built for
that group only; causal self-attention needs no mask (top-left == bottom-right, padded keys sit after
every real query). Padded query rows are discarded and never NaN.

The grouping (``Plan``: index tensors, lengths, which groups need a mask) depends only on the bounds,
so it is built once per ``cu_seqlens`` tensor and reused by every layer of a forward.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import torch
from torch import Tensor

from . import forward_meta
from .kernels import _alibi_bias, _sdpa, attention, explicit_attention, masked_sdpa

#: Lengths up to this share one bucket: a few padded tokens cost less than another kernel launch.
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-call settings after flash-attn's normalisation (window bounded by max_seqlen_k)."""

    scale: float
    left: int
    right: int
    softcap: float
    alibi: Tensor | None
    dropout_p: float
    want_lse: bool
    max_k: int  # as the caller gave it: flash-attn bounds windows by it, FA2 sizes its grid by it

    @property
    def needs_explicit(self) -> bool:
        return self.softcap > 0 or self.want_lse


def _bucket_of(length: int) -> int:
    return (max(length, MIN_BUCKET) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Group:
    """Sequences of one (Lq, Lk) bucket, right-padded to the group's longest."""

    index: list[int]  # which sequences
    rows_q: Tensor  # (n, big_q) source rows of q (padding repeats a sequence's first row)
    rows_k: Tensor  # (n, big_k)
    lq: Tensor  # (n,) lengths, on the host
    lk: Tensor
    full: bool  # no padding in the group: dense semantics
    equal: bool  # Lq == Lk for every sequence


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a row of sequences is split into groups, and where each output row comes from."""

    groups: list[_Group]
    source: Tensor  # (tq,) row of the stacked group outputs for each output row; the last: zeros
    stacked: int


#: Plans kept, by bounds: image sizes and document lengths repeat from forward to forward.
PLANS = 64
_plans: collections.OrderedDict[tuple[tuple[int, ...], tuple[int, ...], int], Plan] = (
    collections.OrderedDict()
)


def plan(bq: list[int], bk: list[int], tq: int) -> Plan:
    """The grouping for these bounds, built once and reused by every layer and later forwards."""
    key = (tuple(bq), tuple(bk), tq)
    found = _plans.get(key)
    if found is None:
        found = _plans[key] = _plan(bq, bk, tq)
        while len(_plans) > PLANS:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return found


def _plan(bq: list[int], bk: list[int], tq: int) -> Plan:
    buckets: dict[tuple[int, int], list[int]] = {}
    for i in range(len(bq) - 1):
        lq, lk = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
        if lq > 0 and lk > 0:  # no key: the row stays 0 (lse +inf)
            buckets.setdefault((_bucket_of(lq), _bucket_of(lk)), []).append(i)
    source = torch.full((tq,), -1, dtype=torch.long)  # output row -> row of the stacked results
    groups: list[_Group] = []
    offset = 0
    for idx in buckets.values():
        lens_q = [bq[i + 1] - bq[i] for i in idx]
        lens_k = [bk[i + 1] - bk[i] for i in idx]
        lq, lk = torch.tensor(lens_q), torch.tensor(lens_k)
        n, big_q, big_k = len(idx), max(lens_q), max(lens_k)
        rows_q, valid_q = _padded_rows(torch.tensor([bq[i] for i in idx]), lq, big_q)
        source[rows_q[valid_q]] = (offset + torch.arange(n * big_q).view(n, big_q))[valid_q]
        rows_k, _ = _padded_rows(torch.tensor([bk[i] for i in idx]), lk, big_k)
        full = all(x == big_q for x in lens_q) and all(x == big_k for x in lens_k)
        groups.append(_Group(idx, rows_q, rows_k, lq, lk, full, lens_q == lens_k))
        offset += n * big_q
    source[source < 0] = offset  # the zero row
    return Plan(groups, source, offset)


def run_bucketed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bq: list[int],
    bk: list[int],
    opts: Options,
    explicit: bool,
) -> tuple[Tensor, Tensor | None]:
    """Sequences grouped into a few padded batches; outputs put back with one index_select."""
    h, dv = q.shape[1], v.shape[-1]
    layout = plan(bq, bk, q.shape[0])
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    for group in layout.groups:
        qb, kb, vb = _gather(q, group.rows_q), _gather(k, group.rows_k), _gather(v, group.rows_k)
        slopes = opts.alibi
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[torch.tensor(group.index, device=slopes.device)]
        out_b, lse_b = _bucket_attention(qb, kb, vb, group, slopes, opts, explicit)
        n, big_q = group.rows_q.shape
        outs.append(out_b.reshape(n * big_q, h, dv))
        if lse_b is not None:
            lses.append(lse_b.permute(0, 2, 1).reshape(n * big_q, h))
    src = forward_meta.CACHE.get(layout.source, ("on", q.device), lambda: layout.source.to(q.device))
    out = torch.cat([*outs, q.new_zeros((1, h, dv))]).index_select(0, src)
    if not outs and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out = out + 0 * (q.sum() + k.sum() + v.sum())  # nothing to attend: zeros, still on the graph
    lse = None
    if opts.want_lse:
        inf_row = torch.full((1, h), math.inf, dtype=torch.float32, device=q.device)
        lse = torch.cat([*lses, inf_row]).index_select(0, src).t().contiguous()
    return out, lse


def _padded_rows(starts: Tensor, lens: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(n, width) source rows of each right-padded sequence (padding repeats its first row)."""
    ar = torch.arange(width).view(1, -1)
    valid = ar < lens.view(-1, 1)
    rows = torch.where(valid, starts.view(-1, 1) + ar, starts.view(-1, 1))
    return rows, valid


def _gather(x: Tensor, rows: Tensor) -> Tensor:
    """(n, width, ...) copy of the given rows of x; one sequence is a zero-copy slice."""
    n, width = rows.shape
    if n == 1:
        start = int(rows[0, 0])
        return x[start : start + width].unsqueeze(0)
    return x.index_select(0, rows.flatten().to(x.device)).view(n, width, *x.shape[1:])


def _bucket_attention(
    qb: Tensor,
    kb: Tensor,
    vb: Tensor,
    group: _Group,
    slopes: Tensor | None,
    opts: Options,
    explicit: bool,
) -> tuple[Tensor, Tensor | None]:
    """One batched call over right-padded sequences; padded query rows are dropped."""
    big_q, big_k = qb.shape[1], kb.shape[1]
    if group.full:  # no padding: dense semantics
        res = attention(
            qb, kb, vb, scale=opts.scale, left=opts.left, right=opts.right, dropout_p=opts.dropout_p,
            softcap=opts.softcap, alibi_slopes=slopes, want_lse=opts.want_lse, explicit=explicit,
        )  # fmt: skip
        return res.out, res.lse
    self_causal = opts.left < 0 and opts.right == 0 and group.equal
    if self_causal and slopes is None and not explicit:
        # Top-left == bottom-right when Lq == Lk, and padded keys come after every real query.
        return _sdpa(qb, kb, vb, scale=opts.scale, dropout_p=opts.dropout_p, is_causal=True), None
    lq, lk = group.lq.to(qb.device), group.lk.to(qb.device)
    mask, row_ok = _padding_mask(lq, lk, big_q, big_k, opts.left, opts.right)
    shift = lk - lq
    bias = _alibi_bias(slopes, big_q, big_k, shift, qb.device) if slopes is not None else None
    if explicit:
        res = explicit_attention(
            qb,
            kb,
            vb,
            opts.scale,
            opts.dropout_p,
            opts.softcap,
            mask,
            bias,
            row_ok,
            False,
            want_lse=opts.want_lse,
        )
        return res.out, res.lse
    return masked_sdpa(qb, kb, vb, opts.scale, opts.dropout_p, mask, bias, row_ok), None


def _padding_mask(
    lq: Tensor, lk: Tensor, big_q: int, big_k: int, left: int, right: int
) -> tuple[Tensor, Tensor | None]:
    """Bool (n, 1, Lq|1, Lk) mask of right-padded sequences, bottom-right aligned per sequence.

    Rows that see no key (``row_ok`` False) are opened to every key and zeroed afterwards, so no
    softmax row is empty: no NaN forward or backward.
    """
    n = lq.shape[0]
    cols = torch.arange(big_k, device=lq.device).view(1, 1, big_k)
    mask = cols < lk.view(n, 1, 1)
    if left < 0 and right < 0:
        return mask.unsqueeze(1), None  # key padding only: every row sees key 0
    rows = torch.arange(big_q, device=lq.device).view(1, big_q, 1)
    diag = rows + (lk - lq).view(n, 1, 1)
    if right >= 0:
        mask = mask & (cols <= diag + right)
    if left >= 0:
        mask = mask & (cols >= diag - left)
    mask = mask.unsqueeze(1)
    row_ok = mask.any(dim=-1, keepdim=True)
    return mask | ~row_ok, row_ok
