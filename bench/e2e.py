"""Section (b): end to end with a random-init 1.1B Llama-shaped model (TinyLlama's shape).

Variants: "eager", plain "sdpa", and a "flash_attention_2" request under the shim ("shim", which
downgrades because flash-attn is absent), plus the shim with ``SDPA_SHIM_BACKEND`` pinned to one
backend ("shim:flash", ...) to find the best single backend for every scenario.

All models stay loaded and every scenario runs in rounds with the variants interleaved, so drift
in clocks or host load hits all alike; a row reports the median over rounds. Each model first runs
a short generate and a training step at throwaway lengths, so no timed row pays one-time costs
(kernel loading, allocator growth). Cold-shape rows use prompt lengths no earlier call used (cuDNN
keeps its plans for the whole process), spaced more than the new tokens apart so no decode step
reuses a key length.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _common import Skip, attempt, free, median_time, peak_memory, wall_time

from sdpa_shim._integration import marks as _attention
from sdpa_shim._runtime import backends as _backends
from sdpa_shim._runtime import packed as _packed

FULL = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=20480,
)
QUICK = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

#: variant -> (attn_implementation requested, SDPA_SHIM_BACKEND while it runs)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "eager": ("eager", None),
    "sdpa": ("sdpa", None),
    "shim": ("flash_attention_2", None),
    "shim:flash": ("flash_attention_2", "flash"),
    "shim:cudnn": ("flash_attention_2", "cudnn"),
    "shim:efficient": ("flash_attention_2", "efficient"),
    # diagnostic: the shim model with the core's packed-sequence check bypassed (same model object)
    "shim:nopack": ("flash_attention_2", None),
}
MAIN = ("eager", "sdpa", "shim")
GENERATE = ("eager", "sdpa", "shim", "shim:flash", "shim:cudnn")
#: cold rows leave out the cuDNN pin: it builds a plan per decode step exactly like plain sdpa
GENERATE_COLD = ("eager", "sdpa", "shim", "shim:flash")
ALL = tuple(v for v in VARIANTS if v != "shim:nopack")


class Lengths:
    """Hands out prompt lengths that no earlier call used, ``gap`` apart."""

    def __init__(self, start: int, gap: int) -> None:
        self.next, self.gap = start, gap

    def take(self) -> int:
        value, self.next = self.next, self.next + self.gap
        return value


_real_boundaries = _packed.boundaries


def use(variant: str) -> None:
    """Set the variant's pin (or none) for the calls that follow; "shim:nopack" skips the packed check."""
    _packed.boundaries = (lambda *args: None) if variant == "shim:nopack" else _real_boundaries
    _, pin = VARIANTS[variant]
    if pin is None:
        os.environ.pop("SDPA_SHIM_BACKEND", None)
    else:
        os.environ["SDPA_SHIM_BACKEND"] = pin


def build(variant: str, device: str, quick: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    request, _ = VARIANTS[variant]
    config = LlamaConfig(**(QUICK if quick else FULL))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=request, dtype=dtype)
    model.eval()
    taken_over = _attention.kind_of(model.config) is not None
    if taken_over != variant.startswith("shim"):
        raise RuntimeError(f"{variant}: taken over by the shim is {taken_over}")
    return model


def generate_once(model: Any, device: str, lengths: list[int], new: int) -> float:
    """Seconds for one greedy ``generate`` of ``new`` tokens for rows of ``lengths`` (left-padded)."""
    longest = max(lengths)
    ids = torch.randint(100, model.config.vocab_size, (len(lengths), longest), device=device)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, : longest - n] = 0
        ids[row, : longest - n] = 0
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return wall_time(lambda: model.generate(input_ids=ids, attention_mask=mask, **kwargs), device)


def prefill_call(
    model: Any, device: str, rows: int, n: int, lengths: list[int] | None = None
) -> Callable[[], None]:
    ids = torch.randint(100, model.config.vocab_size, (rows, n), device=device)
    kwargs: dict[str, Any] = {"use_cache": True, "logits_to_keep": 1}
    if lengths is not None:  # right-padded rows: a 4-D mask
        mask = torch.zeros_like(ids)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        kwargs = {"attention_mask": mask, "use_cache": False, "logits_to_keep": 1}

    def call() -> None:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)

    return call


