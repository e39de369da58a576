"""Florence-2's pattern: ``_supports_sdpa`` is a property that reads a submodule the model has not built yet.

``Florence2PreTrainedModel._supports_sdpa`` returns ``self.language_model._supports_sdpa``; transformers
4.54+ reads it inside ``PreTrainedModel.__init__``, before ``self.language_model`` exists, and the load
dies with ``AttributeError`` (huggingface/transformers#39974; the users' workaround is
``attn_implementation="eager"``). Read on the class, the flag is a property object, not a bool. The
flash import sits under ``if is_flash_attn_2_available():`` as in Florence-2, and the language model
picks its attention class from ``config._attn_implementation``.
"""

from transformers.utils import is_flash_attn_2_available

from .tiny_common import TinyAttention, TinyPreTrainedModel, TinyTextModel

if is_flash_attn_2_available():
    from flash_attn import flash_attn_func


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        return flash_attn_func(q, k, v, causal=True)


ATTENTION_CLASSES = {"eager": TinyAttention, "sdpa": TinyAttention, "flash_attention_2": FlashAttention2}


class LanguageModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES

    def attention_choice(self, config):
        return config._attn_implementation


class PropertyPreTrainedModel(TinyPreTrainedModel):
    _supports_flash_attn_2 = True

    @property
    def _supports_sdpa(self):
        return self.language_model._supports_sdpa


class RemoteTinyModel(PropertyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.language_model = LanguageModel(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        return self.language_model(input_ids, attention_mask)
