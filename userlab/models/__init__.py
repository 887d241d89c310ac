"""Models: USER's dual encoder and its parts.

- :mod:`.pooling`: GPO, :func:`l2norm`, mean / max pooling.
- :mod:`.image`: SGE, CGE, :func:`region_attention`, :class:`ImageEncoder`.
- :mod:`.text`: :class:`GRUTextEncoder`, :class:`TransformerTextEncoder`,
  :func:`build_text_encoder`.
- :mod:`.dual`: :class:`DualEncoder` (``encode_image``, ``encode_text``, ``similarity``,
  ``param_groups``).
"""
from .dual import DualEncoder
from .image import (ClipGuidedEnhancement, ImageEncoder, ImageOutput, RegionMLP,
                    SelfGuidedEnhancement, region_attention)
from .pooling import GPO, l2norm, max_pool, mean_pool, sinusoidal_encoding, unit_embedding
from .text import GRUTextEncoder, TextOutput, TransformerTextEncoder, build_text_encoder

__all__ = [
    "GPO", "ClipGuidedEnhancement", "DualEncoder", "GRUTextEncoder", "ImageEncoder",
    "ImageOutput", "RegionMLP", "SelfGuidedEnhancement", "TextOutput", "TransformerTextEncoder",
    "build_text_encoder", "l2norm", "max_pool", "mean_pool", "region_attention",
    "sinusoidal_encoding", "unit_embedding",
]
