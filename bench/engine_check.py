"""GPU check of the runtime varlen engine: every CUDA route's numbers, then a timing table.

Usage: ``PYTHONPATH=src python bench/engine_check.py --out DIR`` on a CUDA machine (under 4 minutes on
one H200). Part 1 prints PASS/FAIL per (route, case, dtype) against a float64 reference, forward and
backward, plus bit-identical backward with ``deterministic=True``. Part 2 times forward+backward of
packed rows (GQA 32/4, d64, bf16, causal) per route and for the engine's own choice, with a dense
block-mask SDPA call as the baseline where it fits, and writes ``engine_check.md`` and
``engine_check.json`` into DIR. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdpa_shim._runtime import kernels, varlen
from sdpa_shim._runtime.varlen import route_for, varlen_attention

DEV = "cuda"
H, HK, D = 32, 4, 64


def reference(q, k, v, cu_q, cu_k, *, causal=False, window=(-1, -1), max_k=None):
    """float64 per-sequence softmax; out (Tq, H, D), zeros outside the sequences."""
    q, k, v = q.double(), k.double(), v.double()
    h, hk = q.shape[1], k.shape[1]
    limit = max_k or max(b - a for a, b in itertools.pairwise(cu_k))
    left, right = window
    right = 0 if causal else right
    left = -1 if left < 0 or left >= limit else left
    right = -1 if right < 0 or right >= limit else right
    outs = []
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b] : cu_q[b + 1]]
        ks = k[cu_k[b] : cu_k[b + 1]].repeat_interleave(h // hk, 1)
        vs = v[cu_k[b] : cu_k[b + 1]].repeat_interleave(h // hk, 1)
        lq, lk = qs.shape[0], ks.shape[0]
        s = torch.einsum("ihd,jhd->hij", qs, ks) * q.shape[-1] ** -0.5
        diag = torch.arange(lq, device=q.device).view(-1, 1) + lk - lq
        j = torch.arange(lk, device=q.device).view(1, -1)
        ok = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if right >= 0:
            ok &= j <= diag + right
        if left >= 0:
            ok &= j >= diag - left
        row_ok = ok.any(-1)
        s = s.masked_fill(~(ok | ~row_ok.view(-1, 1)), -math.inf)
        p = torch.softmax(s, -1) * row_ok.view(1, -1, 1)
        outs.append(torch.einsum("hij,jhd->ihd", p, vs))
    outs.append(q.new_zeros(q.shape[0] - cu_q[-1], h, v.shape[-1]))
    return torch.cat(outs)


def _cu(lengths: list[int]) -> list[int]:
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


def _split(total: int, n: int, gen: torch.Generator) -> list[int]:
    """n random document lengths (>= 1) summing to total."""
    if n == 1:
        return [total]
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: n - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


# --------------------------------------------------------------------------- part 1: correctness

CASES: dict[str, dict[str, Any]] = {
    "causal self": {"lq": [300, 1, 77, 128, 40], "lk": None, "kw": {"causal": True}},
    "window (64,0)": {"lq": [300, 1, 77, 128, 40], "lk": None, "kw": {"causal": True, "window": (64, 0)}},
    "window (16,16)": {"lq": [300, 1, 77, 128, 40], "lk": None, "kw": {"window": (16, 16)}},
    "cu_q != cu_k causal": {"lq": [1, 16, 200, 3], "lk": [250, 16, 220, 90], "kw": {"causal": True}},
    "uniform causal": {"lq": [128] * 6, "lk": None, "kw": {"causal": True}},
    "trailing rows": {"lq": [50, 0, 90], "lk": None, "kw": {"causal": True}, "extra_q": 7},
}


def check_case(route: str, name: str, case: dict[str, Any], dtype: torch.dtype, paged: int) -> str:
    lq = case["lq"]
    lk = case["lk"] or lq
    extra_q = case.get("extra_q", 0)
    q = torch.randn(sum(lq) + extra_q, H, D, device=DEV)
    k, v = torch.randn(sum(lk), HK, D, device=DEV), torch.randn(sum(lk), HK, D, device=DEV)
    cu_q = torch.tensor(_cu(lq), device=DEV, dtype=torch.int32)
    cu_k = cu_q if case["lk"] is None else torch.tensor(_cu(lk), device=DEV, dtype=torch.int32)
    kw = dict(case["kw"])
    xs = [x.to(dtype).detach().clone().requires_grad_() for x in (q, k, v)]
    kk, vv, extra = xs[1], xs[2], {}
    if paged:
        kk, vv, table = _to_pages(xs[1], xs[2], lk, paged)
        extra["block_table"] = table
    with varlen.force_route(route):
        got_route = route_for(xs[0], kk, vv, cu_q, cu_k, max(lq), max(lk), **kw, **extra)
        out = varlen_attention(xs[0], kk, vv, cu_q, cu_k, max(lq), max(lk), **kw, **extra)
    assert got_route == route
    grad = torch.randn_like(out, dtype=torch.float32)
    out.float().backward(grad)
    xr = [x.detach().double().requires_grad_() for x in xs]  # the rounded inputs the engine saw
    ref = reference(*xr, _cu(lq), _cu(lk), max_k=max(lk), **kw)
    ref.backward(grad.double())
    worst = _rel_err(out, ref)
    for mine, theirs in zip(xs, xr, strict=True):
        worst = max(worst, _rel_err(mine.grad, theirs.grad))
    limit = 2e-2 if dtype != torch.float32 else 1e-4
    return "PASS" if worst <= limit else f"FAIL (max error / max |ref| = {worst:.2e} > {limit:.0e})"


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error scaled by the reference's largest magnitude (bf16 keeps ~3 significant digits)."""
    got, ref = got.detach().double(), ref.detach()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


