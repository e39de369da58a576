"""Environment variables (names, parsing, one warning per bad value) and the shim's loggers.

Values are read when they are needed (activation, each decision), never at module import, so a
test or a notebook can change them at run time. Bad values never raise: they produce one WARNING
naming the variable, the value, what is accepted and the default used, in the same words wherever
the value is noticed (the start-up file, ``import sdpa_shim``, ``sdpa-shim doctor``).

This module is on the path of every ``import sdpa_shim`` (and of every Python start with
``SDPA_SHIM=1``): it imports only ``os`` and ``_thread`` (both always loaded) at module level;
``logging`` is imported when the first record is written (``get_logger``).
"""

from __future__ import annotations

import _thread
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (milliseconds at every start)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from logging import Logger, LogRecord

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
#: How the boolean variables' accepted values are spelled in messages (``_sdpa_shim_startup`` repeats it).
BOOL_ACCEPTED = "1/true/on/yes or 0/false/off/no (any case)"
#: What an invalid ``SDPA_SHIM`` means (``_sdpa_shim_startup`` repeats it).
ENABLED_DEFAULT_TEXT = "the default (as if unset)"

#: The logger every user-facing record comes from, and the prefix a record gets where no handler shows it.
LOGGER = "sdpa_shim"
PREFIX = "sdpa_shim: "

_warned: set[tuple[str, str]] = set()
_warned_lock = _thread.allocate_lock()


class Settings(tuple):
    """The parsed environment, as one immutable value the pure policy can take.

    ``enabled``: None when ``SDPA_SHIM`` is unset (import activates, start-up does nothing).
    A tuple with named fields, like a ``NamedTuple``, without importing ``typing`` at start-up.
    """

    __slots__ = ()
    _fields = ("enabled", "fallback", "backend", "standin_everywhere")

    def __new__(
        cls,
        enabled: bool | None = None,
        fallback: str = "auto",
        backend: str = "auto",
        standin_everywhere: bool = False,
    ) -> Settings:
        return tuple.__new__(cls, (enabled, fallback, backend, standin_everywhere))

    enabled = property(lambda self: self[0], doc="True/False from SDPA_SHIM; None when unset")
    fallback = property(lambda self: self[1], doc="SDPA_SHIM_FALLBACK: auto/sdpa/eager")
    backend = property(lambda self: self[2], doc="SDPA_SHIM_BACKEND")
    standin_everywhere = property(lambda self: self[3], doc="SDPA_SHIM_STANDIN")

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self, strict=True))
        return f"Settings({fields})"

    def _replace(self, **changes: object) -> Settings:
        values = dict(zip(self._fields, self, strict=True))
        values.update(changes)
        return Settings(**values)  # type: ignore[arg-type]


def bad_value_message(name: str, raw: str, accepted: str, default: str) -> str:
    """The one sentence for an invalid value, without the ``sdpa_shim:`` prefix (loggers add it)."""
    return f"{name}={raw!r} is not valid; accepted values: {accepted}; using {default}"


def _already_reported_at_startup(name: str, raw: str) -> bool:
    """True when the start-up file printed this bad value in this process already (same words).

    The start-up module lives outside the package (importing it runs nothing: ``main`` is what the
    ``.pth``/``.start`` line calls), so importing it here is cheap and never activates anything.
    """
    try:
        from _sdpa_shim_startup import reported
    except ImportError:  # a build without the start-up file: nothing was reported at start-up
        return False
    return (name, raw) in reported


def _warn_bad_value(name: str, raw: str, accepted: str, default: str) -> None:
    """Warn once per (variable, value) and process, so a bad value set for a whole job does not flood logs."""
    with _warned_lock:
        if (name, raw) in _warned:
            return
        _warned.add((name, raw))
    if _already_reported_at_startup(name, raw):
        return
    get_logger(LOGGER).warning("%s", bad_value_message(name, raw, accepted, default))


#: Every variable: (accepted values, how messages spell them, what an invalid value means).
VARIABLES: dict[str, tuple[frozenset[str], str, str]] = {
    ENV_ENABLED: (TRUE_VALUES | FALSE_VALUES, BOOL_ACCEPTED, ENABLED_DEFAULT_TEXT),
    ENV_FALLBACK: (frozenset(FALLBACK_VALUES), "/".join(FALLBACK_VALUES), "auto"),
    ENV_BACKEND: (frozenset(BACKEND_VALUES), "/".join(BACKEND_VALUES), "auto"),
    ENV_STANDIN: (TRUE_VALUES | FALSE_VALUES, BOOL_ACCEPTED, "off"),
}


def check(name: str, raw: str | None) -> tuple[str | None, bool]:
    """(the normalised value or None when unset/empty/invalid, whether ``raw`` is valid). No warning.

    The one parser of every variable: ``read_settings``, ``doctor``, ``sdpa-shim run`` and the start-up
    entry all ask it (``_sdpa_shim_startup``, outside the package, repeats the ``SDPA_SHIM`` words).
    """
    if raw is None or not raw.strip():
        return None, True
    value = raw.strip().lower()
    return (value, True) if value in VARIABLES[name][0] else (None, False)


