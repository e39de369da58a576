"""InternVL-style packed attention: ``flash_attn_varlen_qkvpacked_func`` from flash_attn_interface."""

import torch
from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func

from .tiny_common import TinyAttention, TinyTextModel


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        qkv = torch.stack((q[0], k[0], v[0]), dim=1)  # (total, 3, H, D): one packed row
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out = flash_attn_varlen_qkvpacked_func(
            qkv, cu_seqlens, max_seqlen, 0.0, softmax_scale=None, causal=True
        )
        return out[None]


ATTENTION_CLASSES = {"eager": TinyAttention, "flash_attention_2": FlashAttention2}


class RemoteTinyModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES
