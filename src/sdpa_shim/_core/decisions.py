"""The record of downgrades made in this process, and the one-WARNING-per-distinct-decision rule."""

from __future__ import annotations

import logging
import threading

from .policy import Decision

logger = logging.getLogger("sdpa_shim")

_decisions: list[Decision] = []
_warned: set[Decision] = set()
_lock = threading.Lock()


def record(decision: Decision) -> None:
    """Remember ``decision``; WARN the first time this exact decision is made, DEBUG after that."""
    with _lock:
        _decisions.append(decision)
        first = decision not in _warned
        _warned.add(decision)
    log = logger.warning if first else logger.debug
    log(
        "sdpa_shim: %s requested %s; using %s instead: %s",
        decision.model,
        decision.requested,
        decision.chosen,
        decision.reason,
    )


def decisions() -> list[Decision]:
    """Every downgrade made so far in this process, oldest first."""
    with _lock:
        return list(_decisions)


def clear() -> None:
    """Forget all decisions, so the next one warns again (tests, notebooks)."""
    with _lock:
        _decisions.clear()
        _warned.clear()
