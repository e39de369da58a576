"""Packed (varlen) workloads end to end: the shim's flash path against plain sdpa and torch's varlen_attn.

Usage::

    PYTHONPATH=src python bench/varlen_suite.py --out DIR [--only packed,vision,cb] [--budget-s 480]
    PYTHONPATH=src python bench/varlen_suite.py --out DIR --smoke   # tiny, on the CPU: checks the script

Writes ``DIR/varlen_suite.json`` (every number, the command line, the environment) and
``DIR/varlen_suite.md`` (the tables) after every case, so a run cut short keeps what it measured, and
prints the tables at the end. Sections:

- ``packed``: padding-free training of a random-init 1.1B Llama (TinyLlama's shape): one forward +
  backward (no optimizer) on one packed row (16k tokens in 8 / 64 / 256 / 1,024 documents, 32k in 64),
  ``position_ids`` restarting per document, no attention mask. Variants (identical weights):
  ``plain_sdpa`` (shim off: transformers builds a dense block-diagonal mask), ``shim``
  (flash_attention_2 kept on transformers' flash path, run by the stand-in), ``shim_sdpa_downgrade``
  (``SDPA_SHIM_FALLBACK=sdpa``), ``varlen_reference`` (shim off; torch's ``varlen_attn`` registered
  as a custom attention function). tok/s (median of timed steps after a warm-up step), peak memory,
  the loss and layer 0's attention output against the reference (both must agree: with random weights
  the loss alone barely moves when attention crosses a document boundary; the attention output does).
- ``vision``: the Qwen2.5-VL-7B vision tower (random init, bf16, no grad) on 1 x 1344², 4 x 1344²,
  16 x 448² images; ``plain_sdpa`` (one SDPA call per image / window), ``shim``, ``varlen_reference``.
  ms per forward, peak memory, mean |out| and ||out - ref|| / ||ref||, attention calls per forward.
  The reference is registered as ``torch_varlen_flash``: the vision attention takes its cu_seqlens path
  only for names containing "flash" (it is loaded as ``torch_varlen`` and renamed in the config, since
  transformers' loader looks for a flash kernel behind such a name).
- ``cb``: ``generate_batch`` (continuous batching) of a small random Llama, 32 requests, 64 new tokens;
  ``plain_sdpa``, ``shim`` (transformers' default CB settings: CUDA graphs on for flash), and
  ``shim_no_cuda_graph``. Generated tokens/s (wall time of the whole call) and token agreement.
  Each call runs under a watchdog thread: a call that never returns ends the suite (results kept).

Variants of a case run interleaved (round-robin, order alternating between rounds). ``--budget-s``: no
new case starts after that many seconds from the start (rounds in progress stop ``GRACE_S`` later).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import inspect
import json
import logging
import math
import os
import shlex
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STARTED = time.monotonic()  # the budget counts from here: imports and CUDA start-up included
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("SDPA_SHIM_FALLBACK", None)  # each variant sets what it needs while it loads
os.environ.pop("SDPA_SHIM_BACKEND", None)

import torch  # noqa: E402

import sdpa_shim  # noqa: E402  (activates the shim before transformers is imported)

SECTIONS = ("packed", "vision", "cb")
GRACE_S = 40.0  # a case already running may overrun the budget by this much before its rounds stop
FALLBACK_ENV = "SDPA_SHIM_FALLBACK"
REF_NAME = "torch_varlen"  # the custom attention for Llama (causal, cu_seqlens from position_ids)
REF_FLASH_NAME = (
    "torch_varlen_flash"  # same function; "flash" in the name puts Qwen2.5-VL on its cu_seqlens path
)

try:
    from sdpa_shim._core.policy import FLASH_PATH
except Exception:  # pragma: no cover - older checkout
    FLASH_PATH = "transformers' flash path on PyTorch kernels"

LLAMA_FULL = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=32768,
)
LLAMA_SMOKE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)
CB_FULL = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=4096,
)
VISION_FULL = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
VISION_SMOKE = dict(
    VISION_FULL,
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    out_hidden_size=96,
    fullatt_block_indexes=[1],
)

log = logging.getLogger("varlen_suite")


# --------------------------------------------------------------------------- small helpers


class Budget:
    """Seconds since the process started; ``allows(need)``: a case that needs ``need`` seconds may start."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = STARTED, seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, need: float = 0.0) -> bool:
        return self.elapsed() + need <= self.seconds

    def overrun(self) -> bool:
        """Past the budget and its grace: rounds in progress stop."""
        return self.elapsed() > self.seconds + GRACE_S


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "OOM"
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {first}"


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def fallback_env(value: str | None) -> Iterator[None]:
    old = os.environ.pop(FALLBACK_ENV, None)
    if value is not None:
        os.environ[FALLBACK_ENV] = value
    try:
        yield
    finally:
        os.environ.pop(FALLBACK_ENV, None)
        if old is not None:
            os.environ[FALLBACK_ENV] = old


@contextlib.contextmanager
def shim_off() -> Iterator[None]:
    """Load with the shim deactivated (plain transformers), reactivate after."""
    sdpa_shim.deactivate()
    try:
        yield
    finally:
        sdpa_shim.activate()


def split_docs(total: int, n: int, gen: torch.Generator) -> list[int]:
    """n random document lengths (>= 1) summing to total."""
    if n == 1:
        return [total]
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: n - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def sci(x: Any) -> str:
    return "-" if x is None else f"{x:.1e}"


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}f}"
    return str(x)


# --------------------------------------------------------------------------- the reference attention


