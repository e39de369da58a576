"""Attention calls of models kept on the flash path, each served by the route it needs (4.56+).

``registry`` sends every "flash_attention_2" call of a served model here. The call is described by its
shapes and keywords (``_runtime.routes.CallFacts``), the rule (``routes.choose``) picks a route, and this
module runs it: transformers' own SDPA function for dense and padded calls (what plain "sdpa" runs, with
the padding mask built once per forward), the varlen engine directly for packed rows and given
``cu_seqlens`` (bounds derived once per forward), the runtime's block attention for unpadded calls in
flash-attn's own semantics (softcap, windows, cached keys), and transformers' flash code for the rest
(continuous batching, paged caches, sinks). SDPA calls run under the backend policy. The numbers are the
flash path's: padding query rows come back as zeros, as flash-attn leaves them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from .._runtime import backends as _backends
from .._runtime import forward_meta as _meta
from .._runtime import routes as _routes
from .._runtime.determinism import deterministic_backward
from .._runtime.kernels import attention, normalize_window
from .._runtime.varlen import varlen_attention

logger = logging.getLogger(__name__)

Attention = Callable[..., Any]
_HALF = (torch.float16, torch.bfloat16)


class RouteError(Exception):
    """The shim's own fault while choosing a route; nothing ran yet (``__cause__`` says what)."""


#: Keywords only transformers' flash code honours (continuous batching, paged caches, sinks).
FLASH_ONLY = (
    "s_aux", "cache", "read_index", "write_index", "logits_indices", "block_table", "k_cache", "v_cache",
)  # fmt: skip
_FLASH_ONLY = frozenset(FLASH_ONLY)
#: The varlen bounds a collator or a vision tower computed.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def serve(
    flash: Attention,
    sdpa: Attention,
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    kwargs: dict[str, Any],
) -> Any:
    """One attention call of a served model ((B, H, L, D) in, (B, L, H, D) out, like transformers').

    Raises ``RouteError`` (before anything ran) when the route cannot be chosen: the caller then takes
    transformers' flash code. Errors of the attention itself propagate."""
    try:
        route, packed = _route(module, query, key, attention_mask, kwargs)
    except Exception as error:
        raise RouteError("the route could not be chosen") from error
    _routes.count(route)
    if route is _routes.Route.DENSE:
        return _backends.dispatch(sdpa, module, query, key, value, None, **kwargs)
    if route is _routes.Route.PADDED_SDPA:
        return _padded_sdpa(sdpa, module, query, key, value, attention_mask, kwargs)
    if route is _routes.Route.PADDED_VARLEN:
        return _padded_varlen(module, query, key, value, attention_mask, kwargs)
    if route is _routes.Route.VARLEN:
        return _varlen(module, query, key, value, packed, kwargs)
    if route is _routes.Route.FLASH_DENSE:
        return _flash_dense(module, query, key, value, kwargs)
    return _backends.dispatch(flash, module, query, key, value, attention_mask, **kwargs)


def _route(
    module: Any, query: Any, key: Any, attention_mask: Any, kwargs: dict[str, Any]
) -> tuple[_routes.Route, _meta.Packed | None]:
    """Describe the call (shapes and keywords; tensors read once per forward at most) and ask the rule."""
    q_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    present = _FLASH_ONLY.intersection(kwargs)
    flash_only = bool(present) and any(kwargs[name] is not None for name in present)
    masked = attention_mask is not None
    if masked and attention_mask.dim() != 2:
        flash_only = True  # not a 2D padding mask: transformers' flash code says what it makes of it
    packed = None
    # a padding mask comes first, as in transformers' flash code (it unpads before reading the bounds)
    given = not masked and all(kwargs.get(name) is not None for name in VARLEN_KEYS)
    if not (flash_only or masked or given) and q_len > 1 and query.shape[0] == 1:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape[0] == 1:
            packed = _meta.packed_rows(position_ids)
    packed_row = given or packed is not None
    facts = _routes.CallFacts(
        device="cuda" if query.is_cuda else "other",
        half=query.dtype in _HALF,
        q_len=q_len,
        kv_len=kv_len,
        masked=masked,
        # float32 inputs that flash-attn would cast: only the varlen routes differ (SDPA computes in
        # float32, as plain "sdpa" does), so only they ask
        flash_only=flash_only or (packed_row and _casts(module, query)),
        packed_row=packed_row,
        softcap=kwargs.get("softcap") is not None,
        windowed_without_mask=bool(window) and kv_len > int(window),
        mask_covers_keys=not masked or attention_mask.shape[-1] == kv_len,
    )
    route = _routes.choose(facts)
    if route is _routes.Route.PADDED_VARLEN:  # worth it only with enough padding: read once per forward
        share = 1.0 - _meta.unpadded(attention_mask).total / max(attention_mask.numel(), 1)
        route = _routes.choose(facts._replace(padding_share=share))
    return route, packed


def _casts(module: Any, query: Any) -> bool:
    """Whether transformers' flash code would cast float32 inputs to a half dtype first (autocast, or
    half weights beside float32 activations, as PEFT leaves them): that stays its own business."""
    if query.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled(query.device.type):
        return True
    return _weight_dtype(module) not in (None, torch.float32)


#: Where attention modules keep their query projection (checked before walking all parameters).
_PROJECTIONS = ("q_proj", "query", "qkv_proj", "qkv", "Wqkv", "c_attn", "in_proj")


