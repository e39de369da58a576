"""Dense workloads under the flash path: no slower than before (cold-shape generate, prefill, training).

``PYTHONPATH=src python bench/dense_check.py --out DIR`` on a CUDA machine (``--quick --device cpu`` to check
it). The 1.1B Llama shape of ``e2e.py``, bf16. Variants: eager, plain "sdpa", "shim" (flash_attention_2
under the shim: transformers' flash path on PyTorch kernels, the default on 4.56+) and "shim:sdpa" (the same
request with ``SDPA_SHIM_FALLBACK=sdpa``: the plain sdpa downgrade the earlier benchmarks measured).
Rounds interleave the variants; a row is the median over rounds. Writes dense_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))

import sdpa_shim  # noqa: E402,F401  (activates the shim before transformers is imported)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import e2e
    import torch
    from _common import environment, free, median_time, peak_memory

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    e2e.VARIANTS["shim:sdpa"] = ("flash_attention_2", None)
    variants = ("eager", "sdpa", "shim", "shim:sdpa")
    models = {}
    for v in variants:
        if v == "shim:sdpa":
            os.environ["SDPA_SHIM_FALLBACK"] = "sdpa"
        models[v] = e2e.build(v, device, args.quick)
        os.environ.pop("SDPA_SHIM_FALLBACK", None)
    implementations = {v: m.config._attn_implementation for v, m in models.items()}
    n_rows, new = (2, 8) if args.quick else (8, 128)
    fresh = e2e.Lengths(start=24 if args.quick else 640, gap=12 if args.quick else 136)
    for i, v in enumerate(variants):  # warm-up at throwaway lengths
        e2e.generate_once(models[v], device, [8 + i] * n_rows, 4)
        e2e.train_call(models[v], device, 1, 64 + i)()
    free(device)
    rows: list[dict] = []
    results: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(2 if args.quick else 3):
        for v in variants:
            seconds = e2e.generate_once(models[v], device, [fresh.take()] * n_rows, new)
            results[v].append(n_rows * new / seconds)
    for v in variants:
        rows.append({"scenario": "generate cold", "variant": v, "tok_s": statistics.median(results[v])})
    for name, n, make in (
        ("prefill", 64 if args.quick else 4096, lambda m, n: e2e.prefill_call(m, device, 1, n)),
        ("training", 64 if args.quick else 4096, lambda m, n: e2e.train_call(m, device, 1, n)),
    ):
        for v in variants:
            call = make(models[v], n)
            try:
                with peak_memory(device) as mem:
                    seconds = median_time(call, device, warmup=2, reps=5)
            except torch.OutOfMemoryError:  # eager's 32 x S^2 scores beside four 1.1B models on 80 GB
                free(device)
                skipped = {"tok_s": None, "skipped": "out of memory"}
                rows.append({"scenario": f"{name} {n}", "variant": v, **skipped})
                continue
            rows.append({"scenario": f"{name} {n}", "variant": v, "tok_s": n / seconds, **mem})
    by = {(r["scenario"], r["variant"]): r["tok_s"] for r in rows}
    lines = [
        "| scenario | " + " | ".join(variants) + " | shim / sdpa | shim / eager | shim / shim:sdpa |",
        "|---" * (len(variants) + 4) + "|",
    ]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        values = [by[(scenario, v)] for v in variants]
        shim = by[(scenario, "shim")]
        lines.append(
            f"| {scenario} | "
            + " | ".join("OOM (skipped)" if x is None else f"{x:,.0f}" for x in values)
            + f" | {ratio(shim, by[(scenario, 'sdpa')])} | {ratio(shim, by[(scenario, 'eager')])}"
            + f" | {ratio(shim, by[(scenario, 'shim:sdpa')])} |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=src python bench/dense_check.py " + " ".join(argv or sys.argv[1:])
    report = {"command": command, "environment": environment(device), "implementations": implementations}
    (out / "dense_check.json").write_text(json.dumps({**report, "rows": rows}, indent=1))
    (out / "dense_check.md").write_text(f"`{command}` (tok/s)\n\nconfigs: {implementations}\n\n{table}\n")
    print(table, flush=True)
    print(f"dense_check done at {time.strftime('%H:%M:%S')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
