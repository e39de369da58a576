"""Section (a): attention kernels as the shim dispatches them, against each SDPA backend and eager.

Every implementation is called the way a transformers model calls it (``module, query, key, value,
attention_mask``, query as a (B, H, S, D) view of a (B, S, H, D) projection), so GQA handling
(``enable_gqa`` or ``repeat_kv``) and causal flags are transformers' own. Besides the TFLOP/s grid,
two small studies explain the backend policy: decode-step calls (launch-bound, one query token) and
the first call of a new shape (cuDNN builds a plan per shape).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from _common import Skip, attempt, free, loop_time, median_time, wall_time

from sdpa_shim._integration import marks as _attention
from sdpa_shim._runtime import backends as _backends

HIDDEN = 2048
TOKENS = 16384
IMPLS = ("eager", "math", "efficient", "flash", "cudnn", "default", "shim")
PINNED = ("math", "efficient", "flash", "cudnn")


class Config:
    """A stand-in for a model config; weak-referenceable so the shim can remember it."""


class FakeAttention(torch.nn.Module):
    """Just the attributes transformers' attention functions read from the attention module."""

    def __init__(self, groups: int, causal: bool, downgraded: bool) -> None:
        super().__init__()
        self.config = Config()
        self.num_key_value_groups = groups
        self.is_causal = causal
        self.layer_idx = 0
        if downgraded:
            _attention.mark(self.config)


