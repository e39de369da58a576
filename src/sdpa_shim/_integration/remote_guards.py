"""What a remote modeling file says about its own flash_attn imports (read from its source, pure).

A *guard* is an import inside a ``try`` whose handler catches an import failure (``ImportError``,
``ModuleNotFoundError``, ``Exception``, ``BaseException`` or bare), or under an ``if`` that probes for
flash-attn (``is_flash_attn_*()``, ``find_spec``). A *check* is an ``assert``, or an ``if`` that raises,
whose test reads ``.is_cuda``, ``torch.cuda``, ``"cuda"`` or a half-precision dtype: a flash class with
such a check cannot run on CPU or in float32, with flash-attn or with the stand-in. ``remote_window``
decides from these facts whether to serve a guarded import.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

_IMPORT_FAILURES = frozenset({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})
_PROBES = frozenset({"find_spec", "find_loader"})
HALF = frozenset({"float16", "bfloat16", "half"})
_sources: dict[str, tuple[tuple[int, int], SourceFacts]] = {}


@dataclass(frozen=True)
class SourceFacts:
    """What a remote file says about its flash_attn imports."""

    #: (first line, last line, what guards it): try bodies with an import-failure handler, probe ifs.
    guards: tuple[tuple[int, int, str], ...] = ()
    #: (line, source) of asserts/raises that test for CUDA or half precision.
    checks: tuple[tuple[int, str], ...] = ()


def source_facts(file: str) -> SourceFacts:
    """Guards and CUDA/half checks of a remote file (parsed once per version of the file)."""
    try:
        stat = os.stat(file)
        key = (stat.st_mtime_ns, stat.st_size)
        cached = _sources.get(file)
        if cached is not None and cached[0] == key:
            return cached[1]
        with open(file, encoding="utf-8") as handle:
            text = handle.read()
        facts = read_source(text)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return SourceFacts()  # no source (exec'd code): unguarded, no checks
    _sources[file] = (key, facts)
    return facts


def read_source(text: str) -> SourceFacts:
    tree = ast.parse(text)
    guards: list[tuple[int, int, str]] = []
    checks: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try | getattr(ast, "TryStar", ast.Try)) and node.body:
            caught = [_caught(handler) for handler in node.handlers]
            if any(caught):
                what = "try/except " + next(name for name in caught if name)
                guards.append((node.body[0].lineno, node.body[-1].end_lineno or node.lineno, what))
        elif isinstance(node, ast.If) and _probes(node.test):
            guards.append((node.lineno, node.end_lineno or node.lineno, f"if {ast.unparse(node.test)}"))
        if isinstance(node, ast.Assert):
            check = "assert"
        elif isinstance(node, ast.If) and any(isinstance(child, ast.Raise) for child in node.body):
            check = "if"
        else:
            continue
        if _cuda_or_half(node.test):
            checks.append((node.lineno, f"{check} {ast.unparse(node.test)}"))
    return SourceFacts(tuple(guards), tuple(checks))


def _caught(handler: ast.ExceptHandler) -> str:
    """The import failure the handler catches ("ImportError", "bare"), or ""."""
    if handler.type is None:
        return "bare"
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    for node in types:
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        if name in _IMPORT_FAILURES:
            return name
    return ""


def _probes(test: ast.expr) -> bool:
    """Whether an ``if`` test calls ``is_flash_attn_*`` or ``find_spec``."""
    for node in ast.walk(test):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _PROBES or name.startswith("is_flash_attn"):
                return True
    return False


def _cuda_or_half(test: ast.expr) -> bool:
    """Whether a test reads ``.is_cuda``, ``torch.cuda``, ``"cuda"`` or a half-precision dtype."""
    for node in ast.walk(test):
        if isinstance(node, ast.Attribute) and (node.attr in ("is_cuda", "cuda") or node.attr in HALF):
            return True
        if isinstance(node, ast.Constant) and node.value == "cuda":
            return True
    return False
