"""``SDPA_SHIM=1`` start-up activation: the ``.pth`` line, the PEP 829 entry point and the ``run``
sitecustomize in fresh interpreters, then the real thing in throwaway venvs where sdpa_shim is
installed as a wheel and in editable mode.

The venvs are built once per test session (``installed``) and shared with test_cli, test_notebooks
and test_launchers, which import the helpers below.
"""

from __future__ import annotations

import os
import shutil
import site
import statistics
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import sdpa_shim
from expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION
from sdpa_shim._surfaces import startup as _startup

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PTH_LINE = (SRC / "sdpa_shim.pth").read_text().strip()
SHIM_VARIABLES = ("SDPA_SHIM", "SDPA_SHIM_FALLBACK", "SDPA_SHIM_BACKEND", "SDPA_SHIM_STANDIN")
WARNING = (
    f"sdpa_shim: LlamaForCausalLM requested flash_attention_2; using {EXPECTED_CHOSEN} instead: "
    "flash-attn is not installed"
)

#: Loads a flash_attention_2 model and never imports sdpa_shim; argv[1] is the model directory.
LOAD_FLASH = """
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="flash_attention_2")
print("attention:", model.config._attn_implementation)
print("shim loaded:", "sdpa_shim" in sys.modules)
"""


# --------------------------------------------------------------------------- shared helpers


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without the shim's variables or PYTHONPATH, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in SHIM_VARIABLES and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.update(overrides)
    return env


def source_env(**overrides: str) -> dict[str, str]:
    """``clean_env`` with this checkout's ``src`` on PYTHONPATH (no install: no start-up file)."""
    return clean_env(PYTHONPATH=str(SRC), **overrides)


def shim_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sdpa_shim:")]


def flash_attn_usable_here() -> bool:
    from sdpa_shim._core.detect import flash_status

    return flash_status("flash_attention_2").usable


def transformers_supported() -> bool:
    """True when the core hooks this transformers release (else start-up has nothing to show)."""
    import transformers.modeling_utils

    from sdpa_shim._integration.hooks import hooks_for

    return bool(hooks_for(transformers.modeling_utils.PreTrainedModel))


@dataclass(frozen=True)
class Install:
    """A throwaway venv with sdpa_shim installed one way ("wheel" or "editable")."""

    kind: str
    root: Path
    python: Path
    site_packages: Path
    project: Path
    wheel: Path | None

    def script(self, name: str) -> Path:
        return self.python.parent / (f"{name}.exe" if os.name == "nt" else name)

    def run(
        self, args: list[str], env: dict[str, str], timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args], capture_output=True, text=True, env=env, timeout=timeout
        )


_installs: dict[str, Install] = {}


def installed(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Install:
    """The session's venv with sdpa_shim installed as ``kind``, built on first use."""
    if kind not in _installs:
        _installs[kind] = _build_install(kind, tmp_path_factory.mktemp(f"venv-{kind}"))
    return _installs[kind]


def _parent_site_directories() -> list[str]:
    directories = [
        *site.getsitepackages(),
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    ]
    if site.ENABLE_USER_SITE:
        directories.append(site.getusersitepackages())
    unique: list[str] = []
    for directory in directories:
        if os.path.isdir(directory) and directory not in unique:
            unique.append(directory)
    return unique


def _build_install(kind: str, base: Path) -> Install:
    pytest.importorskip("setuptools", reason="building sdpa_shim offline needs setuptools in the test env")
    project = base / "project"
    shutil.copytree(
        ROOT,
        project,
        ignore=shutil.ignore_patterns(
            ".git",
            ".nox",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            "tests",
            "examples",
            "docs",
        ),
    )
    if not (project / "README.md").exists():  # pyproject names it; the copy only needs it to exist
        (project / "README.md").write_text("sdpa_shim\n")
    venv = base / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True
    )
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = clean_env()
    site_packages = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
            env=env,
        ).strip()
    )
    # A venv made from a venv does not see the outer venv's packages (torch, transformers, pip,
    # setuptools): list them in a path file, which site appends after the venv's own directory.
    (site_packages / "zz_sdpa_shim_tests_parent.pth").write_text("\n".join(_parent_site_directories()) + "\n")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    offline = ["--no-deps", "--no-index", "--no-build-isolation"]
    wheel = None
    if kind == "wheel":
        dist = base / "dist"
        subprocess.run([*pip, "wheel", *offline, "-w", str(dist), str(project)], check=True, env=env)
        wheel = next(dist.glob("sdpa_shim-*.whl"))
        subprocess.run([*pip, "install", "--no-deps", "--no-index", str(wheel)], check=True, env=env)
    else:
        subprocess.run([*pip, "install", *offline, "-e", str(project)], check=True, env=env)
    return Install(kind, venv, python, site_packages, project, wheel)


