"""PEP 829 entry point of sdpa_shim (named in ``sdpa_shim.start``; Python 3.15+).

It lives outside the ``sdpa_shim`` package on purpose: importing anything inside the package runs
``sdpa_shim/__init__.py``, which activates the shim. Here, with ``SDPA_SHIM`` unset or off, start-up
costs one environment lookup and imports nothing of ours, exactly like the ``sdpa_shim.pth`` line
that older Pythons run instead.
"""

from __future__ import annotations

import os
import sys

# sdpa_shim._settings.TRUE_VALUES / FALSE_VALUES, repeated to stay import-free
_TRUE_VALUES = ("1", "true", "on", "yes")
_FALSE_VALUES = ("0", "false", "off", "no")


def main() -> None:
    """Activate sdpa_shim when ``SDPA_SHIM`` is a true value; warn about a bad one. Never raises."""
    raw = os.environ.get("SDPA_SHIM", "")
    value = raw.strip().lower()
    if not value or value in _FALSE_VALUES:
        return
    if value not in _TRUE_VALUES:
        sys.stderr.write(
            f"sdpa_shim: SDPA_SHIM={raw!r} is not valid; accepted values: 1/true/on/yes or 0/false/off/no "
            "(any case); using the default (as if unset): no start-up activation\n"
        )
        return
    try:
        from sdpa_shim._surfaces.startup import activate

        activate()
    except Exception as exc:
        sys.stderr.write(f"sdpa_shim: startup activation failed: {exc!r}\n")
