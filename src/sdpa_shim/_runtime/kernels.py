"""Dense block attention in flash-attn's semantics, on torch's own kernels (torch only).

Used by the varlen engine (``varlen.py``) for each batch of equal-shape blocks and by the
``flash_attn`` stand-in for dense calls. Everything here takes flash-attn's ``(batch, seqlen, heads,
dim)`` layout and picks the cheapest torch route that gives flash-attn's numbers:

1. a plain SDPA call (``is_causal`` only where top-left and bottom-right alignment coincide), so the
   fused flash / cuDNN kernels run;
2. SDPA with ``causal_lower_right`` for a causal block with fewer queries than keys (fused on CUDA);
3. SDPA with a mask built for this (seqlen_q, seqlen_k) block only (windows, ALiBi, key ranges);
4. an explicit float32 softmax, only where SDPA cannot express the maths (softcap) or where the
   caller asked for the log-sum-exp / probabilities.

Rows whose window holds no key give zeros, as in flash-attn ("If the row of the mask is all zero,
the output will be zero"), never NaN: such rows are unmasked for the softmax, then zeroed.

Which torch features exist is read once (``features()``); tests and benchmarks hide features with
``override_features`` so that the routes taken on older torch run on the newest one too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

_NEG_INF = float("-inf")
# Scores computed at once by the explicit path when no gradient is needed (elements, float32).
_MATH_CHUNK_ELEMENTS = 1 << 26


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):  # pragma: no cover - unparsable dev version
        return True


@dataclasses.dataclass(frozen=True)
class Features:
    """The torch features the routes depend on; tests replace fields to take older torch's routes."""

    sdpa_enable_gqa: bool  # SDPA's ``enable_gqa`` (torch >= 2.5)
    causal_lower_right: Callable[[int, int], Any] | None  # bottom-right causal bias (torch >= 2.3)
    varlen_attn: Callable[..., Any] | None  # torch.nn.attention.varlen.varlen_attn (torch >= 2.10)
    varlen_params: frozenset[str]  # its parameter names (they changed in 2.11 and 2.12)
    aux_request: type | None  # AuxRequest, for the log-sum-exp
    varlen_attn_devices: frozenset[str] = frozenset({"cuda"})  # where varlen_attn has kernels


@functools.cache
def _detect() -> Features:
    try:  # torch >= 2.3: SDPA dispatches this to kernels that align causal masks bottom-right
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:  # pragma: no cover - old torch
        causal_lower_right = None
    fn: Callable[..., Any] | None = None
    params: frozenset[str] = frozenset()
    aux: type | None = None
    try:
        from torch.nn.attention import varlen as _varlen_mod

        fn = _varlen_mod.varlen_attn
        params = frozenset(inspect.signature(fn).parameters)
        aux = getattr(_varlen_mod, "AuxRequest", None)
    except (ImportError, AttributeError, TypeError, ValueError):
        fn, params, aux = None, frozenset(), None
    return Features(
        sdpa_enable_gqa=_torch_at_least(2, 5),
        causal_lower_right=causal_lower_right,
        varlen_attn=fn,
        varlen_params=params,
        aux_request=aux,
    )


_OVERRIDES: list[Features] = []


def features() -> Features:
    """The features in force: torch's own, unless a test or benchmark hides some."""
    return _OVERRIDES[-1] if _OVERRIDES else _detect()


@contextlib.contextmanager
def override_features(**changes: Any) -> Iterator[Features]:
    """Pretend torch lacks (or has) features, e.g. ``varlen_attn=None, sdpa_enable_gqa=False``."""
    changed = dataclasses.replace(features(), **changes)
    _OVERRIDES.append(changed)
    try:
        yield changed
    finally:
        _OVERRIDES.remove(changed)


class Result(NamedTuple):
    """Output in flash-attn layout, plus what ``return_attn_probs`` asks for (else None)."""

    out: Tensor
    lse: Tensor | None
    probs: Tensor | None


def normalize_window(
    causal: bool, window_size: tuple[int, int] | list[int], seqlen_k: int
) -> tuple[int, int]:
    """Turn flash-attn's ``(causal, window_size)`` into one ``(left, right)`` pair, -1 meaning unbounded.

    Same rules as flash-attn's C++ front end: causal forces ``right = 0``, and a side at least as long
    as ``seqlen_k`` counts as unbounded.
    """
    if len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    if left < 0 or left >= seqlen_k:
        left = -1
    if right < 0 or right >= seqlen_k:
        right = -1
    return left, right


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, S, Hk, D) -> (B, S, Hk * n_rep, D), query head h reading key head h // n_rep."""
    if n_rep == 1:
        return x
    b, s, h, d = x.shape
    return x.unsqueeze(3).expand(b, s, h, n_rep, d).reshape(b, s, h * n_rep, d)


