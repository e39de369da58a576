"""Section (d), issue 4: dots.ocr-sized vision attention over packed images.

12 heads, head_dim 128, bf16, 57,600 tokens packed as 1, 4 or 16 equal images, non-causal. The
stand-in's ``flash_attn_varlen_func`` against: one SDPA flash call per image (the target: stand-in
<= 1.2x), torch's default dispatch per image, the dense block-diagonal mask path (what dots.ocr's
own SDPA class does), and eager (the [heads, S, S] fp32 matrix of dots.ocr's fallback).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from _common import Skip, attempt, median_time, peak_memory

HEADS, DIM, TOTAL = 12, 128, 57600


def standin_varlen() -> Callable[..., Any] | None:
    try:
        from sdpa_shim.standin import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


def per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """One SDPA call per image, (T, H, D) views in and out."""
    outs = []
    for a, b in itertools.pairwise(bounds):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
    return torch.cat(outs)


def _segment_ids(total: int, segments: int, device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(segments, device=device), total // segments)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: int) -> torch.Tensor:
    """dots.ocr's own SDPA path: one call over all tokens with a block-diagonal boolean mask."""
    ids = _segment_ids(q.shape[0], segments, q.device)
    mask = ids[:, None] == ids[None, :]
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[None, None])


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: int) -> torch.Tensor:
    """dots.ocr's eager fallback: an fp32 [heads, S, S] score matrix with a block-diagonal bias."""
    total = q.shape[0]
    ids = _segment_ids(total, segments, q.device)
    bias = torch.zeros(total, total, device=q.device, dtype=torch.float32)
    bias.masked_fill_(ids[:, None] != ids[None, :], float("-inf"))
    qs, ks, vs = (x.transpose(0, 1) for x in (q, k, v))
    scores = (qs.float() @ ks.float().transpose(1, 2)) * q.shape[-1] ** -0.5 + bias
    return (scores.softmax(-1) @ vs.float()).to(q.dtype)


def run(device: str, quick: bool) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    total, heads, dim = (192, 2, 16) if quick else (TOTAL, HEADS, DIM)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    varlen = standin_varlen()
    rows = []
    for segments in (1, 4, 16):
        seg = total // segments
        cu = torch.arange(0, total + 1, seg, device=device, dtype=torch.int32)
        bounds = cu.tolist()

        impls: dict[str, tuple[Callable[..., Any], Any, bool]] = {
            "standin varlen": (
                partial(varlen, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seg, max_seqlen_k=seg)
                if varlen
                else None,
                None,
                True,
            ),
            "SDPA flash per image": (partial(per_segment, bounds=bounds), [SDPBackend.FLASH_ATTENTION], True),
            "SDPA default per image": (partial(per_segment, bounds=bounds), None, True),
            "dense mask SDPA": (partial(dense, segments=segments), None, False),
            "eager (dense fp32)": (partial(eager, segments=segments), None, False),
        }
        for name, (fn, backends, with_grad) in impls.items():
            for grad in (False, True) if with_grad else (False,):
                rec: dict[str, Any] = {
                    "segments": segments,
                    "impl": name,
                    "mode": "fwd+bwd" if grad else "fwd",
                }

                def measure(
                    fn: Any = fn, backends: Any = backends, grad: bool = grad, name: str = name
                ) -> dict:
                    if fn is None:
                        raise Skip("sdpa_shim.standin is not importable in this checkout")
                    if (
                        name.startswith("eager")
                        and device == "cuda"
                        and heads * total * total * 4 > 70 * 2**30
                    ):
                        raise Skip(
                            f"needs a {heads}x{total}x{total} fp32 matrix "
                            f"({heads * total * total * 4 / 2**30:.0f} GiB): out of memory on this GPU"
                        )
                    q, k, v = (
                        torch.randn(total, heads, dim, device=device, dtype=dtype, requires_grad=grad)
                        for _ in range(3)
                    )
                    g = torch.randn(total, heads, dim, device=device, dtype=dtype) if grad else None

                    def call() -> None:
                        out = fn(q, k, v)
                        if isinstance(out, tuple):
                            out = out[0]
                        if grad:
                            torch.autograd.grad(out, (q, k, v), g.view_as(out))

                    ctx = sdpa_kernel(backends) if backends else _Null()
                    with ctx, peak_memory(device) as mem:
                        seconds = median_time(call, device, warmup=2, reps=5)
                    return {"ms": seconds * 1e3, **mem}

                rows.append(attempt(rec, device, measure))
        print(f"  varlen: {segments} segments done", flush=True)
    return rows


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
