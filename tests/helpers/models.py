"""Tiny real models, built from configs in temp dirs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def save_tiny_llama(directory: Path, **config_overrides) -> Path:
    """Save a randomly initialised (seeded) tiny Llama to ``directory`` and return it."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    model.save_pretrained(directory)
    return directory


def input_ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 17, 33, 2, 70, 3]])


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids if ids is not None else input_ids()).logits


def save_tiny_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer over a few letters, built in memory (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(ord("a") + i): 4 + i for i in range(26)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return directory


def tiny_llava_config(**overrides):
    """A composite model: a CLIP vision tower and a Llama text model, each with its own sub-config."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    return LlavaConfig(
        vision_config=vision, text_config=tiny_llama_config(), image_token_index=100, **overrides
    )


def save_tiny_llava(directory: Path) -> Path:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(directory)
    return directory
