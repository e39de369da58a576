"""Float64 references for the flash_attn stand-in tests, written from flash-attn's documented maths.

Deliberately naive: explicit scores, an explicit mask built from the docstring formula
("query i attends to keys [i + Sk - Sq - left, i + Sk - Sq + right]"), softmax, matmul.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    window_seqlen_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, Dv), lse (B, H, Sq), probs (B, H, Sq, Sk).

    All in float64. ``window_seqlen_k`` is the length flash-attn compares window sides against
    (max_seqlen_k for varlen, the cache length for the KV-cache call); default Sk.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    left, right = window_size
    if causal:
        right = 0
    limit = sk if window_seqlen_k is None else window_seqlen_k
    left = -1 if left < 0 or left >= limit else left
    right = -1 if right < 0 or right >= limit else right
    diag = torch.arange(sq).view(sq, 1) + sk - sq  # the key aligned with query i (bottom-right)
    j = torch.arange(sk).view(1, sk)
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        allowed &= j <= diag + right
    if left >= 0:
        allowed &= j >= diag - left
    if alibi_slopes is not None:
        slopes = alibi_slopes.double()
        slopes = slopes.view(1, h, 1, 1) if slopes.dim() == 1 else slopes.view(b, h, 1, 1)
        dist = (torch.arange(sq).view(sq, 1) + sk - sq - torch.arange(sk).view(1, sk)).abs().double()
        scores = scores - slopes * dist
    row_ok = allowed.any(dim=-1)  # (Sq,)
    # Empty rows: give them finite scores, then zero them (flash-attn outputs 0 there).
    scores = scores.masked_fill(~(allowed | ~row_ok.view(sq, 1)), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1) * row_ok.view(1, 1, sq, 1).double()
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    lse = lse.masked_fill(~row_ok.view(1, 1, sq), math.inf)
    return out, lse, probs


def reference_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: list[int],
    cu_k: list[int],
    **kwargs: object,
) -> tuple[Tensor, Tensor]:
    """Packed (T, H, D) inputs: one dense reference per segment; out (Tq, H, Dv), lse (H, Tq)."""
    outs, lses = [], []
    max_k = max(cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1))
    kwargs.setdefault("window_seqlen_k", max_k)
    slopes = kwargs.pop("alibi_slopes", None)
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].unsqueeze(0)
        ks = k[cu_k[i] : cu_k[i + 1]].unsqueeze(0)
        vs = v[cu_k[i] : cu_k[i + 1]].unsqueeze(0)
        seg_slopes = slopes[i] if isinstance(slopes, Tensor) and slopes.dim() == 2 else slopes
        if qs.shape[1] == 0:
            continue
        if ks.shape[1] == 0:
            outs.append(torch.zeros(qs.shape[1], q.shape[1], v.shape[-1], dtype=torch.float64))
            lses.append(torch.full((q.shape[1], qs.shape[1]), math.inf, dtype=torch.float64))
            continue
        out, lse, _ = reference_attention(qs, ks, vs, alibi_slopes=seg_slopes, **kwargs)  # type: ignore[arg-type]
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def reference_rotary(x: Tensor, angles: Tensor, interleaved: bool) -> Tensor:
    """Rotate channel pairs of x (..., D) by ``angles`` (broadcastable to (..., rotary_dim / 2)) in float64.

    Pairs are (c, c + rotary_dim / 2) for GPT-NeoX style or (2c, 2c + 1) when interleaved; each pair is
    a complex number multiplied by exp(i * angle).
    """
    x = x.double()
    half = angles.shape[-1]
    rd = 2 * half
    if interleaved:
        z = torch.complex(x[..., 0:rd:2], x[..., 1:rd:2])
    else:
        z = torch.complex(x[..., :half], x[..., half:rd])
    z = z * torch.polar(torch.ones_like(angles, dtype=torch.float64), angles.double())
    rot = (
        torch.stack((z.real, z.imag), dim=-1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    )
    return torch.cat((rot, x[..., rd:]), dim=-1)