def _allowed(
    sq: int,
    sk: int,
    left: int,
    right: int,
    shift: int | Tensor,
    key_start: Tensor | None,
    key_end: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Boolean (1|B, 1, sq, sk) mask of the keys each query may see; None when it sees all of them.

    Query i may see key j when ``i + shift - left <= j <= i + shift + right`` (shift = seqlen_k -
    seqlen_q gives flash-attn's bottom-right alignment) and ``key_start <= j < key_end``.
    """
    batched = isinstance(shift, Tensor) or key_start is not None or key_end is not None
    if left < 0 and right < 0 and not batched:
        return None
    rel = torch.arange(sk, device=device).view(1, 1, 1, sk) - torch.arange(sq, device=device).view(
        1, 1, sq, 1
    )
    if isinstance(shift, Tensor):
        shift = shift.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    mask = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        mask = mask & (rel <= shift + right)
    if left >= 0:
        mask = mask & (rel >= shift - left)
    cols = torch.arange(sk, device=device).view(1, 1, 1, sk)
    if key_start is not None:
        mask = mask & (cols >= key_start.to(device=device, dtype=torch.long).view(-1, 1, 1, 1))
    if key_end is not None:
        mask = mask & (cols < key_end.to(device=device, dtype=torch.long).view(-1, 1, 1, 1))
    return mask


def _alibi_bias(slopes: Tensor, sq: int, sk: int, shift: int | Tensor, device: torch.device) -> Tensor:
    """flash-attn's ALiBi: ``-slope * |i + seqlen_k - seqlen_q - j|`` as a float32 (1|B, H, sq, sk) bias."""
    slopes = slopes.to(device=device, dtype=torch.float32)
    slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(slopes.shape[0], -1, 1, 1)
    rel = torch.arange(sq, device=device).view(1, 1, sq, 1) - torch.arange(sk, device=device).view(
        1, 1, 1, sk
    )
    if isinstance(shift, Tensor):
        shift = shift.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    return -slopes * (rel + shift).abs().to(torch.float32)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    left: int = -1,
    right: int = -1,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    key_start: Tensor | None = None,
    key_end: Tensor | None = None,
    want_lse: bool = False,
    want_probs: bool = False,
    explicit: bool = False,
) -> Result:
    """Attention over (B, Sq, H, D) queries and (B, Sk, Hk, D) keys, in flash-attn's semantics.

    ``left``/``right`` come from ``normalize_window``. ``key_start``/``key_end`` ((B,) tensors) limit
    each batch row to a slice of the keys (KV cache); alignment is then to ``key_end``.
    ``explicit`` forces the float32 softmax (benchmarks compare it with SDPA).
    """
    b, sq = q.shape[:2]
    sk = k.shape[1]
    if sq == 0 or b == 0 or sk == 0:
        return _empty_result(q, v, want_lse, want_probs)
    ranged = key_start is not None or key_end is not None
    shift: int | Tensor = sk - sq if key_end is None else key_end.to(torch.long) - sq
    if not ranged:  # drop window sides that no query can reach (exact, and opens the fast paths)
        if right >= sq - 1:
            right = -1
        if left >= sk - 1:
            left = -1

    needs_explicit = explicit or softcap > 0 or want_lse or want_probs
    plain = alibi_slopes is None and not ranged and not needs_explicit
    lower_right = features().causal_lower_right
    if plain and left < 0 and (right < 0 or (right == 0 and sq == sk)):
        return Result(_sdpa(q, k, v, scale=scale, dropout_p=dropout_p, is_causal=right == 0), None, None)
    if plain and left < 0 and right == 0 and sq < sk and lower_right is not None:
        bias = lower_right(sq, sk)
        return Result(_sdpa(q, k, v, scale=scale, dropout_p=dropout_p, mask=bias), None, None)

    mask = _allowed(sq, sk, left, right, shift, key_start, key_end, q.device)
    bias = _alibi_bias(alibi_slopes, sq, sk, shift, q.device) if alibi_slopes is not None else None
    row_ok = None
    if mask is not None:
        row_ok = mask.any(dim=-1, keepdim=True)  # (1|B, 1, sq, 1)
        mask = mask | ~row_ok  # empty rows see everything, then get zeroed: no NaN, no gradient
    if needs_explicit:
        return explicit_attention(
            q, k, v, scale, dropout_p, softcap, mask, bias, row_ok, want_probs, want_lse=want_lse
        )
    return Result(masked_sdpa(q, k, v, scale, dropout_p, mask, bias, row_ok), None, None)


def masked_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    dropout_p: float,
    mask: Tensor | None,
    bias: Tensor | None,
    row_ok: Tensor | None,
) -> Tensor:
    """SDPA with a bool mask and/or float bias; rows marked not ``row_ok`` come out as zeros."""
    if bias is not None:
        attn_mask: Tensor | None = bias if mask is None else bias.masked_fill(~mask, _NEG_INF)
        attn_mask = attn_mask.to(q.dtype)
    else:
        attn_mask = mask
    out = _sdpa(q, k, v, scale=scale, dropout_p=dropout_p, mask=attn_mask)
    if row_ok is not None:
        out = out * row_ok.transpose(1, 2).to(out.dtype)  # (1|B, sq, 1, 1)
    return out


