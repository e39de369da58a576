"""torch.compile on CUDA with a downgraded model: same logits as eager mode, no graph break.

``python bench/compile_check.py`` on a CUDA machine (the CPU case is in tests/runtime/test_backends.py).
Under dynamo the shim applies its backend choice with ``sdpa_kernel``, which dynamo traces.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sdpa_shim  # noqa: F401  (activates the shim)


def main() -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sdpa_shim._integration import marks as _attention

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(
            config, attn_implementation="flash_attention_2", dtype=torch.bfloat16
        )
    model.eval()
    assert _attention.kind_of(model.config) in ("sdpa", "eager"), "the shim did not downgrade the model"
    compiled = torch.compile(model, fullgraph=True)
    ok = True
    for n in (64, 64, 96):
        ids = torch.randint(0, 512, (2, n), device="cuda")
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits.float()
            t0 = time.perf_counter()
            got = compiled(ids, use_cache=False).logits.float()
            seconds = time.perf_counter() - t0
        err = ((got - expected).norm() / expected.norm()).item()
        ok &= err < 2e-2
        print(f"seq {n}: compiled vs eager-mode relative error {err:.2e} ({seconds:.1f} s incl. compile)")
    print("torch.compile (inductor, fullgraph) on CUDA with a downgraded model:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
