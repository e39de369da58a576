"""Small remote-code model packages of our own, assembled in a temp dir and loaded with trust_remote_code.

Each import pattern is one ``modeling_<pattern>.py`` next to the shared ``configuration_remote_tiny.py``
and ``tiny_common.py``. ``build`` copies the three into a fresh directory with a config.json whose
``auto_map`` points at them; the directory name is unique, so each build is a new ``transformers_modules``
package (nothing cached from an earlier load with or without the shim).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PATTERNS = ("top_varlen", "try_eager", "guard", "lazy", "qkvpacked", "bert_padding", "window")
#: Patterns whose remote code falls back by itself (issue 11): InternViT's guarded import with CUDA/half
#: asserts, dots.ocr's later guarded vision tower, Florence-2's ``_supports_sdpa`` property, a config class
#: defined in the modeling file beside a second module importing flash_attn (Phi-3-V).
MORE_PATTERNS = ("try_asserts", "try_dots", "property_sdpa", "config_beside")
#: Vision towers: packed images, ``vision_config.attn_implementation``.
VISION = ("top_varlen", "try_dots")
#: config.json values each pattern needs (qkvpacked has no GQA; window has a sliding window).
OVERRIDES: dict[str, dict[str, object]] = {
    "qkvpacked": {"num_kv_heads": 4},
    "window": {"sliding_window": 3},
    "try_asserts": {"num_kv_heads": 4, "use_flash_attn": True},
    "config_beside": {
        "model_type": "remote_tiny_beside",
        "auto_map": {
            "AutoConfig": "modeling_config_beside.BesideConfig",
            "AutoModel": "modeling_config_beside.RemoteTinyModel",
        },
    },
}
#: Modules a pattern's modeling file imports besides tiny_common.
EXTRA_FILES: dict[str, tuple[str, ...]] = {"config_beside": ("vision_embedding_beside.py",)}


def build(pattern: str, root: Path, **overrides: object) -> Path:
    """Write the package for ``pattern`` into a new directory under ``root`` and return it."""
    dest = root / f"remote_{pattern}_{uuid.uuid4().hex[:8]}"
    dest.mkdir(parents=True)
    files = ("configuration_remote_tiny.py", "tiny_common.py", f"modeling_{pattern}.py")
    for name in files + EXTRA_FILES.get(pattern, ()):
        shutil.copyfile(HERE / name, dest / name)
    config = {
        "model_type": "remote_tiny",
        "architectures": ["RemoteTinyModel"],
        "auto_map": {
            "AutoConfig": "configuration_remote_tiny.RemoteTinyConfig",
            "AutoModel": f"modeling_{pattern}.RemoteTinyModel",
        },
        **OVERRIDES.get(pattern, {}),
        **overrides,
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def set_attention(config, pattern: str, value: str) -> None:
    """Set the plain attribute the pattern's modeling code reads to pick its attention class."""
    if pattern in VISION:
        config.vision_config.attn_implementation = value
    elif pattern == "try_asserts":
        config.use_flash_attn = value == "flash_attention_2"
    else:
        config.attn_impl = value


def load(path: Path, pattern: str, attention: str | None = None, **kwargs: object):
    """``AutoModel.from_config`` with trust_remote_code (seeded); ``attention`` overrides the config's.

    ``kwargs`` go to ``from_config`` (``dtype``/``torch_dtype``, ``attn_implementation``).
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    if attention is not None:
        set_attention(config, pattern, attention)
    torch.manual_seed(0)
    return AutoModel.from_config(config, trust_remote_code=True, **kwargs).eval()


def inputs(pattern: str) -> dict[str, torch.Tensor]:
    """Fixed inputs: packed images for the vision model, padded or packed token rows for the others."""
    generator = torch.Generator().manual_seed(1)
    if pattern in VISION:
        grid_thw = torch.tensor([[1, 2, 3], [1, 3, 3], [2, 2, 2]])
        total = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        return {"pixel_values": torch.randn(total, 12, generator=generator), "grid_thw": grid_thw}
    if pattern == "qkvpacked":
        return {
            "input_ids": torch.randint(0, 64, (1, 12), generator=generator),
            "cu_seqlens": torch.tensor([0, 5, 9, 12], dtype=torch.int32),
        }
    ids = torch.randint(0, 64, (2, 8), generator=generator)
    if pattern in ("bert_padding", "try_asserts"):
        return {"input_ids": ids, "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}
    return {"input_ids": ids}


def run(model, pattern: str) -> torch.Tensor:
    """The model's output on ``inputs(pattern)``; padded positions zeroed (they are not compared)."""
    feed = inputs(pattern)
    with torch.no_grad():
        out = model(**feed)
    if "attention_mask" in feed:
        out = out * feed["attention_mask"][..., None]
    return out


def attention_classes(model) -> set[str]:
    """Names of the attention modules the model was built with."""
    return {
        type(m).__name__ for m in model.modules() if type(m).__name__.endswith(("Attention", "Attention2"))
    }
