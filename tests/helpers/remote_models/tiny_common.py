"""Shared by the test remote-code models: the eager reference attention and the model shell.

No flash_attn here: each ``modeling_*.py`` imports it in its own pattern and subclasses
``TinyAttention`` to call it. Everything runs in float32 on the CPU.
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_remote_tiny import RemoteTinyConfig


def segment_ids(cu_seqlens):
    """[0, 0, 0, 1, 1, ...]: which packed segment each token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def eager_attention(q, k, v, causal=False, window=None, key_mask=None, allowed=None):
    """Explicit softmax attention. q: (B, S, H, D); k, v: (B, S, Hk, D) with H % Hk == 0.

    ``window``: a query sees at most ``window`` keys back (flash-attn's ``window_size=(window, window)``
    under ``causal``); ``key_mask``: (B, S) 1 for real tokens; ``allowed``: an extra (S, S) bool mask.
    """
    repeat = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(repeat, dim=2)
    v = v.repeat_interleave(repeat, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    length = q.shape[1]
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= (i - j) <= window
    if allowed is not None:
        mask &= allowed
    mask = mask[None, None]
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class TinyAttention(nn.Module):
    """Projections plus the eager path; flash subclasses override ``attend``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size)

    def forward(self, hidden, attention_mask=None, cu_seqlens=None):
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim)
        out = self.attend(q, k, v, attention_mask, cu_seqlens)
        return self.o_proj(out.reshape(batch, length, -1))

    def attend(self, q, k, v, attention_mask, cu_seqlens):
        allowed = None
        if cu_seqlens is not None:
            segments = segment_ids(cu_seqlens)
            allowed = segments[:, None] == segments[None, :]
        return eager_attention(
            q, k, v, causal=True, window=self.config.sliding_window, key_mask=attention_mask, allowed=allowed
        )


ATTENTION_CLASSES = {"eager": TinyAttention}


class TinyPreTrainedModel(PreTrainedModel):
    config_class = RemoteTinyConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight)


class TinyTextModel(TinyPreTrainedModel):
    """Embedding and residual attention layers; ``attention_classes`` maps ``config.attn_impl`` to a class."""

    attention_classes = ATTENTION_CLASSES

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        attention = self.attention_classes[self.attention_choice(config)]
        self.layers = nn.ModuleList([attention(config) for _ in range(config.num_layers)])
        self.post_init()

    def attention_choice(self, config):
        return config.attn_impl

    def forward(self, input_ids, attention_mask=None, cu_seqlens=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = hidden + layer(hidden, attention_mask, cu_seqlens)
        return hidden
