"""Packed (padding-free) batches on downgraded models: computed per sequence, never mixed.

FlashAttention's varlen kernel keeps the sequences of a packed row apart (``DataCollatorWithFlattening``:
one row, ``position_ids`` restarting per sequence, no attention mask). Plain SDPA only does so on
transformers >= 4.54 with torch >= 2.6, no attention mask and no KV cache; otherwise the sequences
attend to each other and the loss is silently wrong. For the models it downgraded, the shim finds
the sequence boundaries (from ``cu_seq_lens_q`` when the collator provides them, else from
``position_ids``) and runs SDPA once per sequence, so the result equals each sequence run alone.
Memory stays O(tokens): at most one sequence's S_i x S_i block at a time.
"""

from __future__ import annotations

import itertools
from typing import Any

_last_positions: tuple[Any, list[int] | None] = (None, None)


class PackedSequenceError(ValueError):
    """A packed batch the shim cannot compute correctly; the message names the cause and the fix."""


def boundaries(query: Any, key: Any, kwargs: dict[str, Any]) -> list[int] | None:
    """Token offsets [0, e1, e2, ..., T] of the packed sequences in a one-row batch, or None.

    None means "not packed" (several rows, one token, or a single sequence): the normal path is right.
    Skipped while torch.compile traces (a data-dependent check would break the graph).
    """
    if query.shape[0] != 1 or query.shape[2] < 2:
        return None
    import torch

    if torch.compiler.is_compiling():
        return None
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        bounds = [int(b) for b in cu_seqlens.tolist()]
    else:
        bounds = starts_from_positions(kwargs.get("position_ids"))
    if bounds is None or len(bounds) <= 2:
        return None
    if key.shape[2] != query.shape[2]:
        raise PackedSequenceError(
            "sdpa_shim: a packed batch (position_ids restarting per sequence) arrived together with "
            f"{key.shape[2] - query.shape[2]} cached past tokens; packed sequences cannot share a KV cache. "
            "Pass use_cache=False for packed training/evaluation, or unpack the batch for generation."
        )
    if bounds[-1] != query.shape[2]:
        raise PackedSequenceError(
            f"sdpa_shim: packed sequence lengths add up to {bounds[-1]} tokens but the row has "
            f"{query.shape[2]}; pass position_ids (or cu_seq_lens_q) that describe this row."
        )
    return bounds


def starts_from_positions(position_ids: Any) -> list[int] | None:
    """Sequence starts are where a position does not follow its predecessor (one sync per forward)."""
    global _last_positions
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    cached_ids, cached_bounds = _last_positions
    if cached_ids is position_ids:  # every layer of one forward passes the same tensor
        return cached_bounds
    row = position_ids[0]
    starts = ((row[1:] - row[:-1]) != 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *starts, row.shape[0]] if starts else None
    _last_positions = (position_ids, bounds)
    return bounds


def attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, bounds: list[int], **kwargs: Any
) -> tuple[Any, None]:
    """Causal SDPA per sequence; returns (B, S, H, D) like transformers' ``sdpa_attention_forward``."""
    import torch
    import torch.nn.functional as F

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    scale = kwargs.get("scaling")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    pieces = []
    for start, end in itertools.pairwise(bounds):
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[:, :, start:end, start:end]
        pieces.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=bool(causal) and mask is None,
                scale=scale,
            )
        )
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None
