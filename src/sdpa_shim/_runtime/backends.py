"""SDPA backend choice for the attention calls of models the shim serves (CUDA only).

Why this exists: since torch 2.9-2.11, SDPA's default dispatch on Hopper runs cuDNN attention first.
cuDNN is the fastest kernel for a shape it has seen before, but it builds an execution plan for every
new shape (tens of milliseconds), and generation makes a new shape at every decode step (the key
length grows by one). A plain "sdpa" model therefore generates about 3x slower on its first call
than on a repeated one. The FlashAttention-2 kernel inside SDPA has no such plan cost. The policy
("auto", the default) is therefore:

- a decode step (one query token): never cuDNN. torch takes its flash kernel (memory-efficient when
  a padding mask is passed), which needs no plan. A warm cuDNN plan is faster per call there (much
  so with a padding mask), but a plan only becomes warm when a generation is repeated with
  identical shapes, and building one costs tens of milliseconds per decode step;
- any other call (prefill, training): the first time an attention layer sees a shape, never cuDNN
  (no plan to build); from that layer's second call of the shape on, torch's own dispatch (cuDNN on
  Hopper), whose plan is then built once and reused by every layer.

``SDPA_SHIM_BACKEND`` pins one choice for every call of every downgraded model (see ``select``).
Off CUDA the call goes straight to transformers' function, so CPU runs pay nothing. Measurements
behind the policy are in BENCHMARKS.md.

The choice is applied by flipping SDPA's global backend flags around the one call and restoring
them (sub-microsecond; ``torch.nn.attention.sdpa_kernel`` costs ~10-20 us a call). Those flags are
process-wide, so another thread's SDPA call in that window may run on another (equally valid)
backend. Under ``torch.compile`` the choice is made without the shape memory and applied with
``sdpa_kernel``, which dynamo traces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .._core.settings import BACKEND_VALUES, ENV_BACKEND, parse_choice

#: Plans ``select`` returns. "default": torch's dispatch untouched. "avoid_cudnn": cuDNN disabled for
#: the call (torch then takes flash, else memory-efficient, else math). The others come from a pin
#: and never fail where plain sdpa works: "flash" = flash > efficient > math (no cuDNN), "efficient" =
#: efficient > math, "math" = math only, "cudnn" = cuDNN first, then the rest.
PLANS = ("default", "avoid_cudnn", "flash", "efficient", "cudnn", "math")

#: A layer that saw a call shape this many times before gets torch's default dispatch (cuDNN on
#: Hopper). 1: a layer's second call of a shape builds the cuDNN plan (once for all layers, cuDNN
#: caches by shape), every later call reuses it.
WARM_AFTER = 1
#: (layer, shape) entries remembered before the memory is cleared (each entry is a small tuple).
MAX_SHAPES = 8192


def select(device_type: str, backend: str, q_len: int, seen: int) -> str:
    """The plan for one attention call (pure).

    ``device_type``: the query's device type; ``backend``: the parsed ``SDPA_SHIM_BACKEND`` value;
    ``q_len``: query length; ``seen``: how many times this layer saw this call shape before.
    """
    if device_type != "cuda":
        return "default"
    if backend != "auto":
        return backend if backend in PLANS else "default"
    if q_len <= 1:
        return "avoid_cudnn"
    return "default" if seen >= WARM_AFTER else "avoid_cudnn"


# --- reading the pin ------------------------------------------------------------------------------

_pin_cache: tuple[str | None, str] = (None, "auto")


def pinned_backend() -> str:
    """``SDPA_SHIM_BACKEND`` parsed (bad values warn once, in ``_settings``); cached per raw value."""
    global _pin_cache
    raw = os.environ.get(ENV_BACKEND)
    cached_raw, value = _pin_cache
    if raw == cached_raw:
        return value
    value = parse_choice(ENV_BACKEND, raw, BACKEND_VALUES, "auto")
    _pin_cache = (raw, value)
    return value


# --- shape memory ---------------------------------------------------------------------------------

_seen: dict[tuple[Any, ...], int] = {}


def times_seen(module: Any, query: Any, key: Any, attention_mask: Any) -> int:
    """How many times this layer saw this call shape before (and count this one).

    Per layer, so that a model's first forward counts as the first sighting in every layer."""
    shape = (
        id(module),
        query.shape,
        key.shape,
        query.dtype,
        None if attention_mask is None else attention_mask.shape,
        query.requires_grad,
    )
    count = _seen.get(shape, 0)
    if count <= WARM_AFTER:
        if len(_seen) >= MAX_SHAPES:
            _seen.clear()
        _seen[shape] = count + 1
    return count


