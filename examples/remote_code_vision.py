"""A dots.ocr-style remote-code vision model that imports flash_attn, loaded where flash-attn cannot run.

Writes a small trust_remote_code model in a temporary directory (no downloads): a vision tower over
packed images (one ``cu_seqlens`` row for all patches) whose modeling file does
``from flash_attn import flash_attn_varlen_func`` at top level, and whose config carries the plain
attribute ``vision_config.attn_implementation = "flash_attention_2"``. Without the shim, loading it
fails in transformers' ``check_imports``; with it, the model loads, its flash class runs on sdpa_shim's
PyTorch stand-in, and ``import flash_attn`` elsewhere still fails as before.

    python examples/remote_code_vision.py

(On a machine where flash-attn works, the shim stays out of the way and the real flash-attn is used:
run it there on a CUDA device in bfloat16 instead.)
"""

# ruff: noqa: I001  (sdpa_shim is imported first on purpose: on old transformers that matters)
from __future__ import annotations

import json
import logging
import tempfile
import textwrap
from pathlib import Path

import sdpa_shim  # first: from here on, remote code that imports flash_attn can load

import torch
from transformers import AutoConfig, AutoModel

CONFIGURATION = """
from transformers import PretrainedConfig


class TinyOcrVisionConfig(PretrainedConfig):
    model_type = "tiny_ocr_vision"

    def __init__(self, embed_dim=64, num_heads=4, depth=2, patch_size=4, num_channels=3,
                 attn_implementation="flash_attention_2", **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.attn_implementation = attn_implementation  # a plain attribute: transformers never reads it


class TinyOcrConfig(PretrainedConfig):
    model_type = "tiny_ocr"

    def __init__(self, hidden_size=48, vision_config=None, **kwargs):
        self.hidden_size = hidden_size
        if not isinstance(vision_config, TinyOcrVisionConfig):
            vision_config = TinyOcrVisionConfig(**(vision_config or {}))
        self.vision_config = vision_config
        super().__init__(**kwargs)
"""

VISION = '''
import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func  # unconditional, as in dots.ocr's first release
from torch import nn


def rotary_2d(x, rows, cols):
    """Rotate the first half of each head by the patch row, the second half by the patch column."""
    quarter = x.shape[-1] // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    angles = torch.cat((rows[:, None] * freqs, cols[:, None] * freqs), dim=-1)[:, None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class VisionAttention(nn.Module):
    """Eager: a [heads, S, S] float32 score matrix over all packed patches, masked block-diagonally."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def qkv_heads(self, hidden, rows, cols):
        q, k, v = self.qkv(hidden).reshape(hidden.shape[0], 3, self.num_heads, -1).unbind(dim=1)
        return rotary_2d(q, rows, cols), rotary_2d(k, rows, cols), v

    def forward(self, hidden, cu_seqlens, rows, cols):
        q, k, v = self.qkv_heads(hidden, rows, cols)
        total = hidden.shape[0]
        mask = torch.full((total, total), float("-inf"))
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            mask[start:end, start:end] = 0
        scores = torch.einsum("qhd,khd->hqk", q, k).float() / q.shape[-1] ** 0.5 + mask
        out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1).to(v.dtype), v)
        return self.proj(out.reshape(total, -1))


class VisionSdpaAttention(VisionAttention):
    """SDPA with a dense [S, S] boolean mask: 3.3 GB at dots.ocr's largest page (S = 57,600)."""

    def forward(self, hidden, cu_seqlens, rows, cols):
        q, k, v = self.qkv_heads(hidden, rows, cols)
        total = hidden.shape[0]
        mask = torch.zeros(1, total, total, dtype=torch.bool)
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            mask[..., start:end, start:end] = True
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
        return self.proj(out.transpose(0, 1).reshape(total, -1))


class VisionFlashAttention2(VisionAttention):
    """flash_attn_varlen_func over the packed patches: memory grows with the number of patches only."""

    def forward(self, hidden, cu_seqlens, rows, cols):
        q, k, v = self.qkv_heads(hidden, rows, cols)
        max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max().item()
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
        return self.proj(out.reshape(hidden.shape[0], -1))


VISION_ATTENTION_CLASSES = {
    "eager": VisionAttention,
    "sdpa": VisionSdpaAttention,
    "flash_attention_2": VisionFlashAttention2,
}


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim)
        self.attn = VISION_ATTENTION_CLASSES[config.attn_implementation](config)
        self.norm2 = nn.LayerNorm(config.embed_dim)
        width = config.embed_dim
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, hidden, cu_seqlens, rows, cols):
        hidden = hidden + self.attn(self.norm1(hidden), cu_seqlens, rows, cols)
        return hidden + self.mlp(self.norm2(hidden))


class TinyOcrVisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        patch = config.num_channels * config.patch_size**2
        self.patch_embed = nn.Linear(patch, config.embed_dim)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.depth)])

    def forward(self, pixel_values, grid_thw):
        """pixel_values: (total patches, C*P*P) for all images; grid_thw: (images, 3) frames/rows/cols."""
        sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = F.pad(sizes.cumsum(dim=0, dtype=torch.int32), (1, 0))
        rows = torch.cat([torch.arange(h).repeat_interleave(w).repeat(t) for t, h, w in grid_thw.tolist()])
        cols = torch.cat([torch.arange(w).repeat(h * t) for t, h, w in grid_thw.tolist()])
        hidden = self.patch_embed(pixel_values)
        for block in self.blocks:
            hidden = block(hidden, cu_seqlens, rows.float(), cols.float())
        return hidden
'''

