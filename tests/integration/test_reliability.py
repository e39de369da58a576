"""Never break a load, never persist a rewrite, never race: faults injected into each piece of the
shim, threads loading at once, activate/deactivate racing loads, save_pretrained after downgrades,
and pass-through when flash-attn would work."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import sdpa_shim
from helpers.expect import EXPECTED_IMPLEMENTATION
from helpers.fresh import run_python
from helpers.loading import without_shim, write_config_request
from helpers.models import save_tiny_llava, tiny_llama_config

TRANSFORMERS = Version(transformers.__version__)

FAULT_POINTS = [
    "sdpa_shim._core.detect._compute",
    "sdpa_shim._integration.resolve.read_settings",
    "sdpa_shim._integration.resolve.model_facts",
    "sdpa_shim._integration.resolve.decide",
    "sdpa_shim._core.probe.sdpa_error",
    "sdpa_shim._integration.marks.mark",
    "sdpa_shim._core.decisions.record",
]


def transformers_error(load):
    def fails():
        with pytest.raises(Exception) as info:
            load()
        return info

    info = without_shim(fails)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("target", FAULT_POINTS)
def test_injected_fault_passes_the_request_through(target, tiny_llama, monkeypatch, caplog):
    """The faked piece is the shim's own code (the point of the test); transformers is real."""

    def load():
        return LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2")

    expected = transformers_error(load)
    module_name, attribute = target.rsplit(".", 1)
    if attribute == "sdpa_error":  # the SDPA probe runs only where the plain sdpa downgrade is a candidate
        monkeypatch.setenv("SDPA_SHIM_FALLBACK", "sdpa")

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected fault in {attribute}")

    monkeypatch.setattr(f"{module_name}.{attribute}", boom)
    caplog.set_level(logging.DEBUG, logger="sdpa_shim")
    with pytest.raises(Exception) as info:
        load()
    assert (type(info.value), str(info.value)) == expected
    errors = [r for r in caplog.records if r.name.startswith("sdpa_shim") and r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert f"(RuntimeError: injected fault in {attribute}); the call passes through" in errors[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("sdpa_shim") and r.levelno == logging.WARNING]
    # the same fault does not stop loads that would have worked anyway
    assert (
        AutoModelForCausalLM.from_pretrained(
            tiny_llama, attn_implementation="sdpa"
        ).config._attn_implementation
        == "sdpa"
    )


@pytest.mark.usefixtures("plain_sdpa_downgrade")  # the packed check belongs to the sdpa downgrade
def test_fault_in_packed_check_falls_back_to_plain_sdpa(monkeypatch, caplog):
    if Version("4.48") > TRANSFORMERS:
        pytest.skip("no attention registry before 4.48")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation="flash_attention_2"))

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault in boundaries")

    monkeypatch.setattr("sdpa_shim._runtime.packed.boundaries", boom)
    caplog.set_level(logging.DEBUG, logger="sdpa_shim")
    reference = without_shim(lambda: LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")))
    reference.load_state_dict(model.state_dict())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "packed-sequence check" in errors[0].getMessage()


@pytest.mark.parametrize(
    "sabotage, where",
    [
        (
            "import sdpa_shim._integration.hooks as h\ndef boom(*a):\n    raise RuntimeError('injected')\nh.hooks_for = boom\n",
            "patching transformers.modeling_utils",
        ),
        (
            "import sdpa_shim._integration.hooks as h\ndef boom(*a):\n    raise RuntimeError('injected')\nh.install = boom\n",
            "patching transformers.modeling_utils",
        ),
    ],
    ids=["hooks_for", "install"],
)
def test_failing_post_import_hook_never_breaks_import_transformers(sabotage, where):
    result = run_python(
        "import sdpa_shim\n"
        + sabotage
        + """
import transformers.modeling_utils
from transformers import LlamaForCausalLM
from helpers.models import tiny_llama_config
print("built", LlamaForCausalLM(tiny_llama_config()).config._attn_implementation)
"""
    )
    assert result.returncode == 0, result.stderr
    assert "built sdpa" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("sdpa_shim: internal error")]
    assert errors == [
        f"sdpa_shim: internal error in {where} (RuntimeError: injected); transformers is left unchanged"
    ]


def test_missing_wrapt_never_breaks_import_transformers():
    result = run_python(
        """
import sys
sys.modules["wrapt"] = None  # wrapt cannot be imported
import sdpa_shim
from transformers import LlamaForCausalLM
from helpers.models import tiny_llama_config
print("built", LlamaForCausalLM(tiny_llama_config()).config._attn_implementation)
"""
    )
    assert result.returncode == 0, result.stderr
    assert "built sdpa" in result.stdout
    assert (
        "sdpa_shim: internal error in registering the import hook (ModuleNotFoundError: import of wrapt halted"
        in result.stderr
    )


