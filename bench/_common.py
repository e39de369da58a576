"""Timing, memory and environment helpers shared by the benchmark sections."""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch


class Skip(Exception):
    """A measurement that is not run (too big for the device, backend unavailable, ...)."""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], device: str, warmup: int = 2, reps: int = 5, inner: int = 1) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls: CUDA events on the GPU, perf_counter on the CPU.

    ``inner`` calls run back to back between two events, so the host can queue work ahead of the GPU
    (the launch latency of a short kernel is then not counted, as in a model's steady state)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall_time(fn: Callable[[], Any], device: str) -> float:
    """Seconds for one call, host clock, synchronised on both sides (cold-shape and generate timings)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def loop_time(fn: Callable[[], Any], device: str, calls: int, rounds: int = 5) -> float:
    """Median seconds per call over ``rounds`` loops of ``calls`` back-to-back calls (launch-bound work)."""
    fn()
    sync(device)
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Yields a dict that gets ``peak_gib``: the peak allocated above what was allocated on entry."""
    box: dict[str, float] = {}
    if device != "cuda":
        yield box
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield box
    torch.cuda.synchronize()
    box["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30


def attempt(record: dict[str, Any], device: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; failures become a ``status`` instead of ending the suite."""
    try:
        record.update(fn())
        record.setdefault("status", "ok")
    except Skip as exc:
        record["status"] = f"skipped: {exc}"
    except torch.OutOfMemoryError:
        record["status"] = "OOM"
        free(device)
    except Exception as exc:  # a backend that cannot serve this shape, etc.
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        record["status"] = f"error: {type(exc).__name__}: {first_line}"
        free(device)
    return record


def environment(device: str) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    try:
        import sdpa_shim

        info["sdpa_shim"] = sdpa_shim.__version__
    except Exception:  # pragma: no cover
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sdp_priority_order=list(getattr(torch._C, "_get_sdp_priority_order", list)()),
        )
        with suppress(Exception):
            info["flash_version"] = torch.nn.attention._get_flash_version()
    try:
        import flash_attn  # noqa: F401

        info["flash_attn"] = "importable"
    except Exception as exc:
        info["flash_attn"] = f"not usable ({type(exc).__name__})"
    return info
