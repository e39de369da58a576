"""CPU workloads a new user runs, served by the shim against what they would type by hand (issue 18).

Usage::

    PYTHONPATH=src python bench/cpu.py [--rounds 15] [--threads 1] [--out DIR]

Tiny random models (no downloads), float32, one process. Each workload pairs a served
``flash_attention_2`` model with its reference (plain ``sdpa``; ``eager`` where transformers' SDPA
cannot serve the model, Gemma2's softcap) with identical weights; the two run alternately, ``--rounds``
times each, and the row reports medians of CPU time (``time.process_time``: other load on the machine
does not count) and the ratio reference / served (>= 1: the shim is as fast or faster). Writes
``DIR/cpu.json`` and ``DIR/cpu.md`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

import sdpa_shim  # noqa: E402  (activates the shim before transformers is imported)

Workload = tuple[str, str, Callable[[str], Callable[[], Any]]]


def _llama(implementation: str, hidden: int = 256, layers: int = 4) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation=implementation).eval()


def _left_padded(lengths: list[int], vocab: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    longest = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), longest))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, longest - n :] = 1
    return ids, mask


def padded_generate(hidden: int, lengths: list[int], new: int) -> Callable[[str], Callable[[], Any]]:
    def make(implementation: str) -> Callable[[], Any]:
        model = _llama(implementation, hidden)
        ids, mask = _left_padded(lengths)
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return lambda: model.generate(ids, attention_mask=mask, **kwargs)

    return make


def padded_forward(
    hidden: int, lengths: list[int], right: bool = False
) -> Callable[[str], Callable[[], Any]]:
    def make(implementation: str) -> Callable[[], Any]:
        model = _llama(implementation, hidden)
        ids, mask = _left_padded(lengths)
        if right:
            mask = mask.flip(-1)
        return lambda: model(ids, attention_mask=mask)

    return make


def pipeline_batch(implementation: str) -> Callable[[], Any]:
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(97 + i): 4 + i for i in range(26)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    model = _llama(implementation, hidden=64, layers=2)
    del tempfile
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    prompts = ["a b c d e f g h i j k l", "a b c"]
    return lambda: generator(prompts, batch_size=2, max_new_tokens=8, do_sample=False, pad_token_id=0)


def vision_tower(implementation: str) -> Callable[[], Any]:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=2,
        temporal_patch_size=1, window_size=8, fullatt_block_indexes=[3], attn_implementation=implementation,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    grid = torch.tensor([[1, 8, 8], [1, 4, 12], [1, 16, 4]])
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 1 * 2 * 2)
    return lambda: model(pixels, grid_thw=grid)


def gemma2_generate(implementation: str) -> Callable[[], Any]:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM._from_config(config, attn_implementation=implementation).eval()
    ids = torch.randint(3, 256, (1, 12))
    return lambda: model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)


def bert_encode(implementation: str) -> Callable[[], Any]:
    """What sentence-transformers' ``encode`` runs: a padded batch through a BERT encoder, mean-pooled."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = BertModel._from_config(config, attn_implementation=implementation).eval()
    ids, mask = _left_padded([12, 5, 9, 3])
    mask = mask.flip(-1)

    def encode() -> Any:
        hidden = model(ids, attention_mask=mask).last_hidden_state
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    return encode


WORKLOADS: list[Workload] = [
    ("pipeline text-generation, 2 padded prompts, 8 new", "sdpa", pipeline_batch),
    ("Qwen2.5-VL vision tower, 3 images", "sdpa", vision_tower),
    ("Gemma2 generate 16 tokens", "eager", gemma2_generate),
    ("BERT encode (sentence-transformers), 4 padded rows", "sdpa", bert_encode),
    ("generate 16, 4 left-padded rows 5..64, 256-wide", "sdpa", padded_generate(256, [5, 20, 41, 64], 16)),
    ("padded forward, 4 left-padded rows 5..64, 256-wide", "sdpa", padded_forward(256, [5, 20, 41, 64])),
    ("generate 16, 2 left-padded rows 100/300, 512-wide", "sdpa", padded_generate(512, [100, 300], 16)),
    ("padded prefill 2 x 512 (right-padded 300/512)", "sdpa", padded_forward(512, [300, 512], True)),
]


def measure(rounds: int) -> list[dict[str, Any]]:
    rows = []
    for name, reference, make in WORKLOADS:
        calls = {"reference": make(reference), "shim": make("flash_attention_2")}
        times: dict[str, list[float]] = {key: [] for key in calls}
        with torch.no_grad():
            for call in calls.values():  # warm-up
                call()
            for r in range(rounds):
                for key in ("reference", "shim") if r % 2 == 0 else ("shim", "reference"):
                    start = time.process_time()
                    calls[key]()
                    times[key].append(time.process_time() - start)
        ref, shim = statistics.median(times["reference"]), statistics.median(times["shim"])
        row = {"workload": name, "reference": reference, "reference_ms": ref * 1e3, "shim_ms": shim * 1e3,
               "ratio": ref / shim}  # fmt: skip
        rows.append(row)
        print(f"{name}: {reference} {ref * 1e3:.1f} ms, shim {shim * 1e3:.1f} ms, {ref / shim:.2f}x")
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"`{results['command']}` — torch {results['torch']}, transformers {results['transformers']}, "
        f"{results['threads']} thread(s), medians of {results['rounds']} alternating rounds (CPU time)",
        "",
        "| workload | reference | reference ms | shim ms | reference / shim |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['workload']} | {row['reference']} | {row['reference_ms']:.1f} | {row['shim_ms']:.1f} "
            f"| **{row['ratio']:.2f}** |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not sdpa_shim.is_active():
        raise SystemExit("sdpa_shim is not active (SDPA_SHIM=0?)")
    torch.set_num_threads(args.threads)
    import logging

    import transformers

    logging.getLogger("sdpa_shim").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    rows = measure(args.rounds)
    results = {"command": "python bench/cpu.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": args.threads, "rounds": args.rounds,
               "rows": rows}  # fmt: skip
    text = markdown(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu.json").write_text(json.dumps(results, indent=1))
        (out / "cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
