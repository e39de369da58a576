"""``python -m sdpa_shim`` and the ``sdpa-shim`` console script (``doctor``, ``run``, ``demo``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return the exit status."""
    from ._surfaces.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
