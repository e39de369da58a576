"""Markdown tables, target checks and the PNG plot, from the results dict ``run.py`` writes."""

from __future__ import annotations

from typing import Any

E2E_VARIANTS = ("eager", "sdpa", "shim", "shim:flash", "shim:cudnn", "shim:efficient", "shim:nopack")
PINS = ("shim:flash", "shim:cudnn", "shim:efficient")
STEADY = ("prefill", "padded prefill", "train", "packed train")


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cell(row: dict[str, Any] | None, key: str, digits: int = 0) -> str:
    if row is None:
        return "–"
    if row.get("status", "ok") != "ok":
        status = row["status"]
        return "OOM" if status == "OOM" else ("skip" if status.startswith("skipped") else "err")
    return _fmt(row.get(key), digits)


def e2e_index(rows: list[dict[str, Any]]) -> tuple[list[str], dict[tuple[str, str], dict[str, Any]]]:
    scenarios: list[str] = []
    index = {}
    for r in rows:
        if r.get("scenario") == "build":
            continue
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
        index[(r["scenario"], r["variant"])] = r
    return scenarios, index


def _ok(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or row.get("status", "ok") != "ok" or row.get(key) is None:
        return None
    return float(row[key])


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def e2e_tables(rows: list[dict[str, Any]]) -> str:
    scenarios, index = e2e_index(rows)
    header = ["scenario", *E2E_VARIANTS, "shim / eager", "shim / sdpa", "shim / best pin"]
    body = []
    for s in scenarios:
        body.append(
            [
                s,
                *[_cell(index.get((s, v)), "tok_s") for v in E2E_VARIANTS],
                _fmt_ratio(paired_ratio(index.get((s, "shim")), index.get((s, "eager")))),
                _fmt_ratio(paired_ratio(index.get((s, "shim")), index.get((s, "sdpa")))),
                _fmt_ratio(best_pin_ratio(index.get((s, "shim")), [index.get((s, p)) for p in PINS])),
            ]
        )
    out = (
        "Tokens per second, median over rounds (higher is better); shim / eager and shim / sdpa are the "
        "median of per-round ratios (the variants run back to back within a round):\n\n"
        + _table(header, body)
    )
    mem_rows = [
        [s, *[_cell(index.get((s, v)), "peak_gib", 2) for v in E2E_VARIANTS]]
        for s in scenarios
        if any(_ok(index.get((s, v)), "peak_gib") is not None for v in E2E_VARIANTS)
    ]
    out += "\n\nPeak GPU memory above the loaded model, GiB:\n\n" + _table(
        ["scenario", *E2E_VARIANTS], mem_rows
    )
    return out


def paired_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Median over rounds of a/b tok/s, pairing the two variants' samples of the same round."""
    if a is None or b is None or a.get("status") != "ok" or b.get("status") != "ok":
        return None
    ra, rb = a.get("rounds"), b.get("rounds")
    if not ra or not rb or len(ra) != len(rb):
        return _ok(a, "tok_s") / _ok(b, "tok_s") if _ok(b, "tok_s") else None  # type: ignore[operator]
    ratios = sorted(x / y for x, y in zip(ra, rb, strict=True))
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def best_pin_ratio(shim: dict[str, Any] | None, pins: list[dict[str, Any] | None]) -> float | None:
    """Median over rounds of shim / (best pinned backend in the same round)."""
    ok = [p for p in pins if p is not None and p.get("status") == "ok" and p.get("rounds")]
    if shim is None or shim.get("status") != "ok" or not ok or not shim.get("rounds"):
        return None
    n = len(shim["rounds"])
    if any(len(p["rounds"]) != n for p in ok):
        return shim["tok_s"] / max(p["tok_s"] for p in ok)
    ratios = sorted(shim["rounds"][i] / max(p["rounds"][i] for p in ok) for i in range(n))
    mid = n // 2
    return ratios[mid] if n % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def targets(results: dict[str, Any]) -> list[str]:
    """The three targets of issue 6, checked from this run's numbers."""
    rows = results.get("e2e", [])
    _, index = e2e_index(rows)
    lines = []

    def tok(s: str, v: str) -> float | None:
        return _ok(index.get((s, v)), "tok_s")

    g = {v: index.get(("generate cold", v)) for v in ("shim", "sdpa", "eager")}
    vs_sdpa_cold, vs_eager_cold = paired_ratio(g["shim"], g["sdpa"]), paired_ratio(g["shim"], g["eager"])
    if vs_sdpa_cold is not None and vs_eager_cold is not None:
        ok = vs_sdpa_cold >= 3 and vs_eager_cold >= 1
        lines.append(
            f"cold generate: shim {tok('generate cold', 'shim'):.0f} tok/s = {vs_sdpa_cold:.2f}x plain sdpa, "
            f"{vs_eager_cold:.2f}x eager (target >= 3x and >= 1x): {'MET' if ok else 'NOT MET'}"
        )
    worst = []
    for (s, v), r in index.items():
        if v != "shim" or not s.startswith(STEADY):
            continue
        ratio = best_pin_ratio(r, [index.get((s, p)) for p in PINS])
        if ratio is not None:
            worst.append((ratio, s))
    if worst:
        ratio, s = min(worst)
        lines.append(
            f"steady shapes: worst shim / best single backend = {ratio:.3f} ({s}) (target >= 0.95): "
            f"{'MET' if ratio >= 0.95 else 'NOT MET'}"
        )
    vs_sdpa = []
    for (s, v), r in index.items():
        if v == "shim" and (ratio := paired_ratio(r, index.get((s, "sdpa")))) is not None:
            vs_sdpa.append((ratio, f"e2e {s}"))
    for r in results.get("kernels", {}).get("grid", []):
        if r["impl"] != "shim" or r.get("status") != "ok":
            continue
        default = next(
            (
                x
                for x in results["kernels"]["grid"]
                if x["impl"] == "default"
                and x.get("status") == "ok"
                and all(x[k] == r[k] for k in ("d", "hk", "causal", "seq", "mode"))
            ),
            None,
        )
        if "paired_vs_default" in r:
            vs_sdpa.append(
                (
                    r["paired_vs_default"],
                    f"kernel d{r['d']} hk{r['hk']} {'causal' if r['causal'] else 'full'} "
                    f"s{r['seq']} {r['mode']} (paired)",
                )
            )
        elif default:
            vs_sdpa.append(
                (
                    r["tflops"] / default["tflops"],
                    f"kernel d{r['d']} hk{r['hk']} {'causal' if r['causal'] else 'full'} "
                    f"s{r['seq']} {r['mode']}",
                )
            )
    if vs_sdpa:
        ratio, where = min(vs_sdpa)
        lines.append(
            f"vs plain sdpa everywhere: worst shim / sdpa = {ratio:.3f} ({where}) (target >= 0.95): "
            f"{'MET' if ratio >= 0.95 else 'NOT MET'}"
        )
    return lines


def kernel_tables(kernels: dict[str, Any]) -> str:
    from kernel_grid import IMPLS

    parts = []
    grid = kernels.get("grid", [])
    for mode in ("fwd", "fwd+bwd"):
        keys: list[tuple[Any, ...]] = []
        index = {}
        for r in grid:
            if r["mode"] != mode:
                continue
            key = (r["d"], r["h"], r["hk"], r["causal"], r["seq"], r["b"])
            if key not in keys:
                keys.append(key)
            index[(key, r["impl"])] = r
        body = []
        for key in keys:
            d, h, hk, causal, seq, b = key
            best = max(
                (
                    x
                    for i in ("flash", "efficient", "cudnn", "math")
                    if (x := _ok(index.get((key, i)), "tflops")) is not None
                ),
                default=None,
            )
            shim = _ok(index.get((key, "shim")), "tflops")
            body.append(
                [
                    str(d),
                    f"{h}/{hk}",
                    "yes" if causal else "no",
                    str(seq),
                    str(b),
                    *[_cell(index.get((key, i)), "tflops") for i in IMPLS],
                    _ratio(shim, _ok(index.get((key, "default")), "tflops")),
                    _fmt_ratio(index.get((key, "shim"), {}).get("paired_vs_default")),
                    _ratio(shim, best),
                ]
            )
        header = [
            "d",
            "heads q/kv",
            "causal",
            "seq",
            "batch",
            *IMPLS,
            "shim / default",
            "paired",
            "shim / best",
        ]
        parts.append(f"{mode}, TFLOP/s:\n\n" + _table(header, body))
    dec = kernels.get("decode", [])
    if dec:
        body = [
            [("padding mask" if r["masked"] else "no mask"), r["impl"], _cell(r, "us_per_call", 1)]
            for r in dec
        ]
        parts.append(
            "Decode step (8 rows x 1 query, 1000 keys, 32/4 heads, d64), µs per call, back-to-back "
            "(launch-bound, as in generate):\n\n" + _table(["mask", "impl", "µs/call"], body)
        )
    cold = kernels.get("cold", [])
    if cold:
        body = [
            [
                r["case"],
                r["impl"],
                f"{r['sq']}x{r['sk']}",
                _cell(r, "first_ms", 2),
                _cell(r, "second_ms", 2),
                _cell(r, "third_ms", 2),
                _cell(r, "steady_ms", 3),
            ]
            for r in cold
        ]
        parts.append(
            "New shapes: first, second and third call of a never-seen shape vs steady state, ms:\n\n"
            + _table(["case", "impl", "Sq x Sk", "1st", "2nd", "3rd", "steady"], body)
        )
    return "\n\n".join(parts)


def varlen_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        ref = next(
            (
                x
                for x in rows
                if x["impl"] == "SDPA flash per image"
                and x["segments"] == r["segments"]
                and x["mode"] == r["mode"]
            ),
            None,
        )
        body.append(
            [
                str(r["segments"]),
                r["impl"],
                r["mode"],
                _cell(r, "ms", 2),
                _cell(r, "peak_gib", 2),
                _ratio(_ok(r, "ms"), _ok(ref, "ms")),
                r.get("status", "ok"),
            ]
        )
    return _table(
        ["images", "impl", "mode", "ms", "peak extra GiB", "time / flash per image", "status"], body
    )


def overhead_table(over: dict[str, Any]) -> str:
    lines = []
    if "import_ms_median" in over:
        lines.append(
            f"- `import sdpa_shim`: {over['import_ms_median']:.1f} ms (median of fresh interpreters); "
            f"torch imported: {over['torch_imported']}"
        )
    if "hook_added_ms" in over:
        lines.append(
            f"- `from_pretrained` (tiny Llama, warm): shim off {over['off_sdpa_ms']:.1f} ms, shim on "
            f"{over['on_sdpa_ms']:.1f} ms (hook adds {over['hook_added_ms']:+.2f} ms), flash_attention_2 "
            f"downgraded {over['on_fa2_downgraded_ms']:.1f} ms ({over['downgrade_added_ms']:+.2f} ms)"
        )
    body = [
        [r["device"], r["shape"], r["path"], _cell(r, "us_per_call", 2)] for r in over.get("per_call", [])
    ]
    if body:
        lines.append(
            "\nPer attention call, back-to-back:\n\n" + _table(["device", "shape", "path", "µs/call"], body)
        )
    return "\n".join(lines)


def census_table(census: dict[str, Any]) -> str:
    if "counts" not in census:
        return census.get("note", "")
    body = [[c["variant"], c["stage"], c["call"], c["backend"], str(c["n"])] for c in census["counts"]]
    out = "SDPA calls by kernel torch picked:\n\n" + _table(
        ["variant", "stage", "call", "backend", "calls"], body
    )
    call = census.get("masked_decode_call")
    if call:
        out += "\n\nFirst masked decode call: " + ", ".join(f"{k}={v}" for k, v in call.items())
    replay = census.get("masked_decode_replay", [])
    if replay:
        rows = [[r["replay"], r.get("chosen", "–"), _cell(r, "us_per_call", 1)] for r in replay]
        out += "\n\nReplayed under each backend:\n\n" + _table(["flags", "torch picks", "µs/call"], rows)
    return out


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    parts = [
        f"# sdpa_shim benchmarks: {env.get('gpu', env['device'])}",
        "```\n" + "\n".join(f"{k}: {v}" for k, v in env.items()) + "\n```",
        f"command: `{results['command']}`  wall time: {results['wall_s']:.0f} s",
    ]
    if results.get("e2e"):
        parts += ["## Targets (issue 6)", "\n".join(f"- {line}" for line in targets(results))]
        parts += ["## End to end (1.1B Llama shape, bf16)", e2e_tables(results["e2e"])]
    if results.get("kernels"):
        parts += ["## Attention kernels", kernel_tables(results["kernels"])]
    if results.get("census"):
        parts += ["## Which kernel each call lands on", census_table(results["census"])]
    if results.get("varlen"):
        parts += ["## Packed vision attention (issue 4)", varlen_table(results["varlen"])]
    if results.get("overhead"):
        parts += ["## Overhead", overhead_table(results["overhead"])]
    return "\n\n".join(parts) + "\n"


def plot(results: dict[str, Any], path: str) -> str | None:
    """tok/s by scenario (end to end) and forward TFLOP/s by sequence length (kernels), one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6))
    scenarios, index = e2e_index(results.get("e2e", []))
    variants = ("eager", "sdpa", "shim")
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ys = [_ok(index.get((s, v)), "tok_s") or 0 for s in scenarios]
        left.bar([j + i * width for j in range(len(scenarios))], ys, width, label=v)
    left.set_xticks(
        [j + width for j in range(len(scenarios))], scenarios, rotation=40, ha="right", fontsize=8
    )
    left.set_yscale("log")
    left.set_ylabel("tokens / s (log)")
    left.set_title("End to end, 1.1B Llama shape")
    left.legend()
    grid = results.get("kernels", {}).get("grid", [])
    d = max((r["d"] for r in grid), default=0)
    target_d = 128 if any(r["d"] == 128 for r in grid) else d
    for impl in ("eager", "efficient", "flash", "cudnn", "default", "shim"):
        pts = sorted(
            (r["seq"], r["tflops"])
            for r in grid
            if r["impl"] == impl
            and r["mode"] == "fwd"
            and r["d"] == target_d
            and r["causal"]
            and r["h"] == r["hk"]
            and r.get("status") == "ok"
        )
        if pts:
            right.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linestyle="--" if impl == "shim" else "-",
                label=impl,
            )
    right.set_xscale("log", base=2)
    right.set_xlabel("sequence length (batch x seq = 16k tokens)")
    right.set_ylabel("TFLOP/s")
    right.set_title(f"Causal forward attention, head_dim {target_d}")
    right.legend()
    fig.suptitle(f"sdpa_shim on {results['environment'].get('gpu', results['environment']['device'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
