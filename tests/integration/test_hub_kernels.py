"""No Hub, ever, for the models the shim serves: a served ``flash_attention_2`` load, forward, ``generate`` and
``generate_batch`` never ask the Hub for a kernel, and run cleanly offline.

Why: transformers 5.25 depends on ``kernels`` and defaults ``from_pretrained(use_kernels=True)``; without the shim
a flash request flash-attn cannot serve reaches for ``kernels.get_kernel("kernels-community/flash-attn2")``, a
download and run of Hub code at load time (continuous batching's automatic switch to flash looks up
``vllm-flash-attn3`` / ``flash-attn2`` the same way). The shim serves the request itself, so none of that may run.

How it is observed: in a fresh interpreter with ``HF_HUB_OFFLINE=1`` (no network is needed or used), every Hub
entry point is wrapped to record its calls: ``kernels``' loaders (``get_kernel``, ``has_kernel``, ``load_kernel``,
``get_locked_kernel``, ``install_kernel``), huggingface_hub's ``hf_hub_download`` / ``snapshot_download`` (module
functions and ``HfApi`` methods, which ``kernels`` uses), ``HfApi``'s repo queries and huggingface_hub's HTTP
session. That is the only thing faked: a download that cannot happen on an offline box. Each wrapper calls the
original, so what transformers does is unchanged. The control (the shim off, 5.25) shows the wrappers do see
transformers' own reach for the Hub. Faked as in test_continuous_batching.py: the GPU memory query that sizes the
paged cache (5.0-5.12 read free CUDA memory).
"""

from __future__ import annotations

import json

import pytest
import transformers
from packaging.version import Version

from helpers.fresh import run_python

TRANSFORMERS = Version(transformers.__version__)
pytestmark = pytest.mark.skipif(
    Version("4.56") > TRANSFORMERS,
    reason="the shim serves flash requests on transformers' flash path from 4.56",
)

#: Installs the recording wrappers, then runs the steps; the last stdout line is a JSON report.
SCRIPT = r"""
import json, logging, sys, tempfile
from pathlib import Path

logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
if USE_SHIM:
    import sdpa_shim
import torch, transformers, huggingface_hub
import transformers.modeling_utils, transformers.utils.hub
import huggingface_hub.file_download, huggingface_hub._snapshot_download, huggingface_hub.utils._http
try:
    import kernels
    import transformers.integrations.hub_kernels
except ImportError:  # not a dependency before 5.25, not installed in those sessions
    kernels = None

calls = []


def recording(name, original):
    def wrapper(*args, **kwargs):
        calls.append([name, [repr(a)[:80] for a in args[:2]]])
        return original(*args, **kwargs)
    return wrapper


def wrap_everywhere(name, original):
    # every module binding of the function (``from kernels import get_kernel`` copies the name)
    wrapper = recording(name, original)
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            for attribute, value in list(namespace.items()):
                if value is original:
                    setattr(module, attribute, wrapper)


targets = {
    "huggingface_hub.hf_hub_download": huggingface_hub.file_download.hf_hub_download,
    "huggingface_hub.snapshot_download": huggingface_hub._snapshot_download.snapshot_download,
    "huggingface_hub.get_session": huggingface_hub.utils._http.get_session,
}
if kernels is not None:
    for name in ("get_kernel", "has_kernel", "load_kernel", "get_locked_kernel", "install_kernel"):
        targets[f"kernels.{name}"] = getattr(kernels, name)
for name, original in targets.items():
    wrap_everywhere(name, original)
for method in ("hf_hub_download", "snapshot_download", "model_info", "list_repo_refs", "list_repo_files",
               "file_exists", "repo_info"):
    if hasattr(huggingface_hub.HfApi, method):
        setattr(huggingface_hub.HfApi, method, recording(f"HfApi.{method}", getattr(huggingface_hub.HfApi, method)))

from helpers.models import save_tiny_llama
from transformers import AutoModelForCausalLM, GenerationConfig

try:  # the paged cache's GPU memory query (5.0-5.12 read free CUDA memory)
    from transformers.generation.continuous_batching import cache
    cache.PagedAttentionMemoryHandler.get_available_memory = staticmethod(lambda *a, **k: 1 << 30)
except ImportError:
    pass

directory = save_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-llama")
report = {"steps": {}, "calls": {}}


def step(name, run):
    before = len(calls)
    try:
        result = run()
        report["steps"][name] = "ok"
    except Exception as error:
        result = None
        report["steps"][name] = f"{type(error).__name__}: {str(error)[:300]}"
    report["calls"][name] = calls[before:]
    return result


model = step("load", lambda: AutoModelForCausalLM.from_pretrained(
    directory, attn_implementation="flash_attention_2", dtype=getattr(torch, DTYPE)))
if model is not None:
    report["implementation"] = model.config._attn_implementation
    report["use_kernels"] = getattr(model, "use_kernels", None)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0,
                              use_cuda_graph=False)
    with torch.no_grad():
        step("forward", lambda: model(ids).logits.shape)
        step("generate", lambda: model.generate(ids, generation_config=config))
        if hasattr(model, "generate_batch") and GENERATE_BATCH:
            step("generate_batch", lambda: model.generate_batch(
                inputs=[[5, 6, 7, 8], [9, 10], [11, 12, 13]], generation_config=config, progress_bar=False))
print(json.dumps(report))
"""


