"""Keep a model on transformers' flash code paths, with PyTorch kernels underneath (transformers 4.56+).

FlashAttention is asked for above all for variable-length work, and transformers' *flash* code paths are
the ones written for it: vision towers that pack images with ``cu_seqlens`` (one attention call per
layer, where the sdpa path loops over windows in Python), padding-free rows turned into ``cu_seqlens``
from ``position_ids``, padding removed instead of masked (no T x T mask), the flash layout of continuous
batching and its paged KV decode. A model the shim keeps on those paths reads "flash_attention_2", so
every ``== "flash_attention_2"`` check in transformers and its clients (TRL) holds.

From 4.54 on, every flash kernel transformers calls comes from one function,
``modeling_flash_attention_utils._lazy_imports``: ``from flash_attn import flash_attn_func,
flash_attn_varlen_func[, flash_attn_with_kvcache]`` when ``is_flash_attn_2_available()`` says yes. The
shim wraps it: for "flash_attention_2" (``paged|`` too) while flash-attn cannot run here, the original
runs inside ``remote_window.transformers_flash_path()``, where that check answers True and the import
binds the stand-in (``sdpa_shim.standin``, whose varlen and kvcache functions are the runtime's varlen
engine). transformers' own code then does everything else as with real flash-attn. When flash-attn is
usable the wrapper does nothing: the shim never serves a model flash-attn could run.

Served only where both hold (``servable``): the release is 4.56 or newer (4.54-4.55 turned any
``position_ids`` into packed sequences, huggingface/transformers#39814) and the class is one of
transformers' own whose module reaches flash kernels only through that function (a few, e.g. Falcon,
bind ``_flash_attention_forward`` at import time under an availability check: they keep the sdpa
downgrade, as do remote-code classes, which import flash_attn themselves, see ``remote_code``).
"""

from __future__ import annotations

import functools
import logging
import sys
from types import ModuleType
from typing import Any

from .._core import faults as _faults
from .._core.detect import flash_status, version_tuple
from .._state import is_active
from . import ledger, remote_window
from .marks import kind_of

logger = logging.getLogger(__name__)

MODULE = "transformers.modeling_flash_attention_utils"
FUNCTION = "_lazy_imports"
IMPLEMENTATION = "flash_attention_2"
FIRST_RELEASE = (4, 56)
#: Names a modeling module may bind at import time from flash-attn or transformers' flash utilities
#: under an availability check; if the module uses one it lacks, its flash path cannot be served.
_IMPORT_TIME_FLASH_NAMES = ("_flash_attention_forward", "flash_attn_func", "flash_attn_varlen_func")

_loaded_ok = False  # transformers holds its flash kernels (the stand-in's, or flash-attn's own)


#: The ledger unit under which ``_lazy_imports`` and continuous batching's set-up are wrapped.
UNIT = "flash path"


def install(module: ModuleType | None = None) -> None:
    """Wrap ``_lazy_imports`` (idempotent). Never raises: without it, models keep the sdpa downgrade."""
    try:
        module = module or sys.modules.get(MODULE)
        if module is None or not _release_ok():
            return
        if ledger.wrap(module, FUNCTION, _lazy_imports, UNIT) is not None:
            logging.getLogger(MODULE).addFilter(_quiet_no_op_cast)
    except Exception as error:
        _faults.report(f"wrapping {MODULE}.{FUNCTION}", error, "models keep the plain sdpa downgrade")


def install_continuous_batching(api: ModuleType) -> None:
    """Continuous batching's set-up (CUDA graphs for served models) and its switch to flash attention
    (never to a Hub kernel for a model the shim downgraded), wrapped when its module is imported."""
    try:
        owner = getattr(api, "ContinuousMixin", None)
        if owner is not None and "init_continuous_batching" in vars(owner):
            ledger.wrap(owner, "init_continuous_batching", _init_continuous_batching, UNIT)
        manager = getattr(api, "ContinuousBatchingManager", None)
        if manager is not None and "switch_to_cb_friendly_attn" in vars(manager):
            ledger.wrap(manager, "switch_to_cb_friendly_attn", _no_switch_to_hub_flash, UNIT)
    except Exception as error:
        _faults.report("wrapping continuous batching's set-up", error, "it runs as without the shim")


def uninstall() -> None:
    """Undo ``install`` (the ledger puts the very objects back) and drop the log filter."""
    logging.getLogger(MODULE).removeFilter(_quiet_no_op_cast)
    ledger.undo(UNIT)


