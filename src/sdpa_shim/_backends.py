"""SDPA backend choice for downgraded models (placeholder: transformers' own dispatch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def dispatch(
    original: Callable[..., Any],
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    """Run SDPA attention for a downgraded model."""
    return original(module, query, key, value, attention_mask, **kwargs)
