"""Fresh interpreters, and the environments subprocesses get.

Two environments, for two kinds of subprocess:

- ``run_python`` / ``source_env``: this checkout's ``src`` (and ``tests``, for ``helpers``) on PYTHONPATH,
  the test process's environment otherwise: sdpa_shim importable without an install (no start-up file);
- ``clean_env``: the test process's environment without the shim's variables and without PYTHONPATH,
  for interpreters that must find sdpa_shim by themselves (a throwaway install, ``sdpa-shim run``).

``installs.user_shell_env`` is a third: a user's shell, without this session's venv at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from helpers import SHIM_VARIABLES, SRC, TESTS


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without the shim's variables or PYTHONPATH, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in SHIM_VARIABLES and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.update(overrides)
    return env


def source_env(**overrides: str) -> dict[str, str]:
    """``clean_env`` with this checkout's ``src`` on PYTHONPATH (no install: no start-up file)."""
    return clean_env(PYTHONPATH=str(SRC), **overrides)


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


def shim_warnings(stderr: str) -> list[str]:
    """The shim's lines in a subprocess's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("sdpa_shim:")]