def train_call(
    model: Any, device: str, rows: int, n: int, docs: list[int] | None = None
) -> Callable[[], None]:
    """Forward + backward; ``docs``: one packed row whose position_ids restart per document."""
    ids = torch.randint(100, model.config.vocab_size, (rows, n), device=device)
    kwargs: dict[str, Any] = {"labels": ids, "use_cache": False}
    if docs is not None:
        kwargs["position_ids"] = torch.cat([torch.arange(d, device=device) for d in docs])[None]

    def call() -> None:
        model.train()
        try:
            model(input_ids=ids, **kwargs).loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    return call


def interleaved(
    rows: list[dict[str, Any]],
    scenario: str,
    detail: str,
    variants: tuple[str, ...],
    rounds: int,
    device: str,
    measure: Callable[[str, int], dict[str, Any]],
) -> None:
    """Run ``measure(variant, round)`` round-robin; one row per variant with the median over rounds."""
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    failed: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:  # alternate order: no variant always first
            if v in failed:
                continue
            use(v)
            rec = attempt({}, device, lambda v=v, r=r: measure(v, r))
            if rec["status"] != "ok":
                failed[v] = rec
            else:
                samples[v].append(rec)
    use("sdpa")
    for v in variants:
        row: dict[str, Any] = {"scenario": scenario, "detail": detail, "variant": v}
        if v in failed:
            row.update(failed[v])
        else:
            got = samples[v]
            row["status"] = "ok"
            row["rounds"] = [round(s["tok_s"], 1) for s in got]
            row["tok_s"] = statistics.median(s["tok_s"] for s in got)
            peaks = [s["peak_gib"] for s in got if "peak_gib" in s]
            if peaks:
                row["peak_gib"] = max(peaks)
        rows.append(row)
    print(f"  e2e: {scenario} done", flush=True)