class VarlenReference:
    """``attn_implementation="torch_varlen"``: torch's ``varlen_attn`` as a transformers attention function.

    q/k/v come in as (B, H, T, D); sequences from ``cu_seq_lens_q/k`` when given (Qwen2.5-VL's vision
    attention), else from ``position_ids`` (a new sequence wherever it is 0), else one per row. Causal
    unless the call says ``is_causal=False`` (or the module's ``is_causal`` is False). Where
    ``varlen_attn`` cannot run (CPU: the smoke run) it is one SDPA call per sequence, labelled as such.
    """

    def __init__(self) -> None:
        self.fn: Callable[..., Any] | None = None
        self.params: frozenset[str] = frozenset()
        try:
            from torch.nn.attention.varlen import varlen_attn

            self.fn = varlen_attn
            self.params = frozenset(inspect.signature(varlen_attn).parameters)
        except Exception:
            pass
        self.repeat_kv = False  # set when this torch's varlen_attn refuses GQA and takes no enable_gqa
        self.backends: set[str] = set()
        self.last_sequences = 0  # sequences in the latest call (a check that the documents were seen)
        self._cache: tuple[Any, Any, int] | None = None  # (source tensor, cu int32, max len)

    def describe(self) -> str:
        if self.fn is None:
            return "torch has no torch.nn.attention.varlen.varlen_attn"
        return f"varlen_attn{inspect.signature(self.fn)}"

    def _bounds(
        self, query: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        b, _, t, _ = query.shape
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is not None:
            cu_k = cu_q if cu_k is None else cu_k
            max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
            if max_q is None:
                max_q = int((cu_q[1:] - cu_q[:-1]).max())
            if max_k is None:
                max_k = max_q if cu_k is cu_q else int((cu_k[1:] - cu_k[:-1]).max())
            return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
        pos = kwargs.get("position_ids")
        source = pos if pos is not None else query
        if self._cache is not None and self._cache[0] is source:
            return self._cache[1], self._cache[1], self._cache[2], self._cache[2]
        if pos is not None:
            flat = pos.reshape(-1)
            starts = torch.nonzero(flat == 0).flatten()
            if starts.numel() == 0 or int(starts[0]) != 0:
                starts = torch.cat([starts.new_zeros(1), starts])
            end = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
            cu = torch.cat([starts, end]).to(torch.int32)
        else:
            cu = torch.arange(0, b * t + 1, t, device=query.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        self._cache = (source, cu, max_len)  # the same position_ids object serves every layer of a forward
        return cu, cu, max_len, max_len

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        b, h, t, d = query.shape
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = getattr(module, "is_causal", True)
        cu_q, cu_k, max_q, max_k = self._bounds(query, kwargs)
        self.last_sequences = cu_q.numel() - 1
        q = query.transpose(1, 2).reshape(b * t, h, d)
        k = key.transpose(1, 2).reshape(b * key.shape[2], key.shape[1], key.shape[3])
        v = value.transpose(1, 2).reshape(b * value.shape[2], value.shape[1], value.shape[3])
        if self.uses_varlen_attn(q):
            out = self._varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling, bool(causal))
            self.backends.add("varlen_attn")
        else:
            out = self._per_sequence(q, k, v, cu_q, cu_k, scaling, bool(causal))
            self.backends.add("per-sequence SDPA loop (no varlen_attn here)")
        return out.reshape(b, t, h, -1), None

    def uses_varlen_attn(self, q: torch.Tensor) -> bool:
        """varlen_attn has CUDA kernels for fp16/bf16 only."""
        return self.fn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

    def _varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, scaling, causal) -> torch.Tensor:
        assert self.fn is not None
        kw: dict[str, Any] = {}
        if "scale" in self.params:
            kw["scale"] = scaling
        elif scaling is not None and not math.isclose(scaling, q.shape[-1] ** -0.5, rel_tol=1e-6):
            raise RuntimeError("this torch's varlen_attn takes no scale")
        if "window_size" in self.params:
            kw["window_size"] = (-1, 0) if causal else (-1, -1)  # a tuple: varlen_attn compares to (-1, 0)
        elif "is_causal" in self.params:
            kw["is_causal"] = causal
        gqa = q.shape[1] != k.shape[1]
        if gqa and "enable_gqa" in self.params:
            kw["enable_gqa"] = True
        elif gqa and self.repeat_kv:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        try:
            return self.fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
        except (RuntimeError, ValueError) as exc:
            if not gqa or self.repeat_kv or "enable_gqa" in self.params:
                raise
            log.warning("varlen_attn refused GQA (%s); repeating K/V heads from now on", exc)
            self.repeat_kv = True
            return self._varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling, causal)

    @staticmethod
    def _per_sequence(q, k, v, cu_q, cu_k, scaling, causal) -> torch.Tensor:
        bq, bk = cu_q.tolist(), cu_k.tolist()
        outs = []
        for i in range(len(bq) - 1):
            qs = q[bq[i] : bq[i + 1]].transpose(0, 1)[None]
            ks, vs = (x[bk[i] : bk[i + 1]].transpose(0, 1)[None] for x in (k, v))
            if ks.shape[1] != qs.shape[1]:
                ks, vs = (x.repeat_interleave(qs.shape[1] // x.shape[1], dim=1) for x in (ks, vs))
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scaling)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)


REFERENCE = VarlenReference()


def register_reference() -> tuple[bool, str]:
    """Register the reference under both names with transformers' registries; (ok, note)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import flash_attention_mask

        try:
            from transformers import AttentionMaskInterface
        except ImportError:
            from transformers.masking_utils import AttentionMaskInterface
        for name in (REF_NAME, REF_FLASH_NAME):
            AttentionInterface.register(name, REFERENCE)
            AttentionMaskInterface.register(name, flash_attention_mask)
        return True, f"registered {REF_NAME!r} and {REF_FLASH_NAME!r}: {REFERENCE.describe()}"
    except Exception as exc:
        return False, f"registration failed: {error_text(exc)}"


@contextlib.contextmanager
def count_attention_calls() -> Iterator[dict[str, int]]:
    """Count calls of every function fetched from transformers' attention registry, by name."""
    from transformers.modeling_utils import AttentionInterface

    counts: dict[str, int] = {}
    original = AttentionInterface.__getitem__

    def getitem(self: Any, key: str) -> Any:
        fn = original(self, key)
        if not callable(fn):
            return fn

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[key] = counts.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counted

    AttentionInterface.__getitem__ = getitem  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        AttentionInterface.__getitem__ = original  # type: ignore[method-assign]


HUNG = False  # a call that never returned (its thread is left behind): main exits hard after writing


