"""Kernel level: the varlen engine's routes against calling torch's varlen_attn directly (CUDA).

Usage::

    PYTHONPATH=src python bench/kernel_routes.py [--out DIR] [--budget-s 240]

One packed row of T tokens in N documents (random lengths, seeded), GQA 32/4, head dim 64, bf16,
causal; ms per forward + backward (CUDA events, median of 5 after 2 warm-ups). Columns: the engine as
it chooses (``auto``), the engine pinned to ``varlen_attn`` and to ``flex``, and torch's
``varlen_attn`` called directly (the floor for the engine's own overhead). Numerics: the flex route's
output and gradients against the engine's varlen_attn route (max abs difference; bf16). The first flex
call of each shape compiles (not timed: warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from sdpa_shim._runtime import varlen  # noqa: E402

STARTED = time.monotonic()
GRID = [(4096, 8), (4096, 64), (4096, 256), (16384, 8), (16384, 64), (16384, 256), (16384, 1024)]


def lengths(total: int, docs: int, gen: torch.Generator) -> list[int]:
    cuts = torch.randperm(total - 1, generator=gen)[: docs - 1].add(1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def timed(fn: Any, reps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_case(total: int, docs: int) -> dict[str, Any]:
    from torch.nn.attention.varlen import varlen_attn

    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(total + docs)
    lens = lengths(total, docs, gen)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    longest = max(lens)
    q = torch.randn(total, 32, 64, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(total, 4, 64, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(total, 4, 64, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(total, 32, 64, device=dev, dtype=dt)

    def engine(route: str | None) -> Any:
        def step() -> Any:
            with varlen.force_route(route) if route else contextlib.nullcontext():
                out = varlen.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True)
            return out, torch.autograd.grad(out, (q, k, v), grad)

        return step

    gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters

    def direct() -> Any:
        if gqa:
            out = varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True)
        else:  # torch < 2.12: no GQA in varlen_attn, the keys are repeated (as the engine does there)
            kk, vv = (x.repeat_interleave(8, dim=1) for x in (k, v))
            out = varlen_attn(q, kk, vv, cu, cu, longest, longest, window_size=(-1, 0))
        return out, torch.autograd.grad(out, (q, k, v), grad)

    auto = varlen.route_for(q, k, v, cu, cu, longest, longest, causal=True)
    row: dict[str, Any] = {"tokens": total, "docs": docs, "auto_route": auto}
    variants = (
        ("direct_varlen_attn", direct),
        ("engine_varlen_attn", engine("varlen_attn")),
        ("engine_auto", engine(None)),
        ("engine_flex", engine("flex")),
    )
    for name, fn in variants:
        try:
            row[name] = timed(fn)
        except Exception as exc:  # a route that cannot run here is reported, not fatal
            row[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    try:
        ref_out, ref_grads = engine("varlen_attn")()
        flex_out, flex_grads = engine("flex")()
        row["flex_max_abs_diff"] = max(
            (a.float() - b.float()).abs().max().item()
            for a, b in zip((flex_out, *flex_grads), (ref_out, *ref_grads), strict=True)
        )
    except Exception as exc:
        row["flex_max_abs_diff"] = type(exc).__name__
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args()

    rows = []
    for total, docs in GRID:
        if time.monotonic() - STARTED > args.budget_s:
            rows.append({"tokens": total, "docs": docs, "skipped": "time budget"})
            continue
        rows.append(measure_case(total, docs))
        print(json.dumps(rows[-1]), flush=True)
    text = markdown(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel_routes.json").write_text(
            json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows})
        )
        (out / "kernel_routes.md").write_text(text)
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    def ms(x: Any) -> str:
        return f"{x:.2f}" if isinstance(x, float) else str(x)

    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: "
        "ms per fwd+bwd, GQA 32/4, d64, bf16, causal",
        "",
        "| tokens | docs | varlen_attn direct | engine: varlen_attn | engine: flex | engine auto (route) "
        "| engine varlen_attn / direct | flex max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['tokens']} | {r['docs']} | skipped ({r['skipped']}) |")
            continue
        d, e = r.get("direct_varlen_attn"), r.get("engine_varlen_attn")
        ratio = f"{d / e:.3f}" if isinstance(d, float) and isinstance(e, float) else "-"
        lines.append(
            f"| {r['tokens']} | {r['docs']} | {ms(d)} | {ms(e)} | {ms(r.get('engine_flex'))} | "
            f"{ms(r.get('engine_auto'))} ({r['auto_route']}) | {ratio} | {ms(r.get('flex_max_abs_diff'))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
