"""Does SDPA run here? One tiny call per (device type, dtype), cached.

A downgrade to "sdpa" that then fails at the first forward would only move the user's error; the
probe catches torch builds or devices where ``scaled_dot_product_attention`` cannot run the dtype.
"""

from __future__ import annotations

import logging
import threading

from .faults import one_line

logger = logging.getLogger(__name__)

_cache: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def sdpa_error(device_type: str, dtype_name: str) -> str:
    """ "" when SDPA runs on ``device_type`` with ``dtype_name``, else the first line of the error."""
    key = (device_type, dtype_name)
    with _lock:
        if key not in _cache:
            _cache[key] = run_probe(device_type, dtype_name)
            logger.debug("SDPA probe on %s/%s: %s", device_type, dtype_name, _cache[key] or "ok")
        return _cache[key]


def clear_cache() -> None:
    """Forget every probe result (tests)."""
    with _lock:
        _cache.clear()


def run_probe(device_type: str, dtype_name: str, backend: object = None) -> str:
    """One tiny causal SDPA call, uncached ("" or the error); ``backend``: an ``SDPBackend`` to force
    (``doctor`` tries each), None for torch's own choice (what a downgraded model gets)."""
    try:
        import torch
        import torch.nn.functional as F

        dtype = getattr(torch, dtype_name)
        q = torch.randn(1, 2, 4, 8, device=device_type, dtype=dtype)
        if backend is None:
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        else:
            import warnings

            from torch.nn.attention import sdpa_kernel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch explains each refused kernel in a UserWarning
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        if not bool(torch.isfinite(out).all()):
            return f"scaled_dot_product_attention returned non-finite values on {device_type}/{dtype_name}"
    except Exception as exc:
        return one_line(exc)
    return ""
