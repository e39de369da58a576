"""README.md's example outputs are what the code prints today: each one is produced here and compared.

What is checked (the README says so under its first example):

* a ```python block followed by a ```text block: the code runs in a fresh interpreter (this checkout's
  ``src`` on ``PYTHONPATH``, ``"some/model"`` replaced by a tiny random Llama saved in a temporary folder), and
  what it prints, stdout and stderr together, must be the text block;
* a ```console block: each ``$ command`` runs in ``bash`` from the checkout's root (``python`` and
  ``sdpa-shim`` are this interpreter and this checkout's command line), and what it prints must be the lines
  up to the next ``$``.

In an expected line ``...`` matches any text (temporary paths, timings). Blank lines are ignored on both sides.
transformers' progress bars and advisory warnings are switched off (they are transformers' output, not the
shim's). The outputs are those of a CPU without flash-attn on transformers 4.56+ (the flash path): elsewhere
the file skips.

Also checked: every shim log line shown in a fenced block is in a checked block, and the README states each
section once.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, SRC
from helpers.fresh import clean_env

README = ROOT / "README.md"
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```\n", re.MULTILINE | re.DOTALL)
#: What stands for a model id in the README's code.
MODEL_PLACEHOLDER = '"some/model"'
#: A line of the shim's log output, wherever it appears in a fenced block.
SHIM_LOG_LINE = re.compile(r"^(WARNING:? )?sdpa_shim: ", re.MULTILINE)


def blocks() -> list[tuple[str, str, int]]:
    """Every fenced block of the README: (language, body, line number of the opening fence)."""
    text = README.read_text()
    return [(m["lang"], m["body"], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def python_examples() -> list[tuple[str, str, int]]:
    """(code, expected output, line) for each ```python block directly followed by a ```text block."""
    found = blocks()
    return [
        (body, following[1], line)
        for (lang, body, line), following in itertools.pairwise(found)
        if lang == "python" and following[0] == "text"
    ]


def console_commands() -> list[tuple[str, str, int]]:
    """(command, expected output, line) for each ``$ command`` of every ```console block."""
    commands = []
    for lang, body, line in blocks():
        if lang != "console":
            continue
        current: list[str] | None = None
        for text in body.splitlines():
            if text.startswith("$ "):
                current = [text[2:]]
                commands.append((current, line))
            elif current is not None:
                current.append(text)
    return [(lines[0], "\n".join(lines[1:]), line) for lines, line in commands]


def matches(expected: str, actual: str) -> bool:
    """``actual`` is ``expected``, line by line, blank lines ignored, ``...`` matching any text."""
    want = [line for line in expected.splitlines() if line.strip()]
    got = [line.rstrip() for line in actual.splitlines() if line.strip()]
    if len(want) != len(got):
        return False
    return all(
        re.fullmatch(".*".join(map(re.escape, w.rstrip().split("..."))), g) is not None
        for w, g in zip(want, got, strict=True)
    )


# --------------------------------------------------------------------------- the checks that need no model


def test_the_readme_has_checked_examples():
    assert len(python_examples()) >= 4
    assert len(console_commands()) >= 4


def test_every_shim_log_line_in_a_fenced_block_is_checked():
    """A log line shown outside a checked block could drift from the code."""
    found = blocks()
    checked = {line for lang, _, line in found if lang == "console"}
    checked |= {
        after[2] for before, after in itertools.pairwise(found) if (before[0], after[0]) == ("python", "text")
    }
    unchecked = [
        f"README.md:{line}"
        for lang, body, line in found
        if SHIM_LOG_LINE.search(body) and line not in checked
    ]
    assert unchecked == []


def test_each_section_once():
    headings = re.findall(r"^#{1,4} .+$", README.read_text(), re.MULTILINE)
    assert len(headings) == len(set(headings)), [h for h in headings if headings.count(h) > 1]


def test_links_to_files_of_the_checkout_resolve():
    targets = re.findall(r"\]\((?!https?://|#)([^)#]+)", README.read_text())
    assert targets, "no relative links found"
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_anchors_resolve():
    text = README.read_text()

    def slug(heading: str) -> str:
        heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        return heading.replace(" ", "-")

    anchors = {slug(h) for h in re.findall(r"^#{1,4} (.+)$", text, re.MULTILINE)}
    assert sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - anchors) == []


def test_no_install_from_the_index_is_suggested():
    """sdpa_shim is not published: the README installs it from a checkout or a built wheel."""
    text = README.read_text()
    suggested = re.findall(r"pip install (?:-U )?sdpa[_-]shim(?![\w.-])", text)
    assert len(suggested) == text.count("`pip install sdpa_shim` finds nothing")
    assert "in a venv" in text.lower()


# --------------------------------------------------------------------------- running the examples


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory) -> dict[str, str]:
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("the README's outputs are those of a machine without flash-attn")
    transformers = pytest.importorskip("transformers")
    from sdpa_shim._core.versions import version_tuple

    if version_tuple(transformers.__version__) < (4, 56):
        pytest.skip("the README's outputs are those of transformers 4.56+ (the flash path)")
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, prefix in (("python", ""), ("sdpa-shim", "-m sdpa_shim ")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {prefix}"$@"\n')
        (bin_dir / name).chmod(0o755)
    return clean_env(
        PYTHONPATH=str(SRC),
        PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        TMPDIR=str(tmp_path_factory.mktemp("tmp")),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("code", "expected", "line"), [pytest.param(*e, id=f"README.md:{e[2]}") for e in python_examples()]
)
def test_python_example_prints_what_the_readme_shows(code, expected, line, readme_env, tiny_model_dir):
    assert MODEL_PLACEHOLDER in code, f"README.md:{line}: the example loads no model"
    program = code.replace(MODEL_PLACEHOLDER, repr(str(tiny_model_dir)))
    result = subprocess.run(
        [sys.executable, "-c", program],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=readme_env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout
    assert matches(expected, result.stdout), (
        f"README.md:{line} shows:\n{expected}\nthe code prints:\n{result.stdout}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "expected", "line"), [pytest.param(*c, id=f"README.md:{c[2]}") for c in console_commands()]
)
def test_console_example_prints_what_the_readme_shows(command, expected, line, readme_env):
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", "-c", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=readme_env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout
    assert matches(expected, result.stdout), (
        f"README.md:{line} shows:\n{expected}\n`{command}` prints:\n{result.stdout}"
    )


def test_matching_rules():
    assert matches("a ... c", "a b b c\n")
    assert matches("x\n\ny", "x\ny\n")
    assert not matches("a", "a\nb")
    assert not matches("a ... c", "a b d")
