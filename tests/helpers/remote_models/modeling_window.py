"""Phi-3 style: sliding window only if ``flash_attn_func``'s signature has ``window_size``."""

import inspect
import logging

from .tiny_common import TinyAttention, TinyTextModel

logger = logging.getLogger(__name__)

try:
    from flash_attn import flash_attn_func

    _flash_supports_window_size = "window_size" in list(inspect.signature(flash_attn_func).parameters)
except ImportError:
    logger.warning("`flash-attention` package not found, consider installing for better performance")


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        window = self.config.sliding_window
        if window is not None and not _flash_supports_window_size:
            raise ValueError("Current `flash-attention` does not support `window_size`.")
        window_size = (window, window) if window is not None else (-1, -1)
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)


ATTENTION_CLASSES = {"eager": TinyAttention, "flash_attention_2": FlashAttention2}


class RemoteTinyModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES
