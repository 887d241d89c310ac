"""USER: a dual encoder with momentum key encoders, two dynamic queues and a training objective.

:class:`RetrievalModel` is the one trainable object of userlab. With ``momentum.enabled`` and
``loss.objective = "uto"`` it is USER (method notes section 2); with enhancement ``none``, no
momentum and the triplet objective it is the VSE++ baseline. Per step (``forward``):

1. query encoders embed the batch: ``v (B, E)``, ``t (B, E)``, ``S = v tᵀ (B, B)``;
2. the key encoders take an EMA step towards the query encoders (before the keys, as MoCo);
3. key encoders embed the same batch (no gradient): ``v̂, t̂ (B, E)``;
4. the objective is computed over mini-batch and queue negatives;
5. the keys, with their image ids, are enqueued (after the loss, as the original).

The key encoders run in train mode, as in the released code (dropout on, BatchNorm on batch
statistics); only the query encoders are used at test time.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..config import ExperimentConfig
from ..losses import LossOutput, info_nce, triplet_loss, unified_objective
from ..momentum import MomentumQueue, ema_update_, make_key_encoder
from .dual import DualEncoder


def _without_autocast(device: torch.device):
    """Context that computes in the inputs' own precision, even inside ``torch.autocast``."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast
        import contextlib
        return contextlib.nullcontext()


class RetrievalModel(nn.Module):
    """Query encoders (+ momentum key encoders and queues) and the training objective.

    Args:
        cfg: the experiment configuration (model, momentum and loss sections are used).
        vocab: word vocabulary for a GRU text encoder (optional, for GloVe initialisation).
    """

    def __init__(self, cfg: ExperimentConfig, vocab: Any = None, with_momentum: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = DualEncoder(cfg.model, vocab=vocab)
        # Inference never needs the key encoders and queues (with_momentum=False skips them).
        self.uses_queues = with_momentum and cfg.momentum.enabled and cfg.loss.objective == "uto"
        if self.uses_queues:
            self.key_encoder = make_key_encoder(self.encoder)
            self.image_queue = MomentumQueue(cfg.model.embed_size, cfg.momentum.queue_size)
            self.text_queue = MomentumQueue(cfg.model.embed_size, cfg.momentum.queue_size)
        self.max_violation = cfg.loss.max_violation
        self.current_gamma = cfg.loss.gamma   # loss.gamma_warmup_epochs ramps it (set_progress)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the Trainer before each step: UTO's gamma warm-up (off by default)."""
        loss = self.cfg.loss
        if loss.gamma_warmup_epochs <= 0:
            self.current_gamma = loss.gamma
            return
        warm_steps = loss.gamma_warmup_epochs * total_steps / max(1, self.cfg.optim.epochs)
        frac = min(1.0, step / max(1.0, warm_steps))
        self.current_gamma = loss.gamma_start + (loss.gamma - loss.gamma_start) * frac

    # -- encoding (what evaluation and notebooks use) ----------------------------------------
    def encode_image(self, batch: dict[str, torch.Tensor]):
        return self.encoder.encode_image(batch)

    def encode_text(self, batch: dict[str, torch.Tensor]):
        return self.encoder.encode_text(batch)

    def query_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def param_groups(self, lr: float, text_lr_scale: float, weight_decay: float) -> list[dict]:
        """AdamW groups: a pretrained transformer text encoder learns at ``lr * text_lr_scale``."""
        return self.encoder.param_groups(lr, text_lr_scale, weight_decay)

    def train(self, mode: bool = True) -> "RetrievalModel":
        super().train(mode)
        if self.uses_queues:
            self.key_encoder.train(True)  # as released: key encoders never switch to eval
        return self

    # -- one training step --------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        """Loss of one batch.

        Returns:
            ``(loss, outputs)``; ``outputs`` holds ``sim (B, B)``, ``img (B, E)``, ``txt (B, E)``
            and the full ``image`` / ``text`` outputs (attention weights), for figures.
        """
        img, txt = self.encoder(batch)
        # The embeddings leave the encoders in float32; under bf16/fp16 autocast the matmul would
        # round the similarities to ~3 digits, and the losses scale them by up to mu = 90.
        with _without_autocast(img.embedding.device):
            sim = img.embedding @ txt.embedding.t()
        outputs = {"sim": sim, "img": img.embedding, "txt": txt.embedding, "image": img, "text": txt}
        loss_cfg = self.cfg.loss
        if loss_cfg.objective == "uto":
            if self.uses_queues:
                keys = self._momentum_keys(batch)
                ids = batch["image_id"]
                masks = (None, None)
                if self.cfg.momentum.mask_same_image:
                    masks = (self.text_queue.negatives_mask(ids), self.image_queue.negatives_mask(ids))
                loss = unified_objective(
                    sim, img.embedding, txt.embedding, keys[0], keys[1],
                    self.image_queue.keys.clone(), self.text_queue.keys.clone(),
                    mu=loss_cfg.mu, gamma=self.current_gamma, lambda_batch=loss_cfg.lambda_batch,
                    queue_mask=masks)
                self.image_queue.enqueue(keys[0], ids)
                self.text_queue.enqueue(keys[1], ids)
            else:
                loss = unified_objective(sim, img.embedding, txt.embedding, None, None, None, None,
                                         mu=loss_cfg.mu, gamma=self.current_gamma,
                                         lambda_batch=loss_cfg.lambda_batch)
        elif loss_cfg.objective == "triplet":
            loss = triplet_loss(sim, margin=loss_cfg.margin, max_violation=self.max_violation)
        else:
            loss = info_nce(sim, temperature=loss_cfg.temperature)
        return loss, outputs

    @torch.no_grad()
    def _momentum_keys(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ema_update_(self.key_encoder, self.encoder, self.cfg.momentum.momentum)
        img_k, txt_k = self.key_encoder(batch)
        return img_k.embedding.detach(), txt_k.embedding.detach()

    # -- state split for checkpoints ----------------------------------------------------------
    def inference_state(self) -> dict[str, torch.Tensor]:
        """The query encoders only: what ``model.safetensors`` holds."""
        return self.encoder.state_dict()

    def load_inference_state(self, state: dict[str, torch.Tensor], source: Any = "<memory>") -> None:
        """Load query encoders; a mismatch raises CheckpointError naming ``source``."""
        from ..checkpoint import load_state_dict_checked
        load_state_dict_checked(self.encoder, state, source)

    def momentum_state(self) -> dict[str, Any]:
        """Key encoders and queues (keys, ids, pointer): part of ``state.pt``."""
        if not self.uses_queues:
            return {}
        return {"key_encoder": self.key_encoder.state_dict(),
                "image_queue": self.image_queue.state_dict(),
                "text_queue": self.text_queue.state_dict()}

    def load_momentum_state(self, state: dict[str, Any]) -> None:
        if self.uses_queues and state:
            self.key_encoder.load_state_dict(state["key_encoder"])
            self.image_queue.load_state_dict(state["image_queue"])
            self.text_queue.load_state_dict(state["text_queue"])


def build_model(cfg: ExperimentConfig, vocab: Any = None, device: Optional[torch.device] = None) -> RetrievalModel:
    model = RetrievalModel(cfg, vocab=vocab)
    return model.to(device) if device is not None else model
