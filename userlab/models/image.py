"""Image side of USER: region enhancement (SGE, CGE), FC + MLP embedding, GPO, L2 norm.

Method notes section 2.2. Input is a set of ``R`` region (or grid) features ``(B, R, D)``,
``D = 2048`` for BUTD. The enhancement modules work in that raw ``D``-dimensional space and
return regions of the same shape; the embedding head then maps each region to ``E`` and GPO
pools them into one L2-normalised vector ``(B, E)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .pooling import GPO, l2norm, unit_embedding


@dataclass
class ImageOutput:
    """What the image encoder returns.

    Attributes:
        embedding: ``(B, E)`` L2-normalised image embedding.
        alpha: ``(B, R)`` SGE's region weights for the global vector (sum to 1), or None.
        beta: ``(B, R)`` region-attention weights (unit L2 norm over regions): SGE's when SGE
            runs, otherwise CGE's; None without enhancement.
        gpo_weights: ``(B, R)`` GPO's weights over the sorted region ranks (sum to 1).
        guide_beta: ``(B, R)`` CGE's region-attention weights, or None without CGE.
    """

    embedding: torch.Tensor
    alpha: Optional[torch.Tensor]
    beta: Optional[torch.Tensor]
    gpo_weights: torch.Tensor
    guide_beta: Optional[torch.Tensor] = None


def _at_least_float32(x: torch.Tensor) -> torch.dtype:
    """Softmax precision: float32 for half inputs, the input's own for float32/float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear layer with Xavier-uniform weights and zero bias (USER's / SGRAF's init)."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _batch_norm(channels: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


