"""Packed (padding-free) rows on models downgraded to sdpa: computed per sequence, never mixed.

FlashAttention's varlen kernel keeps the sequences of a packed row apart (``DataCollatorWithFlattening``:
one row, ``position_ids`` restarting per sequence, no attention mask). Plain SDPA only does so on
transformers >= 4.54 with torch >= 2.6, no attention mask and no KV cache; otherwise the sequences
attend to each other and the loss is silently wrong. For the models it downgraded to sdpa, the shim
finds the sequence boundaries (from ``cu_seq_lens_q`` when the collator provides them, else from
``position_ids``) and runs the row through the varlen engine (``varlen``): the result equals each
sequence run alone, in a number of kernel calls that does not grow with the number of documents.

Continuous batching also hands the attention function ``cu_seq_lens_q``, but with each request's new
tokens against its cached keys: such a batch is not a training row and goes to transformers' own
function untouched (its mask is right for it).
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
    if query.shape[0] != 1 or query.shape[2] < 2 or is_continuous_batch(kwargs):
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


#: Keyword arguments only continuous batching passes (its cache, its read/write slots, its logits rows).
_CONTINUOUS_BATCHING_KEYS = ("cache", "read_index", "write_index", "logits_indices", "block_table")


def is_continuous_batch(kwargs: dict[str, Any]) -> bool:
    """A continuous-batching step: new tokens of several requests against their cached keys."""
    if any(kwargs.get(name) is not None for name in _CONTINUOUS_BATCHING_KEYS):
        return True
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or cu_k is cu_q:
        return False
    return cu_q.shape != cu_k.shape or bool((cu_q != cu_k).any())


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
    """The packed row through the varlen engine; returns (B, S, H, D) like ``sdpa_attention_forward``.

    The row's own 4D mask, if any, is the causal (or sliding-window) block mask transformers built for
    the whole row: the engine applies causality and the window per sequence instead.
    """
    import torch

    from .varlen import varlen_attention

    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(end - start for start, end in itertools.pairwise(bounds))
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens,
        cu_seqlens,
        longest,
        longest,
        scale=kwargs.get("scaling"),
        causal=bool(causal),
        window=(int(window) - 1, 0 if causal else int(window) - 1) if window else (-1, -1),
        softcap=float(kwargs.get("softcap") or 0.0),
        dropout_p=kwargs.get("dropout", 0.0) if module.training else 0.0,
    )
    return out.unsqueeze(0), None
