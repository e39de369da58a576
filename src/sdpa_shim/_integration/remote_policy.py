"""Whether the stand-in serves one remote module's guarded ``flash_attn`` import, and who is asking.

The loading window (``remote_window``) asks two questions per lookup: which remote frames make it
(``remote_frames``: import machinery, the shim and wrapt skipped), and, for an import the module guards
itself, whether serving it can only help (``serve_guarded``): never worse than without the shim, so a
module that checks for CUDA or half precision is served only where that check would pass. The source
facts (guards, checks) come from ``remote_guards``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from .._core.names import REMOTE_PREFIX
from .remote_guards import HALF, source_facts

logger = logging.getLogger("sdpa_shim._integration.remote_window")

#: Top-level names of frames that are plumbing, not the code that imports or asks.
_PLUMBING = frozenset({"importlib", "_frozen_importlib", "_frozen_importlib_external", "sdpa_shim", "wrapt"})


def serve_guarded(window: Any, frames: list[tuple[str, str, int]], probe: bool = False) -> bool:
    """Serve this lookup? Unguarded: yes. Guarded: yes unless the module needs CUDA/half and won't get it.

    ``frames``: the remote frames making the lookup, innermost first, as (module, file, line); ``probe``:
    the lookup is itself a test for flash_attn (``find_spec``, ``is_flash_attn_2_available()``).
    """
    if not frames:
        return True
    importer = frames[0][0]
    decided = window.guarded.get(importer)
    if decided is not None:
        return decided
    facts = [(source_facts(file), line) for _, file, line in frames]
    guard = "a flash_attn probe" if probe else ""
    for source, line in facts:
        guard = guard or next((what for first, last, what in source.guards if first <= line <= last), "")
    if not guard:
        return True  # not decided for the module: its next import may be guarded
    checks = [check for source, _ in facts for check in source.checks]
    serve, why = True, "no CUDA or half-precision check in the module"
    if checks:
        device, dtype = _target(window)
        serve = device == "cuda" and dtype in HALF
        line, text = checks[0]
        why = f"the module checks CUDA/half precision (line {line}: {text}); this load: {device}, {dtype}"
    outcome = "its flash path runs on the stand-in" if serve else "its own fallback runs, as without the shim"
    window.guarded[importer] = serve
    logger.debug(
        "%s guards its flash_attn import (%s); %s: %s: %s",
        importer.rpartition(".")[2],
        guard,
        "served" if serve else "not served",
        why,
        outcome,
    )
    return serve


def _target(window: Any) -> tuple[str, str]:
    """(device, dtype) the guarded flash path would run on: CUDA when present, the load's dtype."""
    torch = sys.modules.get("torch")
    if torch is None:
        return "cpu", window.dtype or "float32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, window.dtype or str(torch.get_default_dtype()).removeprefix("torch.")


def remote_frames() -> tuple[list[tuple[str, str, int]], bool]:
    """The remote frames making the current lookup, innermost first, and whether it is a ``find_spec``.

    Frames of import machinery, the shim and wrapt are skipped; the walk stops at the first other frame
    that is not a remote module (transformers loading the model).
    """
    frames: list[tuple[str, str, int]] = []
    probe = False
    frame = sys._getframe(1)
    try:
        while frame is not None:
            name = frame.f_globals.get("__name__") or ""
            code = frame.f_code
            if code.co_filename.startswith("<frozen ") or name.split(".")[0] in _PLUMBING:
                probe = probe or (not frames and name == "importlib.util" and code.co_name == "find_spec")
            elif name.startswith(REMOTE_PREFIX):
                frames.append((name, code.co_filename, frame.f_lineno))
            else:
                break
            frame = frame.f_back
        return frames, probe
    finally:
        del frame


def caller_module() -> str:
    """``__name__`` of the nearest frame that is not import machinery, the shim or wrapt."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            name = frame.f_globals.get("__name__") or ""
            if not (frame.f_code.co_filename.startswith("<frozen ") or name.split(".")[0] in _PLUMBING):
                return str(name)
            frame = frame.f_back
        return ""
    finally:
        del frame
