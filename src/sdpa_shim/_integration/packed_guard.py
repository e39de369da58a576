"""Packed rows the shim cannot compute per sequence: refused loudly, never mixed silently.

Two cases. Before transformers 4.48 there is no attention registry: the SDPA attention classes are fixed
at construction, so a model downgraded to sdpa cannot have its packed rows computed per sequence. And a
model downgraded to *eager* (a class without an SDPA path, or ``SDPA_SHIM_FALLBACK=eager``) calls its
eager attention directly, on every release, where transformers' own packed-row masking is right only in
some cases (no cache, no mask). Such models get a forward pre-hook that refuses a packed batch with the
cause and the fix. Models kept on the flash path, and sdpa downgrades from 4.48 on, compute packed rows
correctly and get no hook.
"""

from __future__ import annotations

import sys
from typing import Any

from .._runtime.packed import PackedSequenceError, starts_from_positions
from .marks import kind_of


def guard_post_init(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``post_init`` rewrite for bands A-B (before 4.54), where decisions are made on the class.

    Changes no argument: it only adds the refusing pre-hook to the model being finished, when needed.
    """
    if model is None:
        return
    kind = kind_of(getattr(model, "config", None))
    registry = getattr(sys.modules.get("transformers.modeling_utils"), "ALL_ATTENTION_FUNCTIONS", None)
    if kind == "eager" or (kind == "sdpa" and registry is None):
        refuse_packed_rows(model)


def refuse_packed_rows(model: Any) -> None:
    """Add the pre-hook that refuses packed batches to ``model`` (a model the shim downgraded)."""
    model.register_forward_pre_hook(_refuse_packed, with_kwargs=True)


def _refuse_packed(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2 and not bool(mask.all()):
        return  # a padded batch: positions restart because of padding, not packing
    packed = kwargs.get("cu_seq_lens_q") is not None
    if not packed:
        bounds = starts_from_positions(kwargs.get("position_ids"))
        packed = bounds is not None and len(bounds) > 2
    if not packed:
        return
    import transformers

    kind = kind_of(getattr(model, "config", None))
    if kind is None:
        return  # the decision was withdrawn (a fault while recording it): transformers as without the shim
    if kind == "eager":
        raise PackedSequenceError(
            f"sdpa_shim: {type(model).__name__} was downgraded from flash attention to eager, and this "
            "batch is packed (position_ids restart per sequence); eager attention can let the sequences "
            "attend to each other. Pad the batch instead of packing it, or (transformers 4.56+, a class "
            "with flash attention support) unset SDPA_SHIM_FALLBACK=eager so the shim keeps the flash path."
        )
    raise PackedSequenceError(
        f"sdpa_shim: {type(model).__name__} was downgraded from flash attention to sdpa, and this "
        "batch is packed (position_ids restart per sequence); with transformers "
        f"{transformers.__version__} SDPA would let the sequences attend to each other. Upgrade "
        "transformers to 4.48 or newer (the shim then computes packed rows per sequence), or pad the "
        "batch instead of packing it."
    )
