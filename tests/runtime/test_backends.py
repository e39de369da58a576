"""The SDPA backend policy for downgraded models: the pure choice, the pin, the flag handling, and
that a downgraded model still computes the same logits (eager mode and under torch.compile) on CPU.

CUDA cannot exist here, so the flag tests hand ``dispatch`` a query that says it is on CUDA; SDPA's
backend flags are process-wide settings that a CPU build of torch also keeps.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers import LlamaForCausalLM

from helpers.loading import without_shim
from helpers.models import input_ids, logits, tiny_llama_config
from sdpa_shim._runtime import backends as _backends

#: The policy applies to models downgraded to sdpa (default before 4.56, SDPA_SHIM_FALLBACK=sdpa after).
pytestmark = pytest.mark.usefixtures("plain_sdpa_downgrade")

FLAGS = ("flash", "efficient", "math", "cudnn")
SETTERS = ("_set_sdp_use_flash", "_set_sdp_use_mem_efficient", "_set_sdp_use_math", "_set_sdp_use_cudnn")


@pytest.fixture(autouse=True)
def _clean_backends():
    previous = _backends._flags()
    order = list(torch._C._get_sdp_priority_order())
    _backends.reset()
    yield
    _backends.reset()
    # torch._C directly: a test may have monkeypatched the torch.backends.cuda setters
    for setter, value in zip(SETTERS, previous, strict=True):
        getattr(torch._C, setter)(value)
    torch._C._set_sdp_priority_order(order)


class FakeCudaQuery:
    """Just what ``dispatch`` reads from a query: device, shape, dtype, requires_grad."""

    is_cuda = True
    dtype = torch.bfloat16
    requires_grad = False

    def __init__(self, q_len: int, batch: int = 1) -> None:
        self.shape = torch.Size((batch, 4, q_len, 16))


def recorder():
    """An ``original`` that records the SDPA flags (and priority order) it ran under."""
    seen: list[dict[str, object]] = []

    def original(module, query, key, value, attention_mask, **kwargs):
        state = dict(zip(FLAGS, _backends._flags(), strict=True))
        state["first"] = torch._C._get_sdp_priority_order()[0]
        state["kwargs"] = kwargs
        seen.append(state)
        return "out", None

    return original, seen


LAYER = object()


def call(original, q_len: int = 8, mask=None, module=LAYER, **kwargs):
    query = FakeCudaQuery(q_len)
    key = FakeCudaQuery(max(q_len, 8))
    return _backends.dispatch(original, module, query, key, key, mask, **kwargs)


# --- the pure choice ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn", "math", "efficient", "default"])
def test_off_cuda_always_default(backend):
    for q_len, seen in ((1, 0), (512, 0), (512, 5)):
        assert _backends.select("cpu", backend, q_len, seen) == "default"
        assert _backends.select("mps", backend, q_len, seen) == "default"


@pytest.mark.parametrize(
    ("q_len", "seen", "plan"),
    [
        (1, 0, "avoid_cudnn"),  # decode (padded or not): flash / memory-efficient, no plan to build
        (1, 10, "avoid_cudnn"),
        (2, 0, "avoid_cudnn"),  # a shape seen for the first time: no plan to build
        (4096, 0, "avoid_cudnn"),
        (4096, 1, "default"),  # seen before: torch's dispatch (cuDNN on Hopper) and its cached plan
        (4096, 7, "default"),
    ],
)
def test_auto_policy(q_len, seen, plan):
    assert _backends.select("cuda", "auto", q_len, seen) == plan


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math", "default"])
def test_pins_apply_to_every_call(backend):
    for q_len, seen in ((1, 0), (4096, 0), (4096, 3)):
        assert _backends.select("cuda", backend, q_len, seen) == backend


def test_unknown_backend_means_default():
    assert _backends.select("cuda", "nonsense", 4096, 0) == "default"


# --- the pin from the environment -----------------------------------------------------------------


def test_pin_read_from_environment(monkeypatch):
    assert _backends.pinned_backend() == "auto"
    monkeypatch.setenv("SDPA_SHIM_BACKEND", " Flash ")
    assert _backends.pinned_backend() == "flash"
    monkeypatch.setenv("SDPA_SHIM_BACKEND", "math")
    assert _backends.pinned_backend() == "math"  # read per call: changes take effect at once
    monkeypatch.delenv("SDPA_SHIM_BACKEND")
    assert _backends.pinned_backend() == "auto"


def test_bad_pin_warns_once_and_uses_auto(monkeypatch, shim_records):
    monkeypatch.setenv("SDPA_SHIM_BACKEND", "fastest")
    assert [_backends.pinned_backend() for _ in range(3)] == ["auto"] * 3
    original, seen = recorder()
    call(original, q_len=1)
    assert seen[0]["cudnn"] is False  # auto policy applied
    warnings = [r.getMessage() for r in shim_records(logging.WARNING)]
    assert len(warnings) == 1, warnings
    assert "SDPA_SHIM_BACKEND='fastest' is not valid" in warnings[0]
    assert "auto/default/flash/efficient/cudnn/math" in warnings[0]


# --- shape memory ---------------------------------------------------------------------------------


def test_times_seen_counts_each_shape_per_layer():
    layer, other_layer = object(), object()
    q, k = torch.empty(1, 4, 8, 16), torch.empty(1, 4, 8, 16)
    assert [_backends.times_seen(layer, q, k, None) for _ in range(3)] == [0, 1, 2]
    assert _backends.times_seen(other_layer, q, k, None) == 0  # a model's first forward: new in every layer
    assert _backends.times_seen(layer, q, k, torch.ones(1, 1, 8, 8, dtype=torch.bool)) == 0  # a mask
    assert _backends.times_seen(layer, torch.empty(1, 4, 9, 16), torch.empty(1, 4, 9, 16), None) == 0
    q.requires_grad_(True)
    assert _backends.times_seen(layer, q, k, None) == 0  # training builds backward plans too


def test_shape_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(_backends, "MAX_SHAPES", 4)
    layer = object()
    for n in range(10):
        _backends.times_seen(layer, torch.empty(1, 1, n + 1, 2), torch.empty(1, 1, n + 1, 2), None)
    assert len(_backends._seen) <= 4


# --- applying a plan ------------------------------------------------------------------------------


def test_cpu_tensors_go_straight_to_transformers(monkeypatch):
    def refuse(*args):
        raise AssertionError("no backend flag may be touched for a CPU call")

    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", refuse)
    monkeypatch.setenv("SDPA_SHIM_BACKEND", "math")
    original, seen = recorder()
    query = torch.empty(1, 4, 8, 16)
    assert _backends.dispatch(original, object(), query, query, query, None, scaling=0.5) == ("out", None)
    assert seen[0]["kwargs"] == {"scaling": 0.5}
    assert _backends._seen == {}


def test_auto_decode_runs_without_cudnn_and_restores_flags():
    before = _backends._flags()
    original, seen = recorder()
    assert call(original, q_len=1, dropout=0.0) == ("out", None)
    assert seen[0]["cudnn"] is False
    assert seen[0]["flash"] and seen[0]["efficient"] and seen[0]["math"]
    assert seen[0]["kwargs"] == {"dropout": 0.0}
    assert _backends._flags() == before


def test_auto_prefill_first_time_without_cudnn_then_default():
    original, seen = recorder()
    layers = [object(), object()]
    for _ in range(3):  # three forwards of a two-layer model
        for layer in layers:
            call(original, q_len=512, module=layer)
    assert [s["cudnn"] for s in seen] == [False, False, True, True, True, True]


def test_auto_decode_never_cudnn_and_keeps_no_memory():
    original, seen = recorder()
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    for _ in range(3):
        call(original, q_len=1, mask=mask)
        call(original, q_len=1)
    assert [s["cudnn"] for s in seen] == [False] * 6
    assert _backends._seen == {}


def test_auto_respects_user_flags():
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_math_sdp(False)
    original, seen = recorder()
    call(original, q_len=1)  # the user left only cuDNN on: disabling it would leave no backend
    assert seen[0]["cudnn"] is True
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
    call(original, q_len=512)
    call(original, q_len=512)  # warm shape: "default" keeps the user's choice (no cuDNN)
    assert [s["cudnn"] for s in seen[1:]] == [False, False]
    assert _backends._flags() == (False, False, True, False)


@pytest.mark.parametrize(
    ("pin", "expected"),
    [
        ("flash", {"flash": True, "efficient": True, "math": True, "cudnn": False}),
        ("efficient", {"flash": False, "efficient": True, "math": True, "cudnn": False}),
        ("math", {"flash": False, "efficient": False, "math": True, "cudnn": False}),
        ("cudnn", {"flash": True, "efficient": True, "math": True, "cudnn": True}),
    ],
)
def test_pins_set_flags_for_the_call_only(monkeypatch, pin, expected):
    monkeypatch.setenv("SDPA_SHIM_BACKEND", pin)
    before = _backends._flags()
    order = list(torch._C._get_sdp_priority_order())
    original, seen = recorder()
    call(original, q_len=1)
    call(original, q_len=4096)
    for state in seen:
        assert {name: state[name] for name in FLAGS} == expected
    if pin == "cudnn":
        assert seen[0]["first"] == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    assert _backends._flags() == before
    assert list(torch._C._get_sdp_priority_order()) == order


def test_default_pin_touches_nothing(monkeypatch):
    monkeypatch.setenv("SDPA_SHIM_BACKEND", "default")
    original, seen = recorder()
    call(original, q_len=1)
    call(original, q_len=512)
    assert [s["cudnn"] for s in seen] == [True, True]
    assert _backends._seen == {}


def test_flags_restored_when_the_call_raises(monkeypatch):
    before = _backends._flags()

    def failing(*args, **kwargs):
        raise RuntimeError("kernel failed")

    for pin in ("", "efficient", "cudnn"):
        if pin:
            monkeypatch.setenv("SDPA_SHIM_BACKEND", pin)
        with pytest.raises(RuntimeError, match="kernel failed"):
            call(failing, q_len=1)
        assert _backends._flags() == before


def test_compiling_uses_sdpa_kernel_and_no_shape_memory(monkeypatch):
    """While dynamo traces, the choice is static and applied through ``sdpa_kernel`` (traceable)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    entered = []
    real = torch.nn.attention.sdpa_kernel

    def spy(backends, set_priority=False):
        entered.append(([b.name for b in backends], set_priority))
        return real(backends, set_priority=set_priority)

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", spy)
    original, seen = recorder()
    call(original, q_len=1)
    call(original, q_len=512)  # treated as a steady shape: torch's default dispatch, nothing entered
    assert entered == [(["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"], False)]
    assert seen[0]["cudnn"] is False and seen[1]["cudnn"] is True
    assert _backends._seen == {}


