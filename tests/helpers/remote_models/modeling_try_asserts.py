"""InternViT's pattern: a guarded import, a flash class that asserts CUDA + half precision, a per-layer switch.

``has_flash_attn`` comes from a ``try`` with a bare ``except``; each attention layer takes the flash class
when ``config.use_flash_attn and has_flash_attn`` (config.json ships ``use_flash_attn=True``). The flash
class asserts ``qkv.dtype in [torch.float16, torch.bfloat16]`` and ``qkv.is_cuda`` before calling
flash_attn: on CPU or in float32 it can never run, real flash-attn or stand-in. Without flash_attn the
import fails and every layer takes the model's own attention.
"""

import torch
from torch import nn

from .tiny_common import TinyAttention, TinyTextModel

try:
    from flash_attn.bert_padding import pad_input, unpad_input
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func

    has_flash_attn = True
except:  # noqa: E722  (as in InternViT)
    has_flash_attn = False


class FlashAttention(nn.Module):
    def forward(self, qkv, key_padding_mask=None, causal=False):
        assert qkv.dtype in [torch.float16, torch.bfloat16]
        assert qkv.is_cuda
        batch, length, _, heads, dim = qkv.shape
        if key_padding_mask is None:
            key_padding_mask = torch.ones(batch, length, dtype=torch.bool, device=qkv.device)
        x = qkv.reshape(batch, length, -1)
        x_unpad, indices, cu_seqlens, max_s = unpad_input(x, key_padding_mask)
        out = flash_attn_varlen_qkvpacked_func(
            x_unpad.reshape(-1, 3, heads, dim), cu_seqlens, max_s, 0.0, softmax_scale=None, causal=causal
        )
        return pad_input(out.reshape(out.shape[0], -1), indices, batch, length).reshape(
            batch, length, heads, dim
        )


class InternAttention(TinyAttention):
    def __init__(self, config):
        super().__init__(config)
        self.use_flash_attn = config.use_flash_attn and has_flash_attn
        if self.use_flash_attn:
            self.inner_attn = FlashAttention()

    def attend(self, q, k, v, attention_mask, cu_seqlens):
        if not self.use_flash_attn:
            return super().attend(q, k, v, attention_mask, cu_seqlens)
        qkv = torch.stack((q, k, v), dim=2)  # (B, S, 3, H, D)
        return self.inner_attn(qkv, attention_mask, causal=True)


ATTENTION_CLASSES = {"eager": InternAttention, "flash_attention_2": InternAttention}


class RemoteTinyModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES
