"""Continuous batching correctness on CUDA: every request's greedy tokens against a plain generate of it.

``PYTHONPATH=src python bench/cb_check.py`` on a CUDA machine. A random Llama (hidden 256, 4 layers,
8/2 heads) in float32 (so that greedy ties do not hide a real difference) and bfloat16; 24 requests of
mixed lengths through ``generate_batch`` with flash_attention_2 under the shim (transformers' flash layout,
and on CUDA its paged decode through ``flash_attn_with_kvcache`` with block tables), each compared with
``generate`` of that request alone on plain sdpa. Prints the counts and which stand-in functions ran.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import sdpa_shim  # noqa: F401  (activates the shim first; used below)


def main() -> int:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    import sdpa_shim.standin
    import sdpa_shim.standin.flash_attn_interface as fai

    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    calls = {"flash_attn_varlen_func": 0, "flash_attn_with_kvcache": 0}
    for name in calls:
        original = getattr(fai, name)

        @functools.wraps(original)  # transformers reads the signature to pick keywords
        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(fai, name, counted)
        setattr(sdpa_shim.standin, name, counted)
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        config = dict(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        torch.manual_seed(0)
        with torch.device(device):
            served = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="flash_attention_2")).to(
                dtype
            )
            sdpa_shim.deactivate()
            plain = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).to(dtype)
            sdpa_shim.activate()
        plain.load_state_dict(served.state_dict())
        assert served.config._attn_implementation == "flash_attention_2"
        gen = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=-1, pad_token_id=0)
        g = torch.Generator().manual_seed(1)
        requests = [
            torch.randint(1, 512, (int(n),), generator=g).tolist()
            for n in torch.randint(3, 300, (24,), generator=g)
        ]
        for name in calls:
            calls[name] = 0
        outputs = served.generate_batch(inputs=requests, generation_config=gen, progress_bar=False)
        got = {tuple(o.prompt_ids): list(o.generated_tokens) for o in outputs.values()}
        same = 0
        for prompt in requests:
            with torch.no_grad():
                want = plain.generate(torch.tensor([prompt], device=device), generation_config=gen)[
                    0, len(prompt) :
                ]
            same += got.get(tuple(prompt)) == want.tolist()
        print(
            f"{dtype}: {same}/{len(requests)} requests equal plain generate; stand-in calls {calls}",
            flush=True,
        )
        failures += dtype == torch.float32 and same != len(requests)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