def with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """Run ``fn`` in a thread; TimeoutError (and ``HUNG``) when it has not returned after ``seconds``."""
    global HUNG
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        HUNG = True
        raise TimeoutError(
            f"no return after {seconds:.0f} s (thread left behind; the suite stops after this)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


_STANDIN_COUNTS: list[dict[str, int]] = []  # the dict counting now (empty list: not counting)
_STANDIN_PATCHED: list[tuple[Any, str, Any]] = []


def install_standin_counters() -> str | None:
    """Wrap the flash_attn stand-in's kernels with pass-through counters, once; None or why not.

    transformers binds these functions when it (re)imports them, so the wrappers stay in place for the
    rest of the section: a wrapper bound by one run counts the next one too.
    """
    if _STANDIN_PATCHED:
        return None
    try:
        import sdpa_shim.standin as standin_pkg
        from sdpa_shim.standin import flash_attn_interface

        modules = [standin_pkg, flash_attn_interface, sys.modules.get("flash_attn")]
        names = {n: n for n in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache")}
        targets = [(m, names) for m in {id(m): m for m in modules if m is not None}.values()]
        # what transformers already bound (its lazy import keeps them until the implementation changes)
        bound = sys.modules.get("transformers.modeling_flash_attention_utils")
        if bound is not None:
            targets.append(
                (
                    bound,
                    {
                        "_flash_fn": "flash_attn_func",
                        "_flash_varlen_fn": "flash_attn_varlen_func",
                        "_flash_with_kvcache_fn": "flash_attn_with_kvcache",
                    },
                )
            )
        standin_fns = {id(getattr(standin_pkg, n, None)) for n in names} | {
            id(getattr(flash_attn_interface, n, None)) for n in names
        }
        for mod, attrs in targets:
            for attr, name in attrs.items():
                fn = getattr(mod, attr, None)
                if fn is None or getattr(fn, "_varlen_suite_counted", False):
                    continue
                if mod is bound and id(fn) not in standin_fns:
                    continue  # not the stand-in's (a real flash-attn or a hub kernel): left alone

                @functools.wraps(fn)
                def counted(*args: Any, _fn: Any = fn, _name: str = name, **kwargs: Any) -> Any:
                    if _STANDIN_COUNTS:
                        _STANDIN_COUNTS[-1][_name] = _STANDIN_COUNTS[-1].get(_name, 0) + 1
                    return _fn(*args, **kwargs)

                counted._varlen_suite_counted = True  # type: ignore[attr-defined]
                setattr(mod, attr, counted)
                _STANDIN_PATCHED.append((mod, attr, fn))
    except Exception as exc:  # counting is a diagnostic: never in the way
        return error_text(exc)
    return None


def remove_standin_counters() -> None:
    while _STANDIN_PATCHED:
        mod, attr, fn = _STANDIN_PATCHED.pop()
        if getattr(getattr(mod, attr, None), "_varlen_suite_counted", False):
            setattr(mod, attr, fn)


@contextlib.contextmanager
def count_standin_calls() -> Iterator[dict[str, int]]:
    counts: dict[str, int] = {}
    _STANDIN_COUNTS.append(counts)
    try:
        yield counts
    finally:
        _STANDIN_COUNTS.remove(counts)


# --------------------------------------------------------------------------- model building


def shim_facts(model_class: str, config: Any, chosen: str) -> dict[str, Any]:
    """The shim's record for a model just built: its decision for this class (``decisions()`` lists
    each distinct decision once, so a repeated load adds nothing: the latest match is taken) and the
    registry's mark on the config."""
    found = [
        d for d in sdpa_shim.decisions() if d.model == model_class and d.requested == "flash_attention_2"
    ]
    last = sdpa_shim.decisions()[-1] if sdpa_shim.decisions() else None
    match = next((d for d in reversed(found) if d.chosen == chosen), None)
    facts: dict[str, Any] = {
        "decision": match.chosen if match else (found[-1].chosen if found else None),
        "decisions_last_is_it": last is not None and last == match,
    }
    try:
        from sdpa_shim._integration import marks

        facts["registry_kind"] = marks.kind_of(config)
    except Exception as exc:  # pragma: no cover - internals moved
        facts["registry_kind"] = error_text(exc)
    return facts


def build(
    cls: Any, config: Any, variant_impl: str, device: str, dtype: torch.dtype, source: Any | None
) -> tuple[Any, dict[str, Any]]:
    """One model of a variant; weights copied from ``source`` when given. Returns (model, facts)."""
    facts: dict[str, Any] = {}
    torch.manual_seed(0)

    def make(impl: str) -> Any:  # a copy: _from_config writes the implementation into the config it gets
        with torch.device(device):
            return cls._from_config(copy.deepcopy(config), attn_implementation=impl, dtype=dtype)

    if variant_impl == "plain_sdpa":
        with shim_off():
            model = make("sdpa")
        expect = "sdpa"
    elif variant_impl in ("shim", "shim_sdpa_downgrade"):
        flash = variant_impl == "shim"
        with fallback_env(None if flash else "sdpa"):
            model = make("flash_attention_2")
        expect, chosen = ("flash_attention_2", FLASH_PATH) if flash else ("sdpa", "sdpa")
        facts.update(shim_facts(cls.__name__, model.config, chosen))
        if flash and facts["decision"] != chosen:
            raise RuntimeError(f"shim decision is {facts['decision']!r}, expected {chosen!r}")
    elif variant_impl in (REF_NAME, REF_FLASH_NAME):
        with shim_off():
            if variant_impl == REF_FLASH_NAME:
                try:  # transformers' loader preloads a flash kernel for names with "flash": it finds none
                    model = make(REF_FLASH_NAME)
                    facts["loaded_as"] = REF_FLASH_NAME
                except Exception as exc:
                    facts["load_with_flash_name"] = error_text(exc)
                    model = make(REF_NAME)
                    model.config._attn_implementation = REF_FLASH_NAME  # renamed after loading
                    facts["loaded_as"] = f"{REF_NAME}, config renamed to {REF_FLASH_NAME}"
            else:
                model = make(REF_NAME)
        expect = variant_impl
    else:
        raise ValueError(variant_impl)
    facts["config_attn"] = model.config._attn_implementation
    if facts["config_attn"] != expect:
        raise RuntimeError(f"config reads {facts['config_attn']!r}, expected {expect!r}")
    if source is not None:
        model.load_state_dict(source.state_dict())
    return model, facts


def section_skipped(ctx: Suite, sec: dict[str, Any], need: float) -> bool:
    """True (and noted) when the budget leaves no room to build this section's models and run a case."""
    if ctx.budget.allows(0 if ctx.smoke else need):
        return False
    sec["notes"].append(
        f"section skipped: budget ({ctx.budget.elapsed():.0f} s of {ctx.budget.seconds:.0f} s used)"
    )
    ctx.progress(f"{next(k for k, v in ctx.results.items() if v is sec)}: skipped (budget)")
    ctx.save()
    return True


# --------------------------------------------------------------------------- section: packed


def run_packed(ctx: Suite) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    sec = ctx.section("packed")
    device, dtype = ctx.device, ctx.dtype
    if section_skipped(ctx, sec, 45):
        return
    ok, note = register_reference()
    sec["notes"].append(note)
    REFERENCE.backends.clear()
    config = LlamaConfig(**(LLAMA_SMOKE if ctx.smoke else LLAMA_FULL), use_cache=False)
    variants = ["plain_sdpa", "shim", "shim_sdpa_downgrade", "varlen_reference"]
    if not ok:
        variants.remove("varlen_reference")
    impl = {
        "plain_sdpa": "plain_sdpa",
        "shim": "shim",
        "shim_sdpa_downgrade": "shim_sdpa_downgrade",
        "varlen_reference": REF_NAME,
    }
    models: dict[str, Any] = {}
    source = None
    t0 = time.monotonic()
    for v in variants:
        try:
            models[v], facts = build(LlamaForCausalLM, config, impl[v], device, dtype, source)
            source = source or models[v]
            sec["models"][v] = facts
        except Exception as exc:
            sec["models"][v] = {"status": error_text(exc)}
            sec["notes"].append(f"{v}: not built: {error_text(exc)}")
            traceback.print_exc()
    for m in models.values():
        m.train()
    sec["build_s"] = round(time.monotonic() - t0, 1)
    ctx.progress(f"packed: {len(models)} models built in {sec['build_s']} s")
    if models:
        sec["notes"].append(
            f"each model {param_bytes(next(iter(models.values()))) / 2**30:.2f} GiB of weights; all variants "
            "stay loaded (interleaved rounds); peak GiB = the variant's own weights + the largest allocation "
            "above what was allocated when its step began (grads, activations, masks)"
        )

    cases = (
        [(512, 8), (512, 64)]
        if ctx.smoke
        else [(16384, 8), (16384, 64), (16384, 256), (16384, 1024), (32768, 64)]
    )
    timed_steps = 2 if ctx.smoke else 3
    gen = torch.Generator().manual_seed(0)
    for total, n_docs in cases:
        docs = split_docs(total, n_docs, gen)
        label = f"{total} tokens / {n_docs} docs"
        need = 0 if ctx.smoke else (70 if total > 16384 else 25)
        if not ctx.budget.allows(need):
            for v in variants:
                sec["rows"].append(
                    {"tokens": total, "docs": n_docs, "variant": v, "status": "skipped: budget"}
                )
            ctx.progress(f"packed {label}: skipped (budget)")
            ctx.save()
            continue
        ids = torch.randint(3, config.vocab_size, (1, total), generator=gen).to(device)
        pos = torch.cat([torch.arange(n) for n in docs])[None].to(device)
        labels = ids.clone()
        starts = torch.tensor([0, *torch.tensor(docs).cumsum(0)[:-1].tolist()], device=device)
        labels[0, starts] = -100
        state: dict[str, dict[str, Any]] = {v: {"times": [], "peaks": [], "losses": []} for v in models}
        for v in variants:
            if v not in models:
                state[v] = {"status": sec["models"][v].get("status", "not built")}

        def step(v: str, timed: bool, ids=ids, pos=pos, labels=labels, state=state) -> None:
            model = models[v]
            st = state[v]
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device == "cuda" else 0
            try:
                t0 = time.perf_counter()
                out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
                out.loss.backward()
                sync(device)
                seconds = time.perf_counter() - t0
                loss = float(out.loss.detach())
                del out
            finally:
                model.zero_grad(set_to_none=True)
            if timed:
                st["times"].append(seconds)
                st["losses"].append(loss)
                if device == "cuda":
                    st["peaks"].append(
                        (torch.cuda.max_memory_allocated() - base + param_bytes(model)) / 2**30
                    )

        def attempt_step(v: str, timed: bool, state=state, step=step) -> None:
            if "status" in state[v]:
                return
            err = None
            try:
                step(v, timed)
            except Exception as exc:
                err = error_text(exc)
                if err != "OOM":
                    traceback.print_exc()
            if err is not None:  # outside the except block: the traceback no longer holds the activations
                state[v]["status"] = err
                free(device)

        t_case = time.monotonic()
        # the warm-up step, untimed; it also keeps layer 0's attention output (same inputs in every
        # variant: the embeddings), which shows a document boundary crossed (the loss barely does)
        attn0: dict[str, torch.Tensor] = {}
        for v in variants:
            REFERENCE.last_sequences = 0
            hook = None
            if v in models:
                hook = (
                    models[v]
                    .model.layers[0]
                    .self_attn.register_forward_hook(
                        lambda mod, args, out, v=v, keep=attn0: keep.__setitem__(v, out[0].detach())
                    )
                )
            try:
                attempt_step(v, timed=False)
            finally:
                if hook is not None:
                    hook.remove()
            if v == "varlen_reference":
                state[v]["sequences_seen"] = REFERENCE.last_sequences
        ref_v = next((v for v in ("varlen_reference", "plain_sdpa") if v in attn0), None)
        for v, out in attn0.items():
            if "status" not in state[v] and ref_v is not None:
                state[v]["attn0_rel_diff"] = rel_l2(out, attn0[ref_v])
        attn0.clear()
        for r in range(timed_steps):
            if ctx.budget.overrun():
                sec["notes"].append(f"{label}: stopped after {r} timed rounds (budget)")
                break
            for v in variants if r % 2 == 0 else variants[::-1]:
                attempt_step(v, timed=True)
        free(device)
        rows = []
        for v in variants:
            st = state[v]
            row: dict[str, Any] = {"tokens": total, "docs": n_docs, "max_doc": max(docs), "variant": v}
            if "status" in st:
                row["status"] = st["status"]
            elif not st["times"]:
                row["status"] = "skipped: budget"
            else:
                sec_med = statistics.median(st["times"])
                row.update(
                    status="ok",
                    tok_s=total / sec_med,
                    step_ms=[round(t * 1e3, 1) for t in st["times"]],
                    loss=st["losses"][-1],
                    losses=st["losses"],
                    peak_gib=max(st["peaks"]) if st["peaks"] else None,
                )
                if "attn0_rel_diff" in st:
                    row["attn0_rel_diff"] = st["attn0_rel_diff"]
                    row["attn0_agrees"] = st["attn0_rel_diff"] <= (5e-2 if dtype != torch.float32 else 1e-4)
                if "sequences_seen" in st:
                    row["reference_sequences_seen"] = st["sequences_seen"]
                    if st["sequences_seen"] != n_docs:
                        sec["notes"].append(
                            f"{label}: the reference saw {st['sequences_seen']} sequences, not {n_docs}"
                        )
            rows.append(row)
        by = {r["variant"]: r for r in rows}
        ref_loss = next(
            (by[v]["loss"] for v in ("varlen_reference", "plain_sdpa", "shim") if "loss" in by.get(v, {})),
            None,
        )
        for row in rows:
            for other, key in (("varlen_reference", "vs_reference"), ("plain_sdpa", "vs_plain_sdpa")):
                if "tok_s" in row and "tok_s" in by.get(other, {}):
                    row[key] = row["tok_s"] / by[other]["tok_s"]
            if "loss" in row and ref_loss is not None:
                rel = abs(row["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
                row["loss_rel_diff"] = rel
                row["loss_agrees"] = rel <= 1e-2
                if len(set(row["losses"])) > 1:
                    row["loss_varies_between_steps"] = True
        bad = [r["variant"] for r in rows if r.get("loss_agrees") is False]
        if bad:
            sec["notes"].append(f"{label}: LOSS DISAGREES (> 1e-2 relative) for {', '.join(bad)}")
        bad = [r["variant"] for r in rows if r.get("attn0_agrees") is False]
        if bad:
            sec["notes"].append(
                f"{label}: LAYER-0 ATTENTION OUTPUT DISAGREES with the reference for {', '.join(bad)}"
            )
        sec["rows"].extend(rows)
        summary = ", ".join(
            f"{r['variant']} {fmt(r.get('tok_s'), 0)} tok/s"
            if r["status"] == "ok"
            else f"{r['variant']} {r['status']}"
            for r in rows
        )
        ctx.progress(f"packed {label}: {summary} ({time.monotonic() - t_case:.0f} s)")
        ctx.save()
    sec["notes"].append(f"varlen_reference ran on: {', '.join(sorted(REFERENCE.backends)) or 'nothing'}")
    models.clear()
    source = None
    free(device)


# --------------------------------------------------------------------------- section: vision


def run_vision(ctx: Suite) -> None:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel as Vit,
    )

    sec = ctx.section("vision")
    device, dtype = ctx.device, ctx.dtype
    if section_skipped(ctx, sec, 25):
        return
    ok, note = register_reference()
    sec["notes"].append(note)
    REFERENCE.backends.clear()
    try:
        from transformers.utils.generic import is_flash_attention_requested

        takes = {
            n: bool(is_flash_attention_requested(requested_attention_implementation=n))
            for n in ("sdpa", "flash_attention_2", REF_NAME, REF_FLASH_NAME)
        }
        sec["notes"].append(
            f"is_flash_attention_requested (decides the cu_seqlens path of the vision attention): {takes}; "
            f"the reference is therefore run as {REF_FLASH_NAME!r}"
        )
    except Exception as exc:
        sec["notes"].append(f"is_flash_attention_requested not importable ({error_text(exc)})")
    config = Qwen2_5_VLVisionConfig(**(VISION_SMOKE if ctx.smoke else VISION_FULL))
    variants = ["plain_sdpa", "shim", "varlen_reference"] if ok else ["plain_sdpa", "shim"]
    impl = {"plain_sdpa": "plain_sdpa", "shim": "shim", "varlen_reference": REF_FLASH_NAME}
    models: dict[str, Any] = {}
    source = None
    for v in variants:
        try:
            models[v], facts = build(Vit, config, impl[v], device, dtype, source)
            models[v].eval()
            source = source or models[v]
            sec["models"][v] = facts
        except Exception as exc:
            sec["models"][v] = {"status": error_text(exc)}
            traceback.print_exc()
    ctx.progress(f"vision: {len(models)} models built")

    patch = config.patch_size
    if ctx.smoke:
        cases = [("1 x 224²", [(1, 16, 16)]), ("4 x 224²", [(1, 16, 16)] * 4), ("16 x 56²", [(1, 4, 4)] * 16)]
    else:
        cases = [
            ("1 x 1344²", [(1, 96, 96)]),
            ("4 x 1344²", [(1, 96, 96)] * 4),
            ("16 x 448²", [(1, 32, 32)] * 16),
        ]
    warmup, reps = (1, 2) if ctx.smoke else (2, 5)
    for label, grid in cases:
        tokens = sum(t * h * w for t, h, w in grid)
        if not ctx.budget.allows(0 if ctx.smoke else 15):
            for v in variants:
                sec["rows"].append(
                    {"images": label, "tokens": tokens, "variant": v, "status": "skipped: budget"}
                )
            ctx.progress(f"vision {label}: skipped (budget)")
            ctx.save()
            continue
        gen = torch.Generator().manual_seed(tokens)
        pixels = torch.randn(tokens, 3 * config.temporal_patch_size * patch * patch, generator=gen)
        pixels = pixels.to(device=device, dtype=dtype)
        grid_thw = torch.tensor(grid, device=device, dtype=torch.long)
        state: dict[str, dict[str, Any]] = {v: {"times": [], "peaks": []} for v in models}
        for v in variants:
            if v not in models:
                state[v] = {"status": sec["models"][v].get("status", "not built")}

        def forward(v: str, pixels=pixels, grid_thw=grid_thw) -> torch.Tensor:
            with torch.no_grad():
                out = models[v](pixels, grid_thw=grid_thw)
            if isinstance(out, torch.Tensor):
                return out
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else out[0]

        outputs: dict[str, torch.Tensor] = {}  # each variant's output of its first warm-up forward

        def once(v: str, timed: bool, state=state, forward=forward, outputs=outputs) -> None:
            st = state[v]
            if "status" in st:
                return
            err = None
            try:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if device == "cuda" else 0
                t0 = time.perf_counter()
                out = forward(v)
                sync(device)
                seconds = time.perf_counter() - t0
                if timed:
                    st["times"].append(seconds)
                    if device == "cuda":
                        st["peaks"].append(
                            (torch.cuda.max_memory_allocated() - base + param_bytes(models[v])) / 2**30
                        )
                else:
                    st["mean_abs"] = float(out.float().abs().mean())
                    outputs[v] = out.detach()
                    st["finite"] = bool(torch.isfinite(out).all())
                    st["out_shape"] = list(out.shape)
                del out
            except Exception as exc:
                err = error_text(exc)
                if err != "OOM":
                    traceback.print_exc()
            if err is not None:
                st["status"] = err
                free(device)

        t_case = time.monotonic()
        for _ in range(warmup):
            for v in variants:
                once(v, timed=False)
        for r in range(reps):
            if ctx.budget.overrun():
                sec["notes"].append(f"{label}: stopped after {r} timed rounds (budget)")
                break
            for v in variants if r % 2 == 0 else variants[::-1]:
                once(v, timed=True)
        for v in variants:  # one more forward with the registry's functions counted
            if "status" in state[v]:
                continue
            try:
                with count_attention_calls() as counts:
                    forward(v)
                    sync(device)
                state[v]["attention_calls"] = dict(counts)
            except Exception as exc:
                state[v]["attention_calls"] = {"error": error_text(exc)}
        ref_v = next((v for v in ("varlen_reference", "plain_sdpa") if v in outputs), None)
        for v, out in outputs.items():
            if ref_v is not None and out.shape == outputs[ref_v].shape:
                state[v]["out_l2_rel_diff"] = rel_l2(out, outputs[ref_v])
        outputs.clear()
        free(device)
        rows = []
        for v in variants:
            st = state[v]
            row: dict[str, Any] = {"images": label, "tokens": tokens, "variant": v}
            if "status" in st:
                row["status"] = st["status"]
            elif not st["times"]:
                row["status"] = "skipped: budget"
            else:
                row.update(
                    status="ok",
                    ms=statistics.median(st["times"]) * 1e3,
                    all_ms=[round(t * 1e3, 2) for t in st["times"]],
                    peak_gib=max(st["peaks"]) if st["peaks"] else None,
                    mean_abs_out=st.get("mean_abs"),
                    out_l2_rel_diff=st.get("out_l2_rel_diff"),
                    finite=st.get("finite"),
                    attention_calls=st.get("attention_calls"),
                )
            rows.append(row)
        by = {r["variant"]: r for r in rows}
        ref = next(
            (
                by[v]["mean_abs_out"]
                for v in ("varlen_reference", "plain_sdpa")
                if by.get(v, {}).get("mean_abs_out")
            ),
            None,
        )
        for row in rows:
            for other, key in (
                ("varlen_reference", "time_vs_reference"),
                ("plain_sdpa", "time_vs_plain_sdpa"),
            ):
                if "ms" in row and "ms" in by.get(other, {}):
                    row[key] = row["ms"] / by[other]["ms"]
            if row.get("mean_abs_out") is not None and ref:
                rel = abs(row["mean_abs_out"] - ref) / ref
                row["out_rel_diff"] = rel
                l2 = row.get("out_l2_rel_diff")
                l2_ok = l2 is None or l2 <= (0.1 if dtype != torch.float32 else 1e-4)
                row["out_agrees"] = rel <= 1e-2 and l2_ok and row.get("finite") is not False
        bad = [r["variant"] for r in rows if r.get("out_agrees") is False]
        if bad:
            sec["notes"].append(
                f"{label}: OUTPUT DISAGREES with the reference (mean |out| > 1e-2 relative, or "
                f"||out - ref|| / ||ref|| > {0.1 if dtype != torch.float32 else 1e-4}, or not finite) "
                f"for {', '.join(bad)}"
            )
        sec["rows"].extend(rows)
        summary = ", ".join(
            f"{r['variant']} {fmt(r.get('ms'), 2)} ms"
            if r["status"] == "ok"
            else f"{r['variant']} {r['status']}"
            for r in rows
        )
        ctx.progress(f"vision {label} ({tokens} patches): {summary} ({time.monotonic() - t_case:.0f} s)")
        ctx.save()
    sec["notes"].append(f"varlen_reference ran on: {', '.join(sorted(REFERENCE.backends)) or 'nothing'}")
    models.clear()
    source = None
    free(device)


# --------------------------------------------------------------------------- section: continuous batching


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip().splitlines()
        if text:
            self.messages.append(text[0][:240])


def run_cb(ctx: Suite) -> None:
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sec = ctx.section("cb")
    device, dtype = ctx.device, ctx.dtype
    config = LlamaConfig(**(LLAMA_SMOKE if ctx.smoke else CB_FULL))
    n_req, new, (lo, hi) = (4, 4, (4, 32)) if ctx.smoke else (32, 64, (16, 512))
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi + 1, (n_req,), generator=gen).tolist()
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    sec["notes"].append(
        f"{n_req} requests, prompt lengths {min(lengths)}..{max(lengths)} (sum {sum(lengths)}), "
        f"{new} new tokens each, greedy, eos_token_id=-1"
    )
    cfg_cls = getattr(transformers.generation.configuration_utils, "ContinuousBatchingConfig", None)
    fields = set(getattr(cfg_cls, "__dataclass_fields__", {}))
    sizing: dict[str, Any] = {}
    if "num_blocks" in fields:
        sizing["num_blocks"] = (
            16 if ctx.smoke else 128
        )  # blocks of 256 tokens: room for every request at once
    if "max_batch_tokens" in fields:
        sizing["max_batch_tokens"] = 256 if ctx.smoke else 8192
    if "auto_switch_to_flash" in fields:
        sizing["auto_switch_to_flash"] = False  # keep plain sdpa on sdpa (5.2x+ would switch it to flash)
    variants = {"plain_sdpa": ("plain_sdpa", {}), "shim": ("shim", {})}
    if "use_cuda_graph" in fields:
        variants["shim_no_cuda_graph"] = ("shim", {"use_cuda_graph": False})
    sec["notes"].append(
        f"ContinuousBatchingConfig fields set for every variant: {sizing or 'none (class absent)'}; "
        "tok/s = generated tokens / wall time of the whole generate_batch call (cache set-up and "
        "any CUDA-graph capture included)"
    )
    if section_skipped(ctx, sec, 45):
        return
    why = install_standin_counters()
    if why:
        sec["notes"].append(f"stand-in calls not counted: {why}")
    models: dict[str, Any] = {}
    source = None
    for kind, _ in variants.values():
        if kind in models:
            continue
        try:
            models[kind], facts = build(LlamaForCausalLM, config, kind, device, dtype, source)
            models[kind].eval()
            source = source or models[kind]
            sec["models"][kind] = facts
        except Exception as exc:
            sec["models"][kind] = {"status": error_text(exc)}
            traceback.print_exc()
    ctx.progress(f"cb: {len(models)} models built")

    def call(v: str, count: bool) -> dict[str, Any]:
        kind, extra = variants[v]
        gconf = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
        kwargs: dict[str, Any] = {}
        if cfg_cls is not None:
            kwargs["continuous_batching_config"] = cfg_cls(**sizing, **extra)
        elif extra.get("use_cuda_graph") is False:
            gconf.use_cuda_graph = False
        capture = _Capture()
        tlog = logging.getLogger("transformers")
        tlog.addHandler(capture)
        counting = contextlib.ExitStack()
        try:
            counts = counting.enter_context(count_attention_calls()) if count else {}
            standin = counting.enter_context(count_standin_calls()) if count else {}
            with torch.no_grad():
                sync(device)
                t0 = time.perf_counter()
                outputs = models[kind].generate_batch(
                    inputs=prompts, generation_config=gconf, progress_bar=False, **kwargs
                )
                sync(device)
                seconds = time.perf_counter() - t0
        finally:
            counting.close()
            tlog.removeHandler(capture)
        got = {tuple(o.prompt_ids): list(o.generated_tokens) for o in outputs.values()}
        return {
            "seconds": seconds,
            "got": got,
            "errors": capture.messages,
            "attention_calls": dict(counts),
            "standin_calls": dict(standin),
        }

    state: dict[str, dict[str, Any]] = {v: {"times": []} for v in variants}
    for v, (kind, _) in variants.items():
        if kind not in models:
            state[v]["status"] = sec["models"][kind].get("status", "not built")

    def one(v: str, r: int) -> None:
        st = state[v]
        if "status" in st:
            return
        err = None
        try:
            limit = (
                60.0
                if ctx.smoke
                else max(30.0, min(150.0, ctx.budget.seconds + GRACE_S - ctx.budget.elapsed()))
            )
            res = with_timeout(lambda: call(v, count=r == 0), limit)
            got, errors = res["got"], res["errors"]
            n_tokens = sum(len(t) for t in got.values())
            if len(got) < n_req or n_tokens < n_req * new:
                err = f"error: {len(got)} of {n_req} requests finished, {n_tokens} tokens" + (
                    f"; logged: {errors[0]}" if errors else ""
                )
            elif r == 0:
                st.update(
                    tokens=got,
                    warmup_s=res["seconds"],
                    attention_calls=res["attention_calls"],
                    standin_calls=res["standin_calls"],
                    logged_errors=errors[:3],
                )
            else:
                st["times"].append(res["seconds"])
                st["n_tokens"] = n_tokens
                if got != st.get("tokens"):
                    st["nondeterministic"] = True
        except Exception as exc:
            err = error_text(exc)
            traceback.print_exc()
        if err is not None:
            st["status"] = err
            with contextlib.suppress(Exception):
                free(device)
        ctx.progress(f"cb run {r} {v}: {st.get('status', 'ok')}")

    # CUDA-graph capture is the riskiest path (a failed capture can poison the CUDA context), so the
    # variants without graphs run first, interleaved, and the default-config shim (graphs on for flash
    # implementations on CUDA) runs after them.
    phases = [[v for v in variants if v != "shim"], ["shim"]]
    sec["notes"].append(
        f"run order: {phases[0]} interleaved, then {phases[1]} (CUDA-graph capture last); "
        "attention calls = registry lookups' calls during the warm-up run, stand-in calls = "
        "Python-level calls of the flash_attn stand-in then (CUDA-graph replays not counted)"
    )
    runs = 2 if ctx.smoke else 3  # the first is the warm-up
    for phase in phases:
        for r in range(runs):
            if r > 0 and ctx.budget.overrun():
                sec["notes"].append(f"{phase}: stopped after {r} runs (budget)")
                break
            if HUNG:
                break
            for v in phase if r % 2 == 0 else phase[::-1]:
                if not HUNG:
                    one(v, r)
    rows = []
    ref_tokens = state.get("plain_sdpa", {}).get("tokens")
    for v in variants:
        st = state[v]
        row: dict[str, Any] = {"variant": v, "requests": n_req, "new_tokens": new}
        if "status" in st:
            row["status"] = st["status"]
        elif not st["times"]:
            row["status"] = "skipped: budget"
        else:
            med = statistics.median(st["times"])
            row.update(
                status="ok",
                tok_s=st["n_tokens"] / med,
                wall_s=[round(t, 3) for t in st["times"]],
                warmup_s=round(st["warmup_s"], 3),
                attention_calls=st.get("attention_calls"),
                standin_calls=st.get("standin_calls"),
                repeat_runs_identical=not st.get("nondeterministic", False),
            )
            if st.get("logged_errors"):
                row["logged_errors"] = st["logged_errors"]
        if st.get("tokens") is not None and ref_tokens is not None:
            same = sum(st["tokens"].get(tuple(p)) == ref_tokens.get(tuple(p)) for p in prompts)
            row["requests_identical_to_plain_sdpa"] = f"{same}/{n_req}"
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    for row in rows:
        if "tok_s" in row and "tok_s" in by.get("plain_sdpa", {}):
            row["vs_plain_sdpa"] = row["tok_s"] / by["plain_sdpa"]["tok_s"]
    sec["rows"].extend(rows)
    remove_standin_counters()
    ctx.save()
    models.clear()
    source = None
    free(device)


# --------------------------------------------------------------------------- output


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _calls(calls: Any) -> str:
    return ", ".join(f"{k}: {n}" for k, n in calls.items()) if isinstance(calls, dict) and calls else "-"


def _preamble(sec: dict[str, Any], title: str) -> list[str]:
    lines = [f"## {title}", ""]
    lines += [f"- {n}" for n in sec["notes"]]
    lines += [f"- {v}: {f}" for v, f in sec["models"].items()]
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    what = "SMOKE: tiny shapes on the CPU, measures nothing" if results["smoke"] else env.get("gpu")
    cuda = f", CUDA {env.get('cuda')}" if env.get("cuda") else ""
    sections = ", ".join(f"{k} {fmt(v, 0)} s" for k, v in results.get("section_s", {}).items())
    lines = [
        f"# varlen suite ({what})",
        "",
        f"- command: `{results['command']}`",
        f"- torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"sdpa_shim {env.get('sdpa_shim')}, flash_attn: {env.get('flash_attn')}, "
        f"device {env.get('device')}{cuda}",
        f"- wall time {fmt(results.get('wall_s'), 0)} s (budget {results['budget_s']} s); "
        f"sections: {sections}",
        "",
    ]
    packed = results.get("packed")
    if packed:
        lines += _preamble(packed, "packed: one training step (fwd + bwd) on one packed row, 1.1B Llama")
        rows = []
        for r in packed["rows"]:
            loss = fmt(r.get("loss"), 4) + (" **≠**" if r.get("loss_agrees") is False else "")
            rows.append(
                [
                    r["tokens"],
                    r["docs"],
                    r.get("max_doc", "-"),
                    r["variant"],
                    fmt(r.get("tok_s"), 0),
                    fmt(r.get("peak_gib"), 2),
                    loss,
                    sci(r.get("loss_rel_diff")),
                    sci(r.get("attn0_rel_diff")) + (" **≠**" if r.get("attn0_agrees") is False else ""),
                    fmt(r.get("vs_reference"), 2),
                    fmt(r.get("vs_plain_sdpa"), 2),
                    r["status"],
                ]
            )
        header = [
            "tokens",
            "docs",
            "max doc",
            "variant",
            "tok/s",
            "peak GiB",
            "loss",
            "loss rel. diff",
            "layer-0 attn out rel. L2 diff",
            "tok/s ÷ reference",
            "tok/s ÷ plain sdpa",
            "status",
        ]
        lines += _table(header, rows)
        cases: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for r in packed["rows"]:
            cases.setdefault((r["tokens"], r["docs"]), []).append(r)
        rows = []
        for (t, d), rs in cases.items():
            shim = next((r for r in rs if r["variant"] == "shim"), {})
            agree = [r.get(k) for r in rs for k in ("loss_agrees", "attn0_agrees") if k in r]
            verdict = "-" if not agree else "yes" if all(agree) else "NO"
            rows.append([t, d, fmt(shim.get("vs_reference"), 2), fmt(shim.get("vs_plain_sdpa"), 2), verdict])
        lines += ["", "Summary (shim, tok/s ratios):", ""]
        lines += _table(
            ["tokens", "docs", "shim ÷ varlen_reference", "shim ÷ plain_sdpa", "loss and attention agree"],
            rows,
        )
        lines.append("")
    vision = results.get("vision")
    if vision:
        lines += _preamble(vision, "vision: Qwen2.5-VL-7B vision tower forward (bf16, no grad)")
        rows = []
        for r in vision["rows"]:
            out = fmt(r.get("mean_abs_out"), 5)
            if "out_rel_diff" in r:
                out += f" ({sci(r['out_rel_diff'])})"
            if r.get("out_agrees") is False:
                out += " **≠**"
            rows.append(
                [
                    r["images"],
                    r["tokens"],
                    r["variant"],
                    fmt(r.get("ms"), 2),
                    fmt(r.get("peak_gib"), 2),
                    out,
                    sci(r.get("out_l2_rel_diff")),
                    fmt(r.get("time_vs_reference"), 2),
                    fmt(r.get("time_vs_plain_sdpa"), 2),
                    _calls(r.get("attention_calls")),
                    r["status"],
                ]
            )
        header = [
            "images",
            "patches",
            "variant",
            "ms",
            "peak GiB",
            "mean abs out (rel. diff)",
            "out rel. L2 diff",
            "time ÷ reference",
            "time ÷ plain sdpa",
            "attention calls / forward",
            "status",
        ]
        lines += [*_table(header, rows), ""]
    cb = results.get("cb")
    if cb:
        lines += _preamble(cb, "cb: continuous batching (generate_batch), random Llama 1024 x 8 layers")
        rows = []
        for r in cb["rows"]:
            rows.append(
                [
                    r["variant"],
                    fmt(r.get("tok_s"), 0),
                    fmt(r.get("vs_plain_sdpa"), 2),
                    r.get("wall_s", "-"),
                    r.get("warmup_s", "-"),
                    r.get("requests_identical_to_plain_sdpa", "-"),
                    _calls(r.get("attention_calls")),
                    _calls(r.get("standin_calls")),
                    r["status"],
                ]
            )
        header = [
            "variant",
            "generated tok/s",
            "÷ plain sdpa",
            "wall s (timed)",
            "warm-up s",
            "requests = plain sdpa",
            "attention calls (warm-up run)",
            "stand-in calls (warm-up run)",
            "status",
        ]
        lines += [*_table(header, rows), ""]
    return "\n".join(lines)


class Suite:
    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.smoke = args.smoke
        self.device = "cpu" if args.smoke else "cuda"
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.budget = Budget(args.budget_s)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        from _common import environment

        self.results: dict[str, Any] = {
            "command": command,
            "argv": [sys.executable, *sys.argv],
            "environment": environment(self.device),
            "smoke": self.smoke,
            "budget_s": args.budget_s,
            "section_s": {},
        }

    def section(self, name: str) -> dict[str, Any]:
        sec = {"notes": [], "models": {}, "rows": []}
        self.results[name] = sec
        return sec

    def progress(self, text: str) -> None:
        print(f"[{self.budget.elapsed():6.1f} s] {text}", flush=True)

    def save(self) -> None:
        self.results["wall_s"] = self.budget.elapsed()
        (self.out / "varlen_suite.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "varlen_suite.md").write_text(markdown(self.results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for varlen_suite.json / .md")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections ({','.join(SECTIONS)})"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU in float32: checks the script"
    )
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="start no new case after this many seconds"
    )
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    sections = [s for s in args.only.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on a CPU")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdpa_shim").setLevel(logging.ERROR)  # the per-model decision WARNING
    if not sdpa_shim.is_active():
        raise SystemExit("sdpa_shim is not active (SDPA_SHIM=0?)")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    command = "PYTHONPATH=src python bench/varlen_suite.py " + shlex.join(raw)
    suite = Suite(args, command)
    suite.progress(f"{command}\n  {json.dumps(suite.results['environment'])}")
    runners = {"packed": run_packed, "vision": run_vision, "cb": run_cb}
    for name in sections:
        if HUNG:
            suite.results.setdefault(name, {"notes": [], "models": {}, "rows": []})["notes"].append(
                "not run: an earlier call never returned"
            )
            continue
        t0 = time.monotonic()
        suite.progress(f"== {name}")
        try:
            runners[name](suite)
        except Exception as exc:  # a section that cannot even start: recorded, the others still run
            traceback.print_exc()
            suite.results.setdefault(name, {"notes": [], "models": {}, "rows": []})["notes"].append(
                f"SECTION FAILED: {error_text(exc)}"
            )
            free(suite.device)
        suite.results["section_s"][name] = round(time.monotonic() - t0, 1)
        suite.progress(f"== {name}: {suite.results['section_s'][name]:.0f} s")
        suite.save()
    text = markdown(suite.results)
    print(text)
    print(f"wrote {suite.out / 'varlen_suite.json'} and {suite.out / 'varlen_suite.md'}", flush=True)
    if HUNG:  # a thread that never returned would keep the interpreter from exiting
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
