"""What the shim changes in each hooked ``PreTrainedModel`` method, per band of transformers releases.

A hook here is a *rewrite* (see ``rewrite``); ``patch`` turns rewrites into wrappers.

Bands C-E (4.54 and newer) validate the request in two instance methods; wrapping them on the class
that defines them routes every entry point through the shim: ``from_pretrained`` (direct, Auto,
pipeline, config.json), ``from_config``/``_from_config``, ``Model(config)``, ``set_attn_implementation``
(string or dict) and the sub-models of composite models, each with its own class's facts.
"""

from __future__ import annotations

from typing import Any

from .resolve import choice_for
from .rewrite import Args, Override, Rewrite, replace_argument


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


#: Bands C-E: method name on PreTrainedModel -> rewrite. ``get_correct_attn_implementation`` (4.56+) is
#: called directly for sub-models by ``set_attn_implementation``; inside ``_check_and_adjust...`` it
#: then sees the already-downgraded value and does nothing.
MODERN_HOOKS: dict[str, Rewrite] = {
    "_check_and_adjust_attn_implementation": _first_argument_request("attn_implementation"),
    "get_correct_attn_implementation": _first_argument_request("requested_attention"),
}


def hooks_for(model_class: type) -> dict[str, Rewrite]:
    """The rewrites that apply to this release's ``PreTrainedModel`` (empty: unsupported release)."""
    defined = vars(model_class)
    if "_check_and_adjust_attn_implementation" in defined:
        return {name: rewrite for name, rewrite in MODERN_HOOKS.items() if name in defined}
    from .hooks_legacy import legacy_hooks_for  # bands A-B (4.36-4.53)
    from .packed_guard import guard_post_init

    hooks = legacy_hooks_for(model_class)
    if hooks and "post_init" in defined:
        hooks["post_init"] = guard_post_init  # refuse packed rows: eager downgrades, sdpa before 4.48
    return hooks
