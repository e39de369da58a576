"""The record of downgrades made in this process, and what is logged for each.

What a user sees (the README's "What is logged" says the same):

- one WARNING the first time a distinct decision (model class, requested, chosen, reason) is made in
  this process; a repeat is logged at DEBUG;
- the sub-models of a composite model (Llava's ``LlamaModel`` and ``CLIPVisionModel``, ...) are decided
  on their own classes while the top-level model is being built. A sub-model decision that makes the
  same choice for the same reason as the model around it is logged at DEBUG only, so loading a
  composite model prints one WARNING, naming the top-level class. A sub-model whose choice or reason
  differs gets a WARNING of its own, naming the model around it ("CLIPVisionModel (in
  LlavaForConditionalGeneration) requested ...").

The record (``decisions()``) is deduplicated the same way: each distinct decision once, in the order
first made, so it stays bounded however many models a process builds.
"""

from __future__ import annotations

import sys
import threading

from .policy import Decision
from .settings import LOGGER, get_logger

logger = get_logger(LOGGER)

_decisions: dict[Decision, None] = {}  # insertion-ordered set: each distinct decision once
_lock = threading.Lock()
#: Per thread: the latest decision made for each model class (what an enclosing model chose this time).
_latest = threading.local()
#: Frames searched for an enclosing model under construction (a composite's top-level class).
_MAX_FRAMES = 200


def record(decision: Decision) -> None:
    """Remember ``decision``; WARN the first time it is made (unless it repeats its parent's), else DEBUG."""
    parent = _enclosing_decision(decision)
    latest: dict[str, Decision] = _latest.__dict__.setdefault("by_model", {})
    latest[decision.model] = decision
    with _lock:
        first = decision not in _decisions
        _decisions[decision] = None
    same_as_parent = parent is not None and (parent.requested, parent.chosen, parent.reason) == (
        decision.requested,
        decision.chosen,
        decision.reason,
    )
    model = decision.model if parent is None else f"{decision.model} (in {parent.model})"
    log = logger.warning if first and not same_as_parent else logger.debug
    log(
        "%s requested %s; using %s instead: %s",
        model,
        decision.requested,
        decision.chosen,
        decision.reason,
    )


def _enclosing_decision(decision: Decision) -> Decision | None:
    """The decision of another model whose construction is on this thread's stack (a composite's
    top-level class building this sub-model), or None."""
    latest: dict[str, Decision] = _latest.__dict__.get("by_model", {})
    by_model = {model: earlier for model, earlier in latest.items() if model != decision.model}
    if not by_model:
        return None
    frame = sys._getframe(2)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        if "self" in frame.f_code.co_varnames:
            owner = frame.f_locals.get("self")
            found = by_model.get(type(owner).__name__) if owner is not None else None
            if found is not None:
                return found
        frame = frame.f_back
    return None


def decisions() -> list[Decision]:
    """Every distinct downgrade made so far in this process, in the order first made.

    Deduplicated like the WARNING: a decision made again (same model class, requested, chosen and
    reason; a second load, every layer of a continuous-batching run) is not listed again, so the list
    stays bounded.
    """
    with _lock:
        return list(_decisions)


def clear() -> None:
    """Forget all decisions, so the next one warns again (tests, notebooks)."""
    with _lock:
        _decisions.clear()
    _latest.__dict__.pop("by_model", None)  # this thread's; other threads' only steer DEBUG vs WARNING
