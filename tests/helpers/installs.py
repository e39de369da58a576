"""Throwaway venvs with sdpa_shim installed (as a wheel, or editable), built once per test session, and
what the tests that use them share: the WARNING a start-up activation logs, a tiny saved model, skip
conditions, and the environment of a user's shell.

Used by tests/surfaces (test_startup, test_cli) and tests/end_to_end (test_launchers, test_notebooks,
test_install).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT, SRC
from helpers.expect import EXPECTED_CHOSEN
from helpers.fresh import clean_env

#: The start-up line of ``sdpa_shim.pth``.
PTH_LINE = (SRC / "sdpa_shim.pth").read_text().strip()
#: The one line a start-up activation logs for a flash request of the tiny Llama (flash-attn missing).
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
#: Set by tests/end_to_end/test_install.py's README-command test for the one test it runs inside nox.
EXPECT_TORCH_SITE = "SDPA_SHIM_EXPECT_TORCH_SITE"


def flash_attn_usable_here() -> bool:
    from sdpa_shim._core.detect import flash_status

    return flash_status("flash_attention_2").usable


def transformers_supported() -> bool:
    """True when the core hooks this transformers release (else start-up has nothing to show)."""
    import transformers.modeling_utils

    from sdpa_shim._integration.hooks import hooks_for

    return bool(hooks_for(transformers.modeling_utils.PreTrainedModel))


def user_shell_env(**overrides: str) -> dict[str, str]:
    """The environment a user's shell would have: none of this session venv, PYTHONPATH or the shim's
    variables (nox puts its session venv first on PATH and sets VIRTUAL_ENV). Unlike ``fresh.clean_env``,
    which keeps this session's venv (the throwaway installs see its torch and transformers)."""
    session_bin = str(Path(sys.prefix, "bin"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", EXPECT_TORCH_SITE)
        and not key.startswith("SDPA_SHIM")
    }
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != session_bin)
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(overrides)
    return env


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
