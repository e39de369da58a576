"""Shared fixtures: every test starts with the shim active, clean caches and a clean environment."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import sdpa_shim
from fakes import forget_flash_attn, write_flash_attn_distribution
from sdpa_shim._core import decisions as _decisions
from sdpa_shim._core import detect as _detect
from sdpa_shim._core import faults as _faults
from sdpa_shim._core import probe as _probe
from sdpa_shim._core import settings as _settings

SHIM_VARIABLES = ("SDPA_SHIM", "SDPA_SHIM_FALLBACK", "SDPA_SHIM_BACKEND", "SDPA_SHIM_STANDIN")


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
    from models import save_tiny_llama

    return save_tiny_llama(tmp_path / "tiny-llama")
