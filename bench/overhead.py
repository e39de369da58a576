"""Section (c): what the shim costs when nothing needs to be fast.

``import sdpa_shim`` time (and whether it imported torch); the time its hook adds to
``from_pretrained`` once transformers is warm; the time its attention wrapper adds per call on the
CPU (where it hands the call straight to transformers) and on CUDA (where it flips backend flags).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import attempt, loop_time

import sdpa_shim

SRC = str(Path(__file__).resolve().parents[1] / "src")
IMPORT_PROBE = (
    "import sys, time; t = time.perf_counter(); import sdpa_shim; t = time.perf_counter() - t; "
    "print(t, 'torch' in sys.modules, 'transformers' in sys.modules)"
)


def import_time(repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times, torch_loaded = [], set()
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        times.append(float(out[0]))
        torch_loaded.add(out[1] == "True")
    return {"import_ms_median": statistics.median(times) * 1e3, "torch_imported": any(torch_loaded)}


def from_pretrained_overhead(repeats: int) -> dict[str, Any]:
    """Median load time of a tiny saved Llama: shim off vs on (request sdpa), and a downgraded fa2 request."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)

        def load(request: str) -> float:
            t0 = time.perf_counter()
            LlamaForCausalLM.from_pretrained(tmp, attn_implementation=request)
            return time.perf_counter() - t0

        load("sdpa")  # the first call pays transformers' own imports
        results: dict[str, list[float]] = {"off_sdpa": [], "on_sdpa": [], "on_fa2_downgraded": []}
        import logging

        shim_logger = logging.getLogger("sdpa_shim")
        level = shim_logger.level
        shim_logger.setLevel(logging.ERROR)  # one WARNING per load would flood the output
        try:
            for _ in range(repeats):  # interleaved so drift hits all three alike
                sdpa_shim.deactivate()
                results["off_sdpa"].append(load("sdpa"))
                sdpa_shim.activate()
                results["on_sdpa"].append(load("sdpa"))
                results["on_fa2_downgraded"].append(load("flash_attention_2"))
        finally:
            shim_logger.setLevel(level)
            sdpa_shim.activate()
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    return {
        **{f"{k}_ms": v for k, v in med.items()},
        "hook_added_ms": med["on_sdpa"] - med["off_sdpa"],
        "downgrade_added_ms": med["on_fa2_downgraded"] - med["off_sdpa"],
    }


def per_call(device: str, quick: bool) -> list[dict[str, Any]]:
    """µs per attention call: transformers' sdpa function vs the shim's wrapper for a downgraded model."""
    from kernel_grid import FakeAttention, functions, pinned

    wrapped, original, _ = functions()
    rows = []
    shapes = [("tiny (1x4x8x16)", 1, 4, 1, 8, 16)]
    if device == "cuda":
        shapes.append(("decode (8x32/4 heads, 1 x 1000 keys, d64)", 8, 32, 4, 1, 64))
    for name, b, h, hk, s, d in shapes:
        kv = 1000 if s == 1 else s
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q = torch.randn(b, h, s, d, device=device, dtype=dtype)
        k = torch.randn(b, hk, kv, d, device=device, dtype=dtype)
        v = torch.randn(b, hk, kv, d, device=device, dtype=dtype)
        plain = FakeAttention(h // hk, True, downgraded=False)
        shimmed = FakeAttention(h // hk, True, downgraded=True)
        calls = 200 if quick else 2000
        paths = (
            ("transformers sdpa", original, plain, ""),
            ("shim wrapper, model not downgraded", wrapped, plain, ""),
            ("shim wrapper, downgraded, SDPA_SHIM_BACKEND=default", wrapped, shimmed, "default"),
            ("shim wrapper, downgraded (auto policy)", wrapped, shimmed, ""),
        )
        for label, fn, module, pin in paths:
            rec = {"shape": name, "device": device, "path": label}

            def measure(
                fn: Any = fn,
                module: Any = module,
                pin: str = pin,
                args: tuple = (q, k, v),
                scale: float = d**-0.5,
                calls: int = calls,
            ) -> dict[str, Any]:
                with pinned(pin):
                    seconds = loop_time(lambda: fn(module, *args, None, scaling=scale), device, calls, 7)
                return {"us_per_call": seconds * 1e6}

            rows.append(attempt(rec, device, measure))
    return rows


def run(device: str, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    attempt(out, "cpu", lambda: import_time(3 if quick else 5))
    attempt(out, "cpu", lambda: from_pretrained_overhead(3 if quick else 10))
    out["per_call"] = per_call("cpu", quick)
    if device == "cuda":
        out["per_call"] += per_call("cuda", quick)
    return out
