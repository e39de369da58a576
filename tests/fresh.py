"""Running code in a fresh interpreter with the project and the test helpers importable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
SHIM_VARIABLES = ("SDPA_SHIM", "SDPA_SHIM_FALLBACK", "SDPA_SHIM_BACKEND", "SDPA_SHIM_STANDIN")


def run_python(code: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter; the shim's variables are unset unless given in ``env``."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    environment["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), environment.get("PYTHONPATH", "")])
    for name in SHIM_VARIABLES:
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
