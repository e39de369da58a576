"""Rewrites for bands A (4.36-4.45) and B (4.46-4.53), where the choke point is a classmethod.

Which release hooks which of them is data: ``hooks.HOOKS``.

Before 4.54 every entry point funnels into ``PreTrainedModel._autoset_attn_implementation(cls, config,
use_flash_attention_2=False, ...)``, a *classmethod*: wrapt hands its wrapper the class being built as
``instance``, which is what ``downgrade_for`` wants (its class flags), together with the config (its dtype).
The request lives on ``config._attn_implementation_internal`` (a string, or from 4.46 a dict keyed by
sub-config name), or in the deprecated ``use_flash_attention_2=True`` flag.

What goes around that choke point, and how each rewrite closes it:

* Band B only: a config that already built one model carries ``_attn_implementation_autoset = True`` and
  every caller (``__init__``, ``_from_config``, ``from_pretrained``) then skips validation altogether, so a
  flash request on a re-used config would silently build a FlashAttention model. All three callers end in
  ``PreTrainedModel.__init__`` with that config, so one rewrite there decides the request, rewrites it in
  place (the object is shared with the sub-modules, so a copy would not reach them) and clears the flag
  so that transformers' autoset applies it.
* 4.53 dropped ``use_flash_attention_2`` and raises ``TypeError`` for it; when the shim downgrades such a
  request it pops the flag in ``from_pretrained`` / ``_from_config`` so it never reaches the model.

Target semantics: an explicit ``"sdpa"`` makes these releases raise for classes without an SDPA path, and a
string request on a composite model is copied into every sub-config. So a downgrade to "sdpa" is written as
``None`` ("sdpa where this class can, else eager", decided by transformers per class and per sub-model),
and a downgrade to "eager" as "eager". Dict values are rewritten per key: the sub-model classes are not
known here, so sub-config entries are left for the sub-model's own autoset, which this hook decides with
that class's facts.
"""

from __future__ import annotations

from typing import Any

from .._core.names import FLASH_ATTENTION_2
from .._core.policy import flash_implementation
from .resolve import downgrade_for
from .rewrite import Args, replace_argument

AUTOSET = "_autoset_attn_implementation"
#: The flag band B sets on a config once it has been validated (4.46-4.53).
AUTOSET_FLAG = "_attn_implementation_autoset"
USE_FA2 = "use_flash_attention_2"


def _target(chosen: str) -> str | None:
    """What to store on the config for ``chosen``: None lets transformers pick sdpa-or-eager per class."""
    return None if chosen == "sdpa" else chosen


def _request_of(config: Any) -> object:
    """The raw request on ``config`` (the property would turn None into "eager")."""
    return vars(config).get("_attn_implementation_internal") if config is not None else None


def _rewrite_request(model_class: type, config: Any, dtype: Any = None) -> bool:
    """Downgrade the request stored on ``config`` for ``model_class``, in place; True when changed.

    ``dtype`` is the dtype the model will be built in, when known better than the config says.

    A string is decided for ``model_class``. In a dict only the "" key (the model itself) is decided here;
    sub-config keys are validated by their own sub-model classes when those are built.
    """
    requested = _request_of(config)
    if isinstance(requested, str):
        chosen = downgrade_for(model_class, requested, config, dtype)
        if chosen is None:
            return False
        config._attn_implementation_internal = _target(chosen)
        return True
    if isinstance(requested, dict) and flash_implementation(requested.get("")):
        chosen = downgrade_for(model_class, requested[""], config, dtype)
        if chosen is None:
            return False
        config._attn_implementation_internal = {**requested, "": chosen}
        return True
    return False


def _config_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("config")


def _built_dtype(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Autoset's ``torch_dtype`` argument: the dtype the model will be built in, or None.

    ``from_pretrained(..., torch_dtype=torch.float16)`` passes it to autoset while the config may still
    say float32 (the checkpoint's): judging by the config would downgrade a flash request that works.
    """
    return args[2] if len(args) > 2 else kwargs.get("torch_dtype")


def rewrite_autoset(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Args | None:
    """``_autoset_attn_implementation(cls, config, use_flash_attention_2=False, ...)``.

    The config is mutated in place, as the wrapped classmethod itself does (and its callers use the
    config it returns). ``use_flash_attention_2=True`` is decided like "flash_attention_2" and turned off.
    """
    if not isinstance(cls, type):
        return None
    config = _config_argument(args, kwargs)
    if config is None:
        return None
    use_fa2 = args[1] if len(args) > 1 else kwargs.get(USE_FA2, False)
    if use_fa2:
        requested = _request_of(config)
        if requested not in (None, FLASH_ATTENTION_2):
            return None  # both spellings given: transformers raises its own "not compatible" ValueError
        chosen = downgrade_for(cls, FLASH_ATTENTION_2, config, _built_dtype(args, kwargs))
        if chosen is None:
            return None
        config._attn_implementation_internal = _target(chosen)
        return replace_argument(args, kwargs, 1, USE_FA2, False)
    return (args, kwargs) if _rewrite_request(cls, config, _built_dtype(args, kwargs)) else None


def _any_unusable_flash_value(requested: dict[Any, Any]) -> bool:
    """True when some value of a dict request asks for a flash implementation that cannot run here."""
    from .._core.detect import flash_status

    implementations = {flash_implementation(value) for value in requested.values()}
    return any(not flash_status(name).usable for name in implementations if name is not None)


def rewrite_init(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Args | None:
    """Band B ``PreTrainedModel.__init__(self, config, ...)``: validate a re-used config after all.

    Only when the config was already validated (the flag is set, so transformers would skip the check)
    and still carries a flash request the shim downgrades: the request is rewritten in place (the config
    object is shared with the sub-modules, so a copy would not reach them) and the flag cleared, so
    transformers' autoset applies the rewritten request as it did the first time. A request the shim
    leaves alone keeps the flag: transformers behaves exactly as without the shim.
    """
    config = _config_argument(args, kwargs)
    if config is None or not vars(config).get(AUTOSET_FLAG, False):
        return None
    requested = _request_of(config)
    if isinstance(requested, dict):
        # Sub-config entries are decided by the sub-model classes, once autoset hands them down.
        changed = _rewrite_request(type(model), config) or _any_unusable_flash_value(requested)
    else:
        changed = _rewrite_request(type(model), config)
    if changed:
        config._attn_implementation_autoset = False
    return None


def rewrite_removed_use_fa2(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Args | None:
    """4.53 ``from_pretrained`` / ``_from_config``: ``use_flash_attention_2`` would be a TypeError.

    When the shim downgrades the request it pops the flag and passes the chosen implementation instead
    (unless an ``attn_implementation`` was given too, which then stands). A request the shim leaves
    alone is passed through, so transformers reports it exactly as it would without the shim.
    """
    if not isinstance(cls, type) or not kwargs.get(USE_FA2):
        return None
    config = (
        kwargs.get("config") if "config" in kwargs else (args[0] if args and _is_config(args[0]) else None)
    )
    chosen = downgrade_for(cls, FLASH_ATTENTION_2, config)
    if chosen is None:
        return None
    new_kwargs = {key: value for key, value in kwargs.items() if key != USE_FA2}
    new_kwargs.setdefault("attn_implementation", chosen)
    return args, new_kwargs


def _is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "model_type")
