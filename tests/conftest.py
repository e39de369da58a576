"""The one conftest: every test starts with the shim active, clean caches and a clean environment; the
fixtures more than one test file uses; the ``network`` marker's skip.

Helpers (functions, constants, fake distributions, tiny models) live in ``tests/helpers`` (a package;
``tests/`` is put on ``sys.path`` here, and on PYTHONPATH for fresh interpreters by
``helpers.fresh.run_python``). Fixtures used by one file stay in that file.

Network: tests that run pip against the package index are marked ``network`` and skipped when it cannot
be reached. The signal is ``SDPA_SHIM_TESTS_NETWORK`` when set ("1": run them, "0": skip them);
otherwise a quick check, once per session: a TCP connection (3 s timeout) to the host of the index pip
uses (``PIP_INDEX_URL``, else https://pypi.org/simple; a ``file://`` index counts when it exists).
``HF_HUB_OFFLINE`` is not the signal: it is set for every test (no Hub, ever), online or not.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Remote code is written to and imported from transformers' module cache: one per test session, so that
# runs side by side (two releases, two checkouts) never import each other's ``transformers_modules``.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="sdpa-shim-tests-modules-"))
sys.path.insert(0, str(Path(__file__).parent))

import sdpa_shim
from helpers import SHIM_VARIABLES
from helpers.fakes import forget_flash_attn, write_flash_attn_distribution
from sdpa_shim._core import decisions as _decisions
from sdpa_shim._core import detect as _detect
from sdpa_shim._core import faults as _faults
from sdpa_shim._core import probe as _probe
from sdpa_shim._core import settings as _settings

NETWORK_VARIABLE = "SDPA_SHIM_TESTS_NETWORK"


def reset_shim_state() -> None:
    _decisions.clear()
    _faults.clear()
    _detect.clear_cache()
    _probe.clear_cache()
    _settings.reset_warnings()


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    for name in SHIM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    reset_shim_state()
    sdpa_shim.activate()
    yield
    sdpa_shim.activate()
    reset_shim_state()


# --------------------------------------------------------------------------- the network marker


@functools.cache
def package_index_unreachable() -> str | None:
    """Why pip cannot reach its package index from here, or None when it can (see the module docstring)."""
    setting = os.environ.get(NETWORK_VARIABLE, "").strip()
    if setting in ("0", "1"):
        return None if setting == "1" else f"{NETWORK_VARIABLE}=0"
    url = os.environ.get("PIP_INDEX_URL", "").split()[:1] or ["https://pypi.org/simple"]
    parts = urlsplit(url[0])
    if parts.scheme == "file":
        return None if Path(parts.path).exists() else f"the package index {url[0]} does not exist"
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"the package index ({host}:{port}) cannot be reached: {error}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("network") is not None:
        reason = package_index_unreachable()
        if reason is not None:
            pytest.skip(f"needs the package index ({reason}; set {NETWORK_VARIABLE}=1 to run anyway)")


# --------------------------------------------------------------------------- shared fixtures


@pytest.fixture
def plain_sdpa_downgrade(monkeypatch):
    """``SDPA_SHIM_FALLBACK=sdpa``: the plain sdpa downgrade, which 4.56+ takes only when asked for
    (before 4.56 it is the default); for tests of what that downgrade does (backends, packed rows)."""
    monkeypatch.setenv("SDPA_SHIM_FALLBACK", "sdpa")


@pytest.fixture
def shim_records(caplog):
    """Records from the ``sdpa_shim`` logger at WARNING and above."""
    caplog.set_level(logging.DEBUG, logger="sdpa_shim")

    def records(level: int = logging.WARNING):
        return [r for r in caplog.records if r.name.startswith("sdpa_shim") and r.levelno >= level]

    return records


@pytest.fixture(params=["missing", "broken", "no_cuda"])
def flash_failure(request, tmp_path, monkeypatch):
    """Each failure mode a CPU machine can produce, as (mode, expected reason).

    "missing": no flash_attn anywhere. "broken": a fake flash_attn distribution whose import raises
    the ``undefined symbol`` error. "no_cuda": a fake *importable* flash_attn on this CUDA-less machine.
    """
    mode = request.param
    if mode == "no_cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this failure mode needs a machine without a CUDA device")
    if mode == "missing":
        reason = "flash-attn is not installed"
    else:
        root = write_flash_attn_distribution(tmp_path / "site", "broken" if mode == "broken" else "usable")
        monkeypatch.syspath_prepend(str(root))
        reason = "flash_attn import failed: ImportError: " if mode == "broken" else "no CUDA device"
    forget_flash_attn()
    yield mode, reason
    forget_flash_attn()


@pytest.fixture
def tiny_llama(tmp_path):
    """A tiny Llama saved in this test's temp dir (the test may change its files)."""
    from helpers.models import save_tiny_llama

    return save_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """One saved tiny Llama for the whole session, read-only: for subprocesses (start-up, ``run``, launchers)."""
    from helpers.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("startup-model") / "tiny-llama")


@pytest.fixture
def needs_a_downgrade():
    """Skips unless a flash request is downgraded here: flash-attn unusable, and a release the core hooks
    (start-up activation, launchers, notebooks: otherwise they have nothing to show)."""
    from helpers.installs import flash_attn_usable_here, transformers_supported

    downgraded = not flash_attn_usable_here() and transformers_supported()
    _detect.clear_cache()  # fixtures after this one may put a (fake) flash_attn in place
    if not downgraded:
        pytest.skip("needs an unusable flash-attn and a transformers release the core hooks")
