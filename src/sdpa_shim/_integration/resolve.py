"""Deciding: gather a model's facts, decide (pure policy), then mark and record. Nothing here serves calls.

``preview`` is the decision a load would make, without acting on it: the hooks act on it
(``choice_for``) and ``doctor`` shows it, so the two cannot disagree. Faults raised here are caught by
the hook that called (``guard.guarded``): the request then passes through unchanged and one ERROR is
logged.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, NamedTuple

from .._core import decisions as _decisions
from .._core import detect as _detect
from .._core import probe as _probe
from .._core.names import MODELING_UTILS
from .._core.policy import Decision, Kind, ModelFacts, decide, flash_implementation, served_name
from .._core.settings import Settings, read_settings
from . import marks as _marks
from . import packed_guard

logger = logging.getLogger(__name__)


class Choice(NamedTuple):
    """What a hooked method should see and give back for a flash request the shim takes over.

    ``value`` is what the config ends up reading; ``validate_as`` is what transformers' own validation
    is run with. They differ only on the flash path: transformers would refuse "flash_attention_2"
    without flash-attn, so it validates "eager" (always accepted) and the hook returns the flash name.
    """

    value: str
    validate_as: str


class Preview(NamedTuple):
    """The decision a load would make for a request (``decision``), and what the hooked method then does
    (``choice``): what the config reads and what transformers validates."""

    decision: Decision
    choice: Choice


def downgrade_for(
    model_or_class: Any, requested: object, config: Any = None, dtype: Any = None
) -> str | None:
    """The implementation to use instead of ``requested``, or None to pass it through unchanged."""
    choice = choice_for(model_or_class, requested, config, dtype)
    return None if choice is None else choice.value


def choice_for(
    model_or_class: Any, requested: object, config: Any = None, dtype: Any = None
) -> Choice | None:
    """The ``Choice`` for ``requested``, or None to pass it through unchanged; marks and records it.

    ``model_or_class`` is the model being built (bands C-E) or its class (bands A-B); ``config``
    (the model's own config object: it is what marks the model as downgraded) defaults to
    ``model_or_class.config``; ``dtype``, when given, is the dtype the model will be built in and
    wins over the config's (bands A-B pass ``torch_dtype`` this way).
    """
    if flash_implementation(requested) is None:
        return None
    if config is None:
        config = getattr(model_or_class, "config", None)
    if _marks.kind_of(config) == Kind.FLASH:  # decided and announced already (a second validation)
        assert isinstance(requested, str)
        if read_settings().enabled is False:
            return None
        return Choice(served_name(requested, _registered_names()), "eager")
    previewed = preview(model_or_class, requested, config, dtype)
    if previewed is None:
        return None
    decision, choice = previewed
    _marks.mark(config, decision.kind)
    if decision.kind is Kind.EAGER and not isinstance(model_or_class, type):  # 4.54+: the model being built
        packed_guard.refuse_packed_rows(model_or_class)
    try:
        _decisions.record(decision)  # last: a fault before it leaves no WARNING about a change never made
    except Exception:
        _marks.forget(config)  # the call passes through unchanged: no later call may act on the mark
        raise
    return choice


def preview(
    model_or_class: Any,
    requested: object,
    config: Any = None,
    dtype: Any = None,
    settings: Settings | None = None,
) -> Preview | None:
    """The decision a load of ``model_or_class`` would make for ``requested`` now, or None (untouched).

    Marks nothing and logs no WARNING: ``choice_for`` acts on it; ``doctor`` shows it (``settings``
    lets it ask for each ``SDPA_SHIM_FALLBACK`` value).
    """
    implementation = flash_implementation(requested)
    if implementation is None:
        return None
    assert isinstance(requested, str)
    settings = read_settings() if settings is None else settings
    if settings.enabled is False:
        return None
    status = _detect.flash_status(implementation)
    facts = model_facts(model_or_class, config, dtype)
    decision = decide(requested, status, facts, settings, lambda: _probe.sdpa_error(*probe_target(facts)))
    if decision is None:
        logger.debug("%s: %s can run here; request left unchanged", facts.name, requested)
        return None
    if decision.kind is Kind.FLASH:
        return Preview(decision, Choice(served_name(requested, facts.registered), "eager"))
    return Preview(decision, Choice(decision.chosen, decision.chosen))


def model_facts(model_or_class: Any, config: Any = None, dtype: Any = None) -> ModelFacts:
    """Read the class flags and the dtype the model is built in; a flag that cannot be read is not trusted."""
    from . import flash_paths

    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    if config is None:
        config = getattr(model_or_class, "config", None)
    supports_sdpa, sdpa_error = _class_flag(model_or_class, "_supports_sdpa")
    flash, _ = _class_flag(model_or_class, "_supports_flash_attn")
    flash_2, _ = _class_flag(model_or_class, "_supports_flash_attn_2")
    supports_flash = flash or flash_2
    return ModelFacts(
        name=cls.__name__,
        supports_sdpa=supports_sdpa,
        supports_flash=supports_flash,
        dtype=_dtype_name(config) if dtype is None else str(dtype).removeprefix("torch."),
        registered=_registered_names(),
        flash_paths=supports_flash and flash_paths.servable(cls),
        facts_error=sdpa_error,
    )


def _class_flag(model_or_class: Any, name: str) -> tuple[bool, str]:
    """(value, "") for a flag that can be read; (False, why) when it cannot.

    Some classes define these flags as properties (old Llava: "as the language model"; Florence-2 style
    remote code, which reads the half-built model and raises, transformers#39974). On the class a property
    is an object, always truthy, so it is never taken at face value: on the model being built (4.54+) it is
    evaluated, a raise meaning "cannot be read"; on a class (bands A-B) the downgrade is written as "sdpa
    where this class can", which transformers evaluates itself, per class, so it counts as yes.
    """
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    try:
        raw = inspect.getattr_static(cls, name, False)
    except Exception as error:  # a metaclass that raises
        return False, f"{name} raised {type(error).__name__}"
    if not hasattr(type(raw), "__get__"):
        return bool(raw), ""
    if isinstance(model_or_class, type):
        return True, ""
    try:
        return bool(getattr(model_or_class, name)), ""
    except Exception as error:
        return False, f"{name} is computed and raised {type(error).__name__} on the model being built"


def probe_target(facts: ModelFacts) -> tuple[str, str]:
    """(device type, dtype) the model will most likely run attention on."""
    import torch

    device = torch.get_default_device().type if hasattr(torch, "get_default_device") else "cpu"
    if device == "meta":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, facts.dtype or str(torch.get_default_dtype()).removeprefix("torch.")


def _dtype_name(config: Any) -> str | None:
    if config is None:
        return None
    dtype = config.__dict__.get("dtype") or config.__dict__.get("torch_dtype")
    if dtype is None or dtype == "auto":
        return None
    return str(dtype).removeprefix("torch.")


def _registered_names() -> frozenset[str]:
    module = sys.modules.get(MODELING_UTILS)
    registry = getattr(module, "ALL_ATTENTION_FUNCTIONS", None)
    try:
        return frozenset(registry.keys()) if registry is not None else frozenset()
    except Exception:
        return frozenset()