_tiny_model: list[Path] = []


def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One saved tiny Llama for every subprocess of the session."""
    if not _tiny_model:
        from models import save_tiny_llama

        _tiny_model.append(save_tiny_llama(tmp_path_factory.mktemp("startup-model") / "tiny-llama"))
    return _tiny_model[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Show ``line`` in pytest's output even without ``-s`` (measurements the issue asks to report)."""
    with capsys.disabled():
        print(line)


# --------------------------------------------------------------------------- fresh interpreters, no install


def _run_code(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("value", "active"),
    [
        (None, False),
        ("", False),
        ("0", False),
        ("off", False),
        ("maybe", False),
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" On ", True),
        ("yes", True),
    ],
)
def test_pth_line_acts_only_on_true_values(value, active):
    env = source_env() if value is None else source_env(SDPA_SHIM=value)
    code = f"""
        import sys
        exec({PTH_LINE!r})
        loaded = "sdpa_shim" in sys.modules
        heavy = sorted(m for m in ("torch", "transformers", "wrapt") if m in sys.modules)
        print(loaded, loaded and sys.modules["sdpa_shim"].is_active(), heavy)
    """
    result = _run_code(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(active), str(active), "[]"]
    if value == "maybe":  # a bad value is named once, with what is accepted and what is used
        assert result.stderr == (
            "sdpa_shim: SDPA_SHIM='maybe' is not valid; accepted values: 1/true/on/yes or 0/false/off/no "
            "(any case); using the default (as if unset)\n"
        )
    else:
        assert result.stderr == ""


@pytest.mark.parametrize(("value", "active"), [(None, False), ("0", False), ("1", True), ("Yes", True)])
def test_pep_829_entry_point_acts_only_on_true_values(value, active):
    """``sdpa_shim.start`` names an entry point that imports nothing of ours unless asked."""
    entry = next(
        line.strip()
        for line in (SRC / "sdpa_shim.start").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    env = source_env() if value is None else source_env(SDPA_SHIM=value)
    code = f"""
        import pkgutil, sys
        pkgutil.resolve_name({entry!r})()  # what site does with each .start entry (PEP 829)
        loaded = "sdpa_shim" in sys.modules
        print(loaded, loaded and sys.modules["sdpa_shim"].is_active())
    """
    result = _run_code(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(active), str(active)]


def test_pth_line_never_raises_when_the_package_is_gone():
    """A stale .pth (package removed) must not break Python start: one line, no traceback."""
    result = _run_code(f"exec({PTH_LINE!r}); print('started')", clean_env(SDPA_SHIM="1"))
    assert result.returncode == 0
    assert result.stdout.strip() == "started"
    assert result.stderr.startswith("sdpa_shim: startup activation failed: ModuleNotFoundError")
    assert "Traceback" not in result.stderr


def test_startup_activate_never_raises(monkeypatch, caplog):
    def broken() -> bool:
        raise RuntimeError("boom")

    monkeypatch.setenv("SDPA_SHIM", "1")
    monkeypatch.setattr("sdpa_shim._integration.patch.activate", broken)
    assert _startup.activate() is False
    assert "start-up activation failed (RuntimeError: boom)" in caplog.text


def test_startup_activate_is_a_no_op_unless_asked(monkeypatch):
    sdpa_shim.deactivate()
    assert _startup.activate() is False
    assert not sdpa_shim.is_active()
    monkeypatch.setenv("SDPA_SHIM", "on")
    assert _startup.activate() is True
    assert sdpa_shim.is_active()


def test_sitecustomize_activates_and_chains_the_users_own(tmp_path):
    """The ``run`` fallback shadows sitecustomize; the user's one must still run, after ours."""
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "sitecustomize.py").write_text(_startup.sitecustomize_source())
    code = """
        import os, sys
        print(os.environ.get("USER_SITECUSTOMIZE_RAN"), "sdpa_shim" in sys.modules and sys.modules["sdpa_shim"].is_active())
    """
    # Our package is not on PYTHONPATH: the sitecustomize must find it by itself.
    env = clean_env(SDPA_SHIM="1", PYTHONPATH=os.pathsep.join([str(ours), str(user_dir)]))
    result = _run_code(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]
    off = _run_code(code, clean_env(PYTHONPATH=os.pathsep.join([str(ours), str(user_dir)])))
    assert off.stdout.split() == ["1", "False"]


# --------------------------------------------------------------------------- real installs (throwaway venvs)


