"""The one version parser: leading numeric parts of a version string, and the transformers release in use.

Stdlib only and cheap: gates compare tuples (``(4, 56) <= release``), so "5.25.0.dev0", "2.7.4.post1" and
"2.13.0+cpu" need no ``packaging``.
"""

from __future__ import annotations

import sys


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric parts of a version string: "2.7.4.post1" -> (2, 7, 4); "" or "unknown" -> ()."""
    parts: list[int] = []
    for piece in str(text).split("+")[0].split("."):
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def release(text: str | None) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "5.24.0" or "5.25.0.dev0"; None when unreadable."""
    parts = version_tuple(text or "")
    return (parts[0], parts[1]) if len(parts) >= 2 else None


def transformers_release() -> tuple[int, int] | None:
    """(major, minor) of the transformers imported in this process (None: not imported, or unreadable).

    Read from the module, not the distribution metadata: the imported code is what the shim patches.
    """
    return release(getattr(sys.modules.get("transformers"), "__version__", None))
