"""``flash_attn.bert_padding`` in plain torch: move between padded batches and packed tokens.

``unpad_input`` arity
---------------------
flash-attn 2.7.0 changed ``unpad_input`` from returning 4 values to 5
``(hidden, indices, cu_seqlens, max_seqlen, used_seqlens)``; remote code copied from older
transformers still writes ``a, b, c, d = unpad_input(...)`` and crashes with "too many values to
unpack (expected 4)" on the new library.

This stand-in returns the 5-tuple of flash-attn >= 2.7, except when the calling line unpacks the
result into exactly four names: it looks at the caller's bytecode (the instruction right after the
call is ``UNPACK_SEQUENCE 4``) and then returns the old 4-tuple. That check can only change the
outcome of a call that would otherwise raise, so it never breaks a caller written for 2.7+. When
the check cannot tell (no Python frame, a wrapper function in between, a tracer that rewrites
bytecode), the 5-tuple is returned, exactly as flash-attn >= 2.7 would.
"""

from __future__ import annotations

import dis
import functools
import logging
import sys
from types import CodeType

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input",
           "unpad_input_for_concatenated_sequences"]  # fmt: skip

log = logging.getLogger(__name__)


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:
    """``input[indices]`` along the first axis (differentiable; the backward scatters)."""
    return torch.index_select(input, 0, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """A zero tensor of ``first_axis_dim`` rows with ``values`` written at rows ``indices``."""
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_put((indices,), values)


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """(total, ...) packed tokens -> (batch, seqlen, ...), zeros where there was padding."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def unpad_input(
    hidden_states: Tensor, attention_mask: Tensor, unused_mask: Tensor | None = None
) -> tuple[Tensor, ...]:
    """(batch, seqlen, ...) + (batch, seqlen) mask -> packed tokens and their varlen metadata.

    Returns ``(hidden, indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch)``; see the
    module docstring for when the old 4-tuple is returned instead. ``unused_mask`` marks tokens that
    are kept in the packing but do not count in ``used_seqlens_in_batch``.
    """
    all_masks = attention_mask if unused_mask is None else attention_mask + unused_mask
    seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    hidden = index_first_axis(hidden_states.flatten(0, 1), indices)
    if _caller_unpacks(4):
        log.debug("unpad_input: caller unpacks 4 values, returning the flash-attn < 2.7 tuple")
        return hidden, indices, cu_seqlens, max_seqlen
    return hidden, indices, cu_seqlens, max_seqlen, used_seqlens


def unpad_input_for_concatenated_sequences(
    hidden_states: Tensor, attention_mask_in_length: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Like ``unpad_input`` for rows that hold several packed sequences.

    ``attention_mask_in_length[b]`` lists the lengths of the sequences in row b, then zeros (for
    example ``[2, 3, 0, 0, 0]`` for a row holding a 2-token and a 3-token sequence).
    """
    lengths = attention_mask_in_length.flatten()
    seqlens = lengths[lengths > 0].to(torch.int32)
    batch, seqlen = attention_mask_in_length.shape
    used = attention_mask_in_length.sum(dim=-1)
    keep = torch.arange(seqlen, device=used.device).expand(batch, seqlen) < used.unsqueeze(1)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return index_first_axis(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen


def _caller_unpacks(count: int) -> bool:
    """Whether the code that called our caller unpacks the return value into ``count`` names."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # pragma: no cover - called from the top of the stack
        return False
    try:
        return _unpack_count(frame.f_code, frame.f_lasti) == count
    except Exception:  # pragma: no cover - a bytecode layout we do not know: keep the 2.7+ answer
        return False
    finally:
        del frame


@functools.lru_cache(maxsize=512)
def _unpack_count(code: CodeType, lasti: int) -> int | None:
    """The ``UNPACK_SEQUENCE`` count of the first instruction after byte offset ``lasti``.

    ``f_lasti`` of a frame waiting on a call points at the call instruction or, on CPython 3.11+,
    into its inline cache entries; either way the next real instruction consumes the result.
    """
    for ins in dis.get_instructions(code):
        if ins.offset > lasti and ins.opname != "CACHE":
            if ins.opname == "UNPACK_SEQUENCE" and ins.arg is not None:
                return int(ins.arg)
            return None
    return None