def test_usable_flash_attn_passes_through_silently(tmp_path):
    """A fake importable flash_attn plus a faked CUDA device (no kernel is ever launched): the request
    reaches transformers unchanged and the shim logs nothing above DEBUG."""
    from helpers.fakes import write_flash_attn_distribution

    site = write_flash_attn_distribution(tmp_path / "site", "usable")
    result = run_python(
        f"""
import sys, logging
sys.path.insert(0, {str(site)!r})
import torch
torch.cuda.is_available = lambda: True          # fake CUDA: only availability checks, no kernel
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda *a: (9, 0)
torch.cuda.get_device_name = lambda *a: "NVIDIA H100 80GB HBM3"
torch.version.cuda = torch.version.cuda or "12.4"   # read by is_flash_attn_2_available on 4.x
torch.set_default_dtype(torch.bfloat16)              # 4.x builds Model(config) in the default dtype
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)
logging.getLogger("sdpa_shim").addHandler(Keep(logging.DEBUG))
logging.getLogger("sdpa_shim").setLevel(logging.DEBUG)
import sdpa_shim
from transformers import LlamaForCausalLM
from helpers.models import tiny_llama_config
model = LlamaForCausalLM(tiny_llama_config(attn_implementation="flash_attention_2", dtype=torch.bfloat16))
print("chosen", model.config._attn_implementation)
print("decisions", sdpa_shim.decisions())
print("above-debug", [r.getMessage() for r in records if r.levelno > logging.DEBUG])
print("debug", any("can run here" in r.getMessage() for r in records))
"""
    )
    assert result.returncode == 0, result.stderr
    assert "chosen flash_attention_2" in result.stdout
    assert "decisions []" in result.stdout
    assert "above-debug []" in result.stdout
    assert "debug True" in result.stdout


def _wrapped_once() -> bool:
    """Every method the shim patched is one wrapper directly around transformers' original."""
    from sdpa_shim._integration import ledger

    hooked = ledger.changes("hooks")
    return bool(hooked) and all(
        vars(change.target())[change.name].__wrapped__ is change.original for change in hooked
    )


def test_threads_building_at_once(shim_records):
    """8 threads build models at once, half with a flash request. Built with ``Model(config)``: several
    releases' ``from_pretrained`` use process-global meta-device contexts that are not thread-safe."""
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def build(index: int) -> None:
        try:
            requested = "flash_attention_2" if index % 2 == 0 else "sdpa"
            config = tiny_llama_config()
            config._attn_implementation = requested
            barrier.wait(timeout=60)
            results.append(LlamaForCausalLM(config).config._attn_implementation)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert errors == []
    assert sorted(results) == sorted([EXPECTED_IMPLEMENTATION] * 4 + ["sdpa"] * 4)
    assert len(shim_records()) == 1  # one distinct decision, one WARNING
    assert [d.requested for d in sdpa_shim.decisions()] == ["flash_attention_2"]  # deduplicated
    assert _wrapped_once()


