"""The transformers version matrix: the whole test suite against every supported release, CPU torch 2.13.0.

    python -m pip install torch==2.13.0 nox     # once, into the base interpreter (what .ci/run does)
    python -m nox                               # the matrix: every release in RELEASES
    python -m nox -s newest                     # fast dev loop: the newest release only
    python -m nox -s "tests(transformers='4.46')"   # one release
    python -m nox -r ...                        # re-use the environments of an earlier run

Why it is built this way (2 cores, clean box, under 60 minutes):

* torch is installed once, in the base interpreter, and shared: every session venv is created with
  ``--system-site-packages`` from that base interpreter (``sys.base_prefix``: a venv made from a venv
  would inherit the base's site-packages anyway, never the outer venv's). Each release's transformers,
  tokenizers, huggingface_hub and test tools are installed into its own venv and win over the base's.
  A constraint file pins torch==2.13.0 so pip can never pull a CUDA build.
* pip's wheel cache (the default ``~/.cache/pip``) is shared by all sessions: only the first download costs.
* sdpa_shim itself is not installed: ``PYTHONPATH=src`` (the install tests build their own throwaway venvs
  and check that the test interpreter has no start-up file).
* Every session runs ``tests/``; files for features a release does not have skip themselves with a
  reason. Files listed in RELEASE_INDEPENDENT run only in the newest release's session, so the matrix
  runs twice only what depends on the release.
* A release that cannot be installed or imported goes into UNSUPPORTED with the reason: its session is
  reported as skipped with that reason, and ``docs/versions.md`` (checked by tests/test_versions_table.py)
  shows it. An unexpected install failure fails the session; it is never skipped silently.

Measured on the 2-core dev box (other work running beside it; warm pip cache, fresh .nox), seconds per
session, venv + install + pytest:
    4.36 164   4.40 100   4.44 102   4.46 182   4.48 154   4.51 138   4.53 138   4.54 175
    4.55 154   4.56 168   4.57 168   5.0 159    5.4 149    5.12 140   5.23 243 (runs every file)
    whole matrix: 2334 s (39 min). A cold pip cache adds the downloads (not measured).
    Re-run with reused venvs (`nox -r`, same box): 34 min wall, 1-2 min per release, 4 min for the newest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

#: minor -> the release tested (the latest patch of that minor). Keep docs/versions.md in step:
#: ``python tests/test_versions_table.py --write`` regenerates it, and the test fails when it drifts.
RELEASES: dict[str, str] = {
    "4.36": "4.36.2",
    "4.40": "4.40.2",
    "4.44": "4.44.2",
    "4.46": "4.46.3",
    "4.48": "4.48.3",
    "4.51": "4.51.3",
    "4.53": "4.53.3",
    "4.54": "4.54.1",
    "4.55": "4.55.4",
    "4.56": "4.56.2",
    "4.57": "4.57.6",
    "5.0": "5.0.0",
    "5.4": "5.4.0",
    "5.12": "5.12.1",
    "5.23": "5.23.0",
}
#: minor -> why that release cannot be installed or imported here (torch 2.13.0 CPU, Python 3.11).
UNSUPPORTED: dict[str, str] = {}
NEWEST = "5.23"
#: Test files whose subject does not depend on the transformers release (pure policy, the stand-in's
#: numerics, CLI / start-up / launcher / notebook plumbing): they run once, in the newest release's
#: session, and every other session ignores them. Everything about attention selection runs everywhere.
RELEASE_INDEPENDENT = (
    "tests/test_policy.py",
    "tests/test_standin.py",
    "tests/test_cli.py",
    "tests/test_startup.py",
    "tests/test_launchers.py",
    "tests/test_notebooks.py",
)

TORCH = "2.13.0"
#: The test extra of pyproject.toml (less ruff) plus what the install tests build wheels with
#: (pyproject's build requirements, used there with --no-build-isolation).
TEST_DEPENDENCIES = (
    "wrapt>=1.14,!=2.2.0",
    "pytest>=7",
    "hypothesis>=6",
    "packaging",
    "accelerate",
    "setuptools>=68",
    "wheel",
)
#: A real Jupyter kernel for tests/test_notebooks.py (release-independent: newest session only).
NOTEBOOK_DEPENDENCIES = ("nbclient", "nbformat", "ipykernel")
CHECK_TORCH = (
    "import sys, torch; v = torch.__version__.split('+')[0]; "
    f"sys.exit(None if v == {TORCH!r} else f'torch {{torch.__version__}} in the base interpreter; '"
    f"'run: python -m pip install torch=={TORCH}')"
)
ROOT = Path(__file__).resolve().parent

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True


def _base_python() -> str:
    """The base interpreter (where torch is installed), even when nox itself runs in a venv."""
    for name in ("python3", "python"):
        candidate = Path(sys.base_prefix, "bin", name)
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _constraints(session: nox.Session) -> Path:
    """A pip constraint file pinning torch, so no requirement can pull another (CUDA) build."""
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text(f"torch=={TORCH}\n")
    return constraints


def _run_suite(session: nox.Session, minor: str) -> None:
    if minor in UNSUPPORTED:
        session.skip(f"transformers {minor} is unsupported: {UNSUPPORTED[minor]}")
    release = RELEASES[minor]
    constraints = _constraints(session)
    # torch comes from the base interpreter; check it is the pinned CPU build before installing anything.
    session.run("python", "-c", CHECK_TORCH, silent=True)
    notebooks = NOTEBOOK_DEPENDENCIES if minor == NEWEST else ()  # the notebook tests run there only
    session.install(
        "--constraint", str(constraints), f"transformers=={release}", *TEST_DEPENDENCIES, *notebooks
    )
    session.run(
        "python",
        "-c",
        "import torch, transformers; from transformers import LlamaForCausalLM; "
        "print('transformers', transformers.__version__, 'torch', torch.__version__)",
    )
    env = {
        "PYTHONPATH": str(ROOT / "src"),
        "SDPA_SHIM_MATRIX_RELEASE": release,  # tests/test_versions_table.py checks it is what got installed
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    once = [] if minor == NEWEST else [f"--ignore={path}" for path in RELEASE_INDEPENDENT]
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *once, *session.posargs, env=env)


@nox.session(python=_base_python(), venv_params=["--system-site-packages"], tags=["matrix"])
@nox.parametrize("transformers", list(RELEASES))
def tests(session: nox.Session, transformers: str) -> None:
    """The whole test suite against one transformers release (every release: the matrix)."""
    _run_suite(session, transformers)


@nox.session(python=_base_python(), venv_params=["--system-site-packages"])
def newest(session: nox.Session) -> None:
    """Fast dev loop: the whole test suite against the newest release only."""
    _run_suite(session, NEWEST)
