"""The varlen engine's flex_attention route: packed self-attention rows of many short documents.

Where documents are short (tens of tokens), FA2's varlen kernel spends most of its time on tiles that
are almost empty; flex_attention with a document block mask skips whole 128x128 tiles that hold no
visible pair and runs the rest densely, which was faster on an H100 (GQA 32/4, d64, fwd+bwd: 4k
tokens in 64 docs 0.62 ms vs 0.86 for varlen_attn; 16k/1024 1.92 vs 4.53) but slower for long ones.
The engine decides *when*; this module only says whether it *can* (``flex_refusal``) and runs it
(``run_flex``).

- The block mask is derived once per forward (every layer passes the same ``cu_seqlens`` tensor) and
  built from the document bounds at tile granularity, O((T/128)^2) on the device: never the
  O(T^2) element mask that an uncompiled ``create_block_mask`` evaluates.
- Rows are padded up to a few bucket lengths, padded tokens belonging to no document (their rows come
  out 0, their tiles are skipped), so the compiled kernel sees few shapes. The kernel is compiled
  once per (padded length, heads, head dim, dtype, scale, grad) and at most ``MAX_SHAPES`` times: past
  that the route refuses, since dynamo's recompile limit would otherwise silently run the unfused
  path, which materialises the full score matrix.
- A compile or first-call failure (no Triton, old torch, a lowering bug) marks the route unusable for
  the process; ``run_flex`` then raises ``FlexUnavailable`` and the engine falls back to varlen_attn.

CPU runs eager flex_attention (correct, slow) only with ``allow_cpu`` set, for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import forward_meta
from .bucketed import Options

log = logging.getLogger(__name__)

#: Tests: run eager (uncompiled) flex_attention on CPU, float32 allowed.
allow_cpu = False
#: Distinct compiled shapes per process; beyond it the route refuses (dynamo's recompile limit is 8).
MAX_SHAPES = 8
#: flex_attention's tile (the block mask's granularity).
BLOCK = 128
#: Padded lengths are multiples of this at least (few shapes for the compiler).
MIN_PAD = 1024

_HALF = (torch.float16, torch.bfloat16)


class FlexUnavailable(RuntimeError):
    """flex_attention could not serve this call (compile failure, shape cap): use another route."""


@dataclasses.dataclass
class _State:
    unusable: str | None = None  # why the route is off for the process
    compiled: Callable[..., Tensor] | None = None
    shapes: set[tuple[Any, ...]] = dataclasses.field(default_factory=set)  # compiled keys that ran


_STATE = _State()


def reset() -> None:
    """Forget compile failures and compiled shapes (tests)."""
    global _STATE
    _STATE = _State()


def _flex_module() -> Any | None:
    """torch.nn.attention.flex_attention, or None on torch without it (< 2.5) or where it is hidden."""
    try:
        import torch.nn.attention.flex_attention as fa
    except Exception:  # ImportError, or a broken optional dependency at import
        return None
    return fa if hasattr(fa, "flex_attention") and hasattr(fa, "BlockMask") else None


def padded_len(t: int) -> int:
    """The bucket length a row of ``t`` tokens is padded to: a multiple of 1024, or of 1/8 of the
    largest power of two <= t (< 12.5% padding; 8 lengths per octave, so few compiled shapes)."""
    step = max(MIN_PAD, (1 << max(t.bit_length() - 1, 0)) // 8)
    return max(step, -(-t // step) * step)


def _compile_key(q: Tensor, k: Tensor, v: Tensor, opts: Options) -> tuple[Any, ...]:
    """What a compiled kernel specialises on (dynamic=False): shapes, dtype, device, scale, grad."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (
        padded_len(q.shape[0]),
        q.shape[1],
        k.shape[1],
        q.shape[2],
        q.dtype,
        str(q.device),
        opts.scale,
        grad,
    )