def run_steps(use_shim: bool, dtype: str) -> tuple[dict, str]:
    """The steps in a fresh offline interpreter: the JSON report and the whole log (stderr)."""
    generate_batch = Version("5.0") <= TRANSFORMERS  # before 5.0 continuous batching has its own names
    code = f"USE_SHIM = {use_shim!r}\nDTYPE = {dtype!r}\nGENERATE_BATCH = {generate_batch!r}\n{SCRIPT}"
    # the timeout is the "no hang" check: each run takes seconds
    result = run_python(code, timeout=240, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_served_flash_model_never_reaches_the_hub(dtype: str) -> None:
    """Load, forward, generate and generate_batch of a served flash_attention_2 model: no Hub call, no error,
    no traceback in the log (bf16: where continuous batching would switch to flash through the Hub)."""
    report, log = run_steps(use_shim=True, dtype=dtype)
    assert report["implementation"] == "flash_attention_2", report
    assert set(report["steps"].values()) == {"ok"}, report["steps"]
    expected = {"load", "forward", "generate"} | (
        {"generate_batch"} if Version("5.0") <= TRANSFORMERS else set()
    )
    assert set(report["steps"]) == expected
    assert {step: calls for step, calls in report["calls"].items() if calls} == {}, report["calls"]
    assert "Traceback" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith(("ERROR", "CRITICAL"))]
    assert errors == [], errors
    if Version("5.25") <= TRANSFORMERS:
        # kernelize ran (5.25's default use_kernels=True): on the CPU its layer mapping has nothing to fetch
        assert report["use_kernels"] is True


@pytest.mark.skipif(
    Version("5.25") > TRANSFORMERS,
    reason="kernels is a dependency of transformers (and its fallback default) from 5.25",
)
def test_without_the_shim_transformers_reaches_for_a_hub_kernel() -> None:
    """The control: the wrappers see transformers' own reach for the Hub, so the test above can fail. Offline,
    the download fails and the load ends in transformers' flash-attn ImportError."""
    report, _log = run_steps(use_shim=False, dtype="bfloat16")
    assert report["steps"]["load"].startswith("ImportError"), report["steps"]
    assert ["kernels.get_kernel", ["'kernels-community/flash-attn2'"]] in report["calls"]["load"], report[
        "calls"
    ]


@pytest.mark.skipif(
    Version("5.25") > TRANSFORMERS, reason="the kernels fallback is installed (a dependency) from 5.25"
)
def test_sdpa_downgrade_generate_batch_never_reaches_the_hub() -> None:
    """The sdpa downgrade (not the default, which serves the flash path) under the same observation:
    continuous batching's automatic switch to flash (``is_flash_attn_3/2_available(kernels_fallback_ok=True)``,
    which calls ``kernels.get_kernel``) is off for a model the shim downgraded."""
    code = f"USE_SHIM = True\nDTYPE = 'bfloat16'\nGENERATE_BATCH = True\n{SCRIPT}"
    result = run_python(code, timeout=240, HF_HUB_OFFLINE="1", SDPA_SHIM_FALLBACK="sdpa")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["implementation"] == "sdpa", report
    assert set(report["steps"].values()) == {"ok"}, report["steps"]
    assert {step: calls for step, calls in report["calls"].items() if calls} == {}, report["calls"]
