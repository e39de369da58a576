"""Packed (varlen) attention without ever building a total x total mask.

Routes, picked per call:

- Segments all of one length (images of one size in a vision tower, fixed-length packing): a
  zero-copy view as (n, seqlen, H, D) and one batched attention call. On an H100 with torch 2.11
  this SDPA call (cuDNN) ran 1.6-2x faster than torch's fused varlen kernel, forward and backward,
  even counting the host sync that confirms the lengths; on CUDA that sync is only paid when
  ``n * max_seqlen == total`` already says the lengths are uniform and segments are long.
- ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own FlashAttention-2 kernel, with backward)
  on CUDA in fp16/bf16 when no softcap, ALiBi, dropout or log-sum-exp is asked for. Its signature
  changed across torch releases, so the keywords it takes are read at runtime.
- Otherwise one ``attention`` call per distinct (seqlen_q, seqlen_k), equal-shape segments stacked
  into one batch. Memory stays O(tokens + largest segment squared).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._kernels import Result, attention

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _fused_varlen() -> tuple[Callable[..., Tensor] | None, frozenset[str]]:
    """torch's varlen_attn and the names of its parameters, or (None, {}) where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    try:
        params = frozenset(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):  # pragma: no cover - unexpected wrapper
        return None, frozenset()
    return varlen_attn, params


def _try_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    left: int,
    right: int,
) -> Tensor | None:
    """Run torch's fused varlen kernel when it can give flash-attn's exact semantics, else None."""
    fn, params = _fused_varlen()
    if fn is None or not q.is_cuda or q.dtype not in _HALF or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    d = q.shape[-1]
    if v.shape[-1] != d or d > 256 or d % 8:
        return None
    kwargs: dict[str, object] = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, d**-0.5, rel_tol=1e-6):
        return None
    if "window_size" in params:
        kwargs["window_size"] = (left, right)
    elif "is_causal" in params and left < 0 and right in (-1, 0):
        kwargs["is_causal"] = right == 0
    else:
        return None
    if right == 0 and left < 0 and cu_q is not cu_k and not torch.equal(cu_q, cu_k):
        # Per-segment seqlen_q != seqlen_k: the flash kernel aligns bottom-right like flash-attn, but
        # newer torch may route to cuDNN, whose alignment we have not verified. Take the exact route.
        return None
    h, hk = q.shape[1], k.shape[1]
    if h != hk:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu_q32 = _int32_on(cu_q, q.device)
    cu_k32 = cu_q32 if cu_k is cu_q else _int32_on(cu_k, q.device)
    try:
        return fn(q, k, v, cu_q32, cu_k32, int(max_q), int(max_k), **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:  # a limit of this torch build not checked above
        log.debug("varlen_attn refused (%s); using per-segment SDPA", exc)
        return None


def _int32_on(cu: Tensor, device: torch.device) -> Tensor:
    if cu.dtype == torch.int32 and cu.device == device:
        return cu
    return cu.to(device=device, dtype=torch.int32)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float,
    left: int,
    right: int,
    dropout_p: float,
    softcap: float,
    alibi_slopes: Tensor | None,
    want_lse: bool,
    want_probs: bool,
) -> Result:
    """(Tq, H, D) x (Tk, Hk, D) packed attention; lse is (H, Tq) and probs (n, H, max_q, max_k)."""
    simple = dropout_p == 0 and softcap <= 0 and alibi_slopes is None and not want_lse and not want_probs
    if simple and not (left < 0 and _looks_uniform(q, k, cu_q, max_q, max_k)):
        out = _try_fused(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right)
        if out is not None:
            return Result(out, None, None)
    return _segmented(
        q, k, v, cu_q, cu_k, max_q, max_k,
        scale=scale, left=left, right=right, dropout_p=dropout_p, softcap=softcap,
        alibi_slopes=alibi_slopes, want_lse=want_lse, want_probs=want_probs,
    )  # fmt: skip


# Below this segment length the host sync costs more than cuDNN saves over the fused varlen kernel
# (H100, torch 2.11: even at 256 tokens, slower by 10-40 % forward+backward; faster from 1024 on).
_UNIFORM_MIN_SEQLEN = 512


def _looks_uniform(q: Tensor, k: Tensor, cu_q: Tensor, max_q: int, max_k: int) -> bool:
    """Whether every segment has length max_seqlen, judged from shapes alone (no host sync)."""
    n = cu_q.numel() - 1
    max_q, max_k = int(max_q), int(max_k)
    if n <= 0 or min(max_q, max_k) < _UNIFORM_MIN_SEQLEN:
        return False
    return max_q * n == q.shape[0] and max_k * n == k.shape[0]