def is_true(name: str, raw: str | None) -> bool:
    """``raw`` is one of 1/true/on/yes (any case); no warning."""
    return check(name, raw)[0] in TRUE_VALUES


def is_false(name: str, raw: str | None) -> bool:
    """``raw`` is one of 0/false/off/no (any case); no warning."""
    return check(name, raw)[0] in FALSE_VALUES


def _read(name: str, raw: str | None) -> str | None:
    """``check``, warning once about an invalid value (in the words ``doctor`` uses too)."""
    value, valid = check(name, raw)
    if not valid:
        _, accepted, default = VARIABLES[name]
        _warn_bad_value(name, str(raw), accepted, default)
    return value


def parse_bool(name: str, raw: str | None, default: bool | None) -> bool | None:
    """Parse a boolean env value; unset, empty or invalid gives ``default``."""
    value = _read(name, raw)
    return default if value is None else value in TRUE_VALUES


def parse_choice(name: str, raw: str | None, choices: tuple[str, ...], default: str) -> str:
    """Parse a value that must be one of ``choices`` (the variable's own, ``VARIABLES``); unset, empty or
    invalid gives ``default``."""
    value = _read(name, raw)
    return default if value is None or value not in choices else value


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every variable now. Never raises."""
    env = os.environ if environ is None else environ
    return Settings(
        enabled=parse_bool(ENV_ENABLED, env.get(ENV_ENABLED), None),
        fallback=parse_choice(ENV_FALLBACK, env.get(ENV_FALLBACK), FALLBACK_VALUES, "auto"),
        backend=parse_choice(ENV_BACKEND, env.get(ENV_BACKEND), BACKEND_VALUES, "auto"),
        standin_everywhere=bool(parse_bool(ENV_STANDIN, env.get(ENV_STANDIN), False)),
    )


def reset_warnings() -> None:
    """Forget which bad values were warned about (tests)."""
    with _warned_lock:
        _warned.clear()


# --- logging: the ``sdpa_shim`` name exactly once per line -------------------------------------------


class _NameOnce:
    """Logger filter: a record shows ``sdpa_shim`` once, whatever handlers are configured.

    Messages are written without the prefix. Where the record reaches no handler that prints the
    logger's name (Python's last-resort handler in a bare script or notebook, or a format without
    ``%(name)s``/``{name}``/``$name``), ``sdpa_shim: `` is put in front of the message; where every
    handler prints the name, it is not. A message that still carries the prefix (older call sites)
    is normalised the same way. A logging filter, so it imports nothing and costs nothing until a
    record is written.
    """

    def filter(self, record: LogRecord) -> bool:
        if getattr(record, "_sdpa_shim_prefixed", None) is not None:
            return True  # already decided (a record handled twice)
        message = record.msg
        if isinstance(message, str):
            if message.startswith(PREFIX):
                message = message[len(PREFIX) :]
            prefixed = not _name_shown(record)
            record.msg = PREFIX + message if prefixed else message
            record._sdpa_shim_prefixed = prefixed
        return True


_NAME_ONCE = _NameOnce()


def _name_shown(record: LogRecord) -> bool:
    """True when every handler that will print ``record`` prints the logger's name too."""
    import logging

    found = False
    logger: Logger | None = logging.getLogger(record.name)
    while logger is not None:
        for handler in logger.handlers:
            found = True  # like Logger.callHandlers: any handler, whatever its level, rules out lastResort
            if isinstance(handler, logging.NullHandler) or record.levelno < handler.level:
                continue
            if not _formatter_shows_name(handler.formatter):
                return False
        if not logger.propagate:
            break
        logger = logger.parent
    return found  # no handler at all: Python's last-resort handler prints the bare message


def _formatter_shows_name(formatter: object) -> bool:
    if formatter is None:
        return False  # logging's default formatter: "%(message)s"
    style = getattr(formatter, "_style", None)
    text = getattr(style, "_fmt", None) or getattr(formatter, "_fmt", None) or ""
    return "%(name)" in text or "{name" in text or "$name" in text or "${name}" in text


def get_logger(name: str = LOGGER) -> Logger:
    """The logger ``name`` (``sdpa_shim`` or a child) with the name-once filter; imports ``logging`` now.

    Use it (instead of ``logging.getLogger`` at module level) for every record a user may see, and
    write messages without the ``sdpa_shim:`` prefix.
    """
    import logging

    logger = logging.getLogger(name)
    if _NAME_ONCE not in logger.filters:
        logger.addFilter(_NAME_ONCE)
    return logger


def install_name_once_if_logging_loaded() -> None:
    """Put the filter on the ``sdpa_shim`` logger now if ``logging`` is already imported (costs nothing)."""
    if "logging" in sys.modules:
        get_logger(LOGGER)
