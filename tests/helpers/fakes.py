"""Fakes for what cannot exist on a CPU test machine: flash-attn distributions and a CUDA device.

Everything else in the tests is real: real torch, real transformers, real tiny models.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

BROKEN_IMPORT_ERROR = (
    "/usr/lib/python3/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
    "undefined symbol: _ZN3c104cuda9SetDeviceEab"
)

_USABLE_INIT = '''"""Fake, importable flash_attn (tests only): no kernel is ever launched."""
__version__ = "{version}"


def flash_attn_func(*args, **kwargs):
    raise AssertionError("the fake flash_attn must never be called")


flash_attn_varlen_func = flash_attn_with_kvcache = flash_attn_func
'''

_USABLE_BERT_PADDING = '''"""Fake flash_attn.bert_padding (tests only)."""


def pad_input(*args, **kwargs):
    raise AssertionError("the fake flash_attn must never be called")


unpad_input = index_first_axis = pad_input
'''

_USABLE_ROTARY = '''"""Fake flash_attn.layers.rotary (tests only)."""


def apply_rotary_emb(*args, **kwargs):
    raise AssertionError("the fake flash_attn must never be called")
'''


def write_flash_attn_distribution(root: Path, kind: str, version: str = "2.7.4") -> Path:
    """Write a ``flash_attn`` package plus its ``flash_attn-<version>.dist-info`` under ``root``.

    ``kind`` is "broken" (its import raises the ``undefined symbol`` ImportError users see after a
    torch upgrade) or "usable" (imports fine). Returns ``root``, ready to be put on ``sys.path``.
    """
    package = root / "flash_attn"
    package.mkdir(parents=True, exist_ok=True)
    if kind == "broken":
        body = f"raise ImportError({BROKEN_IMPORT_ERROR!r})\n"
    elif kind == "usable":
        body = _USABLE_INIT.format(version=version)
    else:
        raise ValueError(f"kind must be 'broken' or 'usable', not {kind!r}")
    (package / "__init__.py").write_text(body)
    if kind == "usable":  # what transformers 4.4x-5.x import from a usable flash_attn at module level
        (package / "bert_padding.py").write_text(_USABLE_BERT_PADDING)
        (package / "layers").mkdir(exist_ok=True)
        (package / "layers" / "__init__.py").write_text("")
        (package / "layers" / "rotary.py").write_text(_USABLE_ROTARY)
    dist_info = root / f"flash_attn-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flash-attn\nVersion: {version}\n")
    (dist_info / "top_level.txt").write_text("flash_attn\n")
    (dist_info / "RECORD").write_text(
        f"flash_attn/__init__.py,,\nflash_attn/bert_padding.py,,\nflash_attn/layers/__init__.py,,\n"
        f"flash_attn/layers/rotary.py,,\nflash_attn-{version}.dist-info/METADATA,,\n"
        f"flash_attn-{version}.dist-info/top_level.txt,,\nflash_attn-{version}.dist-info/RECORD,,\n"
    )
    return root


def forget_flash_attn() -> None:
    """Drop every cached trace of flash_attn so the next lookup sees the current sys.path, as a process
    started now would: the modules, the import caches, and transformers' package-to-distribution map
    (read once at its import: 5.4's ``is_flash_attn_2_available`` raises ``KeyError: 'flash_attn'`` for a
    distribution that appeared after transformers was imported, which no real install does)."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    import_utils = sys.modules.get("transformers.utils.import_utils")
    mapping = getattr(import_utils, "PACKAGE_DISTRIBUTION_MAPPING", None)
    if isinstance(mapping, dict):
        mapping.clear()
        mapping.update(importlib.metadata.packages_distributions())
