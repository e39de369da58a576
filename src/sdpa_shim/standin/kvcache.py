"""``flash_attn_with_kvcache`` emulated: append new keys to a (paged) cache, then attend (decode).

Re-exported by ``flash_attn_interface`` (flash-attn's own home of the name); the attention itself is the
runtime's varlen engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._runtime.varlen import varlen_attention
from ._args import _check, _scale, _slopes
from .layers.rotary import _cos_sin_at, rotate


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
    new positions, and q there too when causal or windowed (else at ``cache_seqlens``); positions
    count cache slots, pad included. With ``block_table`` (B, max_pages) the caches are pages
    (num_blocks, page_size, Hk, D) of any page size. ``num_splits`` is a kernel tuning knob and is
    ignored.
    """
    fn = "flash_attn_with_kvcache"
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v, or neither")
    if k is not None and cache_seqlens is None:
        raise ValueError(f"{fn}: cache_seqlens is required when k and v are appended")
    if rotary_cos is not None and k is None:
        raise ValueError(f"{fn}: rotary_cos/rotary_sin need the new k and v")
    if block_table is not None and (cache_batch_idx is not None or cache_leftpad is not None):
        raise ValueError(f"{fn}: paged KV cache (block_table) does not take cache_batch_idx or cache_leftpad")
    _check(q, k_cache, v_cache, 4, fn)
    b, sq, h = q.shape[:3]
    paged = block_table is not None
    # flash-attn's seqlen_k: the cache length, or pages per sequence x page size when paged.
    cache_len = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    seqlens = _seqlens(cache_seqlens, b, q.device)
    if k is not None and seqlens is not None:
        if rotary_cos is not None:
            k = _rotary_at(k, rotary_cos, rotary_sin, seqlens, stepped=True, interleaved=rotary_interleaved)
            stepped = causal or window_size[0] >= 0 or window_size[1] >= 0
            q = _rotary_at(
                q, rotary_cos, rotary_sin, seqlens, stepped=stepped, interleaved=rotary_interleaved
            )
        if paged:
            _append_paged(k_cache, v_cache, k, v, seqlens, block_table)
        else:
            _append(k_cache, v_cache, k, v, seqlens, cache_batch_idx)
    new = k.shape[1] if k is not None else 0
    ends = seqlens + new if seqlens is not None else torch.full((b,), cache_len, device=q.device)
    cu_q = torch.arange(b + 1, device=q.device, dtype=torch.int32) * sq
    if paged:
        cu_k, used = None, ends
    else:
        rows = (
            torch.arange(b, device=q.device)
            if cache_batch_idx is None
            else cache_batch_idx.to(q.device).long()
        )
        start = 0 if cache_leftpad is None else cache_leftpad.to(device=q.device, dtype=torch.long)
        starts = rows * k_cache.shape[1] + start  # offsets into the flattened cache
        cu_k = torch.cat((starts, starts[-1:])) if b else starts.new_zeros(1)
        used = ends - start
        k_cache, v_cache = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    res = varlen_attention(
        q.reshape(b * sq, h, q.shape[-1]), k_cache, v_cache, cu_q, cu_k, sq, cache_len,
        scale=_scale(softmax_scale, q), causal=causal, window=(int(window_size[0]), int(window_size[1])),
        softcap=softcap, alibi_slopes=_slopes(alibi_slopes, h, fn), block_table=block_table,
        seqused_k=used, return_lse=return_softmax_lse,
    )  # fmt: skip
    out, lse = (res[0], res[1]) if return_softmax_lse else (res, None)
    out = out.view(b, sq, h, out.shape[-1])
    if lse is None:
        return out
    return out, lse.view(h, b, sq).transpose(0, 1).contiguous()


def _seqlens(cache_seqlens: int | Tensor | None, b: int, device: torch.device) -> Tensor | None:
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, int):
        return torch.full((b,), cache_seqlens, dtype=torch.long, device=device)
    return cache_seqlens.to(device=device, dtype=torch.long)


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


def _too_short(cache: Tensor, pos: Tensor, capacity: int) -> None:
    if pos.numel() and not cache.is_cuda and int(pos.max()) >= capacity:  # no host sync on CUDA
        raise ValueError(
            f"flash_attn_with_kvcache: cache of length {capacity} is too short for cache_seqlens + new tokens"
        )


def _append(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, batch_idx: Tensor | None
) -> None:
    """Write k/v into the caches at rows ``batch_idx`` and positions ``seqlens[b] + t``, in place."""
    b, s = k.shape[:2]
    rows = (
        torch.arange(b, device=k_cache.device) if batch_idx is None else batch_idx.to(k_cache.device).long()
    )
    pos = seqlens.to(k_cache.device).view(-1, 1) + torch.arange(s, device=k_cache.device).view(1, -1)
    _too_short(k_cache, pos, k_cache.shape[1])
    with torch.no_grad():  # the cache is state, as in flash-attn (which has no backward here)
        k_cache[rows.view(-1, 1), pos] = k.to(k_cache.dtype)
        v_cache[rows.view(-1, 1), pos] = v.to(v_cache.dtype)


def _append_paged(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, block_table: Tensor
) -> None:
    """Write k/v into pages, in place: token p of sequence b goes to page ``block_table[b, p // page]``."""
    s, page = k.shape[1], k_cache.shape[1]
    dev = k_cache.device
    pos = seqlens.to(dev).view(-1, 1) + torch.arange(s, device=dev).view(1, -1)
    _too_short(k_cache, pos, block_table.shape[1] * page)
    table = block_table.to(device=dev, dtype=torch.long)
    pages = table.gather(1, torch.div(pos, page, rounding_mode="floor"))
    with torch.no_grad():
        k_cache[pages, pos % page] = k.to(k_cache.dtype)
        v_cache[pages, pos % page] = v.to(v_cache.dtype)
