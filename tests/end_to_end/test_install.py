"""Ready to publish, and the README's test command works for a newcomer.

* ``python -m build`` makes an sdist and, from it, a wheel; ``twine check --strict`` accepts both; the
  metadata is complete; the wheel installs into a fresh venv (no system site-packages) and its start-up
  files work there.
* The README's test command, run as a user runs it: a fresh venv, torch and nox installed into it, then
  nox creating its session venv, which must get the venv's torch (hard-linked into it). Inside nox only one test runs
  (``test_nox_session_runs_on_the_venvs_torch``), so the whole path costs about a minute with a warm pip
  cache (torch comes from the local wheel).
* A missing or wrong torch is named by nox in one line, with the command that fixes it.

Release independent: runs in the newest session only (``noxfile.RELEASE_INDEPENDENT``). The tests that run
pip against the package index are marked ``network`` (skipped when it cannot be reached: tests/conftest.py).
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from helpers import ROOT
from helpers.installs import EXPECT_TORCH_SITE, user_shell_env

pytestmark = pytest.mark.slow

TORCH = "2.13.0"
#: The README's test command (.ci/run reads it with the same pattern and runs it verbatim).
README_COMMAND = re.compile(r"^python -m pip install torch==[0-9.]+ nox && python -m nox$", re.MULTILINE)
STARTUP_FILES = ("sdpa_shim.pth", "sdpa_shim.start", "_sdpa_shim_startup.py")
#: Not copied from the checkout: VCS data, environments, build outputs, caches.
SKIPPED = (".git", ".nox", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


def base_python() -> str:
    """The interpreter a user's ``python3 -m venv`` runs (the base of this session venv)."""
    for name in ("python3", "python"):
        candidate = Path(sys.base_prefix, "bin", name)
        if candidate.exists():
            return str(candidate)
    return sys.executable


def fresh_venv(path: Path) -> Path:
    """``python3 -m venv PATH`` (with pip, without system site-packages); returns its python."""
    subprocess.run([base_python(), "-m", "venv", str(path)], check=True, env=user_shell_env(), timeout=120)
    return path / "bin" / "python"


def purelib(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.check_output([str(python), "-c", code], text=True, env=user_shell_env()).strip())


def run(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300):
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --------------------------------------------------------------------------- sdist, wheel, metadata


#: Tracked files the sdist leaves out: CI's script and VCS configuration.
NOT_IN_SDIST = (".ci/", ".gitignore")


def checkout_files() -> list[str] | None:
    """The files git tracks in this checkout (as they are on disk now), or None where there is no git."""
    try:
        result = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT, timeout=60)
    except OSError:
        return None
    if result.returncode != 0:
        return None
    return [name for name in result.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """``python -m build``: the sdist, then the wheel built from it (so the sdist must be complete)."""
    pytest.importorskip("build", reason="python -m build (installed in the newest nox session)")
    base = tmp_path_factory.mktemp("build")
    project = base / "project"
    tracked = checkout_files()
    if tracked is None:  # not a git checkout (an unpacked sdist): everything but build outputs and caches
        shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(*SKIPPED))
    else:
        for name in tracked:
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    out = base / "dist"
    # --no-isolation: offline, with the session's setuptools (pyproject's build requirements)
    result = run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(project)],
        user_shell_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = out.glob("sdpa_shim-*.tar.gz")
    (wheel,) = out.glob("sdpa_shim-*.whl")
    return sdist, wheel


