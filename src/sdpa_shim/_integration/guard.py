"""The wrapper each hooked ``PreTrainedModel`` method gets: a rewrite, fault isolation, the caller's warnings.

A rewrite (``rewrite``) changes the method's arguments; a fault in it is reported once and the call
passes through to transformers unchanged. Errors raised by the wrapped method itself are the user's
and pass untouched; its warnings are shown at the frame they would name without the shim.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .._core import faults as _faults
from .._state import is_active
from .rewrite import Override, Rewrite

_NO_OVERRIDE = object()


def guarded(rewrite: Rewrite, name: str) -> Any:
    """Turn a rewrite into a wrapt wrapper that is inert while inactive and never lets a fault out.

    Errors raised by the wrapped transformers method itself are the user's and pass untouched. Warnings
    it raises with a ``stacklevel`` that lands on this wrapper (or wrapt) are shown at the frame they
    would name without the shim: the caller of the hooked method (``_CallerWarnings``).
    """

    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        override: Any = _NO_OVERRIDE
        if is_active():  # inert while off by itself: no extra frame in front of the hooked method
            try:
                rewritten = rewrite(instance, args, kwargs)
            except Exception as error:
                _faults.report(f"the {name} hook", error, "the call passes through to transformers unchanged")
                rewritten = None
            if isinstance(rewritten, Override):
                args, kwargs, override = rewritten
            elif rewritten is not None:
                args, kwargs = rewritten
        with _CallerWarnings(sys._getframe(0)):
            result = wrapped(*args, **kwargs)
        return result if override is _NO_OVERRIDE else override

    wrapper.__sdpa_shim_switched__ = True  # type: ignore[attr-defined]  # ledger.SWITCHED: checks is_active
    return wrapper


#: The shim's own files and wrapt's: frames a warning's ``stacklevel`` must not count.
_SHIM_FILES = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_WRAPT_FILES = f"{os.sep}wrapt{os.sep}"


def _plumbing(filename: str) -> bool:
    return filename.startswith(_SHIM_FILES) or _WRAPT_FILES in filename


class _CallerWarnings:
    """While a hooked method runs, catch its warnings; afterwards show each one again, at the frame it
    would name without the shim's frames in between (``warnings.warn_explicit`` with that frame's module
    and registry, so filters and "once per location" work as for a plain ``warnings.warn`` there).

    Before Python 3.14, ``warnings.catch_warnings`` swaps process-wide state and corrupts it when two
    threads overlap; so the filters and ``showwarning`` are swapped here by hand and put back only if
    they are still ours, and a ``showwarning`` of ours met after its call ended puts the saved ones back
    itself. Warnings of other threads caught meanwhile are shown again unchanged. With a filter that
    turns warnings into errors, the error is raised when the hooked method returns, not inside it.
    """

    __slots__ = ("_callers", "_caught", "_context", "_filters", "_open", "_plumbing", "_saved")

    def __init__(self, frame: Any) -> None:
        self._plumbing: list[Any] = []
        while frame is not None and _plumbing(frame.f_code.co_filename):
            self._plumbing.append(frame.f_code.co_filename)
            frame = frame.f_back
        self._callers: list[Any] = []  # the frames a stacklevel landing on plumbing frame j means
        while frame is not None and len(self._callers) < len(self._plumbing):
            self._callers.append((frame.f_code.co_filename, frame.f_lineno, frame.f_globals))
            frame = frame.f_back
        self._caught: list[tuple[Any, ...]] = []
        self._context: Any = None
        self._filters: Any = None
        self._open = False
        self._saved: tuple[Any, Any] = (None, None)

    def __enter__(self) -> None:
        import warnings

        if getattr(sys.flags, "context_aware_warnings", False):  # 3.14+: catch_warnings is per context
            self._context = warnings.catch_warnings(record=True)
            log = self._context.__enter__()
            warnings.simplefilter("always")
            self._caught = log
            return
        self._saved = (warnings.filters, warnings.showwarning)
        self._open = True
        warnings.showwarning = self._show
        warnings.filters = self._filters = [("always", None, Warning, None, 0)]

    def _show(self, message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if self._open:
            self._caught.append((message, category, filename, lineno))
            return
        self._restore()  # left behind by another thread's catch_warnings: put the user's back, then show
        self._issue(message, category, filename, lineno)

    def _restore(self) -> None:
        import warnings

        filters, show = self._saved
        if warnings.filters is self._filters:
            warnings.filters = filters
        if warnings.showwarning == self._show:
            warnings.showwarning = show

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            caught = [(w.message, w.category, w.filename, w.lineno) for w in self._caught]
        else:
            self._open = False
            self._restore()
            caught = self._caught
        for message, category, filename, lineno in caught:
            self._issue(message, category, filename, lineno)

    def _issue(self, message: Any, category: Any, filename: str, lineno: int) -> None:
        import warnings

        module_globals: Any = None
        if filename in self._plumbing and self._callers:
            index = min(self._plumbing.index(filename), len(self._callers) - 1)
            filename, lineno, module_globals = self._callers[index]
        else:
            module_globals = next(
                (
                    vars(module)
                    for module in list(sys.modules.values())
                    if getattr(module, "__file__", None) == filename
                ),
                None,
            )
        if module_globals is None:
            warnings.warn_explicit(message, category, filename, lineno)
            return
        warnings.warn_explicit(
            message,
            category,
            filename,
            lineno,
            module=module_globals.get("__name__"),
            registry=module_globals.setdefault("__warningregistry__", {}),
            module_globals=module_globals,
        )
