"""Remote-code models that import flash_attn themselves (dots.ocr and its kind), loaded with trust_remote_code.

Our own small packages (tests/remote_models) cover each import pattern seen in the wild: top level,
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
from fakes import forget_flash_attn, write_flash_attn_distribution
from fresh import run_python
from remote_models import PATTERNS, attention_classes, build, load, run
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
ROOT = Path(__file__).resolve().parents[1]
FLASH_CLASS = {"top_varlen": "VisionFlashAttention2"}
WARNING_TEXT = "sdpa_shim: RemoteTinyModel imports flash_attn (modeling_{}); serving it with sdpa_shim's PyTorch stand-in: "


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
        from remote_models import load, run
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
