"""docs/versions.md cannot drift from the matrix or from what is hooked; README.md names the matrix's range.

The table is generated from ``noxfile.RELEASES`` / ``UNSUPPORTED`` (read with ``ast``: nox itself is not
installed in the test environments) and ``BANDS`` below. Every matrix session then checks its own row
against reality: the methods the shim actually wrapped, and where availability is patched.

Regenerate after changing the matrix or the hooks:  python tests/integration/test_versions_table.py --write
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "versions.md"
README = ROOT / "README.md"
NOXFILE = ROOT / "noxfile.py"


@dataclass(frozen=True)
class Band:
    first: str  # first minor release of the band, inclusive
    last: str  # last minor release, inclusive
    name: str
    hooks: tuple[str, ...]  # PreTrainedModel methods the shim wraps, in the order it wraps them
    availability: str  # where is_flash_attn_2_available is wrapped
    broken_without_shim: str  # what an installed-but-broken flash-attn does to plain transformers


_LEGACY = ("_autoset_attn_implementation",)
_MODERN = ("_check_and_adjust_attn_implementation",)
_BOUND = "`import_utils` + every `from … import` binding"
BANDS: tuple[Band, ...] = (
    # post_init (bands A-B, where decisions are made on the class): a model downgraded to eager, or to sdpa
    # before the attention registry (4.48), refuses packed rows from there (the pre-hook is added only then)
    Band(
        "4.36",
        "4.45",
        "A",
        (*_LEGACY, "post_init"),
        _BOUND,
        "`from transformers import LlamaForCausalLM` fails",
    ),
    Band(
        "4.46",
        "4.52",
        "B",
        (*_LEGACY, "__init__", "post_init"),
        _BOUND,
        "`from transformers import LlamaForCausalLM` fails",
    ),
    Band(
        "4.53",
        "4.53",
        "B",
        (*_LEGACY, "__init__", "from_pretrained", "_from_config", "post_init"),
        _BOUND,
        "`from transformers import LlamaForCausalLM` fails",
    ),
    Band("4.54", "4.54", "C", _MODERN, _BOUND, "`from transformers import LlamaForCausalLM` fails"),
    # 4.55.4 already has get_correct_attn_implementation (4.55.0 did not): the tested release decides.
    Band(
        "4.55",
        "4.55",
        "C",
        (*_MODERN, "get_correct_attn_implementation"),
        _BOUND,
        "a flash request fails (4.55.0: `input()` prompt)",
    ),
    Band("4.56", "4.57", "C", (*_MODERN, "get_correct_attn_implementation"), _BOUND, "a flash request fails"),
    Band("5.0", "5.3", "D", (*_MODERN, "get_correct_attn_implementation"), _BOUND, "a flash request fails"),
    Band(
        "5.4",
        "5.25",
        "E",
        (*_MODERN, "get_correct_attn_implementation"),
        _BOUND + " + `FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]`",
        "a flash request fails",
    ),
)


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def band_of(version: str) -> Band | None:
    for band in BANDS:
        if _key(band.first) <= _key(version) <= _key(band.last):
            return band
    return None


def read_matrix() -> tuple[dict[str, str], dict[str, str]]:
    """``RELEASES`` and ``UNSUPPORTED`` from the noxfile, without importing nox."""
    values: dict[str, dict[str, str]] = {}
    for node in ast.parse(NOXFILE.read_text()).body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id in ("RELEASES", "UNSUPPORTED")
            and node.value is not None
        ):
            values[node.target.id] = ast.literal_eval(node.value)
    return values["RELEASES"], values["UNSUPPORTED"]


ADDING = """## Adding a release

1. Find it: `python -m nox -s latest` resolves the newest transformers on the package index and runs the
   suite on it (CI runs it after the matrix and prints `latest: the newest transformers on the index is X`,
   then whether it passes; a failure there is reported, not failing CI, unless `SDPA_SHIM_LATEST_STRICT=1`).
2. Add it to the matrix: the minor and its release in `RELEASES` in `noxfile.py` (and `NEWEST` when it is the
   newest); extend the last band in `BANDS` of `tests/integration/test_versions_table.py`, or add a band when a hooked
   method moved (`hooks.hooks_for` picks the band); `NEWEST_TESTED` in `src/sdpa_shim/_surfaces/doctor.py`
   (`tests/surfaces/test_cli.py` checks it against `RELEASES`).
3. `python -m nox -s newest` and fix what fails, per release: read what changed in the release's own source
   (`pip download transformers==X --no-deps`), never loosen a check to fit.
