"""``flash_attn.flash_attn_interface`` emulated on PyTorch SDPA.

Parameter names, order and defaults are flash-attn 2.8.3's, so code that inspects them (Phi-3 and
MiniMax look for ``window_size``) or passes them positionally keeps working. Semantics follow
flash-attn 2.x: (B, S, H, D) layout, GQA by head ratio, causal masks aligned bottom-right,
``window_size``, ``softcap``, ``alibi_slopes``. Differences from the real library:

- float32 and float64 inputs work too (CPU models); ``deterministic`` is accepted and ignored;
- ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` computed exactly in float32;
  ``S_dmask`` holds the probabilities (negated where dropped) only when ``dropout_p > 0``, unpadded,
  and is an empty tensor otherwise, as in flash-attn. ALiBi with causal gives the documented lse
  (flash-attn's kernel adds a row-constant to it there);
- paged KV (``block_table``) raises ``NotImplementedError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._kernels import Result, attention, normalize_window
from ._varlen import varlen_attention
from .layers.rotary import _cos_sin_at, rotate

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

_PAGED = (
    "{fn}: paged KV cache (block_table) is not supported by sdpa_shim's flash_attn stand-in; "
    "pass a contiguous cache, or install a working flash-attn"
)


def _check(q: Tensor, k: Tensor, v: Tensor, ndim: int, fn: str) -> None:
    """flash-attn's shape and dtype checks, as ValueErrors naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{fn}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"{fn}: inputs must be floating point, got {q.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    h, hk = q.shape[-2], k.shape[-2]
    if v.shape[-2] != hk or hk == 0 or h % hk:
        raise ValueError(
            f"{fn}: number of heads in key/value ({hk}, {v.shape[-2]}) must be equal and divide "
            f"the number of heads in query ({h})"
        )


def _scale(softmax_scale: float | None, q: Tensor) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def _slopes(alibi_slopes: Tensor | None, h: int, fn: str) -> Tensor | None:
    if alibi_slopes is None:
        return None
    if alibi_slopes.shape[-1] != h or alibi_slopes.dim() not in (1, 2):
        raise ValueError(
            f"{fn}: alibi_slopes must be (nheads,) or (batch_size, nheads), got {tuple(alibi_slopes.shape)}"
        )
    return alibi_slopes


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
    return_attn_probs: bool,
    fn: str,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    _check(q, k, v, 4, fn)
    left, right = normalize_window(causal, window_size, k.shape[1])
    res = attention(
        q, k, v,
        scale=_scale(softmax_scale, q), left=left, right=right, dropout_p=dropout_p, softcap=softcap,
        alibi_slopes=_slopes(alibi_slopes, q.shape[2], fn),
        want_lse=return_attn_probs, want_probs=return_attn_probs,
    )  # fmt: skip
    return _ret(res, return_attn_probs)


