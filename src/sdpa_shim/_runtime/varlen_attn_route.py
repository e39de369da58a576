"""The varlen engine's ``varlen_attn`` route: torch's FA2 varlen kernel with flash-attn's semantics.

``varlen_attn_refusal`` says why the kernel cannot give flash-attn's answer for a call (the engine then
takes another route); ``run_varlen_attn`` calls it with the keywords this torch takes (read from its
signature: 2.10 ``is_causal``; 2.11 ``scale``, ``window_size``, ``return_aux``; 2.12 ``enable_gqa``).
FA2 leaves rows outside every segment unwritten: where the segments may not cover every row (known from
the bounds, read once per ``cu_seqlens`` tensor; unknown while compiled or captured), those rows are
zeroed forward and backward on the device. torch 2.15 picks the kernel from SDPA's backend flags: the
flash flag is kept on for the call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from . import forward_meta
from .bucketed import Options
from .kernels import features

_HALF = (torch.float16, torch.bfloat16)


def varlen_attn_refusal(q: Tensor, k: Tensor, v: Tensor, opts: Options) -> str | None:
    """Why torch's varlen_attn cannot give flash-attn's answer for this call (None: it can)."""
    f = features()
    params = f.varlen_params
    d = q.shape[-1]
    reasons = (
        (f.varlen_attn is None, "torch has no varlen_attn"),
        (q.device.type not in f.varlen_attn_devices, f"no varlen_attn kernel on {q.device.type}"),
        (q.dtype not in _HALF or k.dtype != q.dtype or v.dtype != q.dtype, "not fp16/bf16"),
        (v.shape[-1] != d or d > 256 or d % 8, "head dims"),
        (opts.softcap > 0 or opts.alibi is not None or opts.dropout_p > 0, "softcap/alibi/dropout"),
        (opts.want_lse and ("return_aux" not in params or f.aux_request is None), "lse"),
        ("scale" not in params and not math.isclose(opts.scale, d**-0.5, rel_tol=1e-6), "scale"),
        (opts.scale <= 0, "scale <= 0 (torch 2.15 refuses it)"),
        (
            "window_size" not in params and not (opts.left < 0 and opts.right in (-1, 0)),
            "window",
        ),
    )
    return next((why for bad, why in reasons if bad), None)


def _row_mask(cu: Tensor, rows: int, device: torch.device) -> Tensor:
    """(rows,) True inside ``cu[0]:cu[-1]``, computed on the device (no host sync)."""
    r = torch.arange(rows, device=device)
    cu = cu.to(device)
    return (r >= cu[0]) & (r < cu[-1])


class _ZeroGradOutside(torch.autograd.Function):
    """Identity forward; the backward zeroes gradient rows where ``rows_ok`` is False."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows_ok: Tensor) -> Tensor:
        ctx.save_for_backward(rows_ok)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (rows_ok,) = ctx.saved_tensors
        return grad.masked_fill(~rows_ok.view(-1, *([1] * (grad.dim() - 1))), 0), None


def run_varlen_attn(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, opts: Options
) -> tuple[Tensor, Tensor | None]:
    """torch's FA2 varlen kernel with the keywords this torch takes; rows outside segments zeroed.

    FA2 leaves output rows (and dq/dk/dv rows) outside every segment unwritten, so those rows are
    masked on the device, forward and backward, without a host sync.
    """
    f = features()
    params = f.varlen_params
    assert f.varlen_attn is not None
    kwargs: dict[str, object] = {}
    if "scale" in params:
        kwargs["scale"] = opts.scale
    if "window_size" in params:
        kwargs["window_size"] = (int(opts.left), int(opts.right))  # a tuple: (-1, 0) means causal
    elif "is_causal" in params:
        kwargs["is_causal"] = opts.right == 0
    if q.shape[1] != k.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    if opts.want_lse:
        assert f.aux_request is not None
        kwargs["return_aux"] = f.aux_request(lse=True)
    if _covers_every_row(cu_q, cu_k, q.shape[0], k.shape[0]):
        return _call_varlen_attn(q, k, v, cu_q, cu_k, max_q, opts, kwargs)
    q_ok = _row_mask(cu_q, q.shape[0], q.device)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # backward: FA2 leaves gradient rows outside every segment unwritten; zero them on the way back
        # (an identity forward: no copy of q/k/v is made or kept for the backward)
        k_ok = _row_mask(cu_k, k.shape[0], k.device)
        q = _ZeroGradOutside.apply(q, q_ok)
        k, v = _ZeroGradOutside.apply(k, k_ok), _ZeroGradOutside.apply(v, k_ok)
    out, lse = _call_varlen_attn(q, k, v, cu_q, cu_k, max_q, opts, kwargs)
    # In place through ``.data``: FA2's backward keeps ``out`` but never reads rows outside every segment,
    # so zeroing them cannot change a gradient; an out-of-place copy would keep a second output-sized
    # tensor alive per layer until the backward (measured: +1.4 GiB on a 22-layer, 16k-token step).
    out.data.masked_fill_(~q_ok.view(-1, 1, 1), 0)
    if lse is not None:
        lse = torch.where(q_ok.view(1, -1), lse.float(), math.inf)
    return out, lse


def _covers_every_row(cu_q: Tensor, cu_k: Tensor, tq: int, tk: int) -> bool:
    """Whether the segments span every row of q and k (nothing for FA2 to leave unwritten), read on
    the host once per cu_seqlens tensor; unknown (False) while a CUDA graph is captured or traced."""
    if torch.compiler.is_compiling() or (cu_q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    bq = forward_meta.host_list(cu_q)
    bk = bq if cu_k is cu_q else forward_meta.host_list(cu_k)
    return bool(bq) and bool(bk) and bq[0] == 0 and bk[0] == 0 and bq[-1] == tq and bk[-1] == tk


def _call_varlen_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    opts: Options,
    kwargs: dict[str, object],
) -> tuple[Tensor, Tensor | None]:
    f = features()
    assert f.varlen_attn is not None
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu_q32 = forward_meta.int32_on(cu_q, q.device)
    # the same object for q and k when they are one: cuDNN may take it
    cu_k32 = cu_q32 if cu_k is cu_q else forward_meta.int32_on(cu_k, q.device)
    with _flash_backend_available():
        res = f.varlen_attn(q, k, v, cu_q32, cu_k32, max_q, opts.max_k, **kwargs)
    return (res[0], res[1]) if opts.want_lse else (res, None)


@contextlib.contextmanager
def _flash_backend_available() -> Iterator[None]:
    """torch 2.15's varlen_attn picks its kernel from SDPA's backend flags and fails ("No viable
    backend") when flash and cuDNN are both off, as the backend policy's pinned "efficient"/"math"
    plans leave them for SDPA: the flash flag is turned on for the varlen call alone."""
    cuda = torch.backends.cuda
    if cuda.flash_sdp_enabled() or cuda.cudnn_sdp_enabled():
        yield
        return
    cuda.enable_flash_sdp(True)
    try:
        yield
    finally:
        cuda.enable_flash_sdp(False)
