"""Continuous batching (``generate_batch``) on a model the shim took over: every request gets exactly the
greedy tokens of a plain ``generate`` of that request alone.

Faked, because it cannot exist on a CPU box: the GPU memory query transformers uses to size its paged
cache (5.0-5.12 read free CUDA memory and refuse, or fail, on a CPU); it is given a fixed 1 GiB budget.
CUDA graphs (on by default for flash models in 5.0-5.5) are switched off: they need a CUDA device.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, GenerationConfig

from helpers.expect import EXPECTED_IMPLEMENTATION
from helpers.loading import reference
from helpers.models import save_tiny_llama

TRANSFORMERS = Version(transformers.__version__)
pytestmark = pytest.mark.skipif(
    Version("5.0") > TRANSFORMERS,
    reason="continuous batching before 5.0 needs its own attention names (sdpa_paged, paged_attention)",
)

REQUESTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [3], [40, 41], [50, 51, 52, 53, 54, 55, 56]]


@pytest.fixture(autouse=True)
def _fixed_cache_budget(monkeypatch):
    from transformers.generation.continuous_batching import cache

    monkeypatch.setattr(
        cache.PagedAttentionMemoryHandler, "get_available_memory", staticmethod(lambda *a, **k: 1 << 30)
    )


def generation_config() -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0, use_cuda_graph=False
    )


def batch_options(max_batch_tokens: int | None) -> dict:
    """Cap the tokens per step, so that the requests cannot all be scheduled in one batch."""
    if max_batch_tokens is None:
        return {}
    config_class = getattr(transformers.generation.configuration_utils, "ContinuousBatchingConfig", None)
    if config_class is not None:
        return {"continuous_batching_config": config_class(max_batch_tokens=max_batch_tokens)}
    return {}


def run_batch(model, max_batch_tokens: int | None = None) -> dict[tuple[int, ...], list[int]]:
    config = generation_config()
    options = batch_options(max_batch_tokens)
    if max_batch_tokens is not None and not options:
        config.max_batch_tokens = max_batch_tokens  # 5.0-5.5 read it from the generation config
    outputs = model.generate_batch(inputs=REQUESTS, generation_config=config, progress_bar=False, **options)
    return {tuple(out.prompt_ids): list(out.generated_tokens) for out in outputs.values()}


def alone(model) -> dict[tuple[int, ...], list[int]]:
    config = generation_config()
    with torch.no_grad():
        return {
            tuple(prompt): model.generate(torch.tensor([prompt]), generation_config=config)[
                0, len(prompt) :
            ].tolist()
            for prompt in REQUESTS
        }


@pytest.mark.parametrize("fallback", ["auto", "sdpa"], ids=["flash-path", "sdpa-downgrade"])
@pytest.mark.parametrize("max_batch_tokens", [None, 8], ids=["one-batch", "several-batches"])
def test_generate_batch_equals_each_request_alone(tmp_path, monkeypatch, fallback, max_batch_tokens):
    monkeypatch.setenv("SDPA_SHIM_FALLBACK", fallback)
    directory = save_tiny_llama(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == (EXPECTED_IMPLEMENTATION if fallback == "auto" else "sdpa")
    got = run_batch(model, max_batch_tokens)
    assert got == alone(reference(directory))


def test_cuda_graphs_default_off_for_served_models(tmp_path):
    """Where CUDA exists, transformers turns CUDA graphs on by default for flash models; the stand-in
    reads lengths on the host, which capture forbids, so a served model's default becomes off. Checked on
    the arguments the shim hands to transformers (no CUDA here); an explicit choice is kept."""
    from sdpa_shim._integration.flash_paths import _without_cuda_graphs

    model = AutoModelForCausalLM.from_pretrained(
        save_tiny_llama(tmp_path / "m"), attn_implementation="flash_attention_2"
    )
    init = model.init_continuous_batching
    init = getattr(init, "__wrapped__", init)  # the bound method itself, as the shim's wrapper gets it

    def use_cuda_graph(args, kwargs):
        """use_cuda_graph of the config that decides it: the ContinuousBatchingConfig where the release
        has one, else the GenerationConfig."""
        given = [*args, *kwargs.values()]
        cb = [c for c in given if type(c).__name__ == "ContinuousBatchingConfig"]
        return (cb or [c for c in given if isinstance(c, GenerationConfig)])[0].use_cuda_graph

    assert use_cuda_graph(*_without_cuda_graphs(init, model, (), {})) is False
    if "continuous_batching_config" in inspect.signature(init).parameters:
        config_class = transformers.generation.configuration_utils.ContinuousBatchingConfig
        explicit = {"continuous_batching_config": config_class(use_cuda_graph=True)}
    else:
        explicit = {"generation_config": GenerationConfig(max_new_tokens=2, use_cuda_graph=True)}
    assert use_cuda_graph(*_without_cuda_graphs(init, model, (), explicit)) is True
