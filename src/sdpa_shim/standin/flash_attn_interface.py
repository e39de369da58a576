"""``flash_attn.flash_attn_interface`` emulated on PyTorch SDPA.

Parameter names, order and defaults are flash-attn 2.8.3's, so code that inspects them (Phi-3 and
MiniMax look for ``window_size``) or passes them positionally keeps working. Semantics follow
flash-attn 2.x: (B, S, H, D) layout, GQA by head ratio, causal masks aligned bottom-right,
``window_size``, ``softcap``, ``alibi_slopes``. Differences from the real library:

- float32 and float64 inputs work too (CPU models);
- ``deterministic=True`` runs the backward with torch's determinism switch on (bit-identical
  gradients across runs), see ``sdpa_shim._runtime.determinism``;
- ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` computed exactly in float32;
  ``S_dmask`` holds the probabilities (negated where dropped) only when ``dropout_p > 0``, unpadded,
  and is an empty tensor otherwise, as in flash-attn. ALiBi with causal gives the documented lse
  (flash-attn's kernel adds a row-constant to it there);
- paged KV (``block_table``) takes any page size (flash-attn needs a multiple of 256): the used
  pages are gathered, then attended to like packed keys.

Varlen and KV-cache calls go through the runtime's varlen engine (``sdpa_shim._runtime.varlen``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._runtime.determinism import deterministic_backward
from .._runtime.kernels import Result, attention, normalize_window
from .._runtime.varlen import varlen_attention
from ._args import _check, _scale, _slopes
from .kvcache import flash_attn_with_kvcache

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_unpadded_func",
    "flash_attn_unpadded_kvpacked_func",
    "flash_attn_unpadded_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    return_attn_probs: bool,
    fn: str,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    _check(q, k, v, 4, fn)
    left, right = normalize_window(causal, window_size, k.shape[1])
    slopes = _slopes(alibi_slopes, q.shape[2], fn)

    def run(q_: Tensor, k_: Tensor, v_: Tensor) -> tuple[Tensor, ...]:
        res = attention(
            q_, k_, v_,
            scale=_scale(softmax_scale, q), left=left, right=right, dropout_p=dropout_p, softcap=softcap,
            alibi_slopes=slopes, want_lse=return_attn_probs, want_probs=return_attn_probs,
        )  # fmt: skip
        return tuple(x for x in res if x is not None)

    outs = deterministic_backward(run, q, k, v) if deterministic else run(q, k, v)
    if not return_attn_probs:
        return outs[0]
    return outs[0], outs[1], outs[2]


def _varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | Tensor,
    max_seqlen_k: int | Tensor,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    return_attn_probs: bool,
    fn: str,
    block_table: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    _check(q, k, v, 3, fn, kv_ndim=4 if block_table is not None else 3)
    if len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    slopes = _slopes(alibi_slopes, q.shape[1], fn)
    if return_attn_probs and dropout_p > 0:
        if block_table is not None:
            raise NotImplementedError(f"{fn}: return_attn_probs with dropout needs unpaged keys")
        left, right = normalize_window(causal, window_size, int(max_seqlen_k))
        return _varlen_with_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                  int(max_seqlen_k), _scale(softmax_scale, q), left, right, dropout_p,
                                  softcap, slopes)  # fmt: skip
    res = varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale=_scale(softmax_scale, q), causal=causal, window=(int(window_size[0]), int(window_size[1])),
        softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p, block_table=block_table,
        return_lse=return_attn_probs, deterministic=deterministic,
    )  # fmt: skip
    if not return_attn_probs:
        return res  # type: ignore[return-value]
    out, lse = res
    return out, lse, q.new_empty((0,))


def _varlen_with_probs(
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
    dropout_p: float,
    softcap: float,
    slopes: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """flash-attn's testing-only S_dmask: one explicit call per sequence (debug path, not fast)."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    n, h = len(bq) - 1, q.shape[1]
    out = q.new_zeros((q.shape[0], h, v.shape[-1]))
    lse = torch.full((h, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    probs = q.new_zeros((n, h, max(max_q, *(bq[i + 1] - bq[i] for i in range(n))),
                         max(max_k, *(bk[i + 1] - bk[i] for i in range(n)))))  # fmt: skip
    for i in range(n):
        lq, lk = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
        if lq == 0:
            continue
        seg = slopes[i : i + 1] if slopes is not None and slopes.dim() == 2 else slopes
        res = attention(
            q[bq[i] : bq[i + 1]].unsqueeze(0), k[bk[i] : bk[i + 1]].unsqueeze(0),
            v[bk[i] : bk[i + 1]].unsqueeze(0), scale=scale, left=left, right=right, dropout_p=dropout_p,
            softcap=softcap, alibi_slopes=seg, want_lse=True, want_probs=True,
        )  # fmt: skip
        out[bq[i] : bq[i + 1]] = res.out[0]
        assert res.lse is not None and res.probs is not None
        lse[:, bq[i] : bq[i + 1]] = res.lse[0]
        if res.probs.numel():
            probs[i, :, :lq, :lk] = res.probs[0]
    return out, lse, probs


def _ret(res: Result, return_attn_probs: bool) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    if not return_attn_probs:
        return res.out
    assert res.lse is not None and res.probs is not None
    return res.out, res.lse, res.probs


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv: (B, S, 3, H, D) -> (B, S, H, D)."""
    q, k, v = qkv.unbind(dim=2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, "flash_attn_qkvpacked_func")  # fmt: skip


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q: (B, Sq, H, D), kv: (B, Sk, 2, Hk, D) -> (B, Sq, H, D)."""
    k, v = kv.unbind(dim=2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, "flash_attn_kvpacked_func")  # fmt: skip


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q: (B, Sq, H, D), k/v: (B, Sk, Hk, D) with H % Hk == 0 -> (B, Sq, H, Dv).

    ``causal`` is aligned bottom-right when Sq != Sk; ``window_size=(left, right)`` lets query i see
    keys ``[i + Sk - Sq - left, i + Sk - Sq + right]``; rows that see no key give zeros.
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, "flash_attn_func")  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv: (total, 3, H, D) packed by ``cu_seqlens`` -> (total, H, D)."""
    q, k, v = qkv.unbind(dim=1)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   "flash_attn_varlen_qkvpacked_func")  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q: (total_q, H, D), kv: (total_k, 2, Hk, D) -> (total_q, H, D)."""
    k, v = kv.unbind(dim=1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, "flash_attn_varlen_kvpacked_func")  # fmt: skip


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q: (total_q, H, D), k/v: (total_k, Hk, D), segments given by int32 ``cu_seqlens_q/k``.

    With ``block_table`` (batch, max_pages), k/v are pages (num_pages, page_size, Hk, D) and
    ``cu_seqlens_k`` holds cumulative key lengths, as in flash-attn. Never builds a total x total
    mask: see ``sdpa_shim._runtime.varlen`` for the kernels taken.
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, "flash_attn_varlen_func", block_table)  # fmt: skip


# flash-attn 1.x names, still imported by remote code (InternVL).
flash_attn_unpadded_qkvpacked_func = flash_attn_varlen_qkvpacked_func
flash_attn_unpadded_kvpacked_func = flash_attn_varlen_kvpacked_func
flash_attn_unpadded_func = flash_attn_varlen_func
