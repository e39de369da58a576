"""Quickstart: load a model that asks for FlashAttention 2 on a machine where flash-attn cannot run.

Builds a tiny random Llama in a temporary directory (no downloads), loads it with
``attn_implementation="flash_attention_2"``, generates a few tokens and prints what sdpa_shim decided
(on transformers 4.56+: transformers' flash path on PyTorch kernels; before: a downgrade to sdpa).

    python examples/quickstart.py
"""

# ruff: noqa: I001  (sdpa_shim is imported first on purpose: on old transformers that matters)
from __future__ import annotations

import tempfile
from pathlib import Path

import sdpa_shim  # first: from here on, flash-attention requests that cannot run are served by PyTorch

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "tiny-llama"
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)

        model = LlamaForCausalLM.from_pretrained(directory, attn_implementation="flash_attention_2")
        prompt = torch.tensor([[1, 17, 42, 99]])
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)

    print(f"attention in use: {model.config._attn_implementation}")
    print(f"generated token ids: {generated[0].tolist()}")
    for decision in sdpa_shim.decisions():
        print(f"decision: {decision.model}: {decision.requested} -> {decision.chosen} ({decision.reason})")


if __name__ == "__main__":
    main()