MODEL = '''
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny_ocr import TinyOcrConfig
from .modeling_tiny_ocr_vision import TinyOcrVisionTransformer


class TinyOcrModel(PreTrainedModel):
    config_class = TinyOcrConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = TinyOcrVisionTransformer(config.vision_config)
        self.projector = nn.Linear(config.vision_config.embed_dim, config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.05)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values, grid_thw):
        """Image embeddings for the (not included) text decoder: one row per patch."""
        return self.projector(self.vision_tower(pixel_values, grid_thw))
'''

CONFIG_JSON = {
    "model_type": "tiny_ocr",
    "architectures": ["TinyOcrModel"],
    "auto_map": {
        "AutoConfig": "configuration_tiny_ocr.TinyOcrConfig",
        "AutoModel": "modeling_tiny_ocr.TinyOcrModel",
    },
    "vision_config": {"attn_implementation": "flash_attention_2"},
}


def write_model(directory: Path) -> None:
    """The remote-code package: config.json with auto_map, plus the three Python files."""
    directory.mkdir(parents=True)
    for name, source in (
        ("configuration_tiny_ocr.py", CONFIGURATION),
        ("modeling_tiny_ocr_vision.py", VISION),
        ("modeling_tiny_ocr.py", MODEL),
    ):
        (directory / name).write_text(textwrap.dedent(source).lstrip())
    (directory / "config.json").write_text(json.dumps(CONFIG_JSON, indent=2))


def packed_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Three "pages" of 3x4, 5x5 and 2x6 patches of 4x4 RGB pixels, packed into one row."""
    grid_thw = torch.tensor([[1, 3, 4], [1, 5, 5], [1, 2, 6]])
    total = int(grid_thw.prod(dim=1).sum())
    return torch.randn(total, 3 * 4 * 4, generator=torch.Generator().manual_seed(0)), grid_thw


def vision_attention_classes(model: torch.nn.Module) -> str:
    return ", ".join(sorted({type(block.attn).__name__ for block in model.vision_tower.blocks}))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        source, checkpoint = Path(tmp) / "TinyOcrSource", Path(tmp) / "TinyOcr"  # no dots in these names
        write_model(source)
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
        random_model = AutoModel.from_config(config, trust_remote_code=True)
        random_model.register_for_auto_class("AutoModel")  # so that save_pretrained copies the code too
        random_model.save_pretrained(checkpoint)

        # What a user of dots.ocr writes: the request reaches the model itself, not its vision tower.
        model = AutoModel.from_pretrained(
            checkpoint, trust_remote_code=True, attn_implementation="flash_attention_2"
        )
        pixel_values, grid_thw = packed_images()
        with torch.no_grad():
            embeddings = model(pixel_values, grid_thw)

        eager_config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
        eager_config.vision_config.attn_implementation = "eager"
        eager = AutoModel.from_pretrained(checkpoint, config=eager_config, trust_remote_code=True)
        with torch.no_grad():
            difference = (eager(pixel_values, grid_thw) - embeddings).abs().max().item()

        model.save_pretrained(Path(tmp) / "saved")  # the shim changed nothing that could be saved
        saved = AutoConfig.from_pretrained(Path(tmp) / "saved", trust_remote_code=True)

    print(f"image embeddings: {tuple(embeddings.shape)} for {len(grid_thw)} packed images")
    print(f"vision attention classes: {vision_attention_classes(model)}")
    print(f"max |flash path - eager path|: {difference:.2e}")
    print(f"model attention (core shim): {model.config._attn_implementation}")
    for decision in sdpa_shim.decisions():
        print(f"decision: {decision.model}: {decision.requested} -> {decision.chosen} ({decision.reason})")
    print(f"saved vision_config.attn_implementation: {saved.vision_config.attn_implementation}")
    try:
        import flash_attn  # noqa: F401
    except ImportError as error:
        print(f"import flash_attn after loading: {type(error).__name__}: {error}")
    else:
        print("import flash_attn after loading: works (flash-attn is installed here)")


if __name__ == "__main__":
    main()
