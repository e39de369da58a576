"""The hooked ``PreTrainedModel`` methods per transformers release (one table) and what each rewrites.

A hook here is a *rewrite* (see ``rewrite``); ``guard`` turns it into a wrapper and the ``ledger`` puts
that on the class that defines the method, so every subclass and every entry point goes through it.

Bands C-E (4.54 and newer) validate the request in two instance methods: ``from_pretrained`` (direct,
Auto, pipeline, config.json), ``from_config``/``_from_config``, ``Model(config)``,
``set_attn_implementation`` (string or dict) and the sub-models of composite models, each with its own
class's facts. Bands A-B (4.36-4.53) funnel into a classmethod (``hooks_legacy``).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, NamedTuple

from .._core.settings import get_logger
from .._core.versions import transformers_release
from . import ledger
from .guard import guarded
from .hooks_legacy import rewrite_autoset, rewrite_init, rewrite_removed_use_fa2
from .packed_guard import guard_post_init
from .resolve import choice_for
from .rewrite import Args, Override, Rewrite, replace_argument

#: The ledger's name for this unit's changes.
UNIT = "hooks"


def _first_argument_request(parameter: str) -> Rewrite:
    """Rewrite for an instance method whose first argument, ``parameter``, is the request."""

    def rewrite(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Args | Override | None:
        if model is None:
            return None
        requested = args[0] if args else kwargs.get(parameter)
        choice = choice_for(model, requested)
        if choice is None:
            return None
        new_args, new_kwargs = replace_argument(args, kwargs, 0, parameter, choice.validate_as)
        if choice.validate_as == choice.value:
            return new_args, new_kwargs
        return Override(new_args, new_kwargs, choice.value)  # flash path: validated as eager, kept on flash

    return rewrite


class Hook(NamedTuple):
    """A ``PreTrainedModel`` method hooked on releases ``first`` to ``last`` (None: every newer one)."""

    method: str
    first: tuple[int, int]
    last: tuple[int, int] | None
    rewrite: Rewrite


#: In ``patched_methods()`` order (docs/versions.md lists the same per release). A method is hooked
#: where the release is in range and that release's ``PreTrainedModel`` defines it (4.55.0-4.55.3 lack
#: ``get_correct_attn_implementation``). Bands: A 4.36-4.45, B 4.46-4.53, C 4.54-4.57, D/E 5.x.
HOOKS: tuple[Hook, ...] = (
    # before 4.54 every entry point funnels into this classmethod (the class being built, its config)
    Hook("_autoset_attn_implementation", (4, 36), (4, 53), rewrite_autoset),
    # band B: a re-used config (``_attn_implementation_autoset``) would skip validation altogether
    Hook("__init__", (4, 46), (4, 53), rewrite_init),
    # 4.53 dropped ``use_flash_attention_2`` (a TypeError): a downgraded request pops it
    Hook("from_pretrained", (4, 53), (4, 53), rewrite_removed_use_fa2),
    Hook("_from_config", (4, 53), (4, 53), rewrite_removed_use_fa2),
    # packed rows refused where they cannot be computed per sequence (eager; sdpa before 4.48)
    Hook("post_init", (4, 36), (4, 53), guard_post_init),
    Hook(
        "_check_and_adjust_attn_implementation", (4, 54), None, _first_argument_request("attn_implementation")
    ),
    # called directly for sub-models by ``set_attn_implementation`` (4.56+); inside ``_check_and_adjust...``
    # it then sees the already-downgraded value and does nothing
    Hook("get_correct_attn_implementation", (4, 54), None, _first_argument_request("requested_attention")),
)


def hooks_for(model_class: type, release: tuple[int, int] | None = None) -> dict[str, Rewrite]:
    """The rewrites that apply to this release's ``PreTrainedModel`` (empty: unsupported release)."""
    release = release or transformers_release()
    if release is None:
        return {}
    defined = vars(model_class)
    return {
        hook.method: hook.rewrite
        for hook in HOOKS
        if hook.first <= release and (hook.last is None or release <= hook.last) and hook.method in defined
    }


def install(modeling_utils: ModuleType) -> None:
    """Wrap this release's hooked methods on ``PreTrainedModel`` (idempotent), through the ledger."""
    owner = modeling_utils.PreTrainedModel
    hooks = hooks_for(owner)
    if not hooks:
        version = getattr(sys.modules.get("transformers"), "__version__", "unknown")
        get_logger("sdpa_shim._integration.patch").warning(
            "sdpa_shim does not support transformers %s (no known attention hook); leaving it unchanged",
            version,
        )
        return
    for name, rewrite in hooks.items():
        ledger.wrap(owner, name, guarded(rewrite, name), UNIT)
    patched = ", ".join(f"{owner.__name__}.{name}" for name in hooks)
    get_logger("sdpa_shim._integration.patch").debug("patched %s", patched)
