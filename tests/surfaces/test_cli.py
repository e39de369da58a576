"""``sdpa-shim doctor | run | demo`` and ``python -m sdpa_shim``: output, exit statuses, errors.

Most checks call the CLI in-process (torch and transformers are already imported); a few run it as
a user would, in a fresh interpreter or through the console script of a throwaway venv.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import SRC
from helpers.expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION
from helpers.fakes import BROKEN_IMPORT_ERROR, forget_flash_attn, write_flash_attn_distribution
from helpers.fresh import clean_env, shim_warnings, source_env
from helpers.installs import WARNING, flash_attn_usable_here, installed
from sdpa_shim.__main__ import main
from sdpa_shim._surfaces import cli as _cli
from sdpa_shim._surfaces import startup as _startup

BROKEN_REASON = f"flash_attn import failed: ImportError: {BROKEN_IMPORT_ERROR}"

needs_downgrade = pytest.mark.usefixtures("needs_a_downgrade")  # tests/conftest.py


@pytest.fixture
def broken_flash_attn(tmp_path, monkeypatch):
    """A fake flash_attn whose import fails with the ``undefined symbol`` error (tests/fakes.py)."""
    root = write_flash_attn_distribution(tmp_path / "site", "broken")
    monkeypatch.syspath_prepend(str(root))
    forget_flash_attn()
    yield root
    forget_flash_attn()


@pytest.fixture
def no_startup_file(monkeypatch):
    """This interpreter as if no start-up file were installed (CI may have one from `pip install -e`)."""
    monkeypatch.setattr(_startup, "installed_startup_files", lambda: [])


def doctor(capsys, *args: str) -> tuple[int, str]:
    status = main(["doctor", *args])
    return status, capsys.readouterr().out


# --------------------------------------------------------------------------- doctor


@needs_downgrade
def test_doctor_text_with_flash_attn_missing(capsys):
    status, out = doctor(capsys)
    assert status == 0
    assert "flash_attention_2  not usable: flash-attn is not installed" in out
    assert f"LlamaForCausalLM: flash_attention_2 -> {EXPECTED_CHOSEN} (flash-attn is not installed)" in out
    for section in ("Versions", "CUDA", "Flash attention", "SDPA backends", "Environment", "Shim"):
        assert f"\n{section}" in out
    assert "MATH cpu/float32" in out and "works" in out
    assert "SDPA_SHIM " in out and "start-up file" in out
    assert out.rstrip().endswith("OK: sdpa_shim can do its job here.")


@needs_downgrade
def test_doctor_json_with_broken_flash_attn_quotes_the_reason(capsys, broken_flash_attn):
    status, out = doctor(capsys, "--json")
    report = json.loads(out)
    assert status == 0 and report["ok"] is True and report["problems"] == []
    fa2 = report["flash_attention"]["flash_attention_2"]
    assert fa2 == {"usable": False, "reason": BROKEN_REASON, "version": "2.7.4"}
    assert report["versions"]["flash-attn"] == "2.7.4"
    assert report["request"]["becomes"] == EXPECTED_CHOSEN
    assert report["request"]["config_reads"] == EXPECTED_IMPLEMENTATION
    assert report["request"]["reason"] == BROKEN_REASON
    assert {"torch", "transformers", "wrapt", "python"} <= set(report["versions"])
    assert any(r["backend"] == "MATH" and r["works"] for r in report["sdpa_backends"]["results"])
    assert [row["name"] for row in report["environment"]] == [
        "SDPA_SHIM",
        "SDPA_SHIM_FALLBACK",
        "SDPA_SHIM_BACKEND",
        "SDPA_SHIM_STANDIN",
    ]
    assert report["shim"]["active"] is True and report["shim"]["patched"]


@needs_downgrade
def test_doctor_text_with_broken_flash_attn_quotes_the_reason(capsys, broken_flash_attn):
    status, out = doctor(capsys)
    assert status == 0
    assert f"flash_attention_2  not usable: {BROKEN_REASON}\n" in out
    assert f"flash_attention_2 -> {EXPECTED_CHOSEN} ({BROKEN_REASON})" in out


def test_doctor_fails_when_sdpa_shim_1_has_no_startup_file(capsys, monkeypatch, no_startup_file):
    monkeypatch.setenv("SDPA_SHIM", "1")
    status, out = doctor(capsys)
    assert status == 1
    assert "PROBLEM: SDPA_SHIM is on but no sdpa_shim start-up file is installed for this Python" in out
    assert out.rstrip().endswith("FAILED: 1 problem with sdpa_shim's own set-up.")


def test_doctor_fails_without_wrapt(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wrapt", None)  # `import wrapt` now raises ImportError
    status, out = doctor(capsys, "--json")
    report = json.loads(out)
    assert status == 1 and report["ok"] is False
    assert report["problems"][0].startswith("wrapt cannot be imported (ModuleNotFoundError")


def test_doctor_fails_on_invalid_variables_and_names_them(capsys, monkeypatch):
    monkeypatch.setenv("SDPA_SHIM_FALLBACK", "fast")
    status, out = doctor(capsys)
    assert status == 1
    assert "SDPA_SHIM_FALLBACK   'fast'   INVALID (accepted: auto/sdpa/eager); treated as unset" in out
    # the same words as the WARNING that `import sdpa_shim` logs for this value
    assert (
        "PROBLEM: SDPA_SHIM_FALLBACK='fast' is not valid; accepted values: auto/sdpa/eager; using auto\n"
        in out
    )


def test_doctor_reports_off_without_failing(capsys, monkeypatch):
    monkeypatch.setenv("SDPA_SHIM", "0")
    status, out = doctor(capsys, "--json")
    report = json.loads(out)
    assert status == 0
    assert report["environment"][0]["value"] == "0"
    assert report["request"]["becomes"] == "flash_attention_2"
    assert "SDPA_SHIM is off" in report["request"]["reason"]


@pytest.mark.slow
@needs_downgrade
def test_python_m_doctor_json_in_a_fresh_interpreter(tmp_path):
    """As a user runs it: the reason verbatim, exit 0; a bad variable: exit 1 with the message."""
    root = write_flash_attn_distribution(tmp_path / "site", "broken")
    env = clean_env(PYTHONPATH=os.pathsep.join([str(SRC), str(root)]))
    result = subprocess.run(
        [sys.executable, "-m", "sdpa_shim", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["flash_attention"]["flash_attention_2"]["reason"] == BROKEN_REASON
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- argument errors


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "doctor" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cure"], "invalid choice: 'cure'"),
        (["run"], "run needs a command, e.g.: run -- python train.py"),
        (["run", "--"], "run needs a command"),
        (["doctor", "--yaml"], "unrecognized arguments: --yaml"),
        (["demo", "--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_argument_errors_are_one_line_with_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:")
    assert message in err
    assert "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("sdpa_shim ")


def _doctor_with_transformers(monkeypatch, capsys, version: str) -> tuple[int, str]:
    from sdpa_shim._surfaces import doctor_system

    real = doctor_system.versions
    monkeypatch.setattr(doctor_system, "versions", lambda: {**real(), "transformers": version})
    return doctor(capsys)


def test_doctor_names_the_tested_range_and_warns_on_an_untested_release(capsys, monkeypatch):
    status, out = _doctor_with_transformers(monkeypatch, capsys, "5.99.0")
    assert status == 0, out
    assert "transformers       5.99.0  (tested: 4.36 ... 5.25; this one: untested)" in out
    assert "note: transformers 5.99.0 is untested; newest tested is 5.25\n" in out
    assert "PROBLEM" not in out


def test_doctor_fails_on_a_release_older_than_the_oldest_supported(capsys, monkeypatch):
    status, out = _doctor_with_transformers(monkeypatch, capsys, "4.35.2")
    assert status == 1
    assert "PROBLEM: transformers 4.35.2 is not supported: the oldest supported release is 4.36" in out


def test_doctor_range_is_the_nox_matrix():
    """OLDEST_SUPPORTED / NEWEST_TESTED are the first and last releases of noxfile.py's RELEASES."""
    from sdpa_shim._surfaces import doctor as _doctor

    noxfile = (SRC.parent / "noxfile.py").read_text()
    body = noxfile[noxfile.index("RELEASES: dict[str, str] = {") :].split("}", 1)[0]
    minors = [tuple(int(p) for p in key.split(".")) for key in re.findall(r'"(\d+\.\d+)":', body)]
    assert minors, "RELEASES not found in noxfile.py"
    assert (min(minors), max(minors)) == (_doctor.OLDEST_SUPPORTED, _doctor.NEWEST_TESTED)


