"""Remote-code models that import flash_attn themselves (dots.ocr and its kind), loaded with trust_remote_code.

Our own small packages (tests/helpers/remote_models) cover each import pattern seen in the wild: top level,
try/except with an eager fallback, ``if is_flash_attn_2_available():``, lazily in ``__init__``,
``flash_attn.flash_attn_interface`` qkvpacked, ``bert_padding`` round trips, and Phi-3's
``inspect.signature(flash_attn_func)`` check. With the shim, each loads, serves its flash path with the
stand-in and matches its own eager path; without it, each fails the way the reference
(transformers-attention.md §7, flash-attn-in-the-wild.md §4) says. Afterwards ``import flash_attn``
behaves as it did before the load, in the same process.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import threading
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

import sdpa_shim
from helpers import ROOT
from helpers.fakes import forget_flash_attn, write_flash_attn_distribution
from helpers.fresh import run_python
from helpers.loading import without_shim
from helpers.remote_models import PATTERNS, attention_classes, build, inputs, load, run
from sdpa_shim._core import detect as _detect
from sdpa_shim._integration import remote_code as _remote_code
from sdpa_shim._integration import standin_import as _standin_import

TRANSFORMERS = Version(transformers.__version__)
#: 4.45+: ``check_imports`` skips imports under ``if is_flash_attn_*_available():`` and re-raises an
#: ImportError that is not "No module named" (a broken flash-attn) instead of calling it missing.
IF_SKIPPED = RERAISES_BROKEN = Version("4.45") <= TRANSFORMERS
REQUIRES = (
    "This modeling file requires the following packages that were not found in your environment: flash_attn"
)
FLASH_CLASS = {"top_varlen": "VisionFlashAttention2"}
WARNING_TEXT = (
    "RemoteTinyModel imports flash_attn (modeling_{}); serving it with sdpa_shim's PyTorch stand-in: "
)


@pytest.fixture(autouse=True)
def _forget_served():
    _remote_code.clear()
    yield
    _remote_code.clear()


@pytest.fixture(params=["missing", "broken"])
def missing_or_broken(request, tmp_path, monkeypatch):
    if request.param == "broken":
        monkeypatch.syspath_prepend(str(write_flash_attn_distribution(tmp_path / "site", "broken")))
    forget_flash_attn()
    yield request.param
    forget_flash_attn()


def served_warnings(records) -> list[str]:
    return [r.getMessage() for r in records() if "imports flash_attn" in r.getMessage()]


def assert_flash_attn_as_before(mode: str, before: object) -> None:
    """Nothing of the stand-in is left: ``import flash_attn`` does what it did without the shim."""
    assert not [
        name
        for name, m in sys.modules.items()
        if _standin_import.is_flash_name(name) and _standin_import.is_standin(m)
    ]
    if mode == "missing":
        assert importlib.util.find_spec("flash_attn") is None
        with pytest.raises(ModuleNotFoundError, match="No module named 'flash_attn'"):
            import flash_attn
    elif mode == "broken":
        with pytest.raises(ImportError, match="undefined symbol"):
            import flash_attn
    else:  # an importable flash_attn that cannot run here: the very same module object is back
        import flash_attn

        assert flash_attn is before and flash_attn.__version__ == "2.7.4"
    assert not transformers.utils.is_flash_attn_2_available()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_loads_and_matches_its_eager_path(pattern, flash_failure, tmp_path, shim_records):
    mode, reason = flash_failure
    _detect.flash_status("flash_attention_2")  # imports an importable fake flash_attn, as a real load would
    before = sys.modules.get("flash_attn")
    path = build(pattern, tmp_path)

    model = load(path, pattern)
    flash_output = run(model, pattern)  # 4.40-4.44 run the module again at the next load, resetting globals
    eager = load(path, pattern, "eager")
    eager.load_state_dict(model.state_dict())

    assert attention_classes(model) == {FLASH_CLASS.get(pattern, "FlashAttention2")}
    assert "FlashAttention2" not in str(attention_classes(eager))
    torch.testing.assert_close(flash_output, run(eager, pattern), rtol=0, atol=1e-5)
    [warning] = served_warnings(shim_records)  # one per model, however often its module runs
    assert warning.startswith(WARNING_TEXT.format(pattern) + reason)
    uses = _remote_code.standin_uses()  # 4.40-4.44 run the remote module again at every load
    assert uses and {(use.model, use.importers[0].rpartition(".")[2]) for use in uses} == {
        ("RemoteTinyModel", f"modeling_{pattern}")
    }
    assert_flash_attn_as_before(mode, before)


def expected_without_shim(pattern: str, mode: str) -> tuple[str, type[Exception], str] | None:
    """(stage, exception, message) of a load without the shim; None: it loads, on eager."""
    refused = pattern in ("top_varlen", "lazy", "qkvpacked") or (
        pattern in ("guard", "bert_padding") and not IF_SKIPPED
    )
    if refused:  # check_imports: imports in function bodies count too (lazy)
        if mode == "broken" and RERAISES_BROKEN:
            return "load", ImportError, "undefined symbol"
        return "load", ImportError, REQUIRES
    if pattern == "try_eager":
        return None
    undefined = {
        "guard": "flash_attn_func",
        "bert_padding": "unpad_input",
        "window": "_flash_supports_window_size",
    }
    return "forward", NameError, f"name '{undefined[pattern]}' is not defined"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_without_the_shim_fails_as_the_reference_says(pattern, missing_or_broken, tmp_path, capsys):
    sdpa_shim.deactivate()
    path = build(pattern, tmp_path)
    expected = expected_without_shim(pattern, missing_or_broken)
    if expected is None:
        model = load(path, pattern)
        assert attention_classes(model) == {"TinyAttention"}
        assert "flash attention not available! fallback to eager implementation" in capsys.readouterr().out
        return
    stage, error, message = expected
    if stage == "load":
        with pytest.raises(error, match=message):
            load(path, pattern)
    else:
        model = load(path, pattern)
        with pytest.raises(error, match=message):
            run(model, pattern)


def test_dots_style_from_pretrained_and_save_round_trip(tmp_path, shim_records):
    """The text request is downgraded by the core shim; the plain vision attribute keeps its flash class."""
    forget_flash_attn()
    model = load(build("top_varlen", tmp_path), "top_varlen")
    model.register_for_auto_class("AutoModel")  # from_config leaves it unset in 4.46-4.55: no code saved
    model.save_pretrained(tmp_path / "saved")
    original = json.loads((tmp_path / "saved" / "config.json").read_text())

    reloaded = transformers.AutoModel.from_pretrained(
        tmp_path / "saved", trust_remote_code=True, attn_implementation="flash_attention_2"
    )
    assert attention_classes(reloaded) == {"VisionFlashAttention2"}
    assert reloaded.config.vision_config.attn_implementation == "flash_attention_2"
    torch.testing.assert_close(run(reloaded, "top_varlen"), run(model, "top_varlen"), rtol=0, atol=1e-5)
    assert [(d.requested, d.chosen) for d in sdpa_shim.decisions()] == [("flash_attention_2", "sdpa")]

    reloaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    saved.pop("_name_or_path", None), original.pop("_name_or_path", None)  # written by 4.36-4.4x
    assert saved == original  # nothing the shim changed is persisted
    assert "sdpa" not in json.dumps(saved)
    # Written out, or left out as the class default (4.36 diffs nested configs against their defaults).
    assert saved["vision_config"].get("attn_implementation", "flash_attention_2") == "flash_attention_2"
    again = transformers.AutoConfig.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert again.vision_config.attn_implementation == "flash_attention_2"
    assert len(served_warnings(shim_records)) == 1  # one per model, though loaded from two directories


def test_sdpa_and_eager_vision_classes_agree_with_the_stand_in(tmp_path):
    """dots.ocr's dense-mask SDPA class, its eager class and the stand-in's varlen compute the same thing."""
    forget_flash_attn()
    path = build("top_varlen", tmp_path)
    flash = load(path, "top_varlen")
    outputs = [run(flash, "top_varlen")]
    for choice in ("sdpa", "eager"):
        other = load(path, "top_varlen", choice)
        other.load_state_dict(flash.state_dict())
        outputs.append(run(other, "top_varlen"))
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=0, atol=1e-5)


def test_lazy_import_is_served_only_inside_construction(tmp_path):
    forget_flash_attn()
    path = build("lazy", tmp_path)
    model = load(path, "lazy")
    module = sys.modules[type(model).__module__]
    assert module.flash_attn_unpadded_func.__module__ == "sdpa_shim.standin.flash_attn_interface"
    with pytest.raises(ModuleNotFoundError):
        module._import_flash_attn()  # after loading, the same lazy import is not served
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    type(model)(config)  # direct construction is served again


def test_get_imports_drops_flash_attn_only_while_active_and_unusable(tmp_path, missing_or_broken):
    from transformers import dynamic_module_utils

    file = build("top_varlen", tmp_path) / "modeling_top_varlen.py"
    assert "flash_attn" not in dynamic_module_utils.get_imports(file)
    dynamic_module_utils.check_imports(file)
    sdpa_shim.deactivate()
    assert "flash_attn" in dynamic_module_utils.get_imports(file)


def test_guard_is_true_only_for_remote_modules_inside_a_load():
    forget_flash_attn()
    check = transformers.utils.is_flash_attn_2_available
    remote = {"__name__": "transformers_modules.example.modeling_example", "check": check}
    with _remote_code.loading("Model"):
        assert check() is False  # transformers' own callers
        assert eval("check()", remote) is True
    assert eval("check()", remote) is False


def test_what_the_finder_serves_to_a_remote_module():
    forget_flash_attn()
    remote = {"__name__": "transformers_modules.example.modeling_example"}
    with _remote_code.loading("Model"):
        assert eval("__import__('importlib.util').util.find_spec('flash_attn') is not None", remote)
        assert importlib.util.find_spec("flash_attn") is None  # not for the test module itself
        exec("import flash_attn.flash_attn_interface as fai; from flash_attn import flash_attn_func", remote)
        assert remote["fai"].flash_attn_func is remote["flash_attn_func"] is sdpa_shim.standin.flash_attn_func
        with pytest.raises(ModuleNotFoundError, match="stand-in does not provide it"):
            exec("import flash_attn.ops.rms_norm", remote)
        with pytest.raises(ModuleNotFoundError):
            exec("import flash_attn._kernels", remote)  # private: never a second copy of the stand-in
    assert sdpa_shim.standin.__spec__.name == "sdpa_shim.standin"
    assert not [name for name in sys.modules if _standin_import.is_flash_name(name)]


def test_windows_nest_across_threads():
    """The stand-in stays in sys.modules until the last open load in any thread ends."""
    forget_flash_attn()
    remote = {"__name__": "transformers_modules.example.modeling_example"}
    opened, closed = threading.Barrier(2), threading.Event()
    seen = {}

    def other_load():
        with _remote_code.loading("Other"):
            exec("import flash_attn", remote)
            opened.wait()
            closed.wait(10)

    thread = threading.Thread(target=other_load)
    thread.start()
    with _remote_code.loading("Model"):
        opened.wait()
        exec("from flash_attn.bert_padding import unpad_input", remote)
    seen["after_first"] = _standin_import.is_standin(sys.modules.get("flash_attn"))
    closed.set()
    thread.join(10)
    assert seen["after_first"] is True
    assert "flash_attn" not in sys.modules and "flash_attn.bert_padding" not in sys.modules


def test_concurrent_loads(tmp_path):
    forget_flash_attn()
    patterns = ("top_varlen", "lazy", "bert_padding")
    paths = {pattern: build(pattern, tmp_path) for pattern in patterns}
    results, errors = {}, []
    start = threading.Barrier(len(patterns))

    def worker(pattern):
        try:
            start.wait(10)
            results[pattern] = run(load(paths[pattern], pattern), pattern)
        except BaseException as error:  # reported below, with the pattern
            errors.append((pattern, error))

    threads = [threading.Thread(target=worker, args=(pattern,)) for pattern in patterns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(results) == sorted(patterns)
    assert_flash_attn_as_before("missing", None)


def test_a_fault_leaves_the_load_as_without_the_shim(tmp_path, monkeypatch, shim_records, capsys):
    forget_flash_attn()

    def boom():
        raise RuntimeError("injected")

    monkeypatch.setattr(_standin_import, "hide_real", boom)
    model = load(build("try_eager", tmp_path), "try_eager")
    assert attention_classes(model) == {"TinyAttention"}  # its own fallback, as without the shim
    assert "fallback to eager" in capsys.readouterr().out
    [error] = [r for r in shim_records(logging.ERROR)]
    assert "internal error in opening a remote-code load (RuntimeError: injected)" in error.getMessage()
    assert "flash_attn" not in sys.modules


def test_a_fault_in_the_import_check_keeps_transformers_check(tmp_path, monkeypatch, shim_records):
    forget_flash_attn()

    def boom(implementation):
        raise RuntimeError("injected detection fault")

    monkeypatch.setattr(_remote_code, "flash_status", boom)
    with pytest.raises(ImportError, match=REQUIRES):
        load(build("top_varlen", tmp_path), "top_varlen")
    assert len(shim_records(logging.ERROR)) == 1


@pytest.mark.skipif(
    Version("5.4") <= TRANSFORMERS < Version("5.12"),
    reason="transformers 5.4's is_flash_attn_4_available raises KeyError when flash_attn is importable "
    "without a distribution (the stand-in imported before transformers); documented in the README",
)
def test_opt_in_serves_flash_attn_everywhere(tmp_path):
    """SDPA_SHIM_STANDIN=1: ``import flash_attn`` works without transformers, and stays after a load."""
    model_dir = build("top_varlen", tmp_path)
    result = run_python(
        f"""
        import json, sys
        import sdpa_shim
        import flash_attn, torch
        from flash_attn.bert_padding import pad_input, unpad_input
        q = torch.randn(1, 5, 2, 8)
        out = flash_attn.flash_attn_func(q, q, q, causal=True)
        from helpers.remote_models import load, run
        from transformers.utils import is_flash_attn_2_available
        model = load({str(model_dir)!r}, "top_varlen")
        run(model, "top_varlen")
        print(json.dumps({{
            "module": flash_attn.flash_attn_func.__module__,
            "shape": list(out.shape),
            "still_served": sys.modules["flash_attn"] is flash_attn,
            "available": is_flash_attn_2_available(),
        }}))
        """,
        SDPA_SHIM_STANDIN="1",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "module": "sdpa_shim.standin.flash_attn_interface",
        "shape": [1, 5, 2, 8],
        "still_served": True,
        "available": False,
    }
    assert result.stderr.count("SDPA_SHIM_STANDIN=1: serving `import flash_attn`") == 1
    off = run_python(
        "import sdpa_shim\ntry:\n    import flash_attn\nexcept ImportError:\n    print('off')",
        SDPA_SHIM="0",
        SDPA_SHIM_STANDIN="1",
    )
    assert off.stdout.strip() == "off", off.stderr


def test_example_runs():
    result = run_python((ROOT / "examples" / "remote_code_vision.py").read_text())
    assert result.returncode == 0, result.stderr
    assert "serving it with sdpa_shim's PyTorch stand-in" in result.stderr
    assert "vision attention classes: VisionFlashAttention2" in result.stdout
    assert "import flash_attn after loading: ModuleNotFoundError" in result.stdout


# --- Issue 11: never worse than without the shim; the right names in the log ------------------------------

HALF = (torch.float16, torch.bfloat16)
DTYPE_KEY = "dtype" if TRANSFORMERS.major >= 5 else "torch_dtype"  # 5.x deprecates torch_dtype
INTERN_GUARDS = {
    "try": None,  # the file as written: try / bare except
    "if_available": (
        "from transformers.utils import is_flash_attn_2_available\n\n"
        "has_flash_attn = False\n"
        "if is_flash_attn_2_available():\n"
        "    from flash_attn.bert_padding import pad_input, unpad_input\n"
        "    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func\n\n"
        "    has_flash_attn = True\n"
    ),
    "find_spec": (
        "import importlib.util\n\n"
        "has_flash_attn = False\n"
        'if importlib.util.find_spec("flash_attn") is not None:\n'
        "    from flash_attn.bert_padding import pad_input, unpad_input\n"
        "    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func\n\n"
        "    has_flash_attn = True\n"
    ),
}


def build_intern(tmp_path, guard: str = "try", **overrides) -> Path:
    """The InternViT-style package, its ``try`` block replaced by the guard named (same flash class)."""
    path = build("try_asserts", tmp_path, **overrides)
    if INTERN_GUARDS[guard] is not None:
        file = path / "modeling_try_asserts.py"
        text = file.read_text()
        start, end = (
            text.index("try:\n"),
            text.index("    has_flash_attn = False\n") + len("    has_flash_attn = False\n"),
        )
        file.write_text(text[:start] + INTERN_GUARDS[guard] + text[end:])
    return path


def outcome(model, pattern: str):
    """What running the model gives: ("output", tensor) or ("raises", exception type)."""
    try:
        return "output", run(model, pattern)
    except Exception as error:
        return "raises", type(error)


def remote_module(model):
    return sys.modules[type(model).__module__]


def guard_decisions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "guards its flash_attn import" in r.getMessage()]


def load_and_run(path: Path, dtype: torch.dtype):
    """(model or None, ("output", tensor) | ("raises at load" | "raises", exception type))."""
    try:
        model = load(path, "try_asserts", **{DTYPE_KEY: dtype})
    except Exception as error:
        return None, ("raises at load", type(error))
    return model, outcome(model, "try_asserts")


@pytest.mark.parametrize("guard", INTERN_GUARDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_asserting_flash_path_is_not_served_on_cpu(
    guard, dtype, flash_failure, tmp_path, monkeypatch, shim_records, caplog
):
    """InternViT on CPU: the import stays unserved, every layer takes its own attention: never worse.

    Where the load works without the shim it gives exactly the same model and output with it. Where it
    does not (``check_imports`` requires flash_attn under a ``find_spec`` guard, or under
    ``is_flash_attn_2_available()`` before 4.45), the shim's load works and runs the model's fallback;
    except where flash_attn's own import fails it (find_spec finds a broken install): then as without.
    """
    mode, _ = flash_failure
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a CUDA machine
    with_shim, got = load_and_run(build_intern(tmp_path, guard), dtype)

    def plain():
        forget_flash_attn()
        return load_and_run(build_intern(tmp_path, guard), dtype)

    without, expected = without_shim(plain)

    # An importable flash_attn (no_cuda), or a broken one that find_spec finds, is imported as without the shim.
    fallback = mode == "missing" or (mode == "broken" and guard != "find_spec")
    if without is not None or not fallback:
        assert got[0] == expected[0]
        if got[0] == "output":
            torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)  # the very same computation
        else:
            assert got[1] is expected[1]
    if with_shim is not None and without is not None:
        assert attention_classes(with_shim) == attention_classes(without)
        assert remote_module(with_shim).has_flash_attn is remote_module(without).has_flash_attn
    if fallback:
        assert got[0] == "output" and attention_classes(with_shim) == {"InternAttention"}
        assert remote_module(with_shim).has_flash_attn is False
        assert not served_warnings(shim_records)
        [decision] = guard_decisions(caplog)
        assert "not served: the module checks CUDA/half precision (line " in decision
        assert f"this load: cpu, {str(dtype).removeprefix('torch.')}: its own fallback runs" in decision


@pytest.mark.parametrize("guard", INTERN_GUARDS)
@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, None],
    ids=["bfloat16", "float16", "float32", "default"],
)
def test_cuda_asserting_flash_path_is_served_for_cuda_half_precision(
    guard, dtype, tmp_path, monkeypatch, shim_records, caplog
):
    """The serving decision on a CUDA machine: served exactly when the model is built in float16/bfloat16.

    Faked: only ``torch.cuda.is_available()`` (True). The decision is made while the remote module runs
    at load, before any tensor exists, so no kernel is launched; the forward is not run (its
    ``assert qkv.is_cuda`` would fail on these CPU tensors). "default": no dtype argument, config.json says
    bfloat16: ``from_config`` builds in bfloat16 from 4.49 on (its default is the config's dtype), in
    float32 before; the shim must read it the way transformers does.
    """
    forget_flash_attn()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kwargs = {} if dtype is None else {DTYPE_KEY: dtype}
    model = load(build_intern(tmp_path, guard, torch_dtype="bfloat16"), "try_asserts", **kwargs)

    built = next(model.parameters()).dtype
    served = built in HALF
    # from_config builds in the config's dtype by default from 4.49 on (torch's default before).
    assert built == (dtype or (torch.bfloat16 if Version("4.49") <= TRANSFORMERS else torch.float32))
    assert remote_module(model).has_flash_attn is served
    assert attention_classes(model) == (
        {"InternAttention", "FlashAttention"} if served else {"InternAttention"}
    )
    [decision] = guard_decisions(caplog)
    assert f"this load: cuda, {str(built).removeprefix('torch.')}" in decision
    assert ("served: " if served else "not served: ") in decision
    if served:
        module = remote_module(model)
        assert module.flash_attn_varlen_qkvpacked_func is sdpa_shim.standin.flash_attn_varlen_qkvpacked_func
        [warning] = served_warnings(shim_records)
        assert warning.startswith("RemoteTinyModel imports flash_attn (modeling_try_asserts); ")
    else:
        assert not served_warnings(shim_records)
    assert "flash_attn" not in sys.modules


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_cuda_asserting_flash_path_runs_on_the_stand_in_on_cuda(dtype, tmp_path):
    """On a real CUDA device in half precision the InternViT flash path runs, served, and matches eager."""
    forget_flash_attn()
    path = build_intern(tmp_path)
    flash = load(path, "try_asserts", **{DTYPE_KEY: dtype}).cuda()
    assert attention_classes(flash) == {"InternAttention", "FlashAttention"}
    sdpa_shim.deactivate()
    eager = load(build_intern(tmp_path), "try_asserts", **{DTYPE_KEY: dtype}).cuda()
    assert attention_classes(eager) == {"InternAttention"}
    eager.load_state_dict(flash.state_dict())
    feed = {name: value.cuda() for name, value in inputs("try_asserts").items()}
    with torch.no_grad():
        got, expected = flash(**feed), eager(**feed)
    mask = feed["attention_mask"][..., None]
    torch.testing.assert_close(got * mask, expected * mask, rtol=2e-2, atol=2e-2)


def test_guarded_dots_style_tower_is_served_on_cpu(flash_failure, tmp_path, shim_records, caplog):
    """dots.ocr's later tower: its flash class runs on CPU/float32 through the stand-in; matches its fallback."""
    _, reason = flash_failure
    path = build("try_dots", tmp_path)
    model = load(path, "try_dots")
    served = run(model, "try_dots")
    eager = load(path, "try_dots", "eager")
    eager.load_state_dict(model.state_dict())

    assert attention_classes(model) == {"VisionFlashAttention2"}
    assert attention_classes(eager) == {"VisionAttention"}
    torch.testing.assert_close(served, run(eager, "try_dots"), rtol=0, atol=1e-5)
    [warning] = served_warnings(shim_records)
    assert warning.startswith(WARNING_TEXT.format("try_dots") + reason)
    assert any(
        "modeling_try_dots guards its flash_attn import (try/except ImportError); served: no CUDA or "
        "half-precision check in the module" in message
        for message in guard_decisions(caplog)
    )


def test_guarded_dots_style_tower_without_the_shim_takes_its_fallback(tmp_path, capsys):
    forget_flash_attn()
    sdpa_shim.deactivate()
    model = load(build("try_dots", tmp_path), "try_dots")
    assert attention_classes(model) == {"VisionAttention"}
    assert "fallback to eager implementation" in capsys.readouterr().out
    run(model, "try_dots")


def test_supports_sdpa_property_never_crashes_the_load(tmp_path, shim_records):
    """Florence-2's ``_supports_sdpa`` property (raises on the half-built model). 4.54+ decide on the model
    being built: the property raises there, so the load chooses eager and says why. Bands A-B decide on
    the class and write "sdpa where this class can", which transformers evaluates itself (as without the
    shim): the load works either way."""
    forget_flash_attn()
    model = load(build("property_sdpa", tmp_path), "property_sdpa", attn_implementation="flash_attention_2")

    [decision] = sdpa_shim.decisions()
    if Version("4.54") <= TRANSFORMERS:
        assert model.config._attn_implementation == "eager"
        assert attention_classes(model) == {"TinyAttention"}
        assert (decision.requested, decision.chosen) == ("flash_attention_2", "eager")
        assert "_supports_sdpa" in decision.reason
    else:
        assert (decision.requested, decision.chosen) == ("flash_attention_2", "sdpa")
    run(model, "property_sdpa")


def test_warning_names_the_model_class_and_every_importing_module(tmp_path, shim_records):
    """The config class resolves first (it lives in the modeling file) and a second module imports flash_attn."""
    forget_flash_attn()
    model = load(build("config_beside", tmp_path), "config_beside")
    run(model, "config_beside")

    [warning] = served_warnings(shim_records)
    assert warning.startswith(
        "RemoteTinyModel imports flash_attn (modeling_config_beside, vision_embedding_beside); "
    )
    assert "BesideConfig" not in " ".join(r.getMessage() for r in shim_records())
    uses = _remote_code.standin_uses()
    assert uses and {use.model for use in uses} == {"RemoteTinyModel"}
    assert {name.rpartition(".")[2] for use in uses for name in use.importers} == {
        "modeling_config_beside",
        "vision_embedding_beside",
    }


SOURCE_CASES = {
    "try_importerror": ("try:\n    from flash_attn import f\nexcept ImportError:\n    f = None\n", 2, True),
    "try_bare": ("try:\n    import flash_attn\nexcept:\n    pass\n", 2, True),
    "try_tuple": ("try:\n    import flash_attn\nexcept (AttributeError, Exception):\n    pass\n", 2, True),
    "try_other": ("try:\n    import flash_attn\nexcept AttributeError:\n    pass\n", 2, False),
    "try_else": ("try:\n    pass\nexcept ImportError:\n    pass\nelse:\n    import flash_attn\n", 6, False),
    "if_available": ("if is_flash_attn_2_available():\n    from flash_attn import f\n", 2, True),
    "if_find_spec": ("if importlib.util.find_spec('flash_attn'):\n    import flash_attn\n", 1, True),
    "top_level": ("import torch\nfrom flash_attn import f\n", 2, False),
}


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_what_counts_as_a_guarded_import(case):
    from sdpa_shim._integration import remote_guards

    text, line, guarded = SOURCE_CASES[case]
    facts = remote_guards.read_source(text)
    assert any(first <= line <= last for first, last, _ in facts.guards) is guarded


@pytest.mark.parametrize(
    ("check", "flagged"),
    [
        ("assert qkv.is_cuda", True),
        ("assert qkv.dtype in [torch.float16, torch.bfloat16]", True),
        ("assert x.dtype == torch.half", True),
        ("if not x.is_cuda:\n    raise RuntimeError('cuda only')", True),
        ("if x.device.type != 'cuda':\n    raise ValueError", True),
        ("assert torch.cuda.is_available()", True),
        ("assert mask.dtype == torch.bool", False),
        ("if x.dtype == torch.float16:\n    x = x.float()", False),  # converts, does not refuse
    ],
)
def test_what_counts_as_a_cuda_or_half_precision_check(check, flagged):
    from sdpa_shim._integration import remote_guards

    assert bool(remote_guards.read_source(check).checks) is flagged
