"""``flash_attn.flash_attn_interface`` emulated on PyTorch SDPA.

Parameter names, order and defaults are flash-attn 2.8.3's, so code that inspects them (Phi-3 and
MiniMax look for ``window_size``) or passes them positionally keeps working. Semantics follow
flash-attn 2.x: (B, S, H, D) layout, GQA by head ratio, causal masks aligned bottom-right,
``window_size``, ``softcap``, ``alibi_slopes``. Differences from the real library:

- float32 and float64 inputs work too (CPU models);
- ``deterministic=True`` runs the backward with torch's determinism switch on (bit-identical
  gradients across runs), see ``sdpa_shim._runtime.kernels.deterministic_backward``;
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

from .._runtime.kernels import Result, attention, deterministic_backward, normalize_window
from .._runtime.varlen import varlen_attention
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


def _check(q: Tensor, k: Tensor, v: Tensor, ndim: int, fn: str, kv_ndim: int | None = None) -> None:
    """flash-attn's shape and dtype checks, as ValueErrors naming the offending argument."""
    for name, t, want in (("q", q, ndim), ("k", k, kv_ndim or ndim), ("v", v, kv_ndim or ndim)):
        if t.dim() != want:
            raise ValueError(f"{fn}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")
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
