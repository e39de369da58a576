"""An installed-but-broken flash-attn (its CUDA extension fails to import) on a machine with a GPU.

In 4.36-4.54 that breaks ``from transformers import LlamaForCausalLM`` itself, for every model, because
``is_flash_attn_2_available()`` only reads metadata and the modeling modules then import flash_attn;
4.55 prompts on stdin at the first flash forward instead. With the shim active first, transformers must
behave as if flash-attn were not installed.

Each case runs in a fresh interpreter (transformers is imported once per process). The GPU is faked:
``torch.cuda.is_available`` returns True and ``torch.version.cuda`` is set *before* transformers is
imported, which is all transformers' availability check reads. No CUDA kernel is ever launched: every
model stays on the CPU and runs SDPA or eager there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import SHIM_VARIABLES, SRC, TESTS
from helpers.expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION, IMPORT_BREAKS
from helpers.fakes import BROKEN_IMPORT_ERROR, write_flash_attn_distribution

FAKE_GPU = """
    import torch
    torch.cuda.is_available = lambda: True  # fake GPU: read by the availability check only
    torch.version.cuda = "12.4"             # a CPU build has None; transformers <= 4.57 checks it
    torch.cuda.current_device = lambda: 0   # what sdpa_shim's own detection asks of a usable flash-attn
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_name = lambda device=None: "fake H100 (no kernel is ever launched)"
"""

#: ``Model(config)``, not ``from_pretrained``: 5.x builds on the meta device, and the shim then probes SDPA
#: on the (fake) CUDA device, where it cannot run, so it would rightly choose eager there.
LOAD_AND_RUN = """
    import json
    import sdpa_shim
    from helpers.models import tiny_llama_config, input_ids
    from transformers import LlamaForCausalLM
    from transformers import MistralForCausalLM, GPT2LMHeadModel, BertModel  # never asked for flash
    from transformers.utils import import_utils
    available = import_utils.is_flash_attn_2_available()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation="flash_attention_2"))
    sdpa_shim.deactivate()
    reference = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa"))
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        same = torch.equal(model(input_ids()).logits, reference(input_ids()).logits)
    print(json.dumps({
        "chosen": model.config._attn_implementation,
        "same_logits": same,
        "decisions": [[d.model, d.requested, d.chosen, d.reason] for d in sdpa_shim.decisions()],
        "available": available,
    }))
"""


def run_python(code: str, site: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with the broken flash-attn on its path and stdin closed (a prompt would fail)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(SRC), str(TESTS), environment.get("PYTHONPATH", "")]
    )
    for name in (*SHIM_VARIABLES, "CI"):
        environment.pop(name, None)
    script = textwrap.dedent(FAKE_GPU) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    return write_flash_attn_distribution(tmp_path_factory.mktemp("site"), "broken")


def _shim_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING:sdpa_shim")]


LOG_SETUP = "import logging; logging.basicConfig(level=logging.WARNING)\n"


def test_shim_first_import_load_and_run_work(broken_site):
    """Every model module imports (Llama, and models never asked for flash), a flash request becomes SDPA
    with the import error as the reason and one WARNING, the logits equal SDPA's, and nothing reads stdin
    (it is closed: 4.55.0's ``input()`` prompt would raise EOFError)."""
    import json

    result = run_python(LOG_SETUP + "import sdpa_shim\n" + textwrap.dedent(LOAD_AND_RUN), broken_site)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["chosen"] == EXPECTED_IMPLEMENTATION
    assert report["same_logits"] is True
    assert report["available"] is False
    [[model, requested, chosen, reason]] = report["decisions"]
    assert (model, requested, chosen) == ("LlamaForCausalLM", "flash_attention_2", EXPECTED_CHOSEN)
    assert reason == f"flash_attn import failed: ImportError: {BROKEN_IMPORT_ERROR}"
    assert len(_shim_warnings(result.stderr)) == 1, result.stderr[-3000:]


def test_without_the_shim_it_fails_where_documented(broken_site):
    """The control. 4.36-4.54: the plain import fails. 4.55+: it imports, and a flash request fails
    (4.55.0 asked ``input(...)`` at the first forward, an EOFError with stdin closed; later releases raise
    the ImportError at construction)."""
    result = run_python(
        """
        try:
            from transformers import LlamaForCausalLM
        except Exception as error:
            print("IMPORT FAILED", type(error).__name__, error)
            raise SystemExit
        from helpers.models import tiny_llama_config, input_ids
        try:
            model = LlamaForCausalLM(tiny_llama_config(attn_implementation="flash_attention_2"))
            model(input_ids())
        except EOFError:
            print("PROMPTED")
        except ImportError as error:
            print("REQUEST FAILED", error)
        else:
            print("RAN", model.config._attn_implementation)
        """,
        broken_site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if IMPORT_BREAKS:
        assert result.stdout.startswith("IMPORT FAILED"), result.stdout
    else:
        assert result.stdout.startswith(("PROMPTED", "REQUEST FAILED")), result.stdout
    assert "PROMPTED" in result.stdout or "undefined symbol" in result.stdout


def test_late_activation_says_how_to_fix(broken_site):
    result = run_python(
        LOG_SETUP
        + """
import transformers
import sdpa_shim
from transformers import LlamaForCausalLM
print("IMPORTED")
""",
        broken_site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED" in result.stdout
    [warning] = _shim_warnings(result.stderr)
    assert "activated after transformers was imported" in warning
    assert "import sdpa_shim before transformers" in warning


def test_usable_flash_attn_is_never_hidden(tmp_path):
    """The availability wrapper only answers False for an import that fails."""
    site = write_flash_attn_distribution(tmp_path / "site", "usable", version="2.7.4")
    result = run_python(
        """
        import sdpa_shim
        from transformers.utils import import_utils
        print(import_utils.is_flash_attn_2_available())
        """,
        site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "True"