def functions() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """(shim-wrapped sdpa, transformers' sdpa, transformers' eager) attention functions."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    original = getattr(wrapped, "__sdpa_shim_original__", None)
    if original is None:
        raise RuntimeError("sdpa_shim did not wrap ALL_ATTENTION_FUNCTIONS['sdpa']")
    return wrapped, original, eager_attention_forward


def backend_context(impl: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "math": SDPBackend.MATH,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    return sdpa_kernel(names[impl]) if impl in names else nullcontext()


def make_call(
    impl: str,
    b: int,
    h: int,
    hk: int,
    sq: int,
    sk: int,
    d: int,
    causal: bool,
    device: str,
    grad: bool,
    mask: torch.Tensor | None = None,
) -> Callable[[], Any]:
    """A zero-argument callable running one attention call (and its backward when ``grad``)."""
    wrapped, original, eager = functions()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype, requires_grad=grad)
    module = FakeAttention(h // hk, causal, downgraded=impl == "shim")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = d**-0.5
    attn_mask = mask
    if impl == "eager":
        fn = eager
        if causal and mask is None and sq > 1:  # eager has no is_causal: transformers gives it a mask
            keep = torch.ones(sq, sk, device=device, dtype=torch.bool).tril(sk - sq)
            attn_mask = torch.zeros(1, 1, sq, sk, device=device, dtype=dtype)
            attn_mask.masked_fill_(~keep, torch.finfo(dtype).min)
        elif mask is not None and mask.dtype == torch.bool:
            attn_mask = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(
                ~mask, torch.finfo(dtype).min
            )
    elif impl == "shim":
        fn = wrapped
    else:
        fn = original
    grad_out = torch.randn(b, sq, h, d, device=device, dtype=dtype) if grad else None

    def run() -> Any:
        out = fn(module, qt, kt, vt, attn_mask, scaling=scale, dropout=0.0)[0]
        if grad:
            torch.autograd.grad(out, (q, k, v), grad_out)
        return out

    return run


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool, grad: bool) -> float:
    """4·B·H·Sq·Sk·D forward (halved when causal); backward 2.5x forward (FlashAttention convention)."""
    flops = 4.0 * b * h * sq * sk * d * (0.5 if causal else 1.0)
    return flops * (3.5 if grad else 1.0)


def grid(quick: bool) -> list[dict[str, Any]]:
    """The configurations: head_dim 64/128/256, causal or not, GQA, seq 512..16k at 16k tokens."""
    seqs = (64, 128) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    tokens = 256 if quick else TOKENS
    hidden = 64 if quick else HIDDEN
    configs = []
    for d in (16, 32) if quick else (64, 128, 256):
        h = hidden // d
        for causal in (False, True):
            configs += [dict(d=d, h=h, hk=h, causal=causal, seq=s, b=tokens // s) for s in seqs]
    d = 16 if quick else 64  # GQA as in the 1.1B Llama: 32 query heads over 4 key/value heads
    h = hidden // d
    configs += [
        dict(d=d, h=h, hk=h // 8 if not quick else 1, causal=True, seq=s, b=tokens // s) for s in seqs
    ]
    return configs


def too_big(impl: str, cfg: dict[str, Any], grad: bool, device: str) -> bool:
    """eager and math materialise B·H·S² scores: skip sizes that would not fit (or only just)."""
    if impl not in ("eager", "math") or device != "cuda":
        return False
    score_bytes = cfg["b"] * cfg["h"] * cfg["seq"] ** 2 * 4
    return score_bytes * (3 if grad else 2) > 40 * 2**30


def run_grid(device: str, quick: bool) -> list[dict[str, Any]]:
    rows = []
    warmup, reps = (1, 2) if quick else (2, 7)
    for cfg in grid(quick):
        for grad in (False, True):
            for impl in IMPLS:
                rec: dict[str, Any] = {**cfg, "mode": "fwd+bwd" if grad else "fwd", "impl": impl}

                def measure(cfg: dict[str, Any] = cfg, grad: bool = grad, impl: str = impl) -> dict[str, Any]:
                    if too_big(impl, cfg, grad, device):
                        raise Skip("S² scores would need > 48 GiB")
                    b, h, hk, s, d = cfg["b"], cfg["h"], cfg["hk"], cfg["seq"], cfg["d"]
                    with backend_context(impl):
                        call = make_call(impl, b, h, hk, s, s, d, cfg["causal"], device, grad)
                        call()  # first call: plan building, lazy kernel loading
                        single = wall_time(call, device)
                        inner = max(1, min(40, int(4e-3 / max(single, 1e-6))))  # >= ~4 ms between events
                        seconds = median_time(call, device, warmup, reps, inner)
                    flops = attention_flops(b, h, s, s, d, cfg["causal"], grad)
                    return {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12}

                rows.append(attempt(rec, device, measure))
            rows[-1].update(paired(cfg, grad, device, quick))
        free(device)
        print(
            f"  kernels: d={cfg['d']} hk={cfg['hk']} causal={cfg['causal']} seq={cfg['seq']} done", flush=True
        )
    return rows


def paired(cfg: dict[str, Any], grad: bool, device: str, quick: bool) -> dict[str, Any]:
    """shim / default throughput from alternating blocks of the two (same kernel once warm: this
    separates the shim's own cost from clock drift, which independent timings cannot)."""
    b, h, hk, s, d = cfg["b"], cfg["h"], cfg["hk"], cfg["seq"], cfg["d"]
    try:
        calls = [
            make_call(impl, b, h, hk, s, s, d, cfg["causal"], device, grad) for impl in ("default", "shim")
        ]
        for call in calls:
            call(), call()
        single = wall_time(calls[0], device)
        inner = max(1, min(40, int(4e-3 / max(single, 1e-6))))
        ratios = []
        for _ in range(2 if quick else 7):
            t_default, t_shim = (median_time(c, device, 0, 1, inner) for c in calls)
            ratios.append(t_default / t_shim)
        ratios.sort()
        return {"paired_vs_default": ratios[len(ratios) // 2]}
    except Exception as exc:  # pragma: no cover - reported, not fatal
        return {"paired_error": repr(exc)[:160]}


def run_decode(device: str, quick: bool) -> list[dict[str, Any]]:
    """One decode step of the 1.1B Llama's attention (8 rows, 32/4 heads, d 64): µs per call, launch-bound.

    With no mask (equal-length rows) and with a padding mask (left-padded batch)."""
    b, h, hk, d, kv = (2, 4, 1, 16, 32) if quick else (8, 32, 4, 64, 1000)
    rows = []
    for masked in (False, True):
        mask = None
        if masked:
            mask = torch.ones(b, 1, 1, kv, device=device, dtype=torch.bool)
            mask[1:, :, :, : kv // 4] = False
        for impl in (*IMPLS, "shim+flash", "shim+default"):
            rec: dict[str, Any] = {"masked": masked, "b": b, "h": h, "hk": hk, "d": d, "kv": kv, "impl": impl}

            def measure(impl: str = impl, mask: torch.Tensor | None = mask) -> dict[str, Any]:
                base, _, pin = impl.partition("+")
                _backends.reset()
                with backend_context(base), pinned(pin):
                    call = make_call(base, b, h, hk, 1, kv, d, True, device, False, mask)
                    call()  # warm: cuDNN's plan for this shape is built here
                    seconds = loop_time(call, device, calls=20 if quick else 300)
                return {"us_per_call": seconds * 1e6}

            rows.append(attempt(rec, device, measure))
    return rows


class pinned:
    """Set SDPA_SHIM_BACKEND for a block ('' leaves it alone)."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __enter__(self) -> None:
        import os

        self.previous = os.environ.get("SDPA_SHIM_BACKEND")
        if self.value:
            os.environ["SDPA_SHIM_BACKEND"] = self.value

    def __exit__(self, *exc: object) -> None:
        import os

        if self.previous is None:
            os.environ.pop("SDPA_SHIM_BACKEND", None)
        else:
            os.environ["SDPA_SHIM_BACKEND"] = self.previous


def run_cold(device: str, quick: bool) -> list[dict[str, Any]]:
    """First call of a shape never seen before vs the same call repeated: the cuDNN plan-building cost.

    Each implementation gets its own sequence lengths so no plan is shared between rows."""
    rows = []
    impls = ("flash", "efficient", "cudnn", "default", "shim")
    cases = (
        # (name, b, h, hk, sq, sk, d, causal, grad)
        ("prefill 1 x ~2k, GQA 32/4, d64", 1, 32, 4, 2000, 2000, 64, True, False),
        ("train fwd+bwd 1 x ~2k, GQA 32/4, d64", 1, 32, 4, 2000, 2000, 64, True, True),
        ("decode 8 x 1 over ~1k keys, GQA 32/4, d64", 8, 32, 4, 1, 1000, 64, True, False),
        ("prefill 1 x ~2k, 16 heads, d128", 1, 16, 16, 2000, 2000, 128, True, False),
    )
    if quick:
        cases = tuple((n, 1, 4, 1, min(sq, 32), 32, 16, c, g) for n, _, _, _, sq, _, _, c, g in cases)
    for ci, (name, b, h, hk, sq, sk, d, causal, grad) in enumerate(cases):
        for ii, impl in enumerate(impls):
            offset = 8 * (ci * len(impls) + ii) + 1  # a distinct, never-used length per row
            sq_i = sq if sq == 1 else sq + offset
            sk_i = sk + offset
            rec: dict[str, Any] = {"case": name, "impl": impl, "sq": sq_i, "sk": sk_i}

            def measure(
                impl: str = impl,
                sq_i: int = sq_i,
                sk_i: int = sk_i,
                grad: bool = grad,
                b: int = b,
                h: int = h,
                hk: int = hk,
                d: int = d,
                causal: bool = causal,
            ) -> dict[str, Any]:
                _backends.reset()
                with backend_context(impl):
                    call = make_call(impl, b, h, hk, sq_i, sk_i, d, causal, device, grad)
                    first = wall_time(call, device)
                    second = wall_time(call, device)
                    third = wall_time(call, device)
                    steady = median_time(call, device, 1, 5)
                return {
                    "first_ms": first * 1e3,
                    "second_ms": second * 1e3,
                    "third_ms": third * 1e3,
                    "steady_ms": steady * 1e3,
                }

            rows.append(attempt(rec, device, measure))
    return rows


def run(device: str, quick: bool) -> dict[str, Any]:
    return {
        "decode": run_decode(device, quick),
        "cold": run_cold(device, quick),
        "grid": run_grid(device, quick),
    }