def _sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    dropout_p: float,
    is_causal: bool = False,
    mask: object = None,
) -> Tensor:
    """One SDPA call on transposed views; returns flash-attn layout (contiguous, as flash-attn's is)."""
    h, hk = q.shape[2], k.shape[2]
    kwargs: dict[str, object] = {}
    # SDPA's causal flag with scale 0 gives NaN (0 * -inf); flash-attn gives uniform weights
    if is_causal and scale == 0.0:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        is_causal = False
    if h != hk:
        # enable_gqa only where a fused kernel takes it (flash: no tensor mask, half precision for
        # the lower-right bias); elsewhere SDPA would fall back to its math kernel, so repeat K/V.
        half = q.dtype in (torch.float16, torch.bfloat16)
        if features().sdpa_enable_gqa and (mask is None or (half and not isinstance(mask, Tensor))):
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, h // hk), repeat_kv(v, h // hk)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        **kwargs,
    )
    return out.transpose(1, 2).contiguous()


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    dropout_p: float,
    softcap: float,
    mask: Tensor | None,
    bias: Tensor | None,
    row_ok: Tensor | None,
    want_probs: bool,
    want_lse: bool = True,
) -> Result:
    """Scores -> softcap -> bias/mask -> softmax -> dropout -> matmul, in float32 (float64 if given).

    Without autograd and without probabilities, queries go in chunks so that memory stays bounded.
    ``mask`` may be (B|1, 1, Sq|1, Sk): a key-padding mask broadcasts over queries.
    """
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chunk = sq
    if not needs_grad and not want_probs:
        chunk = max(1, min(sq, _MATH_CHUNK_ELEMENTS // max(1, b * h * sk)))
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    hk = k.shape[2]
    kt = repeat_kv(k, h // hk).transpose(1, 2).to(cdt)  # (B, H, Sk, D)
    vt = repeat_kv(v, h // hk).transpose(1, 2).to(cdt)
    outs, lses, probs = [], [], []
    for start in range(0, sq, chunk):
        stop = min(sq, start + chunk)
        qt = q[:, start:stop].transpose(1, 2).to(cdt)
        s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if softcap > 0:
            s = torch.tanh(s / softcap) * softcap
        if bias is not None:
            s = s + bias[:, :, start:stop].to(cdt)
        if mask is not None:
            s = s.masked_fill(~(mask[:, :, start:stop] if mask.shape[2] > 1 else mask), _NEG_INF)
        if want_lse or want_probs:
            lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse.unsqueeze(-1))
        else:  # one fused softmax (softcap calls: Gemma2 decode)
            lse, p = None, torch.softmax(s, dim=-1)
        if row_ok is not None:
            ok = row_ok[:, :, start:stop]
            p = p * ok.to(cdt)
            if lse is not None:
                lse = lse.masked_fill(~ok.squeeze(-1), math.inf)  # flash-attn reports +inf for empty rows
        p_used = p
        if dropout_p > 0:
            keep = torch.rand_like(p) >= dropout_p
            p_used = p * keep.to(cdt) / (1.0 - dropout_p)
            if want_probs:  # flash-attn's S_dmask: negative where dropped
                probs.append(torch.where(keep, p, -p).to(q.dtype))
        outs.append(torch.matmul(p_used, vt))
        if lse is not None:
            lses.append(lse)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    lse_all = None
    if lses:
        lse_all = (torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]).to(torch.float32)
    p_all = None
    if want_probs and dropout_p > 0:
        p_all = torch.cat(probs, dim=2) if len(probs) > 1 else probs[0]
    elif want_probs:  # flash-attn returns S_dmask only when dropout is on
        p_all = q.new_empty((0,))
    return Result(out.transpose(1, 2).to(q.dtype).contiguous(), lse_all, p_all)


def _empty_result(q: Tensor, v: Tensor, want_lse: bool, want_probs: bool) -> Result:
    """No query or no key: flash-attn's answer is zeros (lse +inf), kept on the autograd graph."""
    b, sq, h, _ = q.shape
    out = q.new_zeros((b, sq, h, v.shape[-1]))
    if q.requires_grad or v.requires_grad:
        out = out + 0 * q.sum() + 0 * v.sum()
    lse = q.new_full((b, h, sq), math.inf, dtype=torch.float32) if want_lse else None
    probs = q.new_empty((0,)) if want_probs else None
    return Result(out, lse, probs)