def test_twine_check_accepts_the_sdist_and_the_wheel(dists):
    pytest.importorskip("twine", reason="twine (installed in the newest nox session)")
    result = run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dists)], user_shell_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_sdist_ships_what_the_wheel_is_built_from(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {"LICENSE", "README.md", "pyproject.toml", "setup.py"} | {f"src/{n}" for n in STARTUP_FILES}
    assert expected <= names
    assert "src/sdpa_shim/__init__.py" in names


def test_sdist_is_the_checkout(dists):
    """Complete: every tracked file (tests, their helpers and remote-code models, noxfile.py, examples, docs,
    bench) but CI's script, and no caches."""
    tracked = checkout_files()
    if tracked is None:
        pytest.skip("not a git checkout")
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {name for name in tracked if not name.startswith(NOT_IN_SDIST)}
    assert sorted(expected - names) == []
    assert [n for n in names if "__pycache__" in n or n.endswith(".pyc")] == []


def test_tests_run_from_the_unpacked_sdist(dists, tmp_path):
    """conftest, helpers and the remote-code models come along: a test file that uses them runs there."""
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        if sys.version_info >= (3, 12):
            archive.extractall(tmp_path, filter="data")
        else:
            archive.extractall(tmp_path)
    (unpacked,) = tmp_path.iterdir()
    env = {**os.environ, "PYTHONPATH": str(unpacked / "src")}
    env = {k: v for k, v in env.items() if not k.startswith("SDPA_SHIM")}
    result = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/core/test_policy.py"],
        env,
        cwd=unpacked,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_wheel_carries_the_startup_files_and_complete_metadata(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    assert set(STARTUP_FILES) <= names  # at the wheel root: site reads them from site-packages
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    project = pyproject()["project"]
    assert metadata["Name"] == "sdpa_shim"
    assert metadata["Version"] == project["version"]
    assert metadata["Summary"] == project["description"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "## Supported versions" in metadata.get_payload()
    assert metadata["License-Expression"] == project["license"]
    assert metadata["License-File"] == "LICENSE"
    assert metadata["Requires-Python"] == project["requires-python"]
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Repository", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    runtime = [r for r in requires if r.marker is None or "extra" not in str(r.marker)]
    assert runtime == [Requirement(r) for r in project["dependencies"]]  # wrapt only


def test_python_classifiers_match_requires_python():
    project = pyproject()["project"]
    match = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert match, "requires-python is expected to be a plain lower bound, >=3.X"
    minors = sorted(
        int(c.rsplit(".", 1)[1])
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert minors, "no Programming Language :: Python :: 3.X classifiers"
    assert minors[0] == int(match.group(1)), "the oldest classifier must be requires-python's lower bound"
    assert minors == list(range(minors[0], minors[-1] + 1)), "classifiers must not skip a version"
    assert sys.version_info.minor in minors  # the version CI runs on is claimed
    assert "Programming Language :: Python :: 3 :: Only" in project["classifiers"]


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A fresh venv without system site-packages (no torch, no transformers): its python."""
    return fresh_venv(tmp_path_factory.mktemp("bare") / "venv")


@pytest.mark.network  # pip install from the package index
def test_wheel_installs_and_works_in_a_fresh_venv(dists, bare_venv):
    _, wheel = dists
    install = run([str(bare_venv), "-m", "pip", "install", "-q", str(wheel)], user_shell_env())
    assert install.returncode == 0, install.stdout + install.stderr
    site_packages = purelib(bare_venv)
    for name in STARTUP_FILES[:2]:
        assert (site_packages / name).is_file(), f"{name} is not at the root of site-packages"
    probe = (
        "import sys; m = sys.modules.get('sdpa_shim'); "
        "print(m is not None, m is not None and m.is_active(), 'torch' in sys.modules)"
    )
    on = run([str(bare_venv), "-c", probe], user_shell_env(SDPA_SHIM="1"))
    assert (on.returncode, on.stdout.split(), on.stderr) == (0, ["True", "True", "False"], "")
    off = run([str(bare_venv), "-c", probe], user_shell_env())
    assert (off.returncode, off.stdout.split(), off.stderr) == (0, ["False", "False", "False"], "")
    cli = run([str(bare_venv.parent / "sdpa-shim"), "--help"], user_shell_env())
    assert cli.returncode == 0, cli.stderr
    assert "doctor" in cli.stdout


# --------------------------------------------------------------------------- the README's test command


def test_readme_has_the_test_command():
    assert len(README_COMMAND.findall((ROOT / "README.md").read_text())) == 1
    assert f"torch=={TORCH} " in README_COMMAND.search((ROOT / "README.md").read_text()).group()
    assert "README.md" in (ROOT / ".ci" / "run").read_text()  # CI runs the command read from there


@pytest.mark.network  # pip install from the package index
def test_noxfile_names_a_missing_or_wrong_torch_in_one_line(bare_venv, tmp_path):
    """Before any session creates or installs anything: one line, and the command that fixes it."""
    install = run([str(bare_venv), "-m", "pip", "install", "-q", "nox"], user_shell_env())
    assert install.returncode == 0, install.stdout + install.stderr
    envdir = tmp_path / "nox-envs"
    nox = [str(bare_venv), "-m", "nox", "-f", str(ROOT / "noxfile.py"), "--envdir", str(envdir)]
    fix = f"run: {bare_venv} -m pip install torch=={TORCH}"

    missing = run([*nox, "-s", "newest"], user_shell_env())
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert "torch is not installed" in missing.stderr and missing.stderr.strip().endswith(fix)

    site_packages = purelib(bare_venv)  # a stand-in for another torch release: metadata is enough
    (site_packages / "torch").mkdir()
    (site_packages / "torch" / "__init__.py").write_text("")
    (site_packages / "torch-2.5.1.dist-info").mkdir()
    (site_packages / "torch-2.5.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1\n"
    )
    try:
        wrong = run([*nox, "-s", "newest"], user_shell_env())
    finally:
        shutil.rmtree(site_packages / "torch")
        shutil.rmtree(site_packages / "torch-2.5.1.dist-info")
    assert wrong.returncode != 0
    assert wrong.stderr.strip().splitlines() == [wrong.stderr.strip()]
    assert "torch 2.5.1 is installed" in wrong.stderr and wrong.stderr.strip().endswith(fix)

    listing = run([*nox, "-l"], user_shell_env())  # listing sessions needs no torch
    assert listing.returncode == 0, listing.stderr
    assert not envdir.exists()


@pytest.mark.network  # pip install from the package index
def test_readme_test_command_in_a_fresh_venv(tmp_path, capsys):
    """``python3 -m venv``, activate, then the README's command with ``-s newest -- ONE_TEST``."""
    command = README_COMMAND.search((ROOT / "README.md").read_text()).group()
    project = tmp_path / "checkout"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(*SKIPPED))
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    torch_site = purelib(python)
    inner = "tests/end_to_end/test_install.py::test_nox_session_runs_on_the_venvs_torch"
    env = user_shell_env(VIRTUAL_ENV=str(venv), **{EXPECT_TORCH_SITE: str(torch_site)})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"  # what `source venv/bin/activate` does
    result = run(["bash", "-c", f"{command} -s newest -- {inner}"], env, cwd=project, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"^1 passed in ", result.stdout, re.MULTILINE), output[-3000:]
    # torch (and its requirements) hard-linked into the session venv; nothing else of the venv leaks in
    (session_site,) = (project / ".nox" / "newest").glob("lib/python3*/site-packages")
    assert (session_site / "torch" / "__init__.py").samefile(torch_site / "torch" / "__init__.py")
    assert not (session_site / "nox").exists()


def test_nox_session_runs_on_the_venvs_torch():
    """Runs inside the nox session that test_readme_test_command_in_a_fresh_venv starts."""
    expected = os.environ.get(EXPECT_TORCH_SITE)
    if not expected:
        pytest.skip(f"runs inside the README-command test's nox session ({EXPECT_TORCH_SITE} unset)")
    import torch
    import transformers

    import sdpa_shim

    # the session's own hard links to the venv's torch
    assert Path(torch.__file__).samefile(Path(expected, "torch", "__init__.py"))
    assert Path(torch.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert torch.__version__.split("+")[0] == TORCH
    assert transformers.__version__ == os.environ["SDPA_SHIM_MATRIX_RELEASE"]
    assert Path(sdpa_shim.__file__).resolve().is_relative_to(Path.cwd().resolve() / "src")
