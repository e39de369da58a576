"""flash_attn imported lazily while the model is built (Qwen v1's ``_import_flash_attn``).

The varlen function and rotary embeddings are bound to module globals from ``__init__``, and the
flash-attn version is parsed, as Qwen does.
"""

import torch

from .tiny_common import TinyAttention, TinyTextModel

flash_attn_unpadded_func = None
apply_rotary_emb_func = None


def _import_flash_attn():
    global flash_attn_unpadded_func, apply_rotary_emb_func
    import flash_attn
    from flash_attn.flash_attn_interface import flash_attn_varlen_func
    from flash_attn.layers.rotary import apply_rotary_emb_func as rotary

    major, minor = (int(part) for part in flash_attn.__version__.split(".")[:2])
    if (major, minor) < (2, 1):
        raise ImportError("flash-attn 2.1+ needed")
    flash_attn_unpadded_func = flash_attn_varlen_func
    apply_rotary_emb_func = rotary


def rotary_tables(length, dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """GPT-NeoX style (non-interleaved) rotary on (B, S, H, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryAttention(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        cos, sin = rotary_tables(q.shape[1], q.shape[-1])
        return super().attend(rotate(q, cos, sin), rotate(k, cos, sin), v, attention_mask, cu_seqlens)


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        batch, length = q.shape[:2]
        cos, sin = rotary_tables(length, q.shape[-1])
        q = apply_rotary_emb_func(q, cos, sin)
        k = apply_rotary_emb_func(k, cos, sin)
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
        out = flash_attn_unpadded_func(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, length, length, 0.0, causal=True
        )
        return out.view(batch, length, self.num_heads, self.head_dim)


ATTENTION_CLASSES = {"eager": RotaryAttention, "flash_attention_2": FlashAttention2}


class RemoteTinyModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES

    def __init__(self, config):
        if config.attn_impl == "flash_attention_2":
            _import_flash_attn()
        super().__init__(config)
