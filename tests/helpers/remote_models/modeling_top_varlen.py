"""dots.ocr's first release: a top-level flash_attn import and a packed (varlen) vision tower.

The tower picks its attention class from ``config.vision_config.attn_implementation`` (a plain attribute,
"flash_attention_2" in config.json); its SDPA class builds a dense block-diagonal mask, as dots.ocr's does.
"""

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func
from torch import nn

from .tiny_common import TinyPreTrainedModel, eager_attention, segment_ids


class VisionAttention(nn.Module):
    """Eager: explicit softmax over the whole packed sequence with a block-diagonal mask."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def split(self, hidden):
        total = hidden.shape[0]
        return self.qkv(hidden).reshape(total, 3, self.num_heads, -1).unbind(dim=1)

    def forward(self, hidden, cu_seqlens):
        q, k, v = self.split(hidden)
        segments = segment_ids(cu_seqlens)
        allowed = segments[:, None] == segments[None, :]
        out = eager_attention(q[None], k[None], v[None], allowed=allowed)[0]
        return self.proj(out.reshape(hidden.shape[0], -1))


class VisionSdpaAttention(VisionAttention):
    """One SDPA call with a dense [S, S] mask: O(S^2) memory."""

    def forward(self, hidden, cu_seqlens):
        q, k, v = self.split(hidden)
        total = hidden.shape[0]
        mask = torch.zeros(1, total, total, dtype=torch.bool)
        for i in range(1, len(cu_seqlens)):
            mask[..., cu_seqlens[i - 1] : cu_seqlens[i], cu_seqlens[i - 1] : cu_seqlens[i]] = True
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
        return self.proj(out.transpose(0, 1).reshape(total, -1))


class VisionFlashAttention2(VisionAttention):
    def forward(self, hidden, cu_seqlens):
        q, k, v = self.split(hidden)
        max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max().item()
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
        return self.proj(out.reshape(hidden.shape[0], -1))


VISION_ATTENTION_CLASSES = {
    "eager": VisionAttention,
    "sdpa": VisionSdpaAttention,
    "flash_attention_2": VisionFlashAttention2,
}


class VisionBlock(nn.Module):
    def __init__(self, config, attn_implementation):
        super().__init__()
        self.norm = nn.LayerNorm(config.embed_dim)
        self.attn = VISION_ATTENTION_CLASSES[attn_implementation](config)

    def forward(self, hidden, cu_seqlens):
        return hidden + self.attn(self.norm(hidden), cu_seqlens)


class VisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_embed = nn.Linear(config.patch_dim, config.embed_dim)
        self.blocks = nn.ModuleList(
            [VisionBlock(config, config.attn_implementation) for _ in range(config.depth)]
        )

    def forward(self, pixel_values, grid_thw):
        sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = F.pad(sizes.cumsum(dim=0, dtype=torch.int32), (1, 0))
        hidden = self.patch_embed(pixel_values)
        for block in self.blocks:
            hidden = block(hidden, cu_seqlens)
        return hidden


class RemoteTinyModel(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = VisionTransformer(config.vision_config)
        self.head = nn.Linear(config.vision_config.embed_dim, config.hidden_size)
        self.post_init()

    def forward(self, pixel_values, grid_thw):
        return self.head(self.vision_tower(pixel_values, grid_thw))