def test_doctor_shows_cuda_only_backends_as_not_applicable_on_cpu(capsys):
    import torch

    report = json.loads(doctor(capsys, "--json")[1])
    cpu = {r["backend"]: r for r in report["sdpa_backends"]["results"] if r["device"] == "cpu"}
    assert cpu["MATH"]["works"] is True and cpu["MATH"]["applicable"] is True
    for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        if backend in cpu:
            assert cpu[backend]["applicable"] is False and cpu[backend]["note"] == "n/a (CUDA only)"
    if not torch.cuda.is_available():
        assert "fails" not in doctor(capsys)[1].split("SDPA backends")[1].split("\n\n")[0]


@needs_downgrade
def test_doctor_request_is_what_a_real_load_gives_for_each_fallback(capsys, monkeypatch, tmp_path):
    from transformers import LlamaForCausalLM

    from helpers.models import save_tiny_llama

    report = json.loads(doctor(capsys, "--json")[1])["request"]
    assert report["fallback"] == "auto"
    assert (report["becomes"], report["config_reads"]) == (EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION)
    assert report["facts"] == "read from transformers' LlamaForCausalLM class"
    assert {mode: outcome["becomes"] for mode, outcome in report["by_fallback"].items()} == {
        "auto": EXPECTED_CHOSEN,
        "sdpa": "sdpa",
        "eager": "eager",
    }
    model = LlamaForCausalLM.from_pretrained(
        save_tiny_llama(tmp_path / "m"), attn_implementation="flash_attention_2"
    )
    assert model.config._attn_implementation == report["config_reads"]  # the truth, not a guess
    monkeypatch.setenv("SDPA_SHIM_FALLBACK", "eager")
    status, out = doctor(capsys)
    assert status == 0
    assert (
        "LlamaForCausalLM: flash_attention_2 -> eager (flash-attn is not installed; SDPA_SHIM_FALLBACK=eager)"
        in out
    )
    assert "  * eager  -> eager\n" in out and "    sdpa   -> sdpa\n" in out
    assert "SDPA_SHIM_FALLBACK   'eager'  eager: always eager attention" in out