def test_activate_deactivate_racing_loads():
    from sdpa_shim._integration import ledger

    sdpa_shim.deactivate()
    registry = getattr(transformers.modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
    original_sdpa = registry["sdpa"] if registry is not None else None
    untouched = dict(vars(transformers.modeling_utils.PreTrainedModel))
    sdpa_shim.activate()
    stop = time.monotonic() + 6
    outcomes: list[str] = []

    def toggle() -> None:
        while time.monotonic() < stop:
            sdpa_shim.deactivate()
            sdpa_shim.activate()

    def build() -> None:
        while time.monotonic() < stop:
            config = tiny_llama_config()
            config._attn_implementation = "flash_attention_2"
            try:
                outcomes.append(LlamaForCausalLM(config).config._attn_implementation)
            except ImportError:  # transformers' own error while the shim is off (4.57 raises subclasses:
                outcomes.append("ImportError")  # PackageNotFoundError, ModuleNotFoundError)
            except ValueError:
                outcomes.append("ValueError")

    threads = [threading.Thread(target=toggle)] + [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert outcomes and set(outcomes) <= {EXPECTED_IMPLEMENTATION, "sdpa", "ImportError", "ValueError"}
    # settled state: fully patched (active) ...
    assert _wrapped_once()
    if registry is not None:
        assert registry["sdpa"].__wrapped__ is original_sdpa
    # ... or, after deactivate, fully original
    sdpa_shim.deactivate()
    assert not ledger.changes()
    assert all(vars(transformers.modeling_utils.PreTrainedModel)[k] is v for k, v in untouched.items())
    if registry is not None:
        assert registry["sdpa"] is original_sdpa


def attention_fields(data, path=""):
    """Every attention-implementation key in a config.json, at any depth."""
    found = {}
    for key, value in data.items():
        if isinstance(value, dict):
            found.update(attention_fields(value, f"{path}{key}."))
        elif "attn_implementation" in key:
            found[f"{path}{key}"] = value
    return found


@pytest.mark.parametrize("request_kind", ["kwarg", "config.json", "use_flash_attention_2"])
def test_save_pretrained_persists_nothing_of_the_shim(request_kind, tiny_llama, tmp_path):
    kwargs: dict = {}
    if request_kind == "kwarg":
        kwargs = {"attn_implementation": "flash_attention_2"}
    elif request_kind == "use_flash_attention_2":
        if Version("4.53") <= TRANSFORMERS:
            pytest.skip("use_flash_attention_2 was removed in 4.53")
        kwargs = {"use_flash_attention_2": True}
    else:
        write_config_request(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, **kwargs)
    assert sdpa_shim.decisions(), "the shim must have downgraded something"
    _assert_saved_like_plain_sdpa(model, AutoModelForCausalLM, tiny_llama, tmp_path)


@pytest.mark.skipif(
    Version("4.56") > TRANSFORMERS,
    reason="dict requests on Llava raise AttributeError in transformers <= 4.55 itself; older bands: test_legacy_bands",
)
@pytest.mark.parametrize("request_kind", ["dict", "sub-config"])
def test_save_pretrained_persists_nothing_of_the_shim_composite(request_kind, tmp_path):
    from transformers import LlavaForConditionalGeneration

    source = save_tiny_llava(tmp_path / "source")
    if request_kind == "dict":
        kwargs: dict = {
            "attn_implementation": {"text_config": "flash_attention_2", "vision_config": "flash_attention_2"}
        }
    else:  # a sub-config object carrying the request
        config = transformers.AutoConfig.from_pretrained(source)
        config.text_config._attn_implementation = "flash_attention_2"
        kwargs = {"config": config}
    model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
    assert sdpa_shim.decisions(), "the shim must have downgraded something"
    _assert_saved_like_plain_sdpa(model, LlavaForConditionalGeneration, source, tmp_path)


def _assert_saved_like_plain_sdpa(model, model_class, source, tmp_path) -> None:
    """config.json as transformers writes it for the same directory loaded with "sdpa" by hand, and a
    reload without the shim behaves as transformers does with that directory."""
    model.save_pretrained(tmp_path / "with-shim")
    sdpa_shim.deactivate()
    # the private keyword also beats a private config.json key (read on 4.36-5.24), which "attn_implementation"
    # does not
    plain = model_class.from_pretrained(source, _attn_implementation="sdpa")
    plain.save_pretrained(tmp_path / "without-shim")
    saved = json.loads((tmp_path / "with-shim" / "config.json").read_text())
    expected = json.loads((tmp_path / "without-shim" / "config.json").read_text())
    assert attention_fields(saved) == attention_fields(expected)
    assert "sdpa" not in json.dumps(attention_fields(saved))
    assert saved.get("_attn_implementation_autoset") in (None, False)
    reloaded = model_class.from_pretrained(tmp_path / "with-shim")
    assert reloaded.config._attn_implementation == plain.config._attn_implementation


def test_deactivate_puts_back_every_object_the_shim_replaced_and_activate_replaces_them_again():
    """The ledger's undo: transformers' availability check (everywhere it was bound), the remote-code
    functions and the hooked methods are the very objects transformers had, and come back on activate."""
    import transformers.dynamic_module_utils as dynamic_module_utils
    import transformers.utils.import_utils as import_utils

    from sdpa_shim._integration import availability, ledger

    def bindings() -> dict[tuple[str, str], object]:
        return {
            (name, attribute): value
            for name, module in list(sys.modules.items())
            if module is not None and name.startswith("transformers")
            for attribute, value in list(getattr(module, "__dict__", {}).items())
            if attribute in ("is_flash_attn_2_available", "get_imports", "get_class_in_module")
        }

    def pretrained_model() -> dict[str, object]:
        return dict(vars(transformers.modeling_utils.PreTrainedModel))

    assert availability.is_patched() and ledger.is_shim_wrapper(dynamic_module_utils.get_imports)
    sdpa_shim.deactivate()
    original, original_class = bindings(), pretrained_model()
    assert [key for key, value in original.items() if ledger.is_shim_wrapper(value)] == []
    assert not availability.is_patched()
    sdpa_shim.activate()
    patched = bindings()
    assert ledger.is_shim_wrapper(import_utils.is_flash_attn_2_available)
    assert ledger.is_shim_wrapper(dynamic_module_utils.get_imports)
    assert patched.keys() == original.keys()
    sdpa_shim.deactivate()
    assert all(value is original[key] for key, value in bindings().items())
    assert all(pretrained_model()[name] is value for name, value in original_class.items())
    sdpa_shim.activate()
    assert availability.is_patched()
