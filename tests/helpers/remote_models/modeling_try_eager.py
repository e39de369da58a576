"""dots.ocr's later release: flash_attn imported inside try, falling back to eager with a print."""

from .tiny_common import TinyAttention, TinyTextModel

try:
    from flash_attn import flash_attn_func

    flash_attn_available = True
except ImportError:
    flash_attn_available = False


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        return flash_attn_func(q, k, v, causal=True)


ATTENTION_CLASSES = {"eager": TinyAttention, "flash_attention_2": FlashAttention2}


class RemoteTinyModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES

    def attention_choice(self, config):
        if config.attn_impl == "flash_attention_2" and not flash_attn_available:
            print("flash attention not available! fallback to eager implementation ")
            return "eager"
        return config.attn_impl
