"""Helpers shared by the test files (no tests here); ``tests/`` is on ``sys.path`` (tests/conftest.py).

- ``expect``: what a flash request becomes on the transformers release under test (no transformers import);
- ``loading``: the ways a flash request reaches transformers, ``without_shim``, the one-WARNING assertion;
- ``models``: tiny real models and tokenizers, built in memory (no downloads);
- ``fakes``: what a CPU machine cannot have (flash-attn distributions, broken or importable);
- ``fresh``: fresh interpreters and the environments subprocesses get;
- ``installs``: throwaway venvs with sdpa_shim installed as a wheel or editable, built once per session;
- ``standin_reference``: float64 references for the flash_attn stand-in;
- ``remote_models``: small remote-code model packages, one per flash_attn import pattern.

Everything here imports neither torch nor transformers at import time, except ``loading``, ``models``,
``standin_reference`` and ``remote_models``.
"""

from __future__ import annotations

from pathlib import Path

#: The checkout, its ``src`` and its ``tests`` folders.
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
TESTS = ROOT / "tests"
#: The shim's environment variables: unset for every test (conftest) and every subprocess unless given.
SHIM_VARIABLES = ("SDPA_SHIM", "SDPA_SHIM_FALLBACK", "SDPA_SHIM_BACKEND", "SDPA_SHIM_STANDIN")
