"""A plain VSE++ written apart from the kit's model code: the yardstick for the kit's baseline.

Image: the mean of the region features -> one Linear -> L2 norm. Text: word embedding -> a
bidirectional GRU (the two directions' last states averaged) -> L2 norm. Loss: VSE++ (hardest
negative in both directions, margin 0.2, summed over the batch). Adam at 2e-4, no schedule, no
caption augmentation. Only the data loading (:class:`~userlab.data.precomp.PrecompDataset` and
the kit's word vocabulary) and the recall metrics (:func:`userlab.evaluate.evaluate`) are shared
with the kit, so both models are read and scored identically.

    PYTHONPATH=. python bench/plain_vsepp.py --data /path/to/f8k --out runs/plain_vsepp \\
        --epochs 4 [--train-max-images 1000] [--seed 1]

Writes ``<out>/eval_log.csv`` (dev metrics per epoch, with the epoch's wall time).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F


class PlainImage(nn.Module):
    """``(B, R, D)`` regions -> mean over R -> Linear -> unit vector ``(B, E)``."""

    def __init__(self, dim: int, embed: int, l2_input: bool = False):
        super().__init__()
        self.l2_input = l2_input
        self.fc = nn.Linear(dim, embed)
        r = np.sqrt(6.0) / np.sqrt(dim + embed)   # VSE++'s Xavier init of the image FC
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        pooled = regions.mean(dim=1)
        if self.l2_input:   # unit-length pooled features (many precomputed-feature VSE++ setups)
            pooled = F.normalize(pooled, dim=-1)
        return F.normalize(self.fc(pooled), dim=-1)


class PlainText(nn.Module):
    """Tokens ``(B, L)`` + lengths -> BiGRU -> mean of both directions' final states ``(B, E)``."""

    def __init__(self, vocab_size: int, word_dim: int, embed: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.gru = nn.GRU(word_dim, embed, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(),
                                                   batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)                  # h: (2, B, E)
        return F.normalize((h[0] + h[1]) / 2, dim=-1)


class PlainVSE(nn.Module):
    def __init__(self, dim: int, vocab_size: int, word_dim: int, embed: int, l2_input: bool = False):
        super().__init__()
        self.img = PlainImage(dim, embed, l2_input)
        self.txt = PlainText(vocab_size, word_dim, embed)

    # the interface userlab.evaluate.encode_split expects
    def encode_image(self, batch):
        return self.img(batch["regions"])

    def encode_text(self, batch):
        return self.txt(batch["tokens"], batch["lengths"])


def vsepp_loss(sim: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Hardest-negative hinge in both directions, summed over the batch (VSE++)."""
    pos = sim.diag()
    eye = torch.eye(sim.shape[0], dtype=torch.bool)
    cost_c = (margin + sim - pos[:, None]).clamp(min=0).masked_fill(eye, 0)   # image -> captions
    cost_i = (margin + sim - pos[None, :]).clamp(min=0).masked_fill(eye, 0)   # caption -> images
    return cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()


def main() -> None:
    from userlab.config import preset
    from userlab.data.precomp import collate_batch
    from userlab.evaluate import evaluate
    from userlab.pipeline import EpochBatchSampler, prepare_data
    from userlab.term_shares import similarity_row

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--embed", type=int, default=256)
    ap.add_argument("--word-dim", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-max-images", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--l2-input", action="store_true", help="L2-normalise the mean-pooled features")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    cfg = preset("f8k-cpu-vsepp")
    cfg.data.root, cfg.data.caption_augment = args.data, False
    cfg.data.train_max_images, cfg.data.batch_size = args.train_max_images, args.batch_size
    data = prepare_data(cfg)
    model = PlainVSE(data.train.feature_dim, len(data.vocab), args.word_dim, args.embed, args.l2_input)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        sampler = EpochBatchSampler(len(data.train), args.batch_size, args.seed, epoch)
        data.train.set_epoch(epoch, args.seed)
        loader = torch.utils.data.DataLoader(data.train, batch_sampler=sampler, collate_fn=collate_batch)
        model.train()
        losses, stats = [], []
        for batch in loader:
            sim = model.encode_image(batch) @ model.encode_text(batch).t()
            loss = vsepp_loss(sim)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 2.0)   # as VSE++'s grad_clip
            opt.step()
            losses.append(float(loss.detach()))
            stats.append(similarity_row(sim, 0.5))
        train_s = time.perf_counter() - t0
        df = evaluate(model, data.val, progress=False)
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in df.iloc[0].items() if k != "protocol"},
               "loss": float(np.mean(losses)), "train_s": train_s, "steps": len(losses),
               **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}}
        rows.append(row)
        pd.DataFrame(rows).to_csv(out / "eval_log.csv", index=False)
        print(f"epoch {epoch + 1}: dev rSum {row['rsum']:.1f} loss {row['loss']:.2f} "
              f"pos {row['pos_mean']:.3f} neg {row['neg_mean']:.3f} ({train_s:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
