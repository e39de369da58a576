"""Phi-3-vision's ``image_embedding_phi3_v``: a second remote module of the model that imports flash_attn."""

from flash_attn import flash_attn_func
from torch import nn


class ImageEmbedding(nn.Module):
    """Only holds the function: the model's modeling file imports flash_attn too, after this module."""

    flash_attn_func = staticmethod(flash_attn_func)
