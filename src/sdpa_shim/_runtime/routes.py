"""Which kernel route one attention call of a served model takes: the rule, in one place.

A model the shim serves reads "flash_attention_2" for every check in transformers and its clients, but
each attention call is served by what it actually is (``choose``, pure). The measurements behind the
rule are in BENCHMARKS.md ("per-call routes"):

- continuous batching, paged caches, attention sinks, float32 inputs that flash-attn would cast:
  ``FLASH_CODE``, transformers' own flash code on the varlen engine; the only route that honours all.
- ``cu_seqlens`` given (vision towers, ``DataCollatorWithFlattening``) or a packed row
  (``position_ids`` restarting, no mask, bounds derived once per forward): ``VARLEN``, the varlen
  engine called directly with what transformers' flash code would pass it, without its per-layer
  host work.
- no padding, whole sequences (or one query token): ``DENSE``, transformers' SDPA function, exactly
  what plain "sdpa" runs.
- no padding, but what SDPA's causal flag cannot say (softcap, a sliding window the keys outgrow, cached
  keys before several queries): ``FLASH_DENSE``, the runtime's block attention in flash-attn's semantics
  (what the stand-in's ``flash_attn_func`` runs), without transformers' flash code around it.
- a padded batch: ``PADDED_SDPA``, transformers' SDPA function with a boolean mask built once per
  forward (what plain "sdpa" runs; a decode step over a padded cache never unpads), or, for prefill
  of fp16/bf16 on CUDA with enough padding to skip, ``PADDED_VARLEN``: tokens gathered once per
  layer with indices derived once per forward and run through torch's FA2 varlen kernel.
"""

from __future__ import annotations

import collections
import enum
from typing import NamedTuple


class Route(str, enum.Enum):
    """A per-call route; the value is the name counters and DEBUG logs use."""

    FLASH_CODE = "flash_code"
    VARLEN = "varlen"
    FLASH_DENSE = "flash_dense"
    DENSE = "dense"
    PADDED_SDPA = "padded_sdpa"
    PADDED_VARLEN = "padded_varlen"


#: Padded prefill takes the varlen route from this share of padding tokens on (CUDA, fp16/bf16):
#: below it the masked SDPA call costs less than gathering and scattering every token per layer.
PADDED_VARLEN_FROM_PADDING = 0.25
#: ... and from this many query tokens per row (shorter prefills are host-bound either way).
PADDED_VARLEN_FROM_LENGTH = 256

#: Calls per route since the last ``reset_counts`` (tests observe which route ran); keys are routes,
#: which compare equal to their names.
COUNTS: collections.Counter[Route] = collections.Counter()


class CallFacts(NamedTuple):
    """What the rule needs to know about one call (shapes and keywords; no tensor values). A named
    tuple: built on every attention call, it must cost next to nothing."""

    device: str
    half: bool
    q_len: int
    kv_len: int
    masked: bool  # a 2D padding mask was passed (transformers passes None when nothing is padded)
    flash_only: bool  # continuous batching, paged cache, sinks, a float32 cast, a mask that is not 2D
    packed_row: bool  # position_ids of one row restart (found once per forward), or cu_seqlens given
    softcap: bool = False  # logits soft-capping: SDPA has none
    windowed_without_mask: bool = False  # sliding window on an unmasked call: the dense path lacks it
    mask_covers_keys: bool = True  # the padding mask spans every key (not a static cache's slots)
    padding_share: float = 1.0  # share of padding tokens: read (once per forward) only where it matters


def choose(facts: CallFacts) -> Route:
    """The route for one call (pure)."""
    if facts.flash_only:
        return Route.FLASH_CODE
    if facts.packed_row:
        return Route.VARLEN
    if facts.softcap and facts.masked:
        return Route.FLASH_CODE  # SDPA has no softcap; transformers' flash code unpads
    if facts.softcap:
        return Route.FLASH_DENSE
    if facts.masked:
        if facts.mask_covers_keys and prefers_varlen_for_padding(facts):
            return Route.PADDED_VARLEN
        return Route.PADDED_SDPA
    if facts.windowed_without_mask or facts.q_len not in (1, facts.kv_len):
        return Route.FLASH_DENSE  # bottom-right causal with a cache offset, or a window: flash-attn's own
    return Route.DENSE


def prefers_varlen_for_padding(facts: CallFacts) -> bool:
    """Padded prefill worth unpadding: CUDA half precision, long rows, much padding, no cached keys."""
    return (
        facts.device == "cuda"
        and facts.half
        and facts.q_len == facts.kv_len
        and facts.q_len >= PADDED_VARLEN_FROM_LENGTH
        and facts.padding_share >= PADDED_VARLEN_FROM_PADDING
    )


def count(route: Route) -> None:
    COUNTS[route] += 1


def reset_counts() -> None:
    COUNTS.clear()