def reset() -> None:
    """Forget the shapes seen and the cached pin (tests, benchmarks)."""
    global _pin_cache
    _seen.clear()
    _pin_cache = (None, "auto")


# --- applying a plan ------------------------------------------------------------------------------

_cuda = torch.backends.cuda
# The hot path (decode) reads and flips flags straight through torch._C (what the torch.backends.cuda
# functions wrap); the public functions are the fallback on builds without these names.
_get_cudnn = getattr(torch._C, "_get_cudnn_sdp_enabled", _cuda.cudnn_sdp_enabled)
_set_cudnn = getattr(torch._C, "_set_sdp_use_cudnn", _cuda.enable_cudnn_sdp)
_get_flash = getattr(torch._C, "_get_flash_sdp_enabled", _cuda.flash_sdp_enabled)
_get_efficient = getattr(torch._C, "_get_mem_efficient_sdp_enabled", _cuda.mem_efficient_sdp_enabled)
_get_math = getattr(torch._C, "_get_math_sdp_enabled", _cuda.math_sdp_enabled)
#: plan -> (flash, efficient, math, cudnn) flags for the pinned plans.
_PIN_FLAGS: dict[str, tuple[bool, bool, bool, bool]] = {
    "flash": (True, True, True, False),
    "efficient": (False, True, True, False),
    "math": (False, False, True, False),
    "cudnn": (True, True, True, True),
}


def _flags() -> tuple[bool, bool, bool, bool]:
    return (
        _cuda.flash_sdp_enabled(),
        _cuda.mem_efficient_sdp_enabled(),
        _cuda.math_sdp_enabled(),
        _cuda.cudnn_sdp_enabled(),
    )


def _set_flags(flags: tuple[bool, bool, bool, bool]) -> None:
    flash, efficient, math, cudnn = flags
    _cuda.enable_flash_sdp(flash)
    _cuda.enable_mem_efficient_sdp(efficient)
    _cuda.enable_math_sdp(math)
    _cuda.enable_cudnn_sdp(cudnn)


def _cudnn_first() -> Any:
    """Put cuDNN first in SDPA's priority order; returns the previous order (None: no such API)."""
    get = getattr(torch._C, "_get_sdp_priority_order", None)
    set_ = getattr(torch._C, "_set_sdp_priority_order", None)
    if get is None or set_ is None:
        return None
    previous = list(get())
    cudnn = int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    set_([cudnn, *[b for b in previous if b != cudnn]])
    return previous


def _backends_for(plan: str) -> list[Any]:
    """The backend list ``sdpa_kernel`` takes for a plan (compiled path)."""
    from torch.nn.attention import SDPBackend

    names = (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
        SDPBackend.CUDNN_ATTENTION,
    )
    flags = _PIN_FLAGS.get(plan, (True, True, True, False))
    chosen = [name for name, on in zip(names, flags, strict=True) if on]
    if plan == "cudnn":
        chosen = [SDPBackend.CUDNN_ATTENTION, *chosen[:-1]]
    return chosen


def dispatch(
    original: Callable[..., Any],
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    """Run transformers' SDPA attention for a downgraded model under the backend ``select`` picks."""
    if not query.is_cuda:
        return original(module, query, key, value, attention_mask, **kwargs)
    compiling = torch.compiler.is_compiling()
    backend = _pin_cache[1] if compiling else pinned_backend()
    if backend == "auto":
        q_len = query.shape[-2]
        # No memory while tracing (shapes are steady there), and none is needed for decode steps.
        seen = WARM_AFTER if compiling or q_len <= 1 else times_seen(module, query, key, attention_mask)
        plan = select("cuda", backend, q_len, seen)
    else:
        plan = select("cuda", backend, 0, 0)
    if plan == "default":
        return original(module, query, key, value, attention_mask, **kwargs)
    if compiling:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_backends_for(plan), set_priority=plan == "cudnn"):
            return original(module, query, key, value, attention_mask, **kwargs)
    if plan == "avoid_cudnn":
        if not _get_cudnn() or not (_get_flash() or _get_efficient() or _get_math()):
            # cuDNN already off, or it is the only backend the user left on: nothing to do.
            return original(module, query, key, value, attention_mask, **kwargs)
        _set_cudnn(False)
        try:
            return original(module, query, key, value, attention_mask, **kwargs)
        finally:
            _set_cudnn(True)
    previous = _flags()
    order = None
    _set_flags(_PIN_FLAGS[plan])
    try:
        if plan == "cudnn":
            order = _cudnn_first()
        return original(module, query, key, value, attention_mask, **kwargs)
    finally:
        _set_flags(previous)
        if order is not None:
            torch._C._set_sdp_priority_order(order)
