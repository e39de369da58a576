"""A one-shot ``sys.meta_path`` watcher: run a callback when a top-level package is first imported.

It lets ``import sdpa_shim`` stay cheap (no wrapt import) in processes that never import
transformers. The watcher finds nothing itself; it only notices the import, removes itself and runs
the callback, which registers wrapt's real post-import hook before any submodule is imported.
"""

from __future__ import annotations

import _thread
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class _PackageWatcher:
    """Meta path finder that fires ``callback`` once, on the first lookup of ``package``."""

    def __init__(self, package: str, callback: Callable[[], None]) -> None:
        self.package = package
        self.callback = callback
        self._fired = False
        self._lock = _thread.allocate_lock()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != self.package or self._fired:
            return None
        with self._lock:
            if self._fired:
                return None
            self._fired = True
        try:
            # Removing ourselves and the callback's insertion at index 0 keep the import system's
            # iteration over sys.meta_path on the next finder.
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.callback()
        except Exception as error:
            from .._core import faults as _faults

            _faults.report(f"the {self.package} import watcher", error, "transformers is left unchanged")
        return None


def when_package_imported(package: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` when ``package`` is first imported (at once if it already is)."""
    if package in sys.modules:
        callback()
        return
    if any(isinstance(f, _PackageWatcher) and f.package == package for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PackageWatcher(package, callback))
