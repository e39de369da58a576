"""Imports guarded by ``if is_flash_attn_2_available():`` (Florence-2, MiniCPM-V, DeepSeek-MoE)."""

from transformers.utils import is_flash_attn_2_available

from .tiny_common import TinyAttention, TinyTextModel

if is_flash_attn_2_available():
    from flash_attn import flash_attn_func


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True)


ATTENTION_CLASSES = {"eager": TinyAttention, "flash_attention_2": FlashAttention2}


class RemoteTinyModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES
