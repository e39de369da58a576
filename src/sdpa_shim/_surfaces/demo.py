"""``sdpa-shim demo``: the whole job in ten seconds, offline, on CPU or GPU.

It builds a tiny randomly initialised Llama in a temporary directory (no download), loads it with
``attn_implementation="flash_attention_2"`` as a model card would, and shows what the shim decided
and that a forward pass runs. Where flash-attn is usable the request is kept, which the demo says.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
import time
from typing import Any

TINY_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head dim 16: a size every flash and SDPA kernel accepts
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
INPUT_IDS = [[1, 5, 9, 17, 33, 2, 70, 3]]


def main(device: str = "auto", dtype: str = "auto") -> int:
    """Run the demo; 0 when the model loaded and its forward pass gave finite logits."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the Hub
    try:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        print(f"sdpa-shim demo needs torch and transformers: {exc}", file=sys.stderr)
        return 1
    from .._core.decisions import decisions
    from .._state import is_active

    _quiet_progress_bars()
    device = _pick_device(torch, device)
    if device is None:
        print("sdpa-shim demo: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 1
    dtype = _pick_dtype(torch, device, dtype)
    if not is_active():
        print("sdpa_shim is off (SDPA_SHIM=0): expect transformers' own answer to the request.")
    with tempfile.TemporaryDirectory(prefix="sdpa_shim-demo-") as directory:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(directory)
        print(f"Built a tiny random LlamaForCausalLM in {directory}")
        print(f'Loading it with attn_implementation="flash_attention_2" ({device}, {dtype}) ...', flush=True)
        before = len(decisions())
        try:
            model = AutoModelForCausalLM.from_pretrained(
                directory,
                attn_implementation="flash_attention_2",
                **{_dtype_keyword(): getattr(torch, dtype)},
            )
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            print(f"Loading failed: {type(exc).__name__}: {lines[0] if lines else ''}", file=sys.stderr)
            return 1
        sys.stderr.flush()
        model = model.to(device).eval()
        _report_decision(model, decisions()[before:])
        return _forward(torch, model, device)


def _quiet_progress_bars() -> None:
    """The demo prints its own progress; transformers' save/load bars would only add noise."""
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _pick_device(torch: Any, device: str) -> str | None:
    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if device == "cuda" and not available:
        return None
    return device


def _pick_dtype(torch: Any, device: str, dtype: str) -> str:
    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _dtype_keyword() -> str:
    """``dtype`` since transformers 4.56; ``torch_dtype`` before."""
    version = importlib.metadata.version("transformers")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return "dtype" if parts >= (4, 56) else "torch_dtype"


def _report_decision(model: Any, decisions: list[Any]) -> None:
    used = model.config._attn_implementation
    if decisions:
        decision = decisions[-1]
        print(f"Decision: {decision.requested} -> {decision.chosen} ({decision.reason})")
    else:
        print(f"Decision: none needed, the request was kept (attention in use: {used})")
    print(f"Attention in use: {used}")


def _forward(torch: Any, model: Any, device: str) -> int:
    ids = torch.tensor(INPUT_IDS, device=device)
    with torch.no_grad():
        model(ids)  # warm-up: first calls pay one-time kernel set-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(ids).logits
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1000
    finite = bool(torch.isfinite(logits).all())
    dtype = str(logits.dtype).removeprefix("torch.")
    health = "all finite" if finite else "NOT FINITE"
    print(
        f"Forward: input {tuple(ids.shape)} -> logits {tuple(logits.shape)} {dtype} on {device}, "
        f"{health}, {elapsed_ms:.1f} ms"
    )
    if not finite:
        print("Demo FAILED: the forward pass produced non-finite logits.", file=sys.stderr)
        return 1
    print("Demo OK.")
    return 0
