"""dots.ocr's later vision tower: a guarded varlen import whose flash class works on any device and dtype.

``try: from flash_attn import flash_attn_varlen_func`` / ``except ImportError``; each block falls back to
the eager class (``[heads, S, S]`` float32 scores over every patch of the page) when the import failed.
The flash class only calls ``flash_attn_varlen_func``: no CUDA or dtype check, so the stand-in runs it on
CPU in float32 too, with memory linear in the patches.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .tiny_common import TinyPreTrainedModel, eager_attention, segment_ids

try:
    from flash_attn import flash_attn_varlen_func

    flash_attn_available = True
except ImportError:
    flash_attn_available = False


class VisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def split(self, hidden):
        return self.qkv(hidden).reshape(hidden.shape[0], 3, self.num_heads, -1).unbind(dim=1)

    def forward(self, hidden, cu_seqlens):
        q, k, v = self.split(hidden)
        segments = segment_ids(cu_seqlens)
        out = eager_attention(q[None], k[None], v[None], allowed=segments[:, None] == segments[None, :])[0]
        return self.proj(out.reshape(hidden.shape[0], -1))


class VisionFlashAttention2(VisionAttention):
    def forward(self, hidden, cu_seqlens):
        q, k, v = self.split(hidden)
        max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max().item()
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
        return self.proj(out.reshape(hidden.shape[0], -1))


VISION_ATTENTION_CLASSES = {"eager": VisionAttention, "flash_attention_2": VisionFlashAttention2}


class VisionBlock(nn.Module):
    def __init__(self, config, attn_implementation):
        super().__init__()
        if attn_implementation == "flash_attention_2" and not flash_attn_available:
            print("flash attention not available! fallback to eager implementation ")
            attn_implementation = "eager"
        self.norm = nn.LayerNorm(config.embed_dim)
        self.attn = VISION_ATTENTION_CLASSES[attn_implementation](config)

    def forward(self, hidden, cu_seqlens):
        return hidden + self.attn(self.norm(hidden), cu_seqlens)


class RemoteTinyModel(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        vision = config.vision_config
        self.patch_embed = nn.Linear(vision.patch_dim, vision.embed_dim)
        self.blocks = nn.ModuleList(
            [VisionBlock(vision, vision.attn_implementation) for _ in range(vision.depth)]
        )
        self.post_init()

    def forward(self, pixel_values, grid_thw):
        sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = F.pad(sizes.cumsum(dim=0, dtype=torch.int32), (1, 0))
        hidden = self.patch_embed(pixel_values)
        for block in self.blocks:
            hidden = block(hidden, cu_seqlens)
        return hidden
