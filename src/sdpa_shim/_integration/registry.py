"""The attention functions of models the shim took over, in transformers' registry (4.48+).

From 4.48 transformers looks the attention function up per forward in ``ALL_ATTENTION_FUNCTIONS``
by name. The shim wraps the "sdpa" and "flash_attention_2" entries: calls from models the shim did not
take over go straight to transformers' function. Calls from models downgraded to sdpa get packed rows
through the varlen engine and the SDPA backend policy (``_runtime``); calls from models kept on the
flash path take the route each call needs (``flash_calls``). Models are recognised by the identity of
their config object (``marks``), so nothing is written into the config (and nothing can be saved by
``save_pretrained``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .marks import kind_of

logger = logging.getLogger(__name__)

#: The ledger unit under which the registry entries are replaced (undone by ``deactivate``).
UNIT = "attention entries"


def install(modeling_utils: ModuleType) -> None:
    """Wrap the registry's "sdpa" and "flash_attention_2" entries (idempotent). None before 4.48."""
    from . import ledger

    mapping = _global_mapping(modeling_utils)
    if mapping is None:
        return
    sdpa = mapping.get("sdpa")
    sdpa = getattr(sdpa, "__sdpa_shim_original__", sdpa)
    for key, wrap in (("sdpa", _wrap), ("flash_attention_2", _wrap_flash)):
        original = mapping.get(key)
        if original is None or getattr(original, "__sdpa_shim_original__", None) is not None:
            continue
        ledger.set_item(mapping, key, wrap(original) if key == "sdpa" else wrap(original, sdpa), UNIT)


def _global_mapping(modeling_utils: ModuleType) -> dict[str, Any] | None:
    """The dict that holds the global entries: a class attribute from 4.51, the registry itself before."""
    registry = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
    if registry is None:
        return None
    mapping = getattr(type(registry), "_global_mapping", None)
    if isinstance(mapping, dict):
        return mapping
    return registry if isinstance(registry, dict) else None


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    from .._core import faults as _faults
    from .._runtime import backends as _backends
    from .._runtime import packed as _packed

    def sdpa_attention_forward(
        module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
    ):
        if kind_of(getattr(module, "config", None)) != "sdpa":
            return original(module, query, key, value, attention_mask, **kwargs)
        try:
            bounds = _packed.boundaries(query, key, kwargs)
        except _packed.PackedSequenceError:
            raise
        except Exception as error:
            _faults.report("the packed-sequence check", error, "attention runs as plain sdpa")
            return original(module, query, key, value, attention_mask, **kwargs)
        if bounds is not None:
            return _packed.attention(module, query, key, value, attention_mask, bounds, **kwargs)
        return _backends.dispatch(original, module, query, key, value, attention_mask, **kwargs)

    return _marked(sdpa_attention_forward, original)


def _wrap_flash(original: Callable[..., Any], sdpa: Callable[..., Any] | None) -> Callable[..., Any]:
    """Models kept on the flash path: each call takes the route it needs (``flash_calls``): dense and
    padded calls transformers' SDPA function (what plain "sdpa" runs, with no per-layer host reads),
    varlen work transformers' flash code on the varlen engine."""
    from .._core import faults as _faults
    from .._runtime import backends as _backends
    from . import flash_calls as _flash_calls

    def flash_attention_forward(
        module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
    ):
        if kind_of(getattr(module, "config", None)) != "flash":
            return original(module, query, key, value, attention_mask, **kwargs)
        if sdpa is None:
            return _backends.dispatch(original, module, query, key, value, attention_mask, **kwargs)
        try:
            return _flash_calls.serve(original, sdpa, module, query, key, value, attention_mask, kwargs)
        except _flash_calls.RouteError as error:
            why = error.__cause__ or error
            _faults.report("choosing the attention route", why, "the call takes transformers' flash path")
        return _backends.dispatch(original, module, query, key, value, attention_mask, **kwargs)

    return _marked(flash_attention_forward, original)


def _marked(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    wrapper.__sdpa_shim_original__ = original  # type: ignore[attr-defined]
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__doc__ = original.__doc__
    return wrapper