def _varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    return_attn_probs: bool,
    fn: str,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    _check(q, k, v, 3, fn)
    # flash-attn bounds the window by max_seqlen_k, not by each segment's length.
    left, right = normalize_window(causal, window_size, int(max_seqlen_k))
    res = varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale=_scale(softmax_scale, q), left=left, right=right, dropout_p=dropout_p, softcap=softcap,
        alibi_slopes=_slopes(alibi_slopes, q.shape[1], fn),
        want_lse=return_attn_probs, want_probs=return_attn_probs,
    )  # fmt: skip
    return _ret(res, return_attn_probs)


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
                  return_attn_probs, "flash_attn_qkvpacked_func")  # fmt: skip


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
                  return_attn_probs, "flash_attn_kvpacked_func")  # fmt: skip


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
                  return_attn_probs, "flash_attn_func")  # fmt: skip


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
                   causal, window_size, softcap, alibi_slopes, return_attn_probs,
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
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                   "flash_attn_varlen_kvpacked_func")  # fmt: skip


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

    Never builds a total x total mask: torch's fused varlen kernel on CUDA where it applies, else
    one SDPA call per distinct segment shape.
    """
    if block_table is not None:
        raise NotImplementedError(_PAGED.format(fn="flash_attn_varlen_func"))
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                   "flash_attn_varlen_func")  # fmt: skip


# flash-attn 1.x names, still imported by remote code (InternVL).
flash_attn_unpadded_qkvpacked_func = flash_attn_varlen_qkvpacked_func
flash_attn_unpadded_kvpacked_func = flash_attn_varlen_kvpacked_func
flash_attn_unpadded_func = flash_attn_varlen_func


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of q (B, Sq, H, D) over a KV cache (B_cache, S_cache, Hk, D), appending k/v first.

    As in flash-attn: ``k``/``v`` (B, S_new, Hk, D) are written *in place* into the caches at
    positions ``cache_seqlens[b]...``; each row then attends to keys ``[cache_leftpad[b],
    cache_seqlens[b] + S_new)`` with bottom-right causal alignment; ``rotary_cos/sin`` rotate k at its
    new positions, and q there too when causal or windowed (else at ``cache_seqlens``).
    ``num_splits`` is a kernel tuning knob and is ignored. Paged caches are not supported.
    """
    fn = "flash_attn_with_kvcache"
    if block_table is not None:
        raise NotImplementedError(_PAGED.format(fn=fn))
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v, or neither")
    if k is not None and cache_seqlens is None:
        raise ValueError(f"{fn}: cache_seqlens is required when k and v are appended")
    if rotary_cos is not None and k is None:
        raise ValueError(f"{fn}: rotary_cos/rotary_sin need the new k and v")
    if rotary_cos is not None and cache_leftpad is not None:
        raise NotImplementedError(f"{fn}: rotary embeddings together with cache_leftpad are not supported")
    _check(q, k_cache, v_cache, 4, fn)
    b = q.shape[0]
    scale = _scale(softmax_scale, q)
    left, right = normalize_window(causal, window_size, k_cache.shape[1])

    seqlens: Tensor | None = None
    if isinstance(cache_seqlens, int):
        seqlens = torch.full((b,), cache_seqlens, dtype=torch.long, device=q.device)
    elif cache_seqlens is not None:
        seqlens = cache_seqlens.to(device=q.device, dtype=torch.long)

    if k is not None and seqlens is not None:
        if rotary_cos is not None:
            k = _rotary_at(k, rotary_cos, rotary_sin, seqlens, stepped=True, interleaved=rotary_interleaved)
            stepped = causal or left >= 0 or right >= 0
            q = _rotary_at(
                q, rotary_cos, rotary_sin, seqlens, stepped=stepped, interleaved=rotary_interleaved
            )
        _append(k_cache, v_cache, k, v, seqlens, cache_batch_idx)

    kc, vc = k_cache, v_cache
    if cache_batch_idx is not None:
        idx = cache_batch_idx.to(device=k_cache.device, dtype=torch.long)
        kc, vc = k_cache.index_select(0, idx), v_cache.index_select(0, idx)
    end = None
    if seqlens is not None:
        end = seqlens + (k.shape[1] if k is not None else 0)
    slopes = _slopes(alibi_slopes, q.shape[2], fn)
    if isinstance(cache_seqlens, int) and cache_leftpad is None:
        # One length for every row: a plain dense call on the filled part of the cache.
        n = cache_seqlens + (k.shape[1] if k is not None else 0)
        res = attention(q, kc[:, :n], vc[:, :n], scale=scale, left=left, right=right, softcap=softcap,
                        alibi_slopes=slopes, want_lse=return_softmax_lse)  # fmt: skip
    elif end is None and cache_leftpad is None:
        res = attention(q, kc, vc, scale=scale, left=left, right=right, softcap=softcap,
                        alibi_slopes=slopes, want_lse=return_softmax_lse)  # fmt: skip
    else:
        if end is None:
            end = torch.full((b,), kc.shape[1], dtype=torch.long, device=q.device)
        start = None if cache_leftpad is None else cache_leftpad.to(device=q.device, dtype=torch.long)
        res = attention(q, kc, vc, scale=scale, left=left, right=right, softcap=softcap, alibi_slopes=slopes,
                        key_start=start, key_end=end, want_lse=return_softmax_lse)  # fmt: skip
    if return_softmax_lse:
        return res.out, res.lse
    return res.out


def _rotary_at(
    x: Tensor, cos: Tensor, sin: Tensor | None, seqlens: Tensor, *, stepped: bool, interleaved: bool
) -> Tensor:
    """Rotate x (B, S, H, D) at positions seqlens[b] + t (``stepped``) or seqlens[b] for every t."""
    if sin is None:
        raise ValueError("flash_attn_with_kvcache: rotary_sin is required with rotary_cos")
    s = x.shape[1]
    steps = torch.arange(s, device=x.device) if stepped else torch.zeros(s, dtype=torch.long, device=x.device)
    c, si = _cos_sin_at(cos, sin, seqlens.view(-1, 1) + steps.view(1, -1))
    return rotate(x, c.unsqueeze(2), si.unsqueeze(2), interleaved)


def _append(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, batch_idx: Tensor | None
) -> None:
    """Write k/v into the caches at rows ``batch_idx`` and positions ``seqlens[b] + t``, in place."""
    b, s = k.shape[:2]
    rows = (
        torch.arange(b, device=k_cache.device) if batch_idx is None else batch_idx.to(k_cache.device).long()
    )
    pos = seqlens.to(k_cache.device).view(-1, 1) + torch.arange(s, device=k_cache.device).view(1, -1)
    if s and not k_cache.is_cuda and int(pos.max()) >= k_cache.shape[1]:  # no host sync on CUDA
        raise ValueError(
            f"flash_attn_with_kvcache: cache of length {k_cache.shape[1]} is too short for "
            f"cache_seqlens + {s} new tokens"
        )
    with torch.no_grad():  # the cache is state, as in flash-attn (which has no backward here)
        k_cache[rows.view(-1, 1), pos] = k.to(k_cache.dtype)
        v_cache[rows.view(-1, 1), pos] = v.to(v_cache.dtype)
