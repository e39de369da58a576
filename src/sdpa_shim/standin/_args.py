"""Argument checks shared by the stand-in's functions, with flash-attn's messages and defaults."""

from __future__ import annotations

from torch import Tensor


def _check(q: Tensor, k: Tensor, v: Tensor, ndim: int, fn: str, kv_ndim: int | None = None) -> None:
    """flash-attn's shape and dtype checks, as ValueErrors naming the offending argument."""
    for name, t, want in (("q", q, ndim), ("k", k, kv_ndim or ndim), ("v", v, kv_ndim or ndim)):
        if t.dim() != want:
            raise ValueError(f"{fn}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"{fn}: inputs must be floating point, got {q.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    h, hk = q.shape[-2], k.shape[-2]
    if v.shape[-2] != hk or hk == 0 or h % hk:
        raise ValueError(
            f"{fn}: number of heads in key/value ({hk}, {v.shape[-2]}) must be equal and divide "
            f"the number of heads in query ({h})"
        )


def _scale(softmax_scale: float | None, q: Tensor) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def _slopes(alibi_slopes: Tensor | None, h: int, fn: str) -> Tensor | None:
    if alibi_slopes is None:
        return None
    if alibi_slopes.shape[-1] != h or alibi_slopes.dim() not in (1, 2):
        raise ValueError(
            f"{fn}: alibi_slopes must be (nheads,) or (batch_size, nheads), got {tuple(alibi_slopes.shape)}"
        )
    return alibi_slopes