def _weight_dtype(module: Any) -> Any:
    """The dtype of the attention module's weights (transformers reads its first Linear's)."""
    children = getattr(module, "_modules", None) or {}
    for name in _PROJECTIONS:
        weight = getattr(children.get(name), "weight", None)
        if weight is not None:
            return weight.dtype
    weight = next(module.parameters(), None) if hasattr(module, "parameters") else None
    return None if weight is None else weight.dtype


def _varlen(
    module: Any, query: Any, key: Any, value: Any, packed: _meta.Packed | None, kwargs: dict[str, Any]
) -> Any:
    """Packed rows straight into the varlen engine, as transformers' flash code would call
    ``flash_attn_varlen_func`` (same window, scale, softcap, dropout, determinism)."""
    if packed is not None:
        cu_q = cu_k = packed.cu_seqlens
        max_q = max_k = packed.max_len
    else:
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        max_q, max_k = kwargs["max_length_q"], kwargs["max_length_k"]
    batch, length = query.shape[0], query.shape[2]
    causal = _causal(module, kwargs)
    window = _window(kwargs, key.shape[2])
    softcap = kwargs.get("softcap")
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]) for x in (query, key, value))
    out = varlen_attention(
        q, k, v, cu_q, cu_k, max_q, max_k,
        scale=kwargs.get("scaling"), causal=causal, window=(window - 1, window - 1) if window else (-1, -1),
        softcap=float(softcap or 0.0), dropout_p=float(kwargs.get("dropout") or 0.0),
        deterministic=_deterministic(kwargs),
    )  # fmt: skip
    return out.view(batch, length, *out.shape[1:]), None


def _flash_dense(module: Any, query: Any, key: Any, value: Any, kwargs: dict[str, Any]) -> Any:
    """An unpadded call in flash-attn's semantics (bottom-right causal, window, softcap) on the runtime's
    block attention, as the stand-in's ``flash_attn_func`` would run it for transformers' flash code."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, L, H, D), flash-attn's layout
    window = _window(kwargs, key.shape[2])
    left, right = normalize_window(
        _causal(module, kwargs), (window - 1, window - 1) if window else (-1, -1), key.shape[2]
    )
    scale = kwargs.get("scaling")
    options = {
        "scale": q.shape[-1] ** -0.5 if scale is None else float(scale),
        "left": left,
        "right": right,
        "dropout_p": float(kwargs.get("dropout") or 0.0),
        "softcap": float(kwargs.get("softcap") or 0.0),
    }
    if _deterministic(kwargs):
        return deterministic_backward(lambda *x: (attention(*x, **options).out,), q, k, v)[0], None
    return attention(q, k, v, **options).out, None


def _deterministic(kwargs: dict[str, Any]) -> bool:
    """flash-attn's ``deterministic`` as transformers' flash code asks for it."""
    deterministic = kwargs.get("deterministic")
    if deterministic is None:
        return os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    return bool(deterministic)


def _causal(module: Any, kwargs: dict[str, Any]) -> bool:
    causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if causal is None else causal)


def _window(kwargs: dict[str, Any], kv_len: int) -> int | None:
    """flash-attn's window as transformers asks for it: only when the keys outgrow it."""
    window = kwargs.get("sliding_window")
    return int(window) if window and kv_len > int(window) else None


def _padded_sdpa(
    sdpa: Attention, module: Any, query: Any, key: Any, value: Any, mask_2d: Any, kwargs: dict[str, Any]
) -> Any:
    """transformers' SDPA function with the flash path's padding semantics as a boolean mask."""
    q_len = query.shape[2]
    padding = _meta.padding(
        mask_2d, q_len, _causal(module, kwargs), _window(kwargs, key.shape[2]), query.dtype
    )
    if key.shape[2] != padding.key_len:  # a static cache longer than the mask: unused slots
        key, value = key[:, :, : padding.key_len], value[:, :, : padding.key_len]
    call = {**kwargs, "is_causal": False}  # causality is in the mask
    out, weights = _backends.dispatch(sdpa, module, query, key, value, padding.mask, **call)
    if padding.keep_rows is not None:
        out = out * padding.keep_rows
    return out, weights


def _padded_varlen(
    module: Any, query: Any, key: Any, value: Any, mask_2d: Any, kwargs: dict[str, Any]
) -> Any:
    """Padded prefill as packed rows: tokens gathered with indices derived once per forward, run
    through the varlen engine, and put back (padding rows zero), as transformers' flash code does
    without its per-layer host reads."""
    batch, _, length, _ = query.shape
    unpadded = _meta.unpadded(mask_2d)
    rows, cols = unpadded.rows, unpadded.cols

    def gather(x: Any) -> Any:
        return x[rows, :, cols]  # (total, heads, dim)

    window = _window(kwargs, key.shape[2])
    causal = _causal(module, kwargs)
    out = varlen_attention(
        gather(query),
        gather(key),
        gather(value),
        unpadded.cu_seqlens,
        unpadded.cu_seqlens,
        unpadded.max_len,
        unpadded.max_len,
        scale=kwargs.get("scaling"),
        causal=causal,
        window=(window - 1, 0 if causal else window - 1) if window else (-1, -1),
        dropout_p=float(kwargs.get("dropout") or 0.0),
    )
    full = out.new_zeros(batch, length, *out.shape[1:])
    full[rows, cols] = out
    return full, None