# --- a real downgraded model on CPU ---------------------------------------------------------------


def downgraded_and_reference():
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_llama_config(), attn_implementation="flash_attention_2")
    reference = without_shim(
        lambda: LlamaForCausalLM._from_config(tiny_llama_config(), attn_implementation="sdpa")
    )
    reference.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "sdpa"
    return model.eval(), reference.eval()


@pytest.mark.parametrize("pin", ["", "flash", "math", "cudnn", "nonsense"])
def test_downgraded_model_logits_match_on_cpu(monkeypatch, pin):
    if pin:
        monkeypatch.setenv("SDPA_SHIM_BACKEND", pin)
    model, reference = downgraded_and_reference()
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


def test_torch_compile_on_cpu_matches_eager_mode():
    model, reference = downgraded_and_reference()
    expected = logits(reference)
    torch._dynamo.reset()
    try:  # the reference is plain transformers (no shim): some releases cannot be compiled whole at all
        with torch.no_grad():
            torch.compile(reference, backend="aot_eager", fullgraph=True)(input_ids())
    except torch._dynamo.exc.Unsupported as error:
        pytest.skip(
            f"plain transformers {transformers.__version__} cannot compile with fullgraph: {error}"[:200]
        )
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = input_ids()
    with torch.no_grad():
        got = compiled(ids).logits
        again = compiled(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    torch._dynamo.reset()
