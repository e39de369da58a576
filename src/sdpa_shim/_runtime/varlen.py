"""One varlen attention engine: packed rows with ``cu_seqlens``, cached keys, paged KV caches.

flash-attn 2.8.3 semantics (causal and windows aligned bottom-right per sequence, GQA by head ratio,
rows that see no key give 0 and lse +inf) on torch's own kernels, never with a total x total mask.

Routes (``route_for`` names the one a call takes; ``force_route`` pins one for tests/benchmarks):

- ``varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10: torch's vendored FA2),
  taken on CUDA in fp16/bf16 whenever the call asks for nothing it lacks (softcap, ALiBi, dropout,
  a window or scale before 2.11, lse without ``return_aux``, head dim > 256 or not a multiple of 8,
  Dv != D). Keywords are read from its signature at runtime (2.10 ``is_causal``; 2.11 ``scale``,
  ``window_size``, ``return_aux``; 2.12 ``enable_gqa``). The bounds are read on the host once per
  ``cu_seqlens`` tensor (not per layer) to skip masking rows outside every segment.
- ``flex``: ``flex_attention`` with a document block mask (``flex``), for packed self-attention rows of
  many short documents (``FLEX_FROM_DOCUMENTS``, ``FLEX_UP_TO_MEAN_LENGTH``) on CUDA, where it beats
  FA2's varlen kernel; it falls back to ``varlen_attn`` wherever it cannot compile or run.
- ``uniform_sdpa`` / ``uniform_explicit``: every sequence has the same (Lq, Lk): a zero-copy view
  as (n, L, H, D) and one dense call.
- ``bucketed_sdpa`` / ``bucketed_explicit``: everything else (CPU, fp32, torch < 2.10, softcap,
  ALiBi, dropout): sequences grouped by length into O(log^2 max_len) padded SDPA calls (``bucketed``).
- ``*_explicit``: the float32 softmax, taken for softcap and for the log-sum-exp.

Paged caches (``block_table``) and ``seqused_k`` are first gathered into packed K/V (only the used
tokens: O(used pages), differentiable), then routed like any other call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from . import flex, forward_meta
from .bucketed import Options as _Options
from .bucketed import run_bucketed
from .determinism import deterministic_backward
from .kernels import (
    attention,
    normalize_window,
)
from .varlen_attn_route import run_varlen_attn, varlen_attn_refusal

log = logging.getLogger(__name__)

ROUTES = ("varlen_attn", "flex", "uniform_sdpa", "uniform_explicit", "bucketed_sdpa", "bucketed_explicit")
#: The flex route serves packed self-attention rows of at least this many documents ...
FLEX_FROM_DOCUMENTS = 32
#: ... whose mean length is at most this many tokens. None: never flex unless pinned
#: (``force_route("flex")``, benchmarks). Measured at the kernel level on an H100 (BENCHMARKS.md): flex
#: beat FA2's varlen kernel 1.5-2.4x at a mean of 16 tokens and lost (0.6-0.9x) from 64 up, so 16 is the
#: value to set; it stays off until its numbers against varlen_attn and a training step end to end are
#: measured (its backward compiles inside ``loss.backward()``, where no fallback can catch a failure).
FLEX_UP_TO_MEAN_LENGTH: int | None = None

_HALF = (torch.float16, torch.bfloat16)
_FORCED: list[str] = []
_LOGGED: set[tuple[str, str, torch.dtype]] = set()


@contextlib.contextmanager
def force_route(route: str) -> Iterator[None]:
    """Pin the route (tests, benchmarks); a call the route cannot serve raises ValueError."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    _FORCED.append(route)
    try:
        yield
    finally:
        _FORCED.remove(route)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | Tensor,
    max_seqlen_k: int | Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    block_table: Tensor | None = None,
    seqused_k: Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Packed attention: q (Tq, Hq, D), k/v (Tk, Hkv, D) or pages -> out (Tq, Hq, Dv)[, lse (Hq, Tq)].

    Rows of q outside ``cu_seqlens_q[0]:cu_seqlens_q[-1]`` give zeros. ``deterministic`` makes the
    backward bit-identical across runs (torch's determinism switch is on while it runs).
    """
    opts = _options(q, k, max_seqlen_k, scale, causal, window, softcap, alibi_slopes, dropout_p, return_lse)
    max_q = _as_int(max_seqlen_q)

    def run(q_: Tensor, k_: Tensor, v_: Tensor) -> tuple[Tensor, ...]:
        kp, vp, cu_k = _pack_keys(k_, v_, cu_seqlens_k, seqused_k, block_table)
        route = _choose(q_, kp, vp, cu_seqlens_q, cu_k, max_q, opts)
        _log_route(route, q_)
        out, lse = _execute(route, q_, kp, vp, cu_seqlens_q, cu_k, max_q, opts)
        return (out,) if lse is None else (out, lse)

    outs = deterministic_backward(run, q, k, v) if deterministic else run(q, k, v)
    return (outs[0], outs[1]) if return_lse else outs[0]


def route_for(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | Tensor,
    max_seqlen_k: int | Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    block_table: Tensor | None = None,
    seqused_k: Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> str:
    """The route ``varlen_attention`` takes for these arguments (same signature), without running it."""
    opts = _options(q, k, max_seqlen_k, scale, causal, window, softcap, alibi_slopes, dropout_p, return_lse)
    with torch.no_grad():
        kp, vp, cu_k = _pack_keys(k, v, cu_seqlens_k, seqused_k, block_table)
    return _choose(q, kp, vp, cu_seqlens_q, cu_k, _as_int(max_seqlen_q), opts)


# --------------------------------------------------------------------------- arguments


def _as_int(x: int | Tensor) -> int:
    """A length that may come as a 0-d tensor: read on the host once per tensor (every layer of a
    forward passes the same one)."""
    return forward_meta.host_int(x)


def _options(
    q: Tensor,
    k: Tensor,
    max_seqlen_k: int | Tensor,
    scale: float | None,
    causal: bool,
    window: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    dropout_p: float,
    return_lse: bool,
) -> _Options:
    """Validate the call and normalise the window the way flash-attn's C++ front end does."""
    if q.dim() != 3:
        raise ValueError(f"q must be (total_q, heads, head_dim), got shape {tuple(q.shape)}")
    hq, hk = q.shape[1], k.shape[-2]
    if hk == 0 or hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if alibi_slopes is not None and (alibi_slopes.dim() not in (1, 2) or alibi_slopes.shape[-1] != hq):
        raise ValueError(f"alibi_slopes must be (heads,) or (batch, heads), got {tuple(alibi_slopes.shape)}")
    max_k = _as_int(max_seqlen_k)
    left, right = normalize_window(causal, window, max_k)
    return _Options(
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        left=left,
        right=right,
        softcap=float(softcap),
        alibi=alibi_slopes,
        dropout_p=float(dropout_p),
        want_lse=return_lse,
        max_k=max_k,
    )


def _pack_keys(
    k: Tensor, v: Tensor, cu_k: Tensor | None, seqused_k: Tensor | None, block_table: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed (Tk, Hkv, D) keys and their cu_seqlens; pages and ``seqused_k`` gather the used tokens only."""
    if block_table is None and seqused_k is None:
        if cu_k is None:
            raise ValueError("cu_seqlens_k may be None only with seqused_k")
        if k.dim() != 3:
            raise ValueError(
                f"k must be (total_k, heads, head_dim) without block_table, got {tuple(k.shape)}"
            )
        return k, v, cu_k
    dev = k.device
    if seqused_k is not None:
        lens = seqused_k.to(device=dev, dtype=torch.long)
    elif cu_k is not None:
        cu = cu_k.to(device=dev, dtype=torch.long)
        lens = cu[1:] - cu[:-1]
    else:
        raise ValueError("block_table needs cu_seqlens_k (cumulative key lengths) or seqused_k")
    total = int(lens.sum()) if lens.numel() else 0
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens, output_size=total)
    offsets = torch.cumsum(lens, 0) - lens
    t = torch.arange(total, device=dev) - offsets[seq]
    if block_table is not None:
        if k.dim() != 4:
            raise ValueError(f"paged k must be (num_pages, page_size, heads, head_dim), got {tuple(k.shape)}")
        page = k.shape[1]
        if block_table.dim() != 2 or block_table.shape[0] != lens.numel():
            raise ValueError(f"block_table must be (batch, max_pages), got {tuple(block_table.shape)}")
        if lens.numel() and int(lens.max()) > block_table.shape[1] * page:
            raise ValueError("a sequence uses more keys than its block_table row holds")
        pages = block_table.to(device=dev, dtype=torch.long)[seq, torch.div(t, page, rounding_mode="floor")]
        rows = pages * page + t % page
        k_flat, v_flat = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    else:
        starts = offsets if cu_k is None else cu_k.to(device=dev, dtype=torch.long)[:-1]
        rows = starts[seq] + t
        k_flat, v_flat = k, v
    cu_packed = torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
    return k_flat.index_select(0, rows), v_flat.index_select(0, rows), cu_packed


def _bounds(cu_q: Tensor, cu_k: Tensor, tq: int, tk: int) -> tuple[list[int], list[int]]:
    """cu_seqlens on the host (one sync), checked like flash-attn's front end would."""
    if cu_q.dim() != 1 or cu_q.numel() < 1 or cu_k.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D (batch + 1,), got {tuple(cu_q.shape)}, {tuple(cu_k.shape)}")
    bq = forward_meta.host_list(cu_q)  # once per tensor: every layer of a forward passes the same one
    bk = bq if cu_k is cu_q else forward_meta.host_list(cu_k)
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_q has {len(bq)} entries but cu_seqlens_k has {len(bk)}")
    if not (_ordered(cu_q, bq) and (cu_k is cu_q or _ordered(cu_k, bk))):
        raise ValueError("cu_seqlens must be non-decreasing")
    if bq[0] < 0 or bk[0] < 0 or bq[-1] > tq or bk[-1] > tk:
        raise ValueError(f"cu_seqlens go past the packed tensors ({bq[-1]} > {tq} or {bk[-1]} > {tk})")
    return bq, bk


def _ordered(cu: Tensor, bounds: list[int]) -> bool:
    """Non-decreasing bounds, checked once per tensor."""
    return forward_meta.CACHE.get(cu, "ordered", lambda: all(a <= b for a, b in itertools.pairwise(bounds)))


# --------------------------------------------------------------------------- route choice


def _choose(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, opts: _Options) -> str:
    """The route for a call whose keys are already packed."""
    forced = _FORCED[-1] if _FORCED else None
    if forced is not None:
        _check_forced(forced, q, k, v, cu_q, cu_k, opts)
        return forced
    kind = "explicit" if opts.needs_explicit else "sdpa"
    if _many_short_documents(q, k, cu_q, cu_k) and flex.flex_refusal(q, k, v, opts, True) is None:
        return "flex"
    if varlen_attn_refusal(q, k, v, opts) is None:
        return "varlen_attn"
    bq, bk = _bounds(cu_q, cu_k, q.shape[0], k.shape[0])
    return f"uniform_{kind}" if _uniform(bq, bk) is not None else f"bucketed_{kind}"


def _many_short_documents(q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Tensor) -> bool:
    """A packed self-attention row of many short documents (bounds read once per tensor)."""
    if FLEX_UP_TO_MEAN_LENGTH is None or cu_k is not cu_q or k.shape[0] != q.shape[0]:
        return False
    if cu_q.numel() - 1 < FLEX_FROM_DOCUMENTS or q.shape[0] > FLEX_UP_TO_MEAN_LENGTH * (cu_q.numel() - 1):
        return False  # from shapes alone: too few documents, or too long on average even if all full
    if torch.compiler.is_compiling() or (cu_q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    bounds = forward_meta.host_list(cu_q)
    documents = len(bounds) - 1
    return bounds[-1] - bounds[0] <= FLEX_UP_TO_MEAN_LENGTH * documents


def _check_forced(
    route: str, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, opts: _Options
) -> None:
    if route == "varlen_attn":
        why = varlen_attn_refusal(q, k, v, opts)
        if why:
            raise ValueError(f"route varlen_attn cannot serve this call: {why}")
    elif route == "flex":
        why = flex.flex_refusal(q, k, v, opts, cu_k is cu_q)
        if why:
            raise ValueError(f"route flex cannot serve this call: {why}")
    elif route.endswith("_sdpa") and opts.needs_explicit:
        raise ValueError(f"route {route} cannot give softcap or the log-sum-exp")
    elif route.startswith("uniform") and _uniform(*_bounds(cu_q, cu_k, q.shape[0], k.shape[0])) is None:
        raise ValueError(f"route {route} needs sequences of one shape")


def _uniform(bq: list[int], bk: list[int]) -> tuple[int, int, int] | None:
    """(n, Lq, Lk) when every sequence has the same non-empty shape, else None."""
    n = len(bq) - 1
    if n <= 0:
        return None
    lq, lk = bq[1] - bq[0], bk[1] - bk[0]
    if lq <= 0 or lk <= 0 or bq[-1] - bq[0] != n * lq or bk[-1] - bk[0] != n * lk:
        return None
    if any(bq[i + 1] - bq[i] != lq or bk[i + 1] - bk[i] != lk for i in range(n)):
        return None
    return n, lq, lk


def _log_route(route: str, q: Tensor) -> None:
    key = (route, q.device.type, q.dtype)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.debug("varlen attention: route %s on %s %s", route, q.device.type, q.dtype)


# --------------------------------------------------------------------------- execution


def _execute(
    route: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    opts: _Options,
) -> tuple[Tensor, Tensor | None]:
    if route == "flex":
        try:
            return flex.run_flex(q, k, v, cu_q, _bounds(cu_q, cu_k, q.shape[0], k.shape[0])[0], opts), None
        except flex.FlexUnavailable as exc:
            if _FORCED:
                raise
            log.debug("flex route unavailable (%s)", exc)
            route = "varlen_attn" if varlen_attn_refusal(q, k, v, opts) is None else "bucketed_sdpa"
    if route == "varlen_attn":
        try:
            return run_varlen_attn(q, k, v, cu_q, cu_k, max_q, opts)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:  # a limit of this build not checked above
            if _FORCED:
                raise
            log.debug("varlen_attn refused (%s); using bucketed SDPA", exc)
            route = "bucketed_explicit" if opts.needs_explicit else "bucketed_sdpa"
    bq, bk = _bounds(cu_q, cu_k, q.shape[0], k.shape[0])
    explicit = route.endswith("_explicit")
    if route.startswith("uniform"):
        return _run_uniform(q, k, v, bq, bk, opts, explicit)
    return run_bucketed(q, k, v, bq, bk, opts, explicit)


def _run_uniform(
    q: Tensor, k: Tensor, v: Tensor, bq: list[int], bk: list[int], opts: _Options, explicit: bool
) -> tuple[Tensor, Tensor | None]:
    """All sequences of one shape: a zero-copy (n, L, H, D) view and one dense call."""
    shape = _uniform(bq, bk)
    assert shape is not None
    n, lq, lk = shape
    qs = q[bq[0] : bq[-1]].unflatten(0, (n, lq))
    ks, vs = (x[bk[0] : bk[-1]].unflatten(0, (n, lk)) for x in (k, v))
    res = attention(
        qs, ks, vs, scale=opts.scale, left=opts.left, right=opts.right, dropout_p=opts.dropout_p,
        softcap=opts.softcap, alibi_slopes=opts.alibi, want_lse=opts.want_lse, explicit=explicit,
    )  # fmt: skip
    h, tq = q.shape[1], q.shape[0]
    out = res.out.flatten(0, 1)
    if bq[0] > 0 or bq[-1] < tq:
        out = torch.cat(
            (out.new_zeros((bq[0], h, out.shape[-1])), out, out.new_zeros((tq - bq[-1], h, out.shape[-1])))
        )
    lse = None
    if res.lse is not None:
        lse = torch.full((h, tq), math.inf, dtype=torch.float32, device=q.device)
        lse[:, bq[0] : bq[-1]] = res.lse.permute(1, 0, 2).reshape(h, n * lq)
    return out, lse
