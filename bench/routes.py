"""Per-call routes of served models against plain "sdpa" and eager, all in one process (issue 18).

Usage::

    PYTHONPATH=src python bench/routes.py --out DIR [--only generate,prefill,crossover] [--budget-s 420]
    PYTHONPATH=src python bench/routes.py --out DIR --smoke     # tiny, on the CPU: checks the script

A random-init Llama of TinyLlama's shape (1.1B, 22 layers, 32/4 heads, bf16 on CUDA; a 4-layer,
256-wide one in float32 on the CPU). Variants, identical weights: ``eager``, ``sdpa`` (plain, the shim
not involved), ``shim`` (a flash_attention_2 request served by the shim: per-call routes), and
``shim:flash_code`` (the same model with every call sent to transformers' flash code, the previous
round's behaviour, for the before/after). Rounds interleave the variants (order alternating).

Sections:

- ``generate``: 8 left-padded rows of 128..1024 tokens + 64 new, greedy; "warm" repeats the same
  lengths, "cold" uses lengths no earlier call used (new SDPA/cuDNN shapes at every step).
- ``prefill``: 8 right-padded rows up to 2048 tokens (forward, logits of the last token), and one
  dense 4k row.
- ``crossover``: padded prefill of 8 x L rows with a share of padding, the shim's two padded routes
  forced (masked SDPA vs unpadded varlen): where the rule in ``sdpa_shim._runtime.routes`` switches.

Writes ``DIR/routes.json`` and ``DIR/routes.md`` after every case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

import sdpa_shim  # noqa: E402  (activates the shim before transformers is imported)
from sdpa_shim._runtime import routes as _routes  # noqa: E402

STARTED = time.monotonic()
FULL = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=8192,
)  # fmt: skip
CPU = dict(
    vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
)  # fmt: skip
VARIANTS = {"eager": "eager", "sdpa": "sdpa", "shim": "flash_attention_2", "shim:flash_code": None}


@contextlib.contextmanager
def forced(route: _routes.Route | None) -> Iterator[None]:
    """Every call of a served model takes ``route`` (None: the rule decides)."""
    original = _routes.choose
    if route is not None:
        _routes.choose = lambda facts: route  # type: ignore[assignment]
    try:
        yield
    finally:
        _routes.choose = original  # type: ignore[assignment]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def build(request: str, device: str, shape: dict[str, int], state: dict[str, Any] | None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), attn_implementation=request, dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def padded_batch(lengths: list[int], vocab: int, device: str, left: bool) -> tuple[Any, Any]:
    longest = max(lengths)
    ids = torch.randint(100, vocab, (len(lengths), longest), device=device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[row, longest - n :] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


class Bench:
    def __init__(self, out: Path, device: str, smoke: bool, budget_s: float) -> None:
        self.out, self.device, self.smoke, self.budget_s = out, device, smoke, budget_s
        self.shape = CPU if device == "cpu" else FULL
        if smoke:
            self.shape = {**CPU, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
        self.results: dict[str, Any] = {"command": " ".join(sys.argv), "environment": _environment(device)}
        self.rows: list[dict[str, Any]] = []
        self.results["rows"] = self.rows
        base = build("sdpa", device, self.shape, None)
        state = base.state_dict()
        self.models = {"sdpa": base}
        self.models["eager"] = build("eager", device, self.shape, state)
        self.models["shim"] = build("flash_attention_2", device, self.shape, state)
        self.models["shim:flash_code"] = self.models["shim"]

    def over_budget(self) -> bool:
        return time.monotonic() - STARTED > self.budget_s

    def case(self, name: str, detail: str, variants: list[str], measure: Callable[[str], float], unit: str,
             rounds: int) -> None:  # fmt: skip
        if self.over_budget():
            self.rows.append({"case": name, "detail": detail, "skipped": "time budget"})
            return
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                route = _routes.Route.FLASH_CODE if v == "shim:flash_code" else None
                try:
                    with forced(route):
                        samples[v].append(measure(v))
                except torch.OutOfMemoryError:
                    samples[v].append(float("nan"))
                    torch.cuda.empty_cache()
        row = {"case": name, "detail": detail, "unit": unit}
        for v, values in samples.items():
            row[v] = statistics.median(values)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "routes.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "routes.md").write_text(markdown(self.results))


def run_generate(b: Bench) -> None:
    n_rows, new = (2, 4) if b.smoke else (8, 64)
    lengths = [8, 16] if b.smoke else [128 * (i + 1) for i in range(n_rows)]
    variants = ["eager", "sdpa", "shim", "shim:flash_code"]
    fresh = iter(range(8, 10_000, 72))
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    vocab = b.shape["vocab_size"]
    for v in variants:  # warm-up at throwaway lengths
        ids, mask = padded_batch([5, 9] * (n_rows // 2), vocab, b.device, left=True)
        with torch.no_grad(), forced(_routes.Route.FLASH_CODE if v == "shim:flash_code" else None):
            b.models[v].generate(
                input_ids=ids, attention_mask=mask, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4}
            )
    warm = padded_batch(lengths, vocab, b.device, left=True)

    def tok_s(v: str, batch: tuple[Any, Any]) -> float:
        ids, mask = batch
        with torch.no_grad():
            return (
                n_rows
                * new
                / seconds(lambda: b.models[v].generate(input_ids=ids, attention_mask=mask, **gen), b.device)
            )

    def warm_measure(v: str) -> float:
        tok_s(v, warm)
        return tok_s(v, warm)

    def cold_measure(v: str) -> float:
        shift = next(fresh)
        return tok_s(v, padded_batch([n + shift for n in lengths], vocab, b.device, left=True))

    detail = f"{n_rows} left-padded rows {lengths[0]}..{lengths[-1]} + {new} new"
    b.case("padded generate warm", detail, variants, warm_measure, "tok/s", 1 if b.smoke else 3)
    b.case(
        "padded generate cold", detail + ", new lengths", variants, cold_measure, "tok/s", 1 if b.smoke else 3
    )


def run_prefill(b: Bench) -> None:
    longest = 32 if b.smoke else 2048
    n_rows = 8
    lengths = [longest * (i + 1) // n_rows for i in range(n_rows)]
    variants = ["eager", "sdpa", "shim", "shim:flash_code"]
    ids, mask = padded_batch(lengths, b.shape["vocab_size"], b.device, left=False)

    def padded(v: str) -> float:
        with torch.no_grad():
            call = lambda: b.models[v](input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)  # noqa: E731
            call()
            return sum(lengths) / statistics.median(seconds(call, b.device) for _ in range(3))

    b.case("padded prefill", f"{n_rows} right-padded rows {lengths[0]}..{longest}", variants, padded, "tok/s",
           1 if b.smoke else 3)  # fmt: skip
    n = 64 if b.smoke else 4096
    dense_ids = torch.randint(100, b.shape["vocab_size"], (1, n), device=b.device)

    def dense(v: str) -> float:
        with torch.no_grad():
            call = lambda: b.models[v](input_ids=dense_ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            call()
            return n / statistics.median(seconds(call, b.device) for _ in range(3))

    b.case("dense prefill", f"1 row of {n}", variants, dense, "tok/s", 1 if b.smoke else 3)


def run_crossover(b: Bench) -> None:
    """Masked SDPA vs unpadded varlen for padded prefill: share of padding x row length."""
    variants = ["sdpa", "shim:padded_sdpa", "shim:padded_varlen"]
    routes = {
        "shim:padded_sdpa": _routes.Route.PADDED_SDPA,
        "shim:padded_varlen": _routes.Route.PADDED_VARLEN,
    }
    for length in (32,) if b.smoke else (256, 1024, 2048):
        for share in (0.1, 0.25, 0.5):
            n_rows = 8
            # rows from (1 - 2 * share) * length to length, evenly: mean padding = share
            lengths = [
                max(1, round(length * (1 - 2 * share * (n_rows - 1 - i) / (n_rows - 1))))
                for i in range(n_rows)
            ]
            ids, mask = padded_batch(lengths, b.shape["vocab_size"], b.device, left=False)

            def measure(v: str, ids: Any = ids, mask: Any = mask, lengths: list[int] = lengths) -> float:
                model = b.models["shim" if v.startswith("shim") else v]
                with torch.no_grad(), forced(routes.get(v)):
                    call = lambda: model(  # noqa: E731
                        input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1
                    )
                    call()
                    return sum(lengths) / statistics.median(seconds(call, b.device) for _ in range(3))

            detail = f"8 rows, longest {length}, padding {share:.0%}"
            b.case(
                f"crossover {length} / {share:.0%}", detail, variants, measure, "tok/s", 1 if b.smoke else 2
            )


SECTIONS = {"generate": run_generate, "prefill": run_prefill, "crossover": run_crossover}


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# Per-call routes ({env.get('gpu', 'cpu')})", "", f"`{results['command']}`", "",
             "```", json.dumps(env), "```", ""]  # fmt: skip
    for row in results["rows"]:
        if "skipped" in row:
            lines.append(f"- {row['case']}: skipped ({row['skipped']})")
            continue
        values = {k: v for k, v in row.items() if k not in ("case", "detail", "unit")}
        ref = values.get("sdpa")
        cells = ", ".join(
            f"{k} {v:,.0f}" + (f" ({v / ref:.2f}x sdpa)" if ref and k != "sdpa" else "")
            for k, v in values.items()
        )
        lines.append(f"- **{row['case']}** ({row['detail']}), {row['unit']}: {cells}")
    return "\n".join(lines) + "\n"


def _environment(device: str) -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if not sdpa_shim.is_active():
        raise SystemExit("sdpa_shim is not active (SDPA_SHIM=0?)")
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, device, args.smoke, args.budget_s)
    for name in args.only.split(","):
        SECTIONS[name](bench)
    bench.write()
    print(markdown(bench.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