def _bounds(cu: Tensor) -> list[int]:
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor of batch_size + 1 offsets, got shape {tuple(cu.shape)}"
        )
    return [int(x) for x in cu.tolist()]


def _segmented(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float,
    left: int,
    right: int,
    dropout_p: float,
    softcap: float,
    alibi_slopes: Tensor | None,
    want_lse: bool,
    want_probs: bool,
) -> Result:
    """One batched attention call per distinct (seqlen_q, seqlen_k); each call sees one segment's keys."""
    bq = _bounds(cu_q)
    bk = bq if cu_k is cu_q else _bounds(cu_k)
    if len(bk) != len(bq):
        raise ValueError(f"cu_seqlens_q has {len(bq)} entries but cu_seqlens_k has {len(bk)}")
    n = len(bq) - 1
    tq, h, dv = q.shape[0], q.shape[1], v.shape[-1]
    if bq[-1] > tq or bk[-1] > k.shape[0]:
        raise ValueError(
            f"cu_seqlens go past the packed tensors ({bq[-1]} > {tq} or {bk[-1]} > {k.shape[0]})"
        )
    lens = [(bq[i + 1] - bq[i], bk[i + 1] - bk[i]) for i in range(n)]
    if any(lq < 0 or lk < 0 for lq, lk in lens):
        raise ValueError("cu_seqlens must be non-decreasing")
    kw = dict(scale=scale, left=left, right=right, dropout_p=dropout_p, softcap=softcap)
    kw.update(want_lse=want_lse, want_probs=want_probs)
    pmax_q = max([int(max_q)] + [lq for lq, _ in lens])
    pmax_k = max([int(max_k)] + [lk for _, lk in lens])
    probs = None
    if want_probs and dropout_p > 0:
        probs = q.new_zeros((n, h, pmax_q, pmax_k))

    lq0, lk0 = lens[0] if n else (0, 0)
    if (
        n
        and bq[0] == 0
        and bk[0] == 0
        and bq[-1] == tq
        and bk[-1] == k.shape[0]
        and all(x == lens[0] for x in lens)
    ):
        # Every segment has the same shape: a zero-copy view as (n, seqlen, H, D), one call.
        res = attention(
            q.unflatten(0, (n, lq0)), k.unflatten(0, (n, lk0)), v.unflatten(0, (n, lk0)),
            alibi_slopes=alibi_slopes, **kw,
        )  # fmt: skip
        lse = res.lse.permute(1, 0, 2).reshape(h, tq) if res.lse is not None else None
        if probs is not None and res.probs is not None:
            probs[:, :, :lq0, :lk0] = res.probs
        return Result(res.out.flatten(0, 1), lse, _probs_or_empty(q, want_probs, probs))

    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(lens):
        groups.setdefault(shape, []).append(i)
    outs: list[Tensor | None] = [None] * n
    lses: list[Tensor | None] = [None] * n
    for (lq, lk), idx in groups.items():
        if len(idx) == 1:
            i = idx[0]
            qs, ks, vs = (
                x[b[i] : b[i] + ln].unsqueeze(0) for x, b, ln in ((q, bq, lq), (k, bk, lk), (v, bk, lk))
            )
        else:
            qs = torch.stack([q[bq[i] : bq[i] + lq] for i in idx])
            ks = torch.stack([k[bk[i] : bk[i] + lk] for i in idx])
            vs = torch.stack([v[bk[i] : bk[i] + lk] for i in idx])
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[torch.tensor(idx, device=slopes.device)]
        res = attention(qs, ks, vs, alibi_slopes=slopes, **kw)
        for j, i in enumerate(idx):
            outs[i] = res.out[j]
            if res.lse is not None:
                lses[i] = res.lse[j]
            if probs is not None and res.probs is not None and res.probs.numel():
                probs[i, :, :lq, :lk] = res.probs[j]

    pieces: list[Tensor] = [o for o in outs if o is not None]
    if bq[0] > 0:  # rows outside every segment: flash-attn leaves them unspecified, we give zeros
        pieces.insert(0, q.new_zeros((bq[0], h, dv)))
    if bq[-1] < tq:
        pieces.append(q.new_zeros((tq - bq[-1], h, dv)))
    out = torch.cat(pieces, dim=0) if pieces else q.new_zeros((tq, h, dv))
    lse = None
    if want_lse:
        lse = torch.full((h, tq), math.inf, dtype=torch.float32, device=q.device)
        for i in range(n):
            seg = lses[i]
            if seg is not None:
                lse[:, bq[i] : bq[i + 1]] = seg
    return Result(out, lse, _probs_or_empty(q, want_probs, probs))


def _probs_or_empty(q: Tensor, want_probs: bool, probs: Tensor | None) -> Tensor | None:
    if not want_probs:
        return None
    return probs if probs is not None else q.new_empty((0,))
