"""PEP 829 entry point of sdpa_shim (named in ``sdpa_shim.start``; Python 3.15+).

It lives outside the ``sdpa_shim`` package on purpose: importing anything inside the package runs
``sdpa_shim/__init__.py``, which activates the shim. Here, with ``SDPA_SHIM`` unset or off, start-up
costs one environment lookup and imports nothing of ours, exactly like the ``sdpa_shim.pth`` line
that older Pythons run instead.
"""

from __future__ import annotations

import os
import sys

# sdpa_shim._core.settings.TRUE_VALUES / FALSE_VALUES / BOOL_ACCEPTED / ENABLED_DEFAULT_TEXT, repeated to
# stay import-free (tests/test_logging.py checks that both say the same)
_TRUE_VALUES = ("1", "true", "on", "yes")
_FALSE_VALUES = ("0", "false", "off", "no")
_BOOL_ACCEPTED = "1/true/on/yes or 0/false/off/no (any case)"
_ENABLED_DEFAULT_TEXT = "the default (as if unset)"

#: (variable, raw value) already reported in this process. Python 3.11 reads a venv's ``.pth`` files twice
#: (``lib`` and ``lib64``), and ``import sdpa_shim`` notices the same value again: one message in all
#: (``sdpa_shim._core.settings`` reads this set).
reported: set[tuple[str, str]] = set()


def bad_value_line(raw: str) -> str:
    """The line for an invalid ``SDPA_SHIM``: ``sdpa_shim: `` + ``settings.bad_value_message(...)``."""
    return (
        f"sdpa_shim: SDPA_SHIM={raw!r} is not valid; accepted values: {_BOOL_ACCEPTED}; "
        f"using {_ENABLED_DEFAULT_TEXT}\n"
    )


def main() -> None:
    """Activate sdpa_shim when ``SDPA_SHIM`` is a true value; warn once about a bad one. Never raises."""
    raw = os.environ.get("SDPA_SHIM", "")
    value = raw.strip().lower()
    if not value or value in _FALSE_VALUES:
        return
    if value not in _TRUE_VALUES:
        if ("SDPA_SHIM", raw) not in reported:
            reported.add(("SDPA_SHIM", raw))
            sys.stderr.write(bad_value_line(raw))
        return
    try:
        from sdpa_shim._surfaces.startup import activate

        activate()
    except Exception as exc:
        sys.stderr.write(f"sdpa_shim: startup activation failed: {exc!r}\n")