4. `python tests/integration/test_versions_table.py --write` regenerates this file; in README.md's "Supported
   versions", update the range (checked by that test) and the table of what depends on the release.
"""


def render() -> str:
    releases, unsupported = read_matrix()
    lines = [
        "# Supported transformers releases",
        "",
        "<!-- Generated by `python tests/integration/test_versions_table.py --write` from noxfile.py; "
        "tests/integration/test_versions_table.py fails when this file drifts. -->",
        "",
        "Every release below is tested by the nox matrix (`nox`, run by `.ci/run`) with torch 2.13.0 (CPU) "
        "and Python 3.11: the whole test suite, every entry point × flash-attn missing / broken / no CUDA. "
        "Hooked methods are on `transformers.PreTrainedModel`; each matrix session checks its own row "
        "against the methods the shim actually wrapped.",
        "",
        "| releases | band | tested | hooked (`PreTrainedModel.*`) | `is_flash_attn_2_available` wrapped in "
        "| broken flash-attn without the shim | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for band in BANDS:
        tested = [(minor, release) for minor, release in releases.items() if band_of(minor) is band]
        if not tested:
            continue
        supported = [release for minor, release in tested if minor not in unsupported]
        statuses = ["pass"] if supported else []
        statuses += [
            f"unsupported ({release}): {unsupported[minor]}"
            for minor, release in tested
            if minor in unsupported
        ]
        span = band.first if band.first == band.last else f"{band.first}–{band.last}"
        hooks = ", ".join(f"`{hook}`" for hook in band.hooks)
        lines.append(
            f"| {span} | {band.name} | {', '.join(release for _, release in tested)} | {hooks} "
            f"| {band.availability} | {band.broken_without_shim} | {'; '.join(statuses)} |"
        )
    lines += [
        "",
        "Releases older than 4.36 (no `attn_implementation`) are not supported: there the shim logs one "
        "WARNING and leaves transformers unchanged.",
        "",
        ADDING,
    ]
    return "\n".join(lines)


def test_readme_names_the_matrix_range_and_links_this_page():
    """The README states the tested range once, in "Supported versions", and leaves the table to this page."""
    releases, _ = read_matrix()
    minors = sorted(releases, key=lambda minor: tuple(map(int, minor.split("."))))
    readme = README.read_text()
    section = readme.split("## Supported versions", 1)[1]
    assert f"transformers **{minors[0]} to {minors[-1]}**" in section
    assert "(docs/versions.md)" in section
    assert "<!-- versions:start -->" not in readme  # the hooked-methods table lives here only


def test_doc_matches_the_matrix():
    assert DOC.read_text() == render(), (
        "docs/versions.md drifted: run python tests/integration/test_versions_table.py --write"
    )


def test_every_matrix_release_has_a_band():
    releases, unsupported = read_matrix()
    assert [minor for minor in releases if band_of(minor) is None] == []
    assert set(unsupported) <= set(releases)
    assert all(reason.strip() for reason in unsupported.values()), "an unsupported release needs its reason"


def test_this_release_row_matches_what_the_shim_hooked():
    import transformers
    import transformers.modeling_utils

    from sdpa_shim._integration import availability as _availability
    from sdpa_shim._integration.patch import patched_methods

    band = band_of(transformers.__version__)
    assert band is not None, f"transformers {transformers.__version__} is in no band of docs/versions.md"
    assert patched_methods() == [f"PreTrainedModel.{hook}" for hook in band.hooks]
    assert _availability.is_patched()
    if "FLASH_ATTENTION_COMPATIBILITY_MATRIX" in band.availability:
        import transformers.modeling_flash_attention_utils as flash_utils

        entry = flash_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["general_availability_check"]
        assert entry is transformers.utils.import_utils.is_flash_attn_2_available


def test_broken_column_agrees_with_the_broken_install_test():
    import transformers

    from helpers.expect import IMPORT_BREAKS

    band = band_of(transformers.__version__)
    assert band is not None
    assert band.broken_without_shim.startswith("`from transformers import") == IMPORT_BREAKS


def test_installed_release_is_the_one_the_matrix_pins():
    import pytest
    import transformers

    expected = os.environ.get("SDPA_SHIM_MATRIX_RELEASE")
    if not expected:
        pytest.skip("not running under the nox matrix (SDPA_SHIM_MATRIX_RELEASE unset)")
    assert transformers.__version__ == expected


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(render())
        print(f"wrote {DOC}")
    else:
        print(render())