def region_attention(regions: torch.Tensor, guide: torch.Tensor, lam: float = 1.0,
                     norm: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Add a global vector to every region, weighted by the region's affinity to it.

    ``beta = l2norm_k(softmax_k(lam * <g, R_k>))`` and ``R_hat_k = R_k + beta_k * g``
    (method notes section 2.2, steps 5-6). The softmax output is L2-normalised again across
    regions, as in the released code, so ``sum_k beta_k**2 = 1`` (not ``sum_k beta_k = 1``).

    Args:
        regions: ``(B, R, D)``.
        guide: ``(B, D)`` global vector, normally L2-normalised.
        lam: softmax scale (``attention_lamda``, 1 in USER).
        norm: ``"none"`` (released code: affinity with the raw regions) or ``"l2"`` (affinity
            with L2-normalised regions, i.e. cosines; only the affinity changes, the enhanced
            regions are still ``R_k + beta_k g``). With raw region norms of 10-60 the released
            softmax is one-hot; ``"l2"`` with ``lam`` ~10 spreads it (``model.attention_norm``).

    Returns:
        ``(enhanced (B, R, D), beta (B, R))``.
    """
    if guide.shape != (regions.shape[0], regions.shape[2]):
        raise ConfigError("model.region_dim", f"region attention needs a guide of shape "
                                              f"{(regions.shape[0], regions.shape[2])} for regions "
                                              f"{tuple(regions.shape)}, got {tuple(guide.shape)}")
    if norm not in ("none", "l2"):
        raise ConfigError("model.attention_norm", f"{norm!r} is not one of none, l2")
    keys = l2norm(regions, dim=-1) if norm == "l2" else regions
    affinity = torch.einsum("brd,bd->br", keys, guide)
    weights = torch.softmax(lam * affinity.to(_at_least_float32(affinity)), dim=1)
    beta = l2norm(weights, dim=1).to(regions.dtype)
    return regions + beta.unsqueeze(-1) * guide.unsqueeze(1), beta


def _check_regions(regions: torch.Tensor, num_regions: Optional[int], region_dim: int,
                   who: str) -> None:
    if regions.dim() != 3:
        raise ConfigError("model.num_regions", f"{who} expects regions (B, R, D), got shape "
                                               f"{tuple(regions.shape)}")
    if num_regions is not None and regions.shape[1] != num_regions:
        raise ConfigError("model.num_regions",
                          f"{who} was built for {num_regions} regions (its BatchNorm1d runs over "
                          f"the region axis) but the batch has {regions.shape[1]}; set "
                          f"model.num_regions to the features' region count")
    if regions.shape[2] != region_dim:
        raise ConfigError("model.region_dim", f"{who} was built for {region_dim}-d regions but the "
                                              f"batch has {regions.shape[2]}-d features")


class SelfGuidedEnhancement(nn.Module):
    """USER's Self-Guided Enhancement (SGE), method notes section 2.2 steps 1-6.

    1. ``L = Dropout(tanh(BN1d(R)(Linear(R))))``: BatchNorm over the region axis, one channel
       per region position (this fixes the region count).
    2. ``G = Dropout(tanh(BN1d(D)(Linear(mean_k R_k))))``.
    3. ``alpha = softmax_k(Linear(D -> 1)(L_k * G))``.
    4. ``g = l2norm(sum_k alpha_k R_k)`` over the *raw* regions.
    5-6. :func:`region_attention`: ``R_hat_k = R_k + beta_k g``.

    Args:
        region_dim: ``D``.
        num_regions: ``R``; inputs must have exactly this many regions.
        dropout: dropout after both tanh (0.4 in USER).
        attention_lambda: region-attention softmax scale (1 in USER).
    """

    def __init__(self, region_dim: int, num_regions: int, dropout: float = 0.4,
                 attention_lambda: float = 1.0, attention_norm: str = "none"):
        super().__init__()
        self.region_dim = region_dim
        self.num_regions = num_regions
        self.attention_lambda = attention_lambda
        self.attention_norm = attention_norm
        self.local_fc = _xavier_linear(region_dim, region_dim)
        self.local_bn = _batch_norm(num_regions)
        self.global_fc = _xavier_linear(region_dim, region_dim)
        self.global_bn = _batch_norm(region_dim)
        self.common_fc = _xavier_linear(region_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, regions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Enhance ``regions (B, R, D)``.

        Returns:
            ``(enhanced (B, R, D), alpha (B, R), beta (B, R), g (B, D))``.
        """
        _check_regions(regions, self.num_regions, self.region_dim, "SelfGuidedEnhancement")
        local = self.dropout(torch.tanh(self.local_bn(self.local_fc(regions))))
        glob = self.dropout(torch.tanh(self.global_bn(self.global_fc(regions.mean(1)))))
        logits = self.common_fc(local * glob.unsqueeze(1)).squeeze(-1)
        alpha = torch.softmax(logits.to(_at_least_float32(logits)), dim=1).to(regions.dtype)
        g = l2norm(torch.einsum("br,brd->bd", alpha, regions))
        enhanced, beta = region_attention(regions, g, self.attention_lambda, self.attention_norm)
        return enhanced, alpha, beta, g


class ClipGuidedEnhancement(nn.Module):
    """CLIP-Guided Enhancement (CGE): userlab's reconstruction of USER's unreleased module.

    The guide is a precomputed global image embedding (CLIP ViT-B/32's 512-d vector in USER;
    any off-the-shelf global embedding works). Following the maintainer's description
    (zhangy0822/USER#4) it passes through a small head
    ``BN1d(G) -> Linear(G, H) -> BN1d(H) -> ReLU -> Linear(H, D)``, is L2-normalised, and is
    fused by the same region attention as SGE: ``R_hat_k = R_k + beta_k g_clip``.

    Why project to ``D`` (the raw region width) and not to the embedding width ``E`` as the
    maintainer's head does: the leftover ``region_attention(images, clip_emb)`` in the released
    code takes the raw ``(B, 36, 2048)`` regions, so the CLIP vector must live in that space to be
    compared and added. Projecting there keeps CGE a drop-in replacement for SGE's ``g`` (the
    method notes, section 1.3, list the two readings; this is the one the code points to).

    Why the same attention path: the paper presents SGE and CGE as two sources of the global
    semantics fed into one enhancement; sharing :func:`region_attention` makes the variants
    differ only in where ``g`` comes from, which is the comparison the ablation needs.

    Args:
        guide_dim: ``G``, width of the guide embedding (512 for CLIP ViT-B/32).
        region_dim: ``D``.
        hidden: ``H``, hidden width of the head (the maintainer uses the embedding size).
        attention_lambda: region-attention softmax scale.
    """

    def __init__(self, guide_dim: int, region_dim: int, hidden: int = 1024,
                 attention_lambda: float = 1.0, attention_norm: str = "none"):
        super().__init__()
        self.guide_dim = guide_dim
        self.region_dim = region_dim
        self.attention_lambda = attention_lambda
        self.attention_norm = attention_norm
        self.head = nn.Sequential(
            _batch_norm(guide_dim),
            _xavier_linear(guide_dim, hidden),
            _batch_norm(hidden),
            nn.ReLU(inplace=True),
            _xavier_linear(hidden, region_dim),
        )

    def project(self, guide: torch.Tensor) -> torch.Tensor:
        """Guide ``(B, G)`` -> L2-normalised ``g_clip (B, D)``."""
        if guide.dim() != 2 or guide.shape[1] != self.guide_dim:
            raise ConfigError("model.guide_dim", f"CGE was built for {self.guide_dim}-d guide "
                                                 f"vectors but got shape {tuple(guide.shape)}")
        return l2norm(self.head(guide))

    def forward(self, regions: torch.Tensor, guide: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Enhance ``regions (B, R, D)`` with ``guide (B, G)``.

        Returns:
            ``(enhanced (B, R, D), beta (B, R), g_clip (B, D))``.
        """
        _check_regions(regions, None, self.region_dim, "ClipGuidedEnhancement")
        if guide.shape[0] != regions.shape[0]:
            raise ConfigError("model.guide_dim", f"{guide.shape[0]} guide vectors for "
                                                 f"{regions.shape[0]} images")
        g_clip = self.project(guide)
        enhanced, beta = region_attention(regions, g_clip, self.attention_lambda, self.attention_norm)
        return enhanced, beta, g_clip


class RegionMLP(nn.Module):
    """``Linear(D, H) -> BN1d(H) over all B*R rows -> ReLU -> Linear(H, E)``; default init."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, R, D) -> (B, R, E)``."""
        b, r, _ = x.shape
        h = self.fc1(x)
        h = self.bn(h.reshape(b * r, -1)).reshape(b, r, -1)
        return self.fc2(torch.relu(h))


class ImageEncoder(nn.Module):
    """Regions -> enhancement -> ``v_k = FC(R_hat_k) + MLP(R_hat_k)`` -> GPO -> L2 norm.

    ``cfg.enhancement`` picks the enhancement: ``none``, ``sge``, ``cge`` or ``sge+cge``. The
    last applies SGE first and CGE on SGE's output, so the CLIP vector is compared with
    regions that already carry the self-guided global semantics.

    Args:
        cfg: model configuration (region_dim, num_regions, embed_size, enhancement, guide_dim,
            sge_dropout, attention_lambda, mlp_hidden, gpo_dim).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.enhancement not in ("none", "sge", "cge", "sge+cge"):
            raise ConfigError("model.enhancement", f"{cfg.enhancement!r} is not one of "
                                                   "none, sge, cge, sge+cge")
        self.enhancement = cfg.enhancement
        self.region_dim = cfg.region_dim
        self.num_regions = cfg.num_regions
        self.sge = (SelfGuidedEnhancement(cfg.region_dim, cfg.num_regions, cfg.sge_dropout,
                                          cfg.attention_lambda, cfg.attention_norm)
                    if "sge" in cfg.enhancement else None)
        self.cge = (ClipGuidedEnhancement(cfg.guide_dim, cfg.region_dim, cfg.embed_size,
                                          cfg.attention_lambda, cfg.attention_norm)
                    if "cge" in cfg.enhancement else None)
        self.fc = _xavier_linear(cfg.region_dim, cfg.embed_size)
        self.mlp = RegionMLP(cfg.region_dim, cfg.mlp_hidden, cfg.embed_size)
        self.gpo = GPO(cfg.gpo_dim, cfg.gpo_dim)

    @property
    def needs_guide(self) -> bool:
        return self.cge is not None

    def enhance(self, regions: torch.Tensor, guide: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                           Optional[torch.Tensor]]:
        """Apply the configured enhancement.

        Returns:
            ``(enhanced (B, R, D), alpha (B, R) | None, beta (B, R) | None,
            guide_beta (B, R) | None)``: ``beta`` is SGE's attention when SGE runs, otherwise
            CGE's; ``guide_beta`` is CGE's attention when CGE runs.
        """
        alpha = beta = guide_beta = None
        if self.sge is not None:
            regions, alpha, beta, _ = self.sge(regions)
        if self.cge is not None:
            if guide is None:
                raise ConfigError("model.enhancement",
                                  f"{self.enhancement!r} needs guide features (batch key 'guide', "
                                  "from {split}_guide.npy) but none were given")
            regions, guide_beta, _ = self.cge(regions, guide.to(regions.dtype))
            if beta is None:
                beta = guide_beta
        return regions, alpha, beta, guide_beta

    def forward(self, regions: torch.Tensor, guide: Optional[torch.Tensor] = None) -> ImageOutput:
        """Embed ``regions (B, R, D)`` (with ``guide (B, G)`` for CGE) -> :class:`ImageOutput`."""
        _check_regions(regions, self.num_regions if self.sge is not None else None,
                       self.region_dim, "ImageEncoder")
        regions = regions.to(self.fc.weight.dtype)  # float16 features on disk, float32 weights
        enhanced, alpha, beta, guide_beta = self.enhance(regions, guide)
        per_region = self.fc(enhanced) + self.mlp(enhanced)
        b, r, _ = per_region.shape
        lengths = torch.full((b,), r, dtype=torch.long, device=per_region.device)
        pooled, weights = self.gpo(per_region, lengths)
        return ImageOutput(embedding=unit_embedding(pooled), alpha=alpha, beta=beta,
                           gpo_weights=weights, guide_beta=guide_beta)
