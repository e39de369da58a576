"""A real client: TRL's SFTTrainer with ``padding_free=True`` on a model requested with flash_attention_2.

Losses and gradient norms of a few CPU steps equal a padded run on plain sdpa: losses within relative
1e-5, gradient norms within 2e-4 (the padded and the flattened batch sum differently: measured on 5.24 +
TRL 1.16, step-1 grad norm 2.373237 served vs 2.372957 padded, while plain sdpa's own padding-free run
gives 2.373029 and a loss 7e-6 off the padded one, where the served loss equals it to 7 digits). TRL flattens each batch into one row with ``position_ids`` restarting per
example; the model must keep the examples apart, as FlashAttention's varlen kernel does.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

from helpers.loading import without_shim
from helpers.models import save_tiny_llama, save_tiny_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.skipif(
    Version("4.56") > Version(transformers.__version__),
    reason="TRL releases that train on CPU (1.16) need transformers 4.56.2+",
)

EXAMPLES = ["a b c d e", "f g", "h i j k", "l m n o p q r", "s", "t u v w", "x y z a b", "c d"]


def train(directory, output_dir, attn_implementation: str, padding_free: bool) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    data = datasets.Dataset.from_dict({"text": EXAMPLES})
    args = trl.SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        padding_free=padding_free,
        max_length=None,
        save_strategy="no",
        seed=0,
        data_seed=0,
        use_cpu=True,
        dataloader_drop_last=True,
    )
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_padding_free_sft_matches_plain_sdpa(tmp_path):
    """The reference is plain sdpa on the same flattened batches, which transformers 4.54+ masks correctly
    without a cache (TRL turns it off); where TRL's padded batches average the loss the same way (5.12+;
    4.56-5.0 give 3.8317 padded vs 4.8535 flattened, whatever the attention), the padded plain-sdpa run too."""
    directory = save_tiny_tokenizer(save_tiny_llama(tmp_path / "m", pad_token_id=0))
    served = train(directory, tmp_path / "served", "flash_attention_2", padding_free=True)
    flattened = without_shim(lambda: train(directory, tmp_path / "flat", "sdpa", padding_free=True))
    padded = without_shim(lambda: train(directory, tmp_path / "padded", "sdpa", padding_free=False))
    assert len(served) == len(flattened) == len(padded) == 2
    references = [flattened]
    if padded[0]["loss"] == pytest.approx(flattened[0]["loss"], rel=1e-4):
        references.append(padded)
    for reference in references:
        for got, want in zip(served, reference, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-4)  # 4.x logs 4 decimals
            # plain sdpa's block mask sums in another order: measured step-2 grad norm 2.421086 served,
            # 2.420942 padded, 2.420480 flattened plain sdpa (5.24, TRL 1.16)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-4)
