"""Run the benchmark suite: ``python bench/run.py`` on a CUDA machine (``--quick --device cpu`` to check it).

Writes ``<out>/<date>-<gpu>.json`` (every number), ``.md`` (the tables) and ``.png`` (the plot),
and prints the tables. Sections: kernels (a), e2e (b), overhead (c), varlen (d).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))

import sdpa_shim  # noqa: E402  (activates the shim before transformers is imported)

SECTIONS = ("overhead", "varlen", "kernels", "census", "e2e")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the scripts, measures nothing"
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the json/md/png")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdpa_shim").setLevel(logging.ERROR)  # the downgrade WARNING, once per model built
    os.environ.pop("SDPA_SHIM_BACKEND", None)
    if not sdpa_shim.is_active():
        raise SystemExit("sdpa_shim is not active (SDPA_SHIM=0?)")

    from _common import environment

    results: dict = {
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(device),
        "quick": args.quick,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = results["environment"].get("gpu", "cpu")
    stem = f"{datetime.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}"
    if args.quick:
        stem += "-quick"
    start = time.perf_counter()
    for section in args.only.split(","):
        if section not in SECTIONS:
            raise SystemExit(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        # bench/kernels.py would shadow the ``kernels`` package transformers 5.25 imports: kernel_grid
        module = __import__("kernel_grid" if section == "kernels" else section)
        results[section] = module.run(device, args.quick)
        results[f"{section}_s"] = time.perf_counter() - t0
        print(f"== {section}: {results[f'{section}_s']:.0f} s", flush=True)
        results["wall_s"] = time.perf_counter() - start
        (out / f"{stem}.json").write_text(
            json.dumps(results, indent=1, default=str)
        )  # partial results survive

    import report

    text = report.markdown(results)
    (out / f"{stem}.md").write_text(text)
    png = report.plot(results, str(out / f"{stem}.png"))
    print(text)
    print(f"wrote {out / stem}.json, .md{', .png' if png else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
