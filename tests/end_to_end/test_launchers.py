"""Multi-process launchers: ``torchrun`` and ``accelerate launch`` start two CPU ranks (gloo) of
examples/launcher_script.py, which never imports sdpa_shim. With ``SDPA_SHIM=1`` in the environment
and sdpa_shim installed (the session's wheel venv), every rank loads its flash_attention_2 model on
SDPA and logs the decision exactly once.
"""

from __future__ import annotations

import ast
import re

import pytest

from helpers import ROOT
from helpers.expect import EXPECTED_IMPLEMENTATION
from helpers.fresh import clean_env
from helpers.installs import WARNING, installed

SCRIPT = ROOT / "examples" / "launcher_script.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("needs_a_downgrade"),  # tests/conftest.py
]


def launch(tmp_path_factory, launcher: list[str]):
    install = installed("wheel", tmp_path_factory)
    env = clean_env(
        SDPA_SHIM="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_DISABLE_PROGRESS_BARS="1"
    )
    return install.run(["-m", *launcher, str(SCRIPT)], env, timeout=150)


def check_ranks(result) -> None:
    """Two ranks share the launcher's stdout and stderr, so their lines may interleave mid-line:
    look for each rank's result and the WARNINGs anywhere in the text, not line by line."""
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    ranks = sorted(
        re.findall(
            r"rank \d/2: attention=\S+ logits=\([^)]*\) same_on_all_ranks=\w+ sdpa_shim=[\w ]+?(?=rank|\n|$)",
            result.stdout,
        )
    )
    assert ranks == [
        f"rank {rank}/2: attention={EXPECTED_IMPLEMENTATION} logits=(1, 8, 128) same_on_all_ranks=True sdpa_shim=active"
        for rank in (0, 1)
    ], output
    assert result.stderr.count(WARNING) == 2, output  # once per rank
    assert result.stderr.count("sdpa_shim:") == 2, output


def test_the_script_never_imports_the_shim():
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "sdpa_shim" for name in imported)
    assert "import_module" not in SCRIPT.read_text()


def test_the_scripts_commands_are_the_readmes():
    """The launch commands of the script's docstring are the README's (whose accelerate form the test below
    runs: --multi_gpu starts the two processes)."""
    pattern = re.compile(r"^ *(SDPA_SHIM=1 .*examples/launcher_script\.py)$", re.MULTILINE)
    from_script = pattern.findall(SCRIPT.read_text())
    assert len(from_script) == 2
    assert from_script == pattern.findall((ROOT / "README.md").read_text())
    assert any("accelerate launch --multi_gpu --num_processes 2 " in line for line in from_script)


def test_torchrun_two_cpu_ranks(tmp_path_factory):
    result = launch(tmp_path_factory, ["torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    check_ranks(result)


def test_accelerate_launch_two_cpu_processes(tmp_path_factory):
    pytest.importorskip("accelerate")
    # accelerate starts several local processes through torch elastic (its --multi_gpu path, which
    # also runs CPU ranks); `--cpu --num_processes 2` alone runs a single process unless mpirun is set up.
    launcher = [
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    result = launch(tmp_path_factory, launcher)
    check_ranks(result)
