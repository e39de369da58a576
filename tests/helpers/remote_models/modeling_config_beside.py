"""The config class defined in the modeling file, and two remote modules importing flash_attn (Phi-3-V).

``auto_map["AutoConfig"]`` points into this file, so the first class transformers looks up here is the
*config* class; the module (and its flash_attn imports) runs then. It imports flash_attn, then
``vision_embedding_beside``, which imports flash_attn again: by then it is in ``sys.modules``, so no import
finder is asked the second time.
"""

from flash_attn import flash_attn_varlen_func  # noqa: F401  (Phi-3-V binds it beside the embedding's)
from transformers import PretrainedConfig

# tiny_common imports it; 4.36-4.4x copy only the relative imports of the file auto_map names (and the
# AutoConfig here is this file), so it is named here too.
from .configuration_remote_tiny import RemoteTinyConfig  # noqa: F401
from .tiny_common import TinyAttention, TinyTextModel
from .vision_embedding_beside import ImageEmbedding


class BesideConfig(PretrainedConfig):
    model_type = "remote_tiny_beside"

    def __init__(self, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_layers = num_layers
        self.sliding_window = None
        self.attn_impl = "flash_attention_2"
        super().__init__(**kwargs)


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        return ImageEmbedding.flash_attn_func(q, k, v, causal=True)


ATTENTION_CLASSES = {"eager": TinyAttention, "flash_attention_2": FlashAttention2}


class RemoteTinyModel(TinyTextModel):
    config_class = BesideConfig
    attention_classes = ATTENTION_CLASSES