def test_doctor_shows_where_run_writes_its_files(capsys, monkeypatch, tmp_path, no_startup_file):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    report = json.loads(doctor(capsys, "--json")[1])
    where = report["startup"]["run_files"]
    assert where == {"sitecustomize_directory": str(_startup.sitecustomize_directory()), "written": True}
    assert where["sitecustomize_directory"].startswith(str(tmp_path / "sdpa_shim" / "sitecustomize-"))
    out = doctor(capsys)[1]
    assert f"sdpa-shim run      writes sitecustomize.py in {where['sitecustomize_directory']}\n" in out


# --------------------------------------------------------------------------- run


def test_run_command_not_found_exits_127(capsys):
    assert main(["run", "--", "no-such-command-for-sdpa-shim"]) == 127
    assert capsys.readouterr().err == "sdpa-shim run: command not found: no-such-command-for-sdpa-shim\n"


def test_run_environment_with_and_without_a_startup_file(monkeypatch, tmp_path, no_startup_file):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = _cli.command_environment()
    assert env["SDPA_SHIM"] == "1"
    first, rest = env["PYTHONPATH"].split(os.pathsep, 1)
    assert rest == "/somewhere"
    assert first == str(tmp_path / "sdpa_shim" / first.rsplit(os.sep, 1)[1])
    assert os.path.isfile(os.path.join(first, "sitecustomize.py"))
    assert _cli.command_environment(env)["PYTHONPATH"] == env["PYTHONPATH"]  # nested runs: no duplicate
    monkeypatch.setattr(_startup, "installed_startup_files", lambda: ["/site/sdpa_shim.pth"])
    assert _cli.command_environment()["PYTHONPATH"] == "/somewhere"


