"""Glue between a model being built and the pure policy: gather facts, decide, record.

Faults raised here are caught by the hook that called (``_patch._guarded``): the request then passes
through unchanged and one ERROR is logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from .._core import decisions as _decisions
from .._core import detect as _detect
from .._core import probe as _probe
from .._core.policy import ModelFacts, decide, flash_implementation
from .._core.settings import read_settings
from .._state import MODELING_UTILS
from . import registry as _attention

logger = logging.getLogger(__name__)


def downgrade_for(
    model_or_class: Any, requested: object, config: Any = None, dtype: Any = None
) -> str | None:
    """The implementation to use instead of ``requested``, or None to pass it through unchanged.

    ``model_or_class`` is the model being built (bands C-E) or its class (bands A-B); ``config``
    (the model's own config object: it is what marks the model as downgraded) defaults to
    ``model_or_class.config``; ``dtype``, when given, is the dtype the model will be built in and
    wins over the config's (bands A-B pass ``torch_dtype`` this way).
    """
    implementation = flash_implementation(requested)
    if implementation is None:
        return None
    assert isinstance(requested, str)
    settings = read_settings()
    if settings.enabled is False:
        return None
    status = _detect.flash_status(implementation)
    facts = model_facts(model_or_class, config, dtype)
    decision = decide(requested, status, facts, settings, lambda: _probe.sdpa_error(*probe_target(facts)))
    if decision is None:
        logger.debug("%s: %s can run here; request left unchanged", facts.name, requested)
        return None
    if decision.chosen.endswith("sdpa"):
        _attention.mark(config if config is not None else getattr(model_or_class, "config", None))
    _decisions.record(decision)  # last: a fault before it leaves no WARNING about a change never made
    return decision.chosen


def model_facts(model_or_class: Any, config: Any = None, dtype: Any = None) -> ModelFacts:
    """Read the class flags and the dtype the model is built in."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    if config is None:
        config = getattr(model_or_class, "config", None)
    return ModelFacts(
        name=cls.__name__,
        supports_sdpa=bool(getattr(cls, "_supports_sdpa", False)),
        supports_flash=bool(
            getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False)
        ),
        dtype=_dtype_name(config) if dtype is None else str(dtype).removeprefix("torch."),
        registered=_registered_names(),
    )


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
