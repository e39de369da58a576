"""``flash_attn.layers.rotary`` in plain torch: rotary embeddings with flash-attn's conventions.

``cos``/``sin`` are ``(seqlen_rotary, rotary_dim / 2)``; only the first ``rotary_dim`` channels of
``x`` rotate, the rest pass through. ``interleaved=True`` pairs channels (0, 1), (2, 3), ... (GPT-J);
``False`` pairs channel i with i + rotary_dim / 2 (GPT-NeoX). Positions past the end of ``cos``
are left unrotated, as flash-attn's Triton kernel does (cos 1, sin 0). The maths runs in float32
and the result is cast back, as in the kernel. Autograd flows through ordinary torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_kv_",
           "apply_rotary_emb_qkv_"]  # fmt: skip


def _cos_sin_at(cos: Tensor, sin: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of cos/sin at integer positions ``pos`` (any shape); positions out of range rotate by 0."""
    n = cos.shape[0]
    valid = ((pos >= 0) & (pos < n)).unsqueeze(-1)
    idx = pos.clamp(0, max(n - 1, 0))
    c = torch.where(valid, cos[idx].float(), 1.0)
    s = torch.where(valid, sin[idx].float(), 0.0)
    return c, s


def rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inplace: bool = False) -> Tensor:
    """Rotate ``x[..., :rotary_dim]`` by angles whose cos/sin broadcast against ``x[..., :rotary_dim/2]``."""
    half = cos.shape[-1]
    rd = 2 * half
    if rd > x.shape[-1]:
        raise ValueError(f"rotary_dim ({rd}) must be <= headdim ({x.shape[-1]})")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = x[..., :rd].to(cdt)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
    cos, sin = cos.to(cdt), sin.to(cdt)
    o1 = x1 * cos - x2 * sin
    o2 = x1 * sin + x2 * cos
    rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    rotated = rotated.to(x.dtype)
    if inplace:
        x[..., :rd] = rotated
        return x
    if rd == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rd:]), dim=-1)


def positions(seqlen: int, offsets: int | Tensor, device: torch.device) -> Tensor:
    """(1|B, seqlen) absolute positions of a dense batch shifted by ``seqlen_offsets``."""
    base = torch.arange(seqlen, device=device)
    if isinstance(offsets, Tensor):
        return offsets.to(device=device, dtype=torch.long).view(-1, 1) + base.view(1, -1)
    return (base + int(offsets)).view(1, -1)


def apply_rotary_emb(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """x: (B, S, H, D), or (total, H, D) with ``cu_seqlens``; each sequence starts at its offset."""
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(
                f"x must be (batch, seqlen, nheads, headdim) without cu_seqlens, got {tuple(x.shape)}"
            )
        pos = positions(x.shape[1], seqlen_offsets, x.device)  # (1|B, S)
        c, s = _cos_sin_at(cos, sin, pos)
        return rotate(x, c.unsqueeze(2), s.unsqueeze(2), interleaved, inplace)
    if x.dim() != 3:
        raise ValueError(f"x must be (total_seqlen, nheads, headdim) with cu_seqlens, got {tuple(x.shape)}")
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = cu[:-1]
    if isinstance(seqlen_offsets, Tensor):
        starts = starts - seqlen_offsets.to(device=x.device, dtype=torch.long)
    else:
        starts = starts - int(seqlen_offsets)
    total = int(cu[-1])
    seq_start = torch.repeat_interleave(starts, lengths, output_size=total)
    pos = torch.arange(total, device=x.device) - seq_start
    c, s = _cos_sin_at(cos, sin, pos)
    if total == x.shape[0]:
        return rotate(x, c.unsqueeze(1), s.unsqueeze(1), interleaved, inplace)
    # Rows past cu_seqlens[-1] belong to no sequence: leave them as they are.
    head = rotate(x[:total], c.unsqueeze(1), s.unsqueeze(1), interleaved, inplace)
    return x if inplace else torch.cat((head, x[total:]), dim=0)


# flash-attn keeps this name for backward compatibility.
apply_rotary_emb_func = apply_rotary_emb


def apply_rotary_emb_qkv_(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Tensor | None = None,
    sin_k: Tensor | None = None,
    interleaved: bool = False,
    seqlen_offsets: int | Tensor = 0,
    num_heads_q: int | None = None,
) -> Tensor:
    """Rotate Q and K of a packed (B, S, 3, H, D) or (B, S, Hq + 2 * Hk, D) tensor, in place."""
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    if qkv.dim() == 5:
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        if num_heads_q is None:
            raise ValueError(
                "num_heads_q is required when qkv is (batch, seqlen, nheads_q + 2 * nheads_k, headdim)"
            )
        hk = (qkv.shape[2] - num_heads_q) // 2
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + hk]
    apply_rotary_emb(q, cos, sin, interleaved, True, seqlen_offsets)
    apply_rotary_emb(k, cos_k, sin_k, interleaved, True, seqlen_offsets)
    return qkv


def apply_rotary_emb_kv_(
    kv: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, seqlen_offsets: int | Tensor = 0
) -> Tensor:
    """Rotate K of a (B, S, 2, H, D) tensor in place."""
    apply_rotary_emb(kv[:, :, 0], cos, sin, interleaved, True, seqlen_offsets)
    return kv


class RotaryEmbedding(nn.Module):
    """flash-attn's ``RotaryEmbedding`` without XPos (``scale_base`` must be None).

    Like the original it rotates ``qkv`` (and ``kv``) in place and returns them.
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        scale_base: float | None = None,
        pos_idx_in_fp32: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if scale_base is not None:
            raise NotImplementedError(
                "sdpa_shim's flash_attn stand-in has no XPos rotary (scale_base); install flash-attn for it"
            )
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.pos_idx_in_fp32 = pos_idx_in_fp32
        self.register_buffer("inv_freq", self._inv_freq(device), persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Tensor | None = None
        self._sin_cached: Tensor | None = None

    def _inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        exponent = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return 1.0 / (self.base**exponent)

    def _update_cos_sin_cache(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> None:
        cached = self._cos_cached
        if (
            cached is None
            or seqlen > self._seq_len_cached
            or cached.device != device
            or cached.dtype != dtype
            or (self.training and cached.is_inference())
        ):
            self._seq_len_cached = seqlen
            inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._inv_freq(device)
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq.to(device))
            self._cos_cached = torch.cos(freqs).to(dtype)
            self._sin_cached = torch.sin(freqs).to(dtype)

    def forward(
        self,
        qkv: Tensor,
        kv: Tensor | None = None,
        seqlen_offset: int | Tensor = 0,
        max_seqlen: int | None = None,
        num_heads_q: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """qkv: (B, S, 3, H, D) or (B, S, Hq + 2 * Hk, D); or q (B, S, H, D) with kv (B, S, 2, H, D)."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, qkv.device, qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, qkv.device, qkv.dtype)
        cos, sin = self._cos_cached, self._sin_cached
        if cos is None or sin is None:
            raise ValueError("pass max_seqlen when seqlen_offset is a tensor")
        if kv is None:
            return apply_rotary_emb_qkv_(
                qkv,
                cos,
                sin,
                interleaved=self.interleaved,
                seqlen_offsets=seqlen_offset,
                num_heads_q=num_heads_q,
            )
        apply_rotary_emb(qkv, cos, sin, self.interleaved, True, seqlen_offset)
        apply_rotary_emb_kv_(kv, cos, sin, self.interleaved, seqlen_offset)
        return qkv, kv
