"""``flash_attn.layers`` of sdpa_shim's stand-in: only ``rotary`` is provided."""
