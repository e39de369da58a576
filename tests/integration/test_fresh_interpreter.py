"""Import-order and import-cost behaviour, each in a fresh interpreter (the shim patches globals)."""

from __future__ import annotations

import textwrap

import pytest

from helpers.expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION
from helpers.fresh import run_python


def test_import_loads_neither_torch_nor_transformers_nor_wrapt():
    result = run_python(
        """
        import sys, sdpa_shim
        print(sorted(m for m in ("torch", "transformers", "wrapt") if m in sys.modules), sdpa_shim.is_active())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] True"


LOAD_FLASH = """
    from helpers.models import save_tiny_llama
    import tempfile, pathlib, torch
    from transformers import LlamaForCausalLM
    d = save_tiny_llama(pathlib.Path(tempfile.mkdtemp()) / "m")
    m = LlamaForCausalLM.from_pretrained(d, attn_implementation="flash_attention_2")
    print("chosen", m.config._attn_implementation)
    print("logits", tuple(m(torch.tensor([[1, 2, 3]])).logits.shape))
"""


@pytest.mark.parametrize(
    "order",
    [
        "import sdpa_shim\nimport transformers\n",
        "import transformers\nimport sdpa_shim\n",
        "import transformers.modeling_utils\nimport sdpa_shim\n",
        "from transformers import LlamaForCausalLM\nimport sdpa_shim\n",
    ],
    ids=["shim-first", "transformers-first", "modeling_utils-first", "model-class-first"],
)
def test_import_order_does_not_matter(order):
    result = run_python(order + textwrap.dedent(LOAD_FLASH))
    assert result.returncode == 0, result.stderr
    assert f"chosen {EXPECTED_IMPLEMENTATION}" in result.stdout
    assert "logits (1, 3, 128)" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("sdpa_shim:")]
    assert warnings == [
        f"sdpa_shim: LlamaForCausalLM requested flash_attention_2; using {EXPECTED_CHOSEN} instead: "
        "flash-attn is not installed"
    ]


def test_env_off_then_import_gives_transformers_error():
    result = run_python("import sdpa_shim\n" + textwrap.dedent(LOAD_FLASH), SDPA_SHIM="0")
    assert result.returncode != 0
    assert "FlashAttention2 has been toggled on" in result.stderr or "flash_attn" in result.stderr
    assert "sdpa_shim:" not in result.stderr


def test_without_shim_transformers_fails():
    result = run_python(LOAD_FLASH)
    assert result.returncode != 0
    assert "ImportError" in result.stderr or "ValueError" in result.stderr


def test_bad_env_value_warns_once_and_uses_default():
    result = run_python(
        "import sdpa_shim\n" + textwrap.dedent(LOAD_FLASH), SDPA_SHIM_FALLBACK="fast", SDPA_SHIM="maybe"
    )
    assert result.returncode == 0, result.stderr
    assert f"chosen {EXPECTED_IMPLEMENTATION}" in result.stdout
    lines = result.stderr.splitlines()
    assert (
        lines.count(
            "sdpa_shim: SDPA_SHIM_FALLBACK='fast' is not valid; accepted values: auto/sdpa/eager; using auto"
        )
        == 1
    ), result.stderr
    assert (
        lines.count(
            "sdpa_shim: SDPA_SHIM='maybe' is not valid; accepted values: 1/true/on/yes or 0/false/off/no (any case); using the default (as if unset)"
        )
        == 1
    ), result.stderr
