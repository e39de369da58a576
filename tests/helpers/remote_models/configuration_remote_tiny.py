"""Configuration of the test remote-code models (copied next to each modeling file).

``vision_config.attn_implementation`` is a plain attribute, as in dots.ocr: transformers never reads or
rewrites it; the remote modeling code picks its attention class from it. ``attn_impl`` plays the same
role for the text models (like Qwen v1's ``use_flash_attn``).
"""

from transformers import PretrainedConfig


class RemoteTinyVisionConfig(PretrainedConfig):
    model_type = "remote_tiny_vision"

    def __init__(
        self,
        embed_dim=32,
        num_heads=4,
        depth=2,
        patch_dim=12,
        attn_implementation="flash_attention_2",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.patch_dim = patch_dim
        self.attn_implementation = attn_implementation


class RemoteTinyConfig(PretrainedConfig):
    model_type = "remote_tiny"

    def __init__(
        self,
        vocab_size=64,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        num_layers=2,
        sliding_window=None,
        attn_impl="flash_attention_2",
        vision_config=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_layers = num_layers
        self.sliding_window = sliding_window
        self.attn_impl = attn_impl
        if not isinstance(vision_config, RemoteTinyVisionConfig):
            vision_config = RemoteTinyVisionConfig(**(vision_config or {}))
        self.vision_config = vision_config
        super().__init__(**kwargs)
