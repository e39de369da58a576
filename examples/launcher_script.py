"""A training-style script that asks for flash_attention_2 and never imports sdpa_shim.

Run it under a launcher with the shim switched on by the environment alone:

    SDPA_SHIM=1 torchrun --standalone --nproc_per_node=2 examples/launcher_script.py
    SDPA_SHIM=1 accelerate launch --multi_gpu --num_processes 2 examples/launcher_script.py
    sdpa-shim run -- torchrun --standalone --nproc_per_node=2 examples/launcher_script.py

(accelerate starts several local processes only through ``--multi_gpu``, torch elastic, which runs CPU
ranks too; ``--cpu --num_processes 2`` starts one process unless mpirun is set up.)

Every rank loads the model with attn_implementation="flash_attention_2"; where flash-attn cannot
run, each rank logs the shim's one WARNING and gets SDPA. The ranks then check with an all-reduce
that they computed the same logits. Without a launcher it runs as a single process.

``--model DIR`` loads a saved model; by default each rank builds the same tiny random Llama
(seeded) in a temporary directory, so the script needs no download.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

TINY_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def build_tiny_model(directory: str) -> str:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(directory)
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved model directory (default: a tiny random Llama)")
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Build and load before joining the group: transformers saves only on rank 0 once it is joined.
    with tempfile.TemporaryDirectory(prefix=f"launcher-rank{rank}-") as scratch:
        model_dir = args.model or build_tiny_model(scratch)
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="flash_attention_2")
    model.eval()
    if world_size > 1:
        dist.init_process_group("gloo")  # CPU-capable; NCCL would need one GPU per rank
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 70, 3]])
    with torch.no_grad():
        logits = model(ids).logits

    checksum = logits.double().sum().reshape(1)
    same = True
    if dist.is_initialized():
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(gathered, checksum)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
    shim = "active" if "sdpa_shim" in sys.modules else "not loaded"
    line = (
        f"rank {rank}/{world_size}: attention={model.config._attn_implementation} "
        f"logits={tuple(logits.shape)} same_on_all_ranks={same} sdpa_shim={shim}\n"
    )
    sys.stdout.write(line)  # one write: print() writes the newline separately, and ranks share stdout
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if same and bool(torch.isfinite(logits).all()) else 1


if __name__ == "__main__":
    sys.exit(main())