def test_run_passes_the_exit_status_and_activates_without_torch(tmp_path):
    code = "import os, sys; print(os.environ['SDPA_SHIM'], sys.modules['sdpa_shim'].is_active()); sys.exit(7)"
    result = subprocess.run(
        [sys.executable, "-m", "sdpa_shim", "run", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=source_env(XDG_CACHE_HOME=str(tmp_path)),
        timeout=60,
    )
    assert result.returncode == 7, result.stderr
    assert result.stdout.split() == ["1", "True"]


def test_run_leaves_the_shim_off_when_sdpa_shim_is_0(tmp_path, monkeypatch, no_startup_file):
    """``SDPA_SHIM=0`` wins over ``run``: the command runs without the shim, and one line says so."""
    monkeypatch.setenv("SDPA_SHIM", "0")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = _cli.command_environment()
    assert (env["SDPA_SHIM"], env["PYTHONPATH"]) == ("0", "/somewhere")
    code = "import os, sys; import sdpa_shim; print(os.environ['SDPA_SHIM'], sdpa_shim.is_active())"
    result = subprocess.run(
        [sys.executable, "-m", "sdpa_shim", "run", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=source_env(XDG_CACHE_HOME=str(tmp_path), SDPA_SHIM="0"),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False"]
    assert (
        result.stderr
        == f"sdpa-shim run: SDPA_SHIM=0 keeps the shim off; running {sys.executable} without it\n"
    )
    assert not list(tmp_path.iterdir())  # no sitecustomize written either


PARENT_SCRIPT = """
import subprocess, sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="flash_attention_2")
print("parent:", model.config._attn_implementation, flush=True)
child = subprocess.run([sys.executable, "-c", {child!r}, sys.argv[1]])
sys.exit(3 if child.returncode == 0 else child.returncode)
"""
CHILD = """
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="flash_attention_2")
print("child:", model.config._attn_implementation, flush=True)
"""


def _check_parent_and_child(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 3, result.stderr
    assert result.stdout.split() == ["parent:", EXPECTED_IMPLEMENTATION, "child:", EXPECTED_IMPLEMENTATION]
    assert shim_warnings(result.stderr) == [WARNING, WARNING]  # one per process


@pytest.mark.slow
@needs_downgrade
def test_run_reaches_child_processes_without_a_startup_file(tmp_path, tiny_model_dir):
    """Source checkout: no .pth anywhere, so run's sitecustomize carries the shim into both processes."""
    script = tmp_path / "script.py"
    script.write_text(PARENT_SCRIPT.format(child=CHILD))
    if _startup.startup_installed():
        pytest.skip("this Python has a start-up file installed; the venv test covers that route")
    result = subprocess.run(
        [sys.executable, "-m", "sdpa_shim", "run", "--", sys.executable, str(script), str(tiny_model_dir)],
        capture_output=True,
        text=True,
        env=source_env(XDG_CACHE_HOME=str(tmp_path)),
        timeout=180,
    )
    _check_parent_and_child(result)


@pytest.mark.slow
@needs_downgrade
def test_console_script_run_reaches_child_processes_in_an_install(tmp_path, tmp_path_factory, tiny_model_dir):
    """Installed wheel: ``sdpa-shim run`` only sets SDPA_SHIM=1; the .pth does the rest everywhere."""
    install = installed("wheel", tmp_path_factory)
    script = tmp_path / "script.py"
    script.write_text(PARENT_SCRIPT.format(child=CHILD))
    command = [
        str(install.script("sdpa-shim")),
        "run",
        "--",
        str(install.python),
        str(script),
        str(tiny_model_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=180)
    _check_parent_and_child(result)


@pytest.mark.slow
@needs_downgrade
def test_console_script_doctor_sees_startup_activation(tmp_path_factory):
    install = installed("wheel", tmp_path_factory)
    result = subprocess.run(
        [str(install.script("sdpa-shim")), "doctor"],
        capture_output=True,
        text=True,
        env=clean_env(SDPA_SHIM="1"),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\n  active here +yes \(at Python start\)\n", result.stdout)
    assert re.search(
        rf"\n  start-up file +installed \({re.escape(str(install.site_packages))}/sdpa_shim.pth, ",
        result.stdout,
    )


# --------------------------------------------------------------------------- demo


@needs_downgrade
def test_demo_on_cpu(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert f"Decision: flash_attention_2 -> {EXPECTED_CHOSEN} (flash-attn is not installed)" in out
    assert f"Attention in use: {EXPECTED_IMPLEMENTATION}" in out
    assert "Forward: input (1, 8) -> logits (1, 8, 128) float32 on cpu, all finite" in out
    assert out.rstrip().endswith("Demo OK.")


def test_demo_without_the_shim_shows_transformers_error_in_one_line(capsys):
    import sdpa_shim

    if flash_attn_usable_here():
        pytest.skip("flash-attn is usable here")
    sdpa_shim.deactivate()
    assert main(["demo", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Loading failed: ImportError: ")
    assert "Traceback" not in err


def test_demo_cuda_requested_without_a_device(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["demo", "--device", "cuda"]) == 1
    assert "torch sees no CUDA device" in capsys.readouterr().err


# --------------------------------------------------------------------------- doctor: no model can be built


def _write_broken_torchvision(root):
    """A torchvision 0.28.0 whose import fails as ``pip install torchvision==0.28.0 --no-deps`` does next
    to torch 2.13 (``operator torchvision::nms does not exist``). Faked: the real wheel is a large
    download, and installing it on purpose breaks the environment; everything else here is real."""
    package = root / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    info = root / "torchvision-0.28.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    (info / "RECORD").write_text("torchvision/__init__.py,,\n")
    return root


@pytest.mark.slow
def test_doctor_says_problem_where_no_model_can_be_built(tmp_path):
    """The broken-torchvision environment of issue 17: every load fails, so doctor must not say OK."""
    pil = pytest.importorskip("PIL", reason="transformers imports torchvision only where Pillow is installed")
    site = _write_broken_torchvision(tmp_path / "site")
    pillow_site = os.path.dirname(os.path.dirname(pil.__file__))
    env = clean_env(PYTHONPATH=os.pathsep.join([str(SRC), str(site), pillow_site]), HF_HUB_OFFLINE="1")
    load = "from transformers import LlamaConfig, LlamaForCausalLM; LlamaForCausalLM(LlamaConfig())"
    without_shim = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env)
    assert without_shim.returncode != 0 and "torchvision::nms" in without_shim.stderr  # the user's error
    result = subprocess.run(
        [sys.executable, "-m", "sdpa_shim", "doctor"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM: ")]
    assert len(problems) == 1 and problems[0].startswith("PROBLEM: transformers cannot build a model here (")
    assert "RuntimeError: operator torchvision::nms does not exist" in problems[0]
    assert "OK: sdpa_shim can do its job here." not in result.stdout
    assert "-> sdpa" not in result.stdout  # no request answered where no model can be built


@pytest.mark.parametrize("package", ["torch", "transformers"])
def test_doctor_says_problem_when_torch_or_transformers_is_missing(capsys, monkeypatch, package):
    from sdpa_shim._surfaces import doctor_system

    real = doctor_system.versions
    monkeypatch.setattr(doctor_system, "versions", lambda: {**real(), package: None})
    status, out = doctor(capsys)
    assert status == 1
    assert f"PROBLEM: {package} is not installed: " in out
    assert f"pip install {package}" in out
