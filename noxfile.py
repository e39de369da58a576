"""The transformers version matrix: the whole test suite against every supported release, CPU torch 2.13.0.

    nox                      # the matrix: every release in RELEASES (what .ci/run runs)
    nox -s newest            # fast dev loop: the newest release only
    nox -s "tests(transformers='4.46')"   # one release
    nox -r ...               # re-use the environments of an earlier run (skips installs)

Why it is built this way (2 cores, clean box, under 60 minutes):

* torch is installed once, into ``.nox/_torch-<version>`` with ``pip install --target``, and every session's
  venv reads it through a ``.pth`` file appended after its own site-packages. ``--system-site-packages`` is
  not enough: a venv made from a venv inherits the *base* interpreter's site-packages (not the outer
  venv's), and the base interpreter's own packages (numpy, pytest, ...) would then leak into each release.
  With the layer, each release's own transformers/tokenizers/huggingface_hub/numpy win, torch is shared,
  and a constraint file pins torch so pip can never pull a CUDA build.
* pip's wheel cache (the default ``~/.cache/pip``) is shared by all sessions: only the first download costs.
* Every session runs the whole ``tests/`` directory; files for features a release does not have skip
  themselves with a reason, so a release only runs what its band needs.
* A release that cannot be installed or imported goes into UNSUPPORTED with the reason: its session is
  reported as skipped with that reason, and ``docs/versions.md`` (checked by tests/test_versions_table.py)
  shows it. An unexpected install failure fails the session; it is never skipped silently.

Measured: (filled in below after a full run)
"""

from __future__ import annotations

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

TORCH = "2.13.0"
TEST_DEPENDENCIES = ("pytest>=7", "hypothesis>=6", "packaging", "setuptools>=68", "wheel")
ROOT = Path(__file__).resolve().parent

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True


def _torch_layer(session: nox.Session) -> Path:
    """``.nox/_torch-<version>``: torch and its dependencies, installed once for every session."""
    layer = ROOT / ".nox" / f"_torch-{TORCH}"
    if (layer / ".complete").exists():
        return layer
    staging = layer.with_name(layer.name + ".partial")
    session.run("rm", "-rf", str(staging), external=True)
    session.run(
        "python", "-m", "pip", "install", "--quiet", "--target", str(staging), f"torch=={TORCH}", silent=False
    )
    session.run("rm", "-rf", str(layer), external=True)
    staging.rename(layer)
    (layer / ".complete").write_text(TORCH + "\n")
    return layer


def _link_torch(session: nox.Session, layer: Path) -> Path:
    """Append the torch layer to this venv's ``sys.path``; return a pip constraint file pinning torch."""
    purelib = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    )
    assert isinstance(purelib, str)
    Path(purelib.strip(), "_sdpa_shim_torch_layer.pth").write_text(f"{layer}\n")
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text(f"torch=={TORCH}\n")
    return constraints


def _run_suite(session: nox.Session, minor: str) -> None:
    if minor in UNSUPPORTED:
        session.skip(f"transformers {minor} is unsupported: {UNSUPPORTED[minor]}")
    release = RELEASES[minor]
    layer = _torch_layer(session)
    constraints = _link_torch(session, layer)
    # One resolve: the release, the project (editable) with its test extra, and what the install tests
    # build wheels with (pyproject's build requirements, used with --no-build-isolation).
    session.install(
        "--constraint", str(constraints), f"transformers=={release}", "-e", ".[test]", *TEST_DEPENDENCIES
    )
    session.run(
        "python",
        "-c",
        "import torch, transformers; from transformers import LlamaForCausalLM; "
        "print('transformers', transformers.__version__, 'torch', torch.__version__)",
    )
    env = {
        "SDPA_SHIM_MATRIX_RELEASE": release,  # tests/test_versions_table.py checks it is what got installed
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs, env=env)


@nox.session(tags=["matrix"])
@nox.parametrize("transformers", list(RELEASES))
def tests(session: nox.Session, transformers: str) -> None:
    """The whole test suite against one transformers release (every release: the matrix)."""
    _run_suite(session, transformers)


@nox.session
def newest(session: nox.Session) -> None:
    """Fast dev loop: the whole test suite against the newest release only."""
    _run_suite(session, NEWEST)
