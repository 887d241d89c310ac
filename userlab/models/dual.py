"""USER's dual encoder: an image encoder and a text encoder with no cross-attention.

Similarity is the dot product of the L2-normalised embeddings (cosine), rows are images
(method notes section 2.1).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import DataError
from .image import ImageEncoder, ImageOutput
from .text import TextOutput, build_text_encoder


def _require(batch: dict, key: str) -> torch.Tensor:
    if key not in batch:
        raise DataError(None, f"batch has no {key!r} (keys: {', '.join(sorted(batch))})")
    return batch[key]


class DualEncoder(nn.Module):
    """Image encoder + text encoder built from a :class:`~userlab.config.ModelConfig`.

    Args:
        cfg: model configuration.
        vocab: word vocabulary for the GRU text encoder (its size, and GloVe initialisation).
    """

    def __init__(self, cfg: ModelConfig, vocab: Any = None):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = build_text_encoder(cfg, vocab=vocab)

    def encode_image(self, batch: dict[str, torch.Tensor]) -> ImageOutput:
        """Embed ``batch["regions"] (B, R, D)`` (and ``batch["guide"] (B, G)`` when present)."""
        return self.image_encoder(_require(batch, "regions"), batch.get("guide"))

    def encode_text(self, batch: dict[str, torch.Tensor]) -> TextOutput:
        """Embed ``batch["tokens"] (B, L)`` with ``lengths (B,)`` / ``attention_mask (B, L)``."""
        return self.text_encoder(_require(batch, "tokens"), batch.get("lengths"),
                                 batch.get("attention_mask"))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[ImageOutput, TextOutput]:
        return self.encode_image(batch), self.encode_text(batch)

    @staticmethod
    def similarity(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(N_img, N_txt)`` of L2-normalised embeddings ``(N, E)``."""
        return img_emb @ txt_emb.t()

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters of a pretrained text backbone (empty for the GRU encoder)."""
        return list(self.text_encoder.pretrained_parameters())

    def param_groups(self, lr: float, text_lr_scale: float = 0.1,
                     weight_decay: float = 1e-4) -> list[dict[str, Any]]:
        """AdamW parameter groups: the text backbone at ``lr * text_lr_scale``, the rest at ``lr``.

        Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
        Each group carries a ``name`` (``"main"`` or ``"text_backbone"``) for logging.
        """
        backbone_ids = {id(p) for p in self.pretrained_parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        main = [p for p in trainable if id(p) not in backbone_ids]
        backbone = [p for p in trainable if id(p) in backbone_ids]
        groups = [
            {"name": "main", "params": main, "lr": lr, "weight_decay": weight_decay},
            {"name": "text_backbone", "params": backbone, "lr": lr * text_lr_scale,
             "weight_decay": weight_decay},
        ]
        return [g for g in groups if g["params"]]
