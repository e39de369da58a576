"""Environment variables: names, parsing and the one-warning-per-bad-value rule.

Values are read when they are needed (activation, each decision), never at module import, so a
test or a notebook can change them at run time. Bad values never raise: they produce one WARNING
naming the variable, the value, what is accepted and the default used.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import NamedTuple

logger = logging.getLogger(__name__)

#: ``SDPA_SHIM``: 1/true/on/yes activates at interpreter start (with the startup file installed);
#: 0/false/off/no keeps the shim off even when imported. Unset: ``import sdpa_shim`` activates.
ENV_ENABLED = "SDPA_SHIM"
#: ``SDPA_SHIM_FALLBACK``: what a flash request that flash-attn cannot serve becomes. ``auto`` (default):
#: transformers' flash path on PyTorch kernels where the release and the class allow, else ``sdpa``, else
#: ``eager``; ``sdpa``: the plain sdpa downgrade (eager where SDPA cannot serve); ``eager``: always eager.
ENV_FALLBACK = "SDPA_SHIM_FALLBACK"
#: ``SDPA_SHIM_BACKEND``: SDPA backend policy for downgraded models (``auto`` or one backend name).
ENV_BACKEND = "SDPA_SHIM_BACKEND"
#: ``SDPA_SHIM_STANDIN``: ``1`` makes ``import flash_attn`` resolve to the stand-in everywhere (opt-in).
ENV_STANDIN = "SDPA_SHIM_STANDIN"

TRUE_VALUES = frozenset({"1", "true", "on", "yes"})
FALSE_VALUES = frozenset({"0", "false", "off", "no"})
FALLBACK_VALUES = ("auto", "sdpa", "eager")
BACKEND_VALUES = ("auto", "default", "flash", "efficient", "cudnn", "math")

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


class Settings(NamedTuple):
    """The parsed environment, as one immutable value the pure policy can take."""

    enabled: bool | None = None  # None: unset (import activates, startup does nothing)
    fallback: str = "auto"
    backend: str = "auto"
    standin_everywhere: bool = False


def _warn_bad_value(name: str, raw: str, accepted: str, default: str) -> None:
    """Warn once per (variable, value) so a bad value set for a whole job does not flood its logs."""
    with _warned_lock:
        if (name, raw) in _warned:
            return
        _warned.add((name, raw))
    logger.warning("%s=%r is not valid; accepted values: %s; using %s", name, raw, accepted, default)


def parse_bool(name: str, raw: str | None, default: bool | None) -> bool | None:
    """Parse a boolean env value; unset or empty gives ``default``."""
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    shown = "the default (as if unset)" if default is None else ("on" if default else "off")
    _warn_bad_value(name, raw, "1/true/on/yes or 0/false/off/no (any case)", shown)
    return default


def parse_choice(name: str, raw: str | None, choices: tuple[str, ...], default: str) -> str:
    """Parse a value that must be one of ``choices`` (case-insensitive); unset or empty gives ``default``."""
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in choices:
        return value
    _warn_bad_value(name, raw, "/".join(choices), default)
    return default


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every variable now. Never raises."""
    env = os.environ if environ is None else environ
    return Settings(
        enabled=parse_bool(ENV_ENABLED, env.get(ENV_ENABLED), None),
        fallback=parse_choice(ENV_FALLBACK, env.get(ENV_FALLBACK), FALLBACK_VALUES, "auto"),
        backend=parse_choice(ENV_BACKEND, env.get(ENV_BACKEND), BACKEND_VALUES, "auto"),
        standin_everywhere=bool(parse_bool(ENV_STANDIN, env.get(ENV_STANDIN), False)),
    )


def disabled_by_env() -> bool:
    """True when ``SDPA_SHIM`` says off: the shim must then never act."""
    return read_settings().enabled is False


def reset_warnings() -> None:
    """Forget which bad values were warned about (tests)."""
    with _warned_lock:
        _warned.clear()
