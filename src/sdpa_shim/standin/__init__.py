"""sdpa_shim's stand-in for the ``flash_attn`` package (flash-attn 2.x API on PyTorch SDPA).

It is not flash-attn: it emulates the 2.8.3 Python API (names, signatures, semantics) with plain
torch, so that model code written against ``flash_attn`` runs where the real package is missing or
cannot run. See ``flash_attn_interface`` for what differs from the real library.
"""

from __future__ import annotations

from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_unpadded_func,
    flash_attn_unpadded_kvpacked_func,
    flash_attn_unpadded_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__version__ = "2.8.3"

__all__ = [
    "__version__",
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