@pytest.fixture(scope="session", params=["wheel", "editable"])
def install(request, tmp_path_factory) -> Install:
    return installed(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def wheel_install(tmp_path_factory) -> Install:
    return installed("wheel", tmp_path_factory)


@pytest.mark.slow
def test_install_places_the_startup_files_in_site_packages(install):
    for name in ("sdpa_shim.pth", "sdpa_shim.start"):
        assert (install.site_packages / name).read_text() == (SRC / name).read_text()
    where = install.run(
        ["-c", "import sdpa_shim, _sdpa_shim_startup; print(sdpa_shim.__file__)"], clean_env()
    )
    assert where.returncode == 0, where.stderr
    location = Path(where.stdout.strip())
    if install.kind == "editable":
        assert location.is_relative_to(install.project / "src")
    else:
        assert location.is_relative_to(install.site_packages)
        with zipfile.ZipFile(install.wheel) as wheel:
            names = set(wheel.namelist())
        assert {"sdpa_shim.pth", "sdpa_shim.start", "_sdpa_shim_startup.py"} <= names


@pytest.mark.slow
def test_flash_request_works_and_warns_with_sdpa_shim_1(install, tiny_model_dir):
    if flash_attn_usable_here() or not transformers_supported():
        pytest.skip("needs an unusable flash-attn and a transformers release the core hooks")
    check = LOAD_FLASH + textwrap.dedent("""
        import sdpa_shim  # a later import must not activate or wrap a second time
        from sdpa_shim._integration import ledger
        wrappers = [vars(c.target())[c.name] for c in ledger.changes("hooks")]
        print("wrapped:", len(wrappers) > 0, "double wrapped:", any(isinstance(w.__wrapped__, type(w)) for w in wrappers))
        print("activated at start:", sdpa_shim._surfaces.startup.activated_at_startup())
    """)
    result = install.run(["-c", check, str(tiny_model_dir)], clean_env(SDPA_SHIM="1"))
    assert result.returncode == 0, result.stderr
    assert f"attention: {EXPECTED_IMPLEMENTATION}" in result.stdout
    assert "shim loaded: True" in result.stdout
    assert "wrapped: True double wrapped: False" in result.stdout
    assert "activated at start: True" in result.stdout
    assert shim_warnings(result.stderr) == [WARNING]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unset", "off-then-import"])
def test_without_sdpa_shim_1_transformers_answers(wheel_install, tiny_model_dir, case):
    if flash_attn_usable_here():
        pytest.skip("flash-attn is usable here: transformers would not fail")
    if case == "unset":
        result = wheel_install.run(["-c", LOAD_FLASH, str(tiny_model_dir)], clean_env())
    else:
        code = "import sdpa_shim\n" + LOAD_FLASH
        result = wheel_install.run(["-c", code, str(tiny_model_dir)], clean_env(SDPA_SHIM="0"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "FlashAttention2 has been toggled on" in result.stderr or "flash_attn" in result.stderr
    assert shim_warnings(result.stderr) == []


def _startup_ms(python: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], check=True, env=env)
    return (time.perf_counter() - start) * 1000


@pytest.mark.slow
def test_startup_cost_is_measured(wheel_install, capsys, record_testsuite_property):
    """Measured and reported, not asserted: timings on shared CI machines are too noisy to gate on.
    Unset and set runs alternate, so a change in machine load shifts both alike."""
    runs = 15
    unset_env, on_env = clean_env(), clean_env(SDPA_SHIM="1")
    for env in (unset_env, on_env):  # warm the file cache
        _startup_ms(wheel_install.python, env)
    samples: dict[str, list[float]] = {"unset": [], "on": []}
    for _ in range(runs):
        samples["unset"].append(_startup_ms(wheel_install.python, unset_env))
        samples["on"].append(_startup_ms(wheel_install.python, on_env))
    unset, on = statistics.median(samples["unset"]), statistics.median(samples["on"])
    # The .pth line itself, with SDPA_SHIM unset: what every Python start pays for the shim.
    code = (
        f"import time\nt = time.perf_counter()\nfor _ in range(10000): exec({PTH_LINE!r})\n"
        "print((time.perf_counter() - t) / 10000 * 1e6)"
    )
    line_us = float(wheel_install.run(["-c", code], clean_env()).stdout)
    record_testsuite_property("startup_ms_unset", round(unset, 2))
    record_testsuite_property("startup_ms_sdpa_shim_1", round(on, 2))
    record_testsuite_property("pth_line_us_unset", round(line_us, 2))
    report(
        capsys,
        f"\nstart-up cost (python -c pass, median of {runs}): SDPA_SHIM unset {unset:.1f} ms, "
        f"SDPA_SHIM=1 {on:.1f} ms ({on - unset:+.1f} ms); the .pth line unset: {line_us:.2f} us",
    )