def _to_pages(k, v, lk: list[int], page: int):
    """Shuffled pages holding the packed keys (differentiable: built with index ops)."""
    per = [max(1, -(-n // page)) for n in lk]
    n_pages = sum(per) + 5
    order = torch.randperm(n_pages)[: sum(per)].tolist()
    table = torch.zeros(len(lk), max(per), dtype=torch.int32)
    rows = torch.full((n_pages * page,), -1, dtype=torch.long)
    start, used = 0, 0
    for b, n in enumerate(lk):
        for j in range(per[b]):
            table[b, j] = order[used]
            take = min(page, n - j * page)
            if take > 0:
                rows[order[used] * page : order[used] * page + take] = torch.arange(take) + start + j * page
            used += 1
        start += n
    src = rows.clamp(min=0).to(DEV)
    keep = (rows >= 0).to(DEV).view(-1, 1, 1)
    kp = torch.where(keep, k.index_select(0, src), 0).view(n_pages, page, *k.shape[1:])
    vp = torch.where(keep, v.index_select(0, src), 0).view(n_pages, page, *v.shape[1:])
    return kp, vp, table.to(DEV)


def check_deterministic(route: str, dtype: torch.dtype) -> str:
    lens = [300, 1, 77, 128, 40]
    q = torch.randn(sum(lens), H, D, device=DEV, dtype=dtype)
    k = torch.randn(sum(lens), HK, D, device=DEV, dtype=dtype)
    v = torch.randn(sum(lens), HK, D, device=DEV, dtype=dtype)
    cu = torch.tensor(_cu(lens), device=DEV, dtype=torch.int32)
    grad = torch.randn_like(q)
    first = None
    for _ in range(20):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        with varlen.force_route(route):
            out = varlen_attention(*xs, cu, cu, 300, 300, causal=True, deterministic=True)
        out.backward(grad)
        grads = [x.grad for x in xs]
        if first is None:
            first = grads
        elif not all(torch.equal(a, b) for a, b in zip(grads, first, strict=True)):
            return "FAIL (gradients differ between runs)"
    return "PASS"


def part1() -> tuple[list[dict[str, Any]], bool]:
    rows, ok = [], True
    has_varlen = kernels.features().varlen_attn is not None and DEV == "cuda"
    plan = []
    for dtype in (torch.bfloat16, torch.float32):
        routes = ["bucketed_sdpa", "bucketed_explicit", "uniform_sdpa"]
        if dtype != torch.float32 and has_varlen:
            routes.insert(0, "varlen_attn")
        for route in routes:
            for name, case in CASES.items():
                if route.startswith("uniform") != (name == "uniform causal"):
                    continue
                for paged in (0, 48) if name == "cu_q != cu_k causal" else (0,):
                    plan.append((route, name, case, dtype, paged))
    for route, name, case, dtype, paged in plan:
        torch.manual_seed(0)
        label = f"{name}{' paged(48)' if paged else ''}"
        try:
            status = check_case(route, name, case, dtype, paged)
        except Exception as exc:
            status = f"FAIL ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ok &= status == "PASS"
        rows.append({"route": route, "case": label, "dtype": str(dtype).split(".")[-1], "status": status})
        print(f"{status[:4]}  {route:18s} {label:28s} {rows[-1]['dtype']:9s} {status[5:]}", flush=True)
    for route in (["varlen_attn"] if has_varlen else []) + ["bucketed_sdpa", "bucketed_explicit"]:
        try:
            status = check_deterministic(route, torch.bfloat16)
        except Exception as exc:
            status = f"FAIL ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ok &= status == "PASS"
        rows.append({"route": route, "case": "deterministic bwd x20", "dtype": "bfloat16", "status": status})
        print(f"{status[:4]}  {route:18s} {'deterministic bwd x20':28s} bfloat16  {status[5:]}", flush=True)
    return rows, ok


# --------------------------------------------------------------------------- part 2: timing


def _time(fn, iters: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _dense_block_mask(q, k, v, lens: list[int]):
    """The T x T baseline: one SDPA call with a block-diagonal causal mask (what transformers' sdpa does)."""
    doc = torch.repeat_interleave(torch.arange(len(lens), device=DEV), torch.tensor(lens, device=DEV))
    t = q.shape[0]
    pos = torch.arange(t, device=DEV)
    mask = (doc.view(-1, 1) == doc.view(1, -1)) & (pos.view(1, -1) <= pos.view(-1, 1))
    kk = k.repeat_interleave(H // HK, 1).transpose(0, 1).unsqueeze(0)
    vv = v.repeat_interleave(H // HK, 1).transpose(0, 1).unsqueeze(0)
    return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kk, vv, attn_mask=mask)


def part2(deadline: float) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    routes = (["varlen_attn"] if kernels.features().varlen_attn is not None else []) + [
        "bucketed_sdpa",
        "bucketed_explicit",
    ]
    for total in (4096, 16384):
        for docs in (1, 8, 64, 256, 1024):
            lens = _split(total, docs, gen)
            cu = torch.tensor(_cu(lens), device=DEV, dtype=torch.int32)
            q = torch.randn(total, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(total, HK, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(total, HK, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn_like(q)
            row: dict[str, Any] = {"tokens": total, "docs": docs, "max_len": max(lens)}
            row["engine_route"] = route_for(q, k, v, cu, cu, max(lens), max(lens), causal=True)

            def step(route: str | None, q=q, k=k, v=v, cu=cu, lens=lens, grad=grad) -> None:
                if route is None:
                    out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True)
                else:
                    with varlen.force_route(route):
                        out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True)
                out.backward(grad)

            for route in [*routes, None]:
                key = route or "engine"
                scores = sum(n * n for n in lens) * H * 4 * 3  # fp32 scores, probs, grad
                if route == "bucketed_explicit" and scores > 24e9:
                    row[key] = None
                    continue
                if time.monotonic() > deadline:
                    row[key] = None
                    continue
                try:
                    row[key] = round(_time(lambda route=route, step=step: step(route)), 3)
                except torch.OutOfMemoryError:
                    row[key] = "OOM"
                torch.cuda.empty_cache()
            if total <= 16384 and time.monotonic() < deadline:
                try:

                    def dense(q=q, k=k, v=v, lens=lens, grad=grad) -> None:
                        _dense_block_mask(q, k, v, lens).squeeze(0).transpose(0, 1).backward(grad)

                    row["dense_block_mask"] = round(_time(dense, iters=3, warmup=1), 3)
                except torch.OutOfMemoryError:
                    row["dense_block_mask"] = "OOM"
                torch.cuda.empty_cache()
            print(f"timing {row}", flush=True)
            rows.append(row)
    return rows


def markdown(check_rows: list[dict[str, Any]], time_rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Varlen engine check ({torch.__version__}, {torch.cuda.get_device_name()})",
        "",
        "## Correctness (vs float64 reference, forward + backward)",
        "",
        "| route | case | dtype | status |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['route']} | {r['case']} | {r['dtype']} | {r['status']} |" for r in check_rows]
    cols = [c for c in ("varlen_attn", "bucketed_sdpa", "bucketed_explicit", "engine", "dense_block_mask")
            if any(c in r for r in time_rows)]  # fmt: skip
    lines += [
        "",
        "## Forward + backward, ms (GQA 32/4, d64, bf16, causal)",
        "",
        "| tokens | docs | max len | engine picks | " + " | ".join(cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for r in time_rows:
        cells = ["-" if r.get(c) is None else str(r[c]) for c in cols]
        lines.append(
            f"| {r['tokens']} | {r['docs']} | {r['max_len']} | {r['engine_route']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop timing after this many seconds")
    parser.add_argument("--cpu-smoke", action="store_true", help="part 1 only, on CPU (checks this script)")
    args = parser.parse_args()
    if args.cpu_smoke:
        global DEV
        DEV = "cpu"
        return 0 if part1()[1] else 1
    if not torch.cuda.is_available():
        print("engine_check needs a CUDA device", file=sys.stderr)
        return 2
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    f = kernels.features()
    print(f"torch {torch.__version__}; varlen_attn params: {sorted(f.varlen_params)}", flush=True)
    check_rows, ok = part1()
    time_rows = part2(began + args.budget_s)
    (args.out / "engine_check.md").write_text(markdown(check_rows, time_rows))
    payload = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "checks": check_rows,
               "timings_ms": time_rows, "all_pass": ok}  # fmt: skip
    (args.out / "engine_check.json").write_text(json.dumps(payload, indent=2))
    print(markdown(check_rows, time_rows))
    print(f"{'ALL PASS' if ok else 'SOME CHECKS FAILED'} in {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
