"""Packed rows on releases without the attention registry (transformers < 4.48): refused, never mixed.

There the SDPA attention classes are fixed at construction and the shim cannot compute packed rows per
sequence, so a model it downgraded refuses them with the fix instead of mixing sequences silently.
"""

from __future__ import annotations

from typing import Any

from .._runtime.packed import PackedSequenceError, starts_from_positions
from .registry import is_downgraded


def guard_old_release(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``post_init`` rewrite for releases without the attention registry (transformers < 4.48).

    There the SDPA attention classes are fixed at construction and the shim cannot compute packed rows
    per sequence, so a model it downgraded refuses them instead of mixing sequences silently. Changes
    no argument: it only adds a forward pre-hook to the model being finished.
    """
    if model is not None and is_downgraded(getattr(model, "config", None)):
        model.register_forward_pre_hook(_refuse_packed, with_kwargs=True)


def _refuse_packed(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    packed = kwargs.get("cu_seq_lens_q") is not None
    if not packed:
        bounds = starts_from_positions(kwargs.get("position_ids"))
        packed = bounds is not None and len(bounds) > 2
    if packed:
        import transformers

        raise PackedSequenceError(
            f"sdpa_shim: {type(model).__name__} was downgraded from flash attention to sdpa, and this "
            "batch is packed (position_ids restart per sequence); with transformers "
            f"{transformers.__version__} SDPA would let the sequences attend to each other. Upgrade "
            "transformers to 4.48 or newer (the shim then computes packed rows per sequence), or pad the "
            "batch instead of packing it."
        )
