"""Metadata derived once per forward and shared by every attention layer of it.

Every layer of one forward receives the very same attention mask, ``position_ids`` and ``cu_seqlens``
tensors. What the attention call needs from them (a 4D padding mask, unpad indices, sequence bounds,
maximum lengths as host integers) is therefore derived on the first layer's call and reused by the
others: the host reads that transformers' flash code pays per layer (``nonzero``, ``.item()``,
``.tolist()``) are paid once per forward instead.

Entries are keyed by the tensor's identity *and* its in-place version counter, and hold only a weak
reference to it: a tensor changed in place (``mask[0, 0] = 0``), a new tensor at a recycled address, or
a new shape all miss the cache. Under ``torch.compile`` nothing is cached (dynamo traces the plain
computation).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .kernels import _torch_at_least

T = TypeVar("T")

#: Entries kept: a few forwards' worth (mask, positions, cu_seqlens of the model and its sub-models).
CAPACITY = 32


class _TensorCache:
    """Values derived from tensors, valid while the same tensor object is unchanged."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._entries: collections.OrderedDict[tuple[int, Hashable], tuple[Any, ...]] = (
            collections.OrderedDict()
        )
        self.builds = 0  # how many values were derived (tests: once per forward, not per layer)

    def get(self, tensor: Tensor, key: Hashable, build: Callable[[], T]) -> T:
        if torch.compiler.is_compiling():
            return build()
        slot = (id(tensor), key)
        entry = self._entries.get(slot)
        if entry is not None:
            ref, version, value = entry
            if ref() is tensor and version == tensor._version:
                return value
        value = build()
        self.builds += 1
        try:
            ref = weakref.ref(tensor)
        except TypeError:  # not weak-referenceable: never cache
            return value
        self._entries[slot] = (ref, tensor._version, value)
        self._entries.move_to_end(slot)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


CACHE = _TensorCache()


def host_int(value: int | Tensor) -> int:
    """An int argument that may come as a 0-d tensor (``max_seqlen``): read once per tensor."""
    if not isinstance(value, Tensor):
        return int(value)
    return CACHE.get(value, "int", lambda: int(value.item()))


def host_list(tensor: Tensor) -> list[int]:
    """A small integer tensor (``cu_seqlens``) on the host: read once per tensor."""
    return CACHE.get(tensor, "list", lambda: [int(x) for x in tensor.tolist()])


def int32_on(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` as int32 on ``device``, converted once per tensor (varlen kernels want int32)."""
    if tensor.dtype == torch.int32 and tensor.device == device:
        return tensor
    return CACHE.get(tensor, ("int32", device), lambda: tensor.to(device=device, dtype=torch.int32))


# --------------------------------------------------------------------------- packed rows


@dataclasses.dataclass(frozen=True)
class Packed:
    """Sequences packed into one row: cumulative bounds on the device and the longest length."""

    cu_seqlens: Tensor  # (n + 1,) int32
    max_len: int


def packed_rows(position_ids: Tensor) -> Packed | None:
    """The sequences of a padding-free row, found as transformers' flash code finds them (every
    sequence restarts at the row's smallest position); None when the row is one sequence from its
    first token. One host read per forward."""
    return CACHE.get(position_ids, "packed", lambda: _packed_rows(position_ids))


def _packed_rows(position_ids: Tensor) -> Packed | None:
    row = position_ids.reshape(-1)
    if row.numel() < 2:
        return None
    starts = [int(x) for x in (row == row.min()).nonzero().flatten().tolist()]
    if starts == [0]:
        return None
    bounds = [*starts, row.numel()]
    cu = torch.tensor(bounds, dtype=torch.int32, device=position_ids.device)
    return Packed(cu, max(b - a for a, b in itertools.pairwise(bounds)))


# --------------------------------------------------------------------------- padded batches


@dataclasses.dataclass(frozen=True)
class Padding:
    """A padded batch as SDPA takes it: a boolean (B, 1, Lq or 1, M) mask over the first M keys, and the
    query rows flash-attn leaves at zero (padding), as a (B, Lq, 1, 1) multiplier (None: no such row
    can exist, a decode step)."""

    mask: Tensor
    keep_rows: Tensor | None
    key_len: int


def padding(mask_2d: Tensor, q_len: int, causal: bool, window: int | None, dtype: torch.dtype) -> Padding:
    """The SDPA form of flash-attn's unpadded attention for a (B, M) padding mask (1 = token).

    Queries are the last ``q_len`` positions (bottom-right, as flash-attn aligns them); causal and a
    sliding window of ``window`` tokens are applied in those positions, which equal flash-attn's
    unpadded ones when each row's padding is contiguous (left or right). Padding queries see no key:
    SDPA gives 0 for such a row from torch 2.5 on, as flash-attn does (and skips its work); before 2.5
    they are opened to every key (no NaN) and zeroed after the call (``keep_rows``).
    """
    key = ("padding", q_len, causal, window, dtype)
    return CACHE.get(mask_2d, key, lambda: _padding(mask_2d, q_len, causal, window, dtype))


#: SDPA gives 0 (not NaN) for a row that sees no key, forward and backward, from torch 2.5.
EMPTY_ROWS_ARE_ZERO = _torch_at_least(2, 5)


def _padding(mask_2d: Tensor, q_len: int, causal: bool, window: int | None, dtype: torch.dtype) -> Padding:
    keys = mask_2d.bool()
    batch, m = keys.shape
    queries = keys[:, m - q_len :]
    if not window and (not causal or q_len == 1):  # every query sees every key: one broadcast row
        keep = None if q_len == 1 else queries.to(dtype).view(batch, q_len, 1, 1)
        if not EMPTY_ROWS_ARE_ZERO:
            keys = keys | ~keys.any(dim=-1, keepdim=True)
        return Padding(keys[:, None, None, :], keep, m)
    allowed = keys[:, None, :] & queries[:, :, None]
    cols = torch.arange(m, device=keys.device).view(1, 1, m)
    rows = torch.arange(m - q_len, m, device=keys.device).view(1, q_len, 1)
    if causal:
        allowed = allowed & (cols <= rows)
    if window:
        allowed = allowed & (cols > rows - window)
        if not causal:
            allowed = allowed & (cols < rows + window)
    if EMPTY_ROWS_ARE_ZERO:
        return Padding(allowed.unsqueeze(1), None, m)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    keep = queries.to(dtype).view(batch, q_len, 1, 1) if q_len > 1 else None
    return Padding(allowed.unsqueeze(1), keep, m)


@dataclasses.dataclass(frozen=True)
class Unpadded:
    """A padded batch of whole sequences (no cached keys) as packed rows: token indices, bounds."""

    rows: Tensor  # (total,) batch index of each token
    cols: Tensor  # (total,) position of each token in its row
    cu_seqlens: Tensor  # (B + 1,) int32
    max_len: int
    total: int


def unpadded(mask_2d: Tensor) -> Unpadded:
    """Unpad indices and bounds of a (B, L) padding mask, derived once per forward (one host read)."""
    return CACHE.get(mask_2d, "unpadded", lambda: _unpadded(mask_2d))


def _unpadded(mask_2d: Tensor) -> Unpadded:
    keys = mask_2d.bool()
    lens = keys.sum(dim=-1, dtype=torch.int32)
    indices = keys.flatten().nonzero().flatten()
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    host = lens.tolist()
    length = keys.shape[-1]
    return Unpadded(indices // length, indices % length, cu, max(host) if host else 0, int(indices.numel()))