def run(device: str, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fresh = Lengths(start=24 if quick else 640, gap=12 if quick else 136)
    fresh_padded = Lengths(start=4 if quick else 8, gap=12 if quick else 72)
    models = {}
    for v in ALL:
        use(v)
        models[v] = build(v, device, quick)
    models["shim:nopack"] = models["shim"]
    _backends.reset()
    n_rows, base, new = (2, 16, 8) if quick else (8, 512, 128)
    padded = [base // 4 + i * (base // 4) for i in range(n_rows)]  # 128 .. 1024 for 8 rows
    rounds = 2 if quick else 3
    gen_rounds = 2 if quick else 3

    # warm-up at throwaway lengths: kernel loading, allocator growth, first-call costs
    for i, v in enumerate(ALL):
        use(v)
        generate_once(models[v], device, [8 + i] * n_rows, 4)
        generate_once(models[v], device, [4 + i, 8 + i] * (n_rows // 2), 4)
        train_call(models[v], device, 1, 64 + i, [32, 32 + i])()
        train_call(models[v], device, 2, 64 + i)()
    free(device)

    def gen_cold(v: str, _: int) -> dict[str, Any]:
        seconds = generate_once(models[v], device, [fresh.take()] * n_rows, new)
        return {"tok_s": n_rows * new / seconds}

    def gen_padded_cold(v: str, _: int) -> dict[str, Any]:
        shift = fresh_padded.take()
        seconds = generate_once(models[v], device, [n + shift for n in padded], new // 2)
        return {"tok_s": n_rows * (new // 2) / seconds}

    interleaved(
        rows,
        "generate cold",
        f"{n_rows} x ~{base} + {new}, new prompt length each call",
        GENERATE_COLD,
        gen_rounds,
        device,
        gen_cold,
    )
    interleaved(
        rows,
        "padded generate cold",
        f"{n_rows} rows ~{padded[0]}..{padded[-1]} + {new // 2}, new lengths",
        GENERATE_COLD,
        rounds - 1,
        device,
        gen_padded_cold,
    )

    def gen_warm(v: str, r: int) -> dict[str, Any]:
        if r == 0:  # two untimed calls: the shim's prefill shape becomes warm on the second
            for _ in range(2):
                generate_once(models[v], device, [base] * n_rows, new)
        return {"tok_s": n_rows * new / generate_once(models[v], device, [base] * n_rows, new)}

    def gen_padded_warm(v: str, r: int) -> dict[str, Any]:
        if r == 0:
            for _ in range(2):
                generate_once(models[v], device, padded, new // 2)
        return {"tok_s": n_rows * (new // 2) / generate_once(models[v], device, padded, new // 2)}

    interleaved(
        rows,
        "generate warm",
        f"{n_rows} x {base} + {new}, same call repeated",
        GENERATE,
        gen_rounds,
        device,
        gen_warm,
    )
    interleaved(
        rows,
        "padded generate warm",
        f"{n_rows} rows {padded[0]}..{padded[-1]} + {new // 2}, repeated",
        GENERATE,
        rounds,
        device,
        gen_padded_warm,
    )

    def timed(
        call_for: Callable[[str], Callable[[], None]], tokens: int, reps: int
    ) -> Callable[[str, int], dict]:
        def measure(v: str, _: int) -> dict[str, Any]:
            call = call_for(v)
            with peak_memory(device) as mem:
                seconds = median_time(call, device, warmup=2, reps=reps)
            return {"tok_s": tokens / seconds, **mem}

        return measure

    for n in (64, 128) if quick else (1024, 4096, 16384):
        label = f"{n // 1024}k" if n >= 1024 else str(n)

        def prefill_for(v: str, n: int = n) -> Callable[[], None]:
            if v == "eager" and n > 8192:
                raise Skip("eager materialises 32 x S² scores per layer: > 80 GB at 16k")
            return prefill_call(models[v], device, 1, n)

        variants = (*ALL, "shim:nopack") if n < 4096 else ALL
        interleaved(
            rows,
            f"prefill {label}",
            "1 row, logits of the last token",
            variants,
            rounds,
            device,
            timed(prefill_for, n, 3 if n > 8192 else 5),
        )

    longest = 32 if quick else 2048
    lengths = [longest * (i + 1) // n_rows for i in range(n_rows)]
    interleaved(
        rows,
        "padded prefill",
        f"{n_rows} rows {lengths[0]}..{longest}, right-padded",
        ALL,
        rounds,
        device,
        timed(lambda v: prefill_call(models[v], device, n_rows, longest, lengths), sum(lengths), 5),
    )

    batch, seq = (2, 32) if quick else (4, 2048)

    def train_for(v: str) -> Callable[[], None]:
        if v.startswith("shim:efficient"):
            raise Skip("efficient takes no GQA without a mask: this is the math backend")
        return train_call(models[v], device, batch, seq)

    interleaved(
        rows,
        "train",
        f"fwd+bwd, {batch} x {seq} tokens, no padding",
        ALL,
        rounds - 1,
        device,
        timed(train_for, batch * seq, 3),
    )

    for total in (128,) if quick else (4096, 16384):
        docs = [total * f // 16 for f in (5, 3, 4, 2, 1)]
        docs.append(total - sum(docs))
        label = f"{total // 1024}k" if total >= 1024 else str(total)

        def packed_for(v: str, total: int = total, docs: list[int] = docs) -> Callable[[], None]:
            if v == "eager" and total > 4096:
                raise Skip("eager keeps 32 x S² attention weights per layer for backward")
            return train_call(models[v], device, 1, total, docs)

        interleaved(
            rows,
            f"packed train {label}",
            f"fwd+bwd, {len(docs)} documents in one row",
            (*MAIN, "shim:nopack"),
            rounds - 1,
            device,
            timed(packed_for, total, 3),
        )
    use("sdpa")
    os.environ.pop("SDPA_SHIM_BACKEND", None)
    models.clear()
    free(device)
    _backends.reset()
    return rows
