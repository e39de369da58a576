"""transformers' old FA2 recipe in remote code: unpad_input -> flash_attn_varlen_func -> pad_input.

Guarded by ``is_flash_attn_2_available()`` and written against flash-attn < 2.7, so it unpacks four
values from ``unpad_input``.
"""

from transformers.utils import is_flash_attn_2_available

from .tiny_common import TinyAttention, TinyTextModel

if is_flash_attn_2_available():
    from flash_attn import flash_attn_varlen_func
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input


class FlashAttention2(TinyAttention):
    def attend(self, q, k, v, attention_mask, cu_seqlens):
        batch, length = q.shape[:2]
        q_unpad, indices, cu, max_seqlen = unpad_input(q, attention_mask)
        k_unpad = index_first_axis(k.reshape(batch * length, self.num_kv_heads, self.head_dim), indices)
        v_unpad = index_first_axis(v.reshape(batch * length, self.num_kv_heads, self.head_dim), indices)
        out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu, cu, max_seqlen, max_seqlen, causal=True)
        return pad_input(out, indices, batch, length)


ATTENTION_CLASSES = {"eager": TinyAttention, "flash_attention_2": FlashAttention2}


class RemoteTinyModel(TinyTextModel):
    attention_classes = ATTENTION_CLASSES