def _compile_off() -> str | None:
    """Why torch.compile would not compile now (flex would run unfused and materialise T x T scores)."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is None or not dynamo.is_dynamo_supported():
        return "torch.compile is not supported here"
    if dynamo.config.disable:
        return "torch.compile is disabled (TORCHDYNAMO_DISABLE)"
    stance = getattr(getattr(dynamo, "eval_frame", None), "_stance", None)
    if getattr(stance, "stance", "default") not in ("default", "fail_on_recompile"):
        return f"torch.compiler stance {stance.stance!r}"
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - very old torch
        return "no Triton"
    return None if has_triton() else "no Triton"


def flex_refusal(q: Tensor, k: Tensor, v: Tensor, opts: Options, same_bounds: bool) -> str | None:
    """Why the flex route cannot give flash-attn's answer for this call (None: it can)."""
    if _flex_module() is None:
        return "torch has no flex_attention"
    if _STATE.unusable is not None:
        return _STATE.unusable
    cpu_ok = allow_cpu and q.device.type == "cpu"
    d = q.shape[-1]
    reasons = (
        (q.device.type != "cuda" and not cpu_ok, f"flex route needs CUDA (got {q.device.type})"),
        (
            (q.dtype not in _HALF and not (cpu_ok and q.dtype == torch.float32))
            or k.dtype != q.dtype
            or v.dtype != q.dtype,
            "not fp16/bf16",
        ),
        (opts.softcap > 0, "softcap"),
        (opts.alibi is not None, "alibi"),
        (opts.dropout_p > 0, "dropout"),
        (opts.want_lse, "lse"),
        (not same_bounds, "cross-attention bounds (cu_seqlens_q is not cu_seqlens_k)"),
        (k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0], "not as many key rows as query rows"),
        (not 16 <= d <= 256 or d % 8 != 0 or v.shape[-1] != d, "head dims"),
        (k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0, "heads not a multiple of key/value heads"),
        (opts.scale <= 0, "scale <= 0"),
        (torch.compiler.is_compiling(), "inside torch.compile tracing"),
        (q.is_cuda and torch.cuda.is_current_stream_capturing(), "inside CUDA graph capture"),
    )
    why = next((why for bad, why in reasons if bad), None)
    if why is not None:
        return why
    if q.is_cuda:
        why = _compile_off()
        if why is not None:
            return why
    if _compile_key(q, k, v, opts) not in _STATE.shapes and len(_STATE.shapes) >= MAX_SHAPES:
        return f"flex route already compiled {MAX_SHAPES} shapes (MAX_SHAPES)"
    return None


# --------------------------------------------------------------------------- block mask


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(nb, nb) tile flags -> flex's (1, 1, nb) counts and (1, 1, nb, nb) indices, flagged tiles first."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _from_kv_blocks(fa: Any, parts: tuple[Tensor, ...], mask_mod: Callable[..., Tensor], p: int) -> Any:
    """``BlockMask.from_kv_blocks`` with this torch's keywords (2.5/2.6: KV_/Q_BLOCK_SIZE; 2.7+:
    BLOCK_SIZE, seq_lengths)."""
    params = inspect.signature(fa.BlockMask.from_kv_blocks).parameters
    kwargs: dict[str, Any] = {"mask_mod": mask_mod}
    if "BLOCK_SIZE" in params:
        kwargs["BLOCK_SIZE"] = BLOCK
    else:  # pragma: no cover - torch < 2.7
        kwargs["KV_BLOCK_SIZE"] = kwargs["Q_BLOCK_SIZE"] = BLOCK
    if "seq_lengths" in params:
        kwargs["seq_lengths"] = (p, p)
    return fa.BlockMask.from_kv_blocks(*parts, **kwargs)


def build_block_mask(bounds: list[int], p: int, left: int, right: int, device: torch.device) -> Any:
    """The document block mask of a padded row of ``p`` tokens, from tile-level document ranges.

    A tile pair is *full* when both tiles lie inside one document and every pair satisfies the
    window, *partial* (mask_mod applied per element) when their document ranges overlap and the
    window may reach; otherwise it is skipped. Tokens outside ``bounds`` have document -1 and see
    nothing. Windows compare absolute positions: in self-attention both sides of a document start
    at the same row, so per-document offsets cancel.
    """
    fa = _flex_module()
    assert fa is not None
    pos = torch.arange(p, device=device, dtype=torch.int32)
    cu = torch.tensor(bounds, device=device, dtype=torch.int32)
    doc = torch.searchsorted(cu, pos, right=True).to(torch.int32) - 1
    doc = torch.where((pos >= bounds[0]) & (pos < bounds[-1]), doc, -1)
    hi = torch.tensor(right if right >= 0 else p, device=device, dtype=torch.int32)
    lo = torch.tensor(left if left >= 0 else p, device=device, dtype=torch.int32)

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        dq = doc[qi]
        return (dq == doc[ki]) & (dq >= 0) & (ki <= qi + hi) & (ki >= qi - lo)

    nb = p // BLOCK
    tiles = doc.view(nb, BLOCK)
    valid = tiles >= 0
    dmax = tiles.amax(dim=1)  # -1: no token of any document
    dmin = torch.where(valid, tiles, torch.iinfo(torch.int32).max).amin(dim=1)
    single = valid.all(dim=1) & (dmin == dmax)
    start = torch.arange(nb, device=device) * BLOCK
    qs, qe, ks, ke = start[:, None], start[:, None] + BLOCK - 1, start[None, :], start[None, :] + BLOCK - 1
    some = (dmax[:, None] >= 0) & (dmax[None, :] >= 0)
    some &= (dmin[:, None] <= dmax[None, :]) & (dmin[None, :] <= dmax[:, None])
    full = single[:, None] & single[None, :] & (dmin[:, None] == dmin[None, :])
    if right >= 0:
        some &= ks <= qe + right
        full &= ke <= qs + right
    if left >= 0:
        some &= ke >= qs - left
        full &= ks >= qe - left
    partial = some & ~full
    return _from_kv_blocks(fa, (*_ordered(partial), *_ordered(full)), mask_mod, p)


# --------------------------------------------------------------------------- execution


def _flex_call(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, scale: float, gqa: bool) -> Tensor:
    """One flex_attention call; compiled as our own frame so that dynamo's per-code cache (and its
    recompile limit) is not shared with other compiled flex_attention users (transformers' flex)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _kernel(device: torch.device) -> Callable[..., Tensor]:
    """The compiled kernel on CUDA (compiled once per process), eager flex_attention on CPU (tests)."""
    if device.type == "cpu":
        return _flex_call
    if _STATE.compiled is None:
        _STATE.compiled = torch.compile(_flex_call, dynamic=False)
    return _STATE.compiled


@contextlib.contextmanager
def _recompile_guard() -> Iterator[None]:
    """Make dynamo raise instead of silently running the unfused path past its recompile limit."""
    config = torch._dynamo.config
    patch: dict[str, Any] = {}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    if hasattr(config, "recompile_limit"):
        patch["recompile_limit"] = max(int(config.recompile_limit), MAX_SHAPES + 2)
    with config.patch(**patch):
        yield


def _padded(x: Tensor, p: int) -> Tensor:
    """(T, H, D) -> (1, H, p, D) over a contiguous (p, H, D) buffer (one layout: one compile)."""
    t = x.shape[0]
    x = F.pad(x, (0, 0, 0, 0, 0, p - t)) if p > t else x.contiguous()
    return x.transpose(0, 1).unsqueeze(0)


def run_flex(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, bounds: list[int], opts: Options) -> Tensor:
    """Packed self-attention over documents ``bounds`` (host copy of ``cu_seqlens``) with flex_attention.

    q (T, Hq, D), k/v (T, Hk, D) -> (T, Hq, D); rows outside ``bounds[0]:bounds[-1]`` are 0. Raises
    ``FlexUnavailable`` when the route cannot run (the caller falls back to another route).

    Padded and out-of-bounds rows need no masking: flex_attention gives 0 for a row that sees no key
    (fused kernels and the eager dense path alike; checked on CPU, torch 2.13), and no gradient.
    """
    why = flex_refusal(q, k, v, opts, same_bounds=True)
    if why is not None:
        raise FlexUnavailable(why)
    t, hq = q.shape[0], q.shape[1]
    if not bounds or bounds[-1] <= bounds[0]:  # no document token: zeros, still on the graph
        out = q.new_zeros((t, hq, v.shape[-1]))
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            out = out + 0 * (q.sum() + k.sum() + v.sum())
        return out
    p = padded_len(t)
    left, right = opts.left, opts.right
    mask = forward_meta.CACHE.get(
        cu_seqlens,
        ("flex_mask", p, left, right, str(q.device)),
        lambda: build_block_mask(bounds, p, left, right, q.device),
    )
    key = _compile_key(q, k, v, opts)
    kernel = _kernel(q.device)
    try:
        with _recompile_guard():
            out = kernel(_padded(q, p), _padded(k, p), _padded(v, p), mask, opts.scale, hq != k.shape[1])
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if key in _STATE.shapes:  # this shape ran before: a genuine error, not a missing compiler
            raise
        _STATE.unusable = f"flex_attention failed to compile or run ({type(exc).__name__}: {exc})"
        log.debug("flex route unusable for this process: %s", _STATE.unusable, exc_info=True)
        raise FlexUnavailable(_STATE.unusable) from exc
    _STATE.shapes.add(key)
    return out[0].transpose(0, 1)[:t]
