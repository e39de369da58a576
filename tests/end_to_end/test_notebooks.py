"""The example notebooks, executed by a real Jupyter kernel (nbclient + ipykernel).

``startup_no_import.ipynb`` never imports the shim: its kernel runs in the throwaway venv where
sdpa_shim is installed, with ``SDPA_SHIM=1``. ``load_ext.ipynb`` uses ``%load_ext sdpa_shim`` in a
kernel of this interpreter. Either way the WARNING must be in the loading cell's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import ROOT, SRC
from helpers.expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION
from helpers.fresh import clean_env
from helpers.installs import WARNING, installed

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 - after the skips
from jupyter_client.manager import KernelManager  # noqa: E402

EXAMPLES = ROOT / "examples"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("needs_a_downgrade"),  # tests/conftest.py
]


def execute(name: str, python: str, env: dict[str, str], workdir: Path) -> list[dict[str, str]]:
    """Run examples/``name`` in a kernel of ``python``; return each code cell's stdout and stderr."""
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    kernels = workdir / "kernels"
    spec_dir = kernels / "sdpa-shim-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sdpa_shim test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    manager = KernelManager(
        kernel_name="sdpa-shim-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    client = nbclient.NotebookClient(
        notebook, km=manager, timeout=180, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env=env)
    outputs = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        streams = {"stdout": "", "stderr": ""}
        for output in cell.outputs:
            if output.output_type == "stream":
                streams[output.name] += output.text
            elif output.output_type == "error":
                streams["stderr"] += f"{output.ename}: {output.evalue}"
        outputs.append({"source": cell.source, **streams})
    return outputs


def cell(outputs: list[dict[str, str]], source_part: str) -> dict[str, str]:
    return next(o for o in outputs if source_part in o["source"])


def private_tmp(workdir: Path) -> dict[str, str]:
    """A temporary folder of the kernel's own, to see what the notebook leaves there."""
    tmp = workdir / "tmp"
    tmp.mkdir()
    return {"TMPDIR": str(tmp)}


def assert_cleaned_up(workdir: Path, outputs: list[dict[str, str]]) -> None:
    """The notebook's last cell deletes the tiny model it built in the temporary folder."""
    assert "removed " in outputs[-1]["stdout"], outputs[-1]
    assert sorted(path.name for path in (workdir / "tmp").glob("tiny-llama-*")) == []


def test_notebook_that_never_imports_the_shim_runs_with_sdpa_shim_1(tmp_path, tmp_path_factory):
    install = installed("wheel", tmp_path_factory)
    source = (EXAMPLES / "startup_no_import.ipynb").read_text()
    assert "import sdpa_shim" not in source and "load_ext" not in source.replace("%load_ext", "")
    env = clean_env(SDPA_SHIM="1", JUPYTER_PLATFORM_DIRS="1", **private_tmp(tmp_path))
    outputs = execute("startup_no_import.ipynb", str(install.python), env, tmp_path)
    load = cell(outputs, 'attn_implementation="flash_attention_2"')
    assert WARNING in load["stderr"]
    assert f"attention in use: {EXPECTED_IMPLEMENTATION}" in load["stdout"]
    assert "forward OK: (1, 8, 128) finite: True" in cell(outputs, "torch.no_grad")["stdout"]
    assert "sdpa_shim loaded at kernel start: True" in cell(outputs, "kernel start")["stdout"]
    assert_cleaned_up(tmp_path, outputs)


def test_notebook_with_load_ext(tmp_path):
    import sys

    env = clean_env(
        PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **private_tmp(tmp_path)
    )
    outputs = execute("load_ext.ipynb", sys.executable, env, tmp_path)
    load = cell(outputs, 'attn_implementation="flash_attention_2")\nprint')
    assert WARNING in load["stderr"]
    assert f"attention in use: {EXPECTED_IMPLEMENTATION}" in load["stdout"]
    assert "forward OK: (1, 8, 128) finite: True" in cell(outputs, "torch.no_grad")["stdout"]
    assert (
        f"Decision(model='LlamaForCausalLM', requested='flash_attention_2', chosen={EXPECTED_CHOSEN!r}"
        in cell(outputs, "sdpa_shim.decisions()")["stdout"]
    )
    unloaded = cell(outputs, "%unload_ext sdpa_shim")
    assert "transformers without the shim:" in unloaded["stdout"]
    assert "sdpa_shim:" not in unloaded["stderr"]
    assert_cleaned_up(tmp_path, outputs)