def _init_continuous_batching(wrapped: Any, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        if is_active() and kind_of(getattr(model, "config", None)) == "flash" and _cuda_available():
            args, kwargs = _without_cuda_graphs(wrapped, model, args, kwargs)
    except Exception as error:
        _faults.report("choosing CUDA graphs for continuous batching", error, "transformers decides")
    return wrapped(*args, **kwargs)


def _no_switch_to_hub_flash(wrapped: Any, manager: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Continuous batching switches a half-precision sdpa/eager model to flash attention where a flash
    kernel is "available", Hub kernels included (5.25: ``kernels.get_kernel`` downloads one). For a
    model the shim downgraded because flash-attn cannot run here, that switch is off: no download."""
    try:
        model = args[0] if args else kwargs.get("model")
        if is_active() and kind_of(getattr(model, "config", None)) in ("sdpa", "eager"):
            args, kwargs = args[:1], {**kwargs, "auto_switch_to_flash": False}
            logger.debug("continuous batching keeps the shim's downgrade: no switch to a Hub flash kernel")
    except Exception as error:
        _faults.report("keeping continuous batching off Hub kernels", error, "transformers decides")
    return wrapped(*args, **kwargs)


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _without_cuda_graphs(
    wrapped: Any, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments with CUDA graphs off where the caller left them to the default (5.0-5.12: on the
    generation config; 5.12+: on the ContinuousBatchingConfig)."""
    import copy
    import inspect

    bound = inspect.signature(wrapped).bind_partial(*args, **kwargs)
    arguments = bound.arguments
    if "continuous_batching_config" in inspect.signature(wrapped).parameters:
        cb_config = arguments.get("continuous_batching_config")
        if cb_config is None:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            generation_config = arguments.get("generation_config") or model.generation_config
            cb_config = getattr(generation_config, "continuous_batching_config", None)
            cb_config = copy.copy(cb_config) if cb_config is not None else ContinuousBatchingConfig()
        if getattr(cb_config, "use_cuda_graph", None) is None:
            cb_config.use_cuda_graph = False
            logger.debug("continuous batching without CUDA graphs: the stand-in reads lengths on the host")
        arguments["continuous_batching_config"] = cb_config
    else:
        generation_config = copy.deepcopy(arguments.get("generation_config") or model.generation_config)
        if getattr(generation_config, "use_cuda_graph", None) is None:
            generation_config.use_cuda_graph = False
            logger.debug("continuous batching without CUDA graphs: the stand-in reads lengths on the host")
        arguments["generation_config"] = generation_config
    return bound.args, bound.kwargs


def _quiet_no_op_cast(record: logging.LogRecord) -> bool:
    """Drop transformers' "Casting fp32 inputs back to torch.float32 for flash-attn compatibility": on the
    served path float32 stays float32 (the stand-in computes in it), so the line would only mislead."""
    return not record.getMessage().startswith("Casting fp32 inputs back to torch.float32")


def servable(cls: type) -> bool:
    """Whether a model of ``cls`` can keep its flash paths here (see the module docstring). Never raises."""
    try:
        if not ledger.is_shim_wrapper(getattr(sys.modules.get(MODULE), FUNCTION, None)):
            return False
        return _transformers_class_without_import_time_flash(cls) and _preloaded()
    except Exception as error:
        _faults.report(
            "checking whether a flash path can be served", error, "the model gets the sdpa downgrade"
        )
        return False


def _preloaded() -> bool:
    """Load transformers' flash kernels now, as transformers itself does at validation ("preload ... to
    allow compile with fullgraph"): a served model then keeps its kernels even if the shim is deactivated
    later. True once transformers holds them."""
    if _loaded_ok:
        return True
    module = sys.modules.get(MODULE)
    try:
        module.lazy_import_flash_attention(IMPLEMENTATION)  # type: ignore[union-attr]
    except Exception as error:
        logger.debug("transformers' flash kernels could not be loaded (%r): sdpa downgrade", error)
        return False
    _mark_loaded()
    return True


def _mark_loaded() -> None:
    global _loaded_ok
    _loaded_ok = True


def _lazy_imports(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    implementation = args[0] if args else kwargs.get("implementation")
    if not (is_active() and _is_served_request(implementation)) or flash_status(IMPLEMENTATION).usable:
        return wrapped(*args, **kwargs)
    logger.debug("transformers' flash path for %s runs on sdpa_shim's PyTorch kernels", implementation)
    _settle_other_flash_checks()
    with remote_window.transformers_flash_path():
        return wrapped(*args, **kwargs)


def _settle_other_flash_checks() -> None:
    """Ask transformers' flash checks now, while flash_attn is not importable: they are cached, and
    5.4's ``is_flash_attn_2/4_available()`` raise ``KeyError: 'flash_attn'`` when they first run while the
    stand-in makes flash_attn importable without a flash-attn distribution (a cleared cache, e.g. after
    a test resets detection, made the FA2 check's first run fall inside the window). Inside the window the
    availability unit answers True for the FA2 check whatever transformers cached."""
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for name in ("is_flash_attn_2_available", "is_flash_attn_3_available", "is_flash_attn_4_available"):
        check = getattr(import_utils, name, None)
        if check is None:
            continue
        try:
            check()
        except Exception:
            logger.debug("transformers' %s() failed outside the stand-in's window", name, exc_info=True)


def _is_served_request(implementation: object) -> bool:
    return isinstance(implementation, str) and implementation.removeprefix("paged|") == IMPLEMENTATION


def _release_ok() -> bool:
    return version_tuple(getattr(sys.modules.get("transformers"), "__version__", "0")) >= FIRST_RELEASE


@functools.lru_cache(maxsize=256)
def _transformers_class_without_import_time_flash(cls: type) -> bool:
    module_name = getattr(cls, "__module__", "") or ""
    if not module_name.startswith("transformers."):
        return False  # remote code and user classes: their own flash code is theirs (see remote_code)
    module = sys.modules.get(module_name)
    source_file = getattr(module, "__file__", None)
    if module is None or not source_file:
        return False
    try:
        with open(source_file, encoding="utf-8") as handle:
            source = handle.read()
    except OSError:
        return False
    missing = [
        name for name in _IMPORT_TIME_FLASH_NAMES if f"{name}(" in source and not hasattr(module, name)
    ]
    if missing:
        logger.debug("%s binds %s only with flash-attn installed: sdpa downgrade", cls.__name__, missing)
    return not missing
