"""Diagnostics of a trained retrieval model: what its similarities and attention look like.

Every function here works on plain arrays (a similarity matrix ``S (N_img, N_cap)`` with
captions ``5i..5i+4`` belonging to image ``i``, embeddings, attention weights), so the numbers
can be checked against independent computations; :func:`diagnose_run` puts them together for a
run folder and ``userlab diagnose RUN`` prints them and writes ``diagnostics.json``.

- **Hubness** (:func:`k_occurrence`, :func:`hubness`): ``N_k(x)``, how many queries have item
  ``x`` among their top ``k`` results. Every item would have ``N_k ≈ k · queries / items`` if
  results were spread evenly; a strongly right-skewed ``N_k`` (skewness ≫ 0) means a few *hub*
  items crowd the top of many queries' lists (Radovanović et al., JMLR 2010).
- **Modality gap** (:func:`modality_gap`): the distance between the centroids of the image and
  caption embeddings (Liang et al., NeurIPS 2022).
- **Similarity spread and collapse** (:func:`similarity_stats`, :func:`collapse_score`):
  positive and negative similarity means and their gap; a collapse score that is high when
  positives and negatives are equal *and* both near 1 (the failure that a spread-only check
  misses when a little noise remains).
- **Attention entropy** (:func:`attention_entropy`): entropy of SGE's ``alpha`` and of the
  region attention ``beta`` (``beta`` is L2-normalised, so it is turned back into the softmax
  distribution ``beta / sum(beta)`` first).
- **Recall by caption kind** (:func:`recall_by_group`): t2i R@K per caption kind (demo:
  counts / relations / colour binding / partial, recorded when the scenes are generated) or
  per caption-length bucket (:func:`length_buckets`, any data).
- **Twin confusion** (:func:`twin_confusion`): on the demo, the share of top-1 errors that
  retrieve the query's *twin* scene (same objects with colours swapped or the layout flipped),
  against the share a uniformly random wrong answer would give.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError, DataError

DIAGNOSTICS_FILE = "diagnostics.json"
#: Length buckets (words) for recall by caption length on real data.
LENGTH_EDGES = (8, 11, 14)


# ---------------------------------------------------------------------------------------------
# Small statistics
# ---------------------------------------------------------------------------------------------
def skewness(x: Any) -> float:
    """Sample skewness ``g1 = m3 / m2**1.5`` (the biased Fisher-Pearson coefficient).

    The same definition as ``scipy.stats.skew(x, bias=True)``; 0 for a constant sample.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise DataError(None, "skewness of an empty sample")
    d = x - x.mean()
    m2 = float(np.mean(d * d))
    if m2 <= 1e-300:
        return 0.0
    return float(np.mean(d ** 3) / m2 ** 1.5)


def entropy(p: Any, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of distributions along ``axis`` (``0 log 0 = 0``)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def _as_sims(sims: Any) -> torch.Tensor:
    if isinstance(sims, np.ndarray):
        sims = torch.from_numpy(np.ascontiguousarray(sims))
    if not isinstance(sims, torch.Tensor) or sims.ndim != 2:
        raise DataError(None, f"expected a 2-d similarity matrix, got {getattr(sims, 'shape', type(sims))}")
    if sims.shape[1] % sims.shape[0]:
        raise DataError(None, f"{sims.shape[1]} captions for {sims.shape[0]} images is not a whole "
                              "number of captions per image")
    return sims.detach().float().cpu()


# ---------------------------------------------------------------------------------------------
# Hubness
# ---------------------------------------------------------------------------------------------
def k_occurrence(sims: Any, k: int = 10, direction: str = "t2i", chunk: int = 1024) -> np.ndarray:
    """``N_k`` of every retrievable item.

    Args:
        sims: ``(N_img, N_cap)``.
        k: neighbourhood size.
        direction: ``"t2i"``: queries are captions, items images, returns ``(N_img,)``;
            ``"i2t"``: queries are images, items captions, returns ``(N_cap,)``.

    Returns:
        int64 counts; they sum to ``k`` times the number of queries.
    """
    if direction not in ("t2i", "i2t"):
        raise ConfigError("direction", f"{direction!r} is not one of i2t, t2i")
    S = _as_sims(sims)
    scores = S.t() if direction == "t2i" else S          # (queries, items)
    n_items = scores.shape[1]
    if not 1 <= k <= n_items:
        raise ConfigError("k", f"must lie in 1..{n_items}, got {k}")
    counts = torch.zeros(n_items, dtype=torch.int64)
    for r0 in range(0, scores.shape[0], chunk):
        top = torch.topk(scores[r0:r0 + chunk], k, dim=1).indices.reshape(-1)
        counts += torch.bincount(top, minlength=n_items)
    return counts.numpy()


def hubness(sims: Any, k: int = 10, top: int = 5) -> dict[str, Any]:
    """Hubness in both directions.

    ``k`` is cut to the number of items on tiny splits.

    Returns:
        ``{"t2i": {...}, "i2t": {...}}``, each with ``k``, ``skewness`` of ``N_k``, ``expected``
        (the even share ``k * queries / items``), ``max``, ``max_over_expected``, ``orphans``
        (share of items in nobody's top k), ``top_items`` (``[[index, N_k], ...]`` of the ``top``
        most retrieved items) and ``top1_share_of_top1pct`` (share of all top-1 results that go
        to the 1 % most retrieved items by ``N_1``).
    """
    out: dict[str, Any] = {}
    S = _as_sims(sims)
    for direction in ("t2i", "i2t"):
        k = min(k, S.shape[0] if direction == "t2i" else S.shape[1])   # tiny splits
        counts = k_occurrence(S, k, direction)
        n_items = counts.size
        n_queries = S.shape[1] if direction == "t2i" else S.shape[0]
        expected = k * n_queries / n_items
        order = np.argsort(-counts, kind="stable")
        top1 = k_occurrence(S, 1, direction)
        n_hub = max(1, int(round(0.01 * n_items)))
        hub_share = float(np.sort(top1)[::-1][:n_hub].sum() / max(1, top1.sum()))
        out[direction] = {
            "k": int(k), "skewness": skewness(counts), "expected": float(expected),
            "max": int(counts.max()), "max_over_expected": float(counts.max() / expected),
            "orphans": float(np.mean(counts == 0)),
            "top_items": [[int(i), int(counts[i])] for i in order[:top]],
            "top1_share_of_top1pct": hub_share, "top1pct_items": n_hub,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Modality gap, similarity spread, collapse
# ---------------------------------------------------------------------------------------------
def modality_gap(img: Any, cap: Any) -> dict[str, float]:
    """Distance between the image and caption embedding centroids.

    Args:
        img: ``(N_img, E)`` embeddings (normally unit vectors).
        cap: ``(N_cap, E)``.

    Returns:
        ``gap`` (``||mean(img) - mean(cap)||``), ``centroid_cosine`` (cosine of the two
        centroids), ``img_concentration`` / ``cap_concentration`` (``||mean||²``, the mean
        pairwise cosine within a modality for unit vectors, self-pairs included: 1 when every
        embedding is the same point).
    """
    a = torch.as_tensor(np.asarray(img) if not isinstance(img, torch.Tensor) else img).double().cpu()
    b = torch.as_tensor(np.asarray(cap) if not isinstance(cap, torch.Tensor) else cap).double().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DataError(None, f"embeddings must be (N_img, E) and (N_cap, E), got {tuple(a.shape)} "
                              f"and {tuple(b.shape)}")
    ca, cb = a.mean(0), b.mean(0)
    denom = float(ca.norm() * cb.norm())
    return {"gap": float((ca - cb).norm()),
            "centroid_cosine": float(ca @ cb) / denom if denom > 0 else float("nan"),
            "img_concentration": float(ca @ ca), "cap_concentration": float(cb @ cb)}


def collapse_score(pos_mean: float, neg_mean: float, margin: float = 0.2) -> float:
    """How collapsed a model looks from its mean positive and negative similarities, in [0, 1].

    ``clip(neg_mean, 0, 1) * (1 - clip((pos_mean - neg_mean) / margin, 0, 1))``: 1 when
    positives and negatives are equal at similarity 1 (every embedding the same point), 0 when
    negatives sit at or below 0 or positives beat them by at least ``margin`` (the gap a
    triplet loss asks for).
    """
    if margin <= 0:
        raise ConfigError("margin", f"must be > 0, got {margin}")
    neg = min(1.0, max(0.0, float(neg_mean)))
    sep = min(1.0, max(0.0, (float(pos_mean) - float(neg_mean)) / margin))
    return neg * (1.0 - sep)


def positive_mask(n_img: int, n_cap: int) -> torch.Tensor:
    """``(N_img, N_cap)`` bool, True where caption ``c`` belongs to image ``c // (N_cap/N_img)``."""
    per = n_cap // n_img
    return torch.arange(n_cap).unsqueeze(0) // per == torch.arange(n_img).unsqueeze(1)


def similarity_stats(sims: Any, margin: float = 0.2) -> dict[str, float]:
    """Spread of a similarity matrix: positive / negative means, their gap, and collapse.

    Returns:
        ``pos_mean``, ``neg_mean``, ``gap``, ``pos_std``, ``neg_std``, ``sim_min``, ``sim_max``,
        ``spread`` (max - min, what :func:`userlab.losses.collapse_score` measures),
        ``collapse`` (:func:`collapse_score`) and ``hard_gap`` (mean over images of the
        best positive minus the best negative).
    """
    S = _as_sims(sims).double()
    mask = positive_mask(*S.shape)
    pos, neg = S[mask], S[~mask]
    hard = (S.masked_fill(~mask, -math.inf).max(1).values - S.masked_fill(mask, -math.inf).max(1).values)
    pm, nm = float(pos.mean()), float(neg.mean()) if neg.numel() else float("nan")
    return {"pos_mean": pm, "neg_mean": nm, "gap": pm - nm, "pos_std": float(pos.std()) if pos.numel() > 1 else 0.0,
            "neg_std": float(neg.std()) if neg.numel() > 1 else 0.0, "sim_min": float(S.min()),
            "sim_max": float(S.max()), "spread": float(S.max() - S.min()),
            "collapse": collapse_score(pm, nm, margin) if neg.numel() else float("nan"),
            "hard_gap": float(hard.mean()) if neg.numel() else float("nan")}


def epoch_table(run_dir: str | os.PathLike, margin: float = 0.2) -> pd.DataFrame:
    """Similarity spread and collapse per epoch from a run's logs.

    From ``train_log.csv`` (the batch similarities the Trainer logs every ``log_every`` steps):
    mean ``pos_sim``, ``neg_sim`` and their collapse score per epoch; from ``eval_log.csv``:
    dev rSum and, when the Trainer recorded them, the dev-matrix diagnostics (``dev_*``).
    """
    run = Path(run_dir)
    rows: dict[int, dict[str, float]] = {}
    train = run / "train_log.csv"
    if train.is_file():
        df = pd.read_csv(train)
        if {"epoch", "pos_sim", "neg_sim"} <= set(df.columns) and len(df):
            for epoch, g in df.groupby("epoch"):
                p, n = float(g["pos_sim"].mean()), float(g["neg_sim"].mean())
                rows[int(epoch) + 1] = {"epoch": int(epoch) + 1, "batch_pos_sim": p, "batch_neg_sim": n,
                                        "batch_gap": p - n, "batch_collapse": collapse_score(p, n, margin)}
    ev = run / "eval_log.csv"
    if ev.is_file():
        df = pd.read_csv(ev)
        keep = [c for c in df.columns if c == "rsum" or c.startswith("dev_")]
        for _, r in df.iterrows():
            row = rows.setdefault(int(r["epoch"]), {"epoch": int(r["epoch"])})
            row.update({("dev_rsum" if c == "rsum" else c): float(r[c]) for c in keep})
    if not rows:
        raise DataError(run, "no train_log.csv / eval_log.csv with similarity columns in this run folder")
    return pd.DataFrame([rows[k] for k in sorted(rows)])


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
def attention_entropy(weights: Any, kind: str = "softmax") -> dict[str, float]:
    """Entropy of per-image attention weights ``(B, R)``.

    Args:
        weights: ``alpha`` (rows sum to 1) or ``beta`` (rows have unit L2 norm).
        kind: ``"softmax"`` (rows already sum to 1) or ``"l2"`` (divide each row by its sum
            first: ``beta = w / ||w||`` for the softmax weights ``w``, so ``beta / sum(beta) = w``).

    Returns:
        ``entropy`` (mean nats), ``normalised`` (divided by ``log R``: 1 uniform, 0 one-hot),
        ``max_weight`` (mean of the largest weight per image), ``regions`` (``R``).
    """
    w = np.asarray(weights.detach().float().cpu() if isinstance(weights, torch.Tensor) else weights,
                   dtype=np.float64)
    if w.ndim != 2 or w.shape[1] < 1:
        raise DataError(None, f"attention weights must be (B, R), got shape {w.shape}")
    if kind == "l2":
        w = w / np.clip(w.sum(1, keepdims=True), 1e-300, None)
    elif kind != "softmax":
        raise ConfigError("kind", f"{kind!r} is not one of softmax, l2")
    h = entropy(w, axis=1)
    r = w.shape[1]
    return {"entropy": float(h.mean()), "normalised": float(h.mean() / math.log(r)) if r > 1 else 0.0,
            "max_weight": float(w.max(1).mean()), "regions": int(r)}


@torch.no_grad()
def collect_attention(model: torch.nn.Module, dataset, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run the image encoder over a split and keep what its enhancement did.

    Returns:
        ``alpha``, ``beta``, ``guide_beta`` ``(N, R)`` (absent keys: that module did not run) and
        ``beta_change`` ``(N,)``: per image, the largest relative change ``beta_k / ||R_k||`` the
        enhancement ``R_k + beta_k g`` (``||g|| = 1``) makes to a region.
    """
    from torch.utils.data import DataLoader

    from .data.precomp import ImageView, collate_batch
    from .evaluate import move_batch
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    try:
        for batch in DataLoader(ImageView(dataset), batch_size=batch_size, shuffle=False,
                                collate_fn=collate_batch):
            batch = move_batch(batch, device)
            res = model.encode_image(batch)
            for name in ("alpha", "beta", "guide_beta"):
                value = getattr(res, name, None)
                if value is not None:
                    out.setdefault(name, []).append(value.float().cpu().numpy())
            beta = getattr(res, "beta", None)
            if beta is not None:
                norms = batch["regions"].float().norm(dim=-1).clamp_min(1e-8)
                out.setdefault("beta_change", []).append((beta.float() / norms).max(1).values.cpu().numpy())
    finally:
        model.train(was)
    return {k: np.concatenate(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Recall by caption kind / length
# ---------------------------------------------------------------------------------------------
def recall_by_group(t2i_ranks: Any, groups: Sequence[str], ks: Sequence[int] = (1, 5, 10)) -> pd.DataFrame:
    """t2i recall per caption group.

    Args:
        t2i_ranks: ``(N_cap,)`` 0-based ranks of each caption's image.
        groups: one label per caption.

    Returns:
        One row per group (sorted by name): ``group``, ``captions``, ``R@K`` (percent).
    """
    r = np.asarray(t2i_ranks.cpu() if isinstance(t2i_ranks, torch.Tensor) else t2i_ranks)
    g = np.asarray(list(groups), dtype=object)
    if r.shape[0] != g.shape[0]:
        raise DataError(None, f"{r.shape[0]} ranks but {g.shape[0]} group labels")
    rows = []
    for name in sorted(set(g.tolist())):
        sel = r[g == name]
        rows.append({"group": name, "captions": int(sel.size),
                     **{f"R@{k}": float(100.0 * np.mean(sel < k)) for k in ks}})
    return pd.DataFrame(rows)


def length_buckets(captions: Sequence[str], edges: Sequence[int] = LENGTH_EDGES) -> list[str]:
    """Caption-length bucket of each caption (words): ``"<=8"``, ``"9-11"``, ..., ``">14"``."""
    names = []
    lo = 0
    for e in edges:
        names.append((lo, e, f"<={e}" if lo == 0 else f"{lo + 1}-{e}"))
        lo = e
    out = []
    for c in captions:
        n = len(str(c).split())
        out.append(next((name for a, b, name in names if n <= b), f">{edges[-1]}"))
    return out


def demo_caption_kinds(folder: str | os.PathLike, split: str, n_captions: Optional[int] = None
                       ) -> Optional[list[str]]:
    """Caption kinds of a demo split (counts / relations / colour binding / partial), or None.

    Read from ``scenes_{split}.json`` when it records ``caption_frames``; otherwise the scenes
    are regenerated from ``demo_manifest.json`` (a pure function of the config, no pixels) and
    used only if their captions equal the ones on disk. None when the folder is not demo data.
    """
    from .data.scenes import FRAME_KINDS, MANIFEST_NAME, SceneConfig, generate_scenes
    folder = Path(folder)
    path = folder / f"scenes_{split}.json"
    if not path.is_file():
        return None
    scenes = json.loads(path.read_text(encoding="utf-8"))["scenes"]
    if all(s.get("caption_frames") for s in scenes):
        frames = [f for s in scenes for f in s["caption_frames"]]
    else:
        manifest = folder / MANIFEST_NAME
        if not manifest.is_file():
            return None
        cfg = SceneConfig(**json.loads(manifest.read_text(encoding="utf-8"))["config"])
        fresh = generate_scenes(cfg, split)
        if [s.captions for s in fresh] != [s["captions"] for s in scenes]:
            return None  # made by another version of the generator: kinds unknown
        frames = [f for s in fresh for f in s.caption_frames]
    kinds = [FRAME_KINDS.get(f, f) for f in frames]
    return kinds[:n_captions] if n_captions is not None else kinds


# ---------------------------------------------------------------------------------------------
# Twin confusion (demo)
# ---------------------------------------------------------------------------------------------
def twin_partners(twin_of: Sequence[Optional[int]], n: Optional[int] = None) -> np.ndarray:
    """``(n,)`` int: the twin of each scene (both directions of every pair), -1 when none."""
    n = len(twin_of) if n is None else n
    partner = np.full(n, -1, dtype=np.int64)
    for j, i in enumerate(twin_of[:n]):
        if i is not None and 0 <= int(i) < n:
            partner[j], partner[int(i)] = int(i), j
    return partner


def twin_confusion(sims: Any, partner: Any) -> dict[str, dict[str, float]]:
    """How many top-1 errors retrieve the query's twin.

    Args:
        sims: ``(N_img, N_cap)``.
        partner: ``(N_img,)`` twin index per image, -1 without a twin (:func:`twin_partners`).

    Returns:
        Per direction (``t2i``: caption queries, top-1 image; ``i2t``: image queries, image of
        the top-1 caption): ``errors`` (top-1 errors), ``errors_with_twin`` (errors of queries
        whose image has a twin), ``to_twin`` (those whose top-1 is the twin),
        ``share_of_errors`` (``to_twin / errors``), ``share_of_twin_query_errors``
        (``to_twin / errors_with_twin``), ``chance`` (``1 / (N_img - 1)``: the share a wrong
        answer drawn uniformly from the other images would give) and ``twin_queries``.
    """
    S = _as_sims(sims)
    n_img, n_cap = S.shape
    per = n_cap // n_img
    partner = np.asarray(partner, dtype=np.int64)
    if partner.shape != (n_img,):
        raise DataError(None, f"need one twin entry per image ({n_img}), got {partner.shape}")
    out = {}
    t2i_top = S.argmax(0).numpy()                     # (N_cap,) image of each caption's top-1
    i2t_top = (S.argmax(1) // per).numpy()            # (N_img,) image owning the top-1 caption
    for direction, top, truth in (("t2i", t2i_top, np.arange(n_cap) // per),
                                  ("i2t", i2t_top, np.arange(n_img))):
        wrong = top != truth
        has_twin = partner[truth] >= 0
        to_twin = wrong & has_twin & (top == partner[truth])
        errors, with_twin = int(wrong.sum()), int((wrong & has_twin).sum())
        out[direction] = {
            "queries": int(truth.size), "twin_queries": int(has_twin.sum()), "errors": errors,
            "errors_with_twin": with_twin, "to_twin": int(to_twin.sum()),
            "share_of_errors": float(to_twin.sum() / errors) if errors else float("nan"),
            "share_of_twin_query_errors": float(to_twin.sum() / with_twin) if with_twin else float("nan"),
            "chance": 1.0 / (n_img - 1) if n_img > 1 else float("nan"),
        }
    return out


# ---------------------------------------------------------------------------------------------
# i2t / t2i asymmetry
# ---------------------------------------------------------------------------------------------
def single_caption_recall(sims: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in both directions with *one* caption per image, averaged over the caption slots.

    With ``P`` captions per image, i2t counts a hit when *any* of the ``P`` captions ranks in
    the top K, t2i when the single right image does: at chance i2t R@1 is about ``P`` times t2i
    R@1. Keeping caption slot ``j`` of every image (``S[:, j::P]``, square) makes both directions
    face the same ``N x N`` matrix; an asymmetry that remains there is not the ``P`` positives.

    Returns:
        ``i2t_R@K``, ``t2i_R@K`` (percent, mean over the ``P`` slots) and ``i2t_over_t2i_R@1``.
    """
    from .evaluate import retrieval_ranks
    S = _as_sims(sims)
    per = S.shape[1] // S.shape[0]
    acc = {f"{d}_R@{k}": 0.0 for d in ("i2t", "t2i") for k in ks}
    for j in range(per):
        i2t, t2i = retrieval_ranks(S[:, j::per].contiguous(), captions_per_image=1)
        for k in ks:
            acc[f"i2t_R@{k}"] += 100.0 * float((i2t < k).float().mean()) / per
            acc[f"t2i_R@{k}"] += 100.0 * float((t2i < k).float().mean()) / per
    acc["i2t_over_t2i_R@1"] = acc["i2t_R@1"] / acc["t2i_R@1"] if acc["t2i_R@1"] > 0 else float("nan")
    return acc


def centred_recall(sims: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K after removing each image's (or caption's) mean similarity: a hubness test.

    Subtracting a constant from an image's row cannot change its own i2t ranking but does
    change t2i: a hub image that scores high against *every* caption loses its lead. So
    ``t2i_R@K`` of the row-centred matrix shows how much t2i recall the per-image offsets
    (hubs) cost, and ``i2t_R@K`` of the column-centred matrix the same for caption hubs; the
    other direction is unchanged by construction.

    Returns:
        ``t2i_R@K`` (rows centred) and ``i2t_R@K`` (columns centred), percent.
    """
    from .evaluate import retrieval_ranks
    S = _as_sims(sims)
    per = S.shape[1] // S.shape[0]
    _, t2i = retrieval_ranks(S - S.mean(1, keepdim=True), captions_per_image=per)
    i2t, _ = retrieval_ranks(S - S.mean(0, keepdim=True), captions_per_image=per)
    out = {f"t2i_R@{k}": 100.0 * float((t2i < k).float().mean()) for k in ks}
    out.update({f"i2t_R@{k}": 100.0 * float((i2t < k).float().mean()) for k in ks})
    return out


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------
def diagnose_embeddings(img: torch.Tensor, cap: torch.Tensor, dataset=None, k: int = 10,
                        margin: float = 0.2) -> dict[str, Any]:
    """Every embedding-level diagnostic of one split: hubness, gap, spread, kinds, twins."""
    from .evaluate import retrieval_ranks, similarity
    sims = similarity(img.float().cpu(), cap.float().cpu())
    _, t2i = retrieval_ranks(sims)
    report: dict[str, Any] = {
        "n_images": int(sims.shape[0]), "n_captions": int(sims.shape[1]),
        "hubness": hubness(sims, k=k), "modality_gap": modality_gap(img, cap),
        "similarity": similarity_stats(sims, margin=margin),
        "single_caption": single_caption_recall(sims),
        "centred": centred_recall(sims),
    }
    if dataset is not None:
        kinds = demo_caption_kinds(dataset.folder, dataset.split, sims.shape[1])
        groups, label = (kinds, "caption kind") if kinds is not None else (
            length_buckets(dataset.captions[: sims.shape[1]]), "caption length (words)")
        report["recall_by_group"] = {"grouping": label,
                                     "rows": recall_by_group(t2i, groups).to_dict("records")}
        scenes_file = Path(dataset.folder) / f"scenes_{dataset.split}.json"
        if scenes_file.is_file():
            scenes = json.loads(scenes_file.read_text(encoding="utf-8"))["scenes"]
            partner = twin_partners([s.get("twin_of") for s in scenes], sims.shape[0])
            report["twins"] = twin_confusion(sims, partner)
    return report


def diagnose_run(run_dir: str | os.PathLike, split: str = "test", data_root: Optional[str] = None,
                 tag: str = "best", max_images: Optional[int] = None, k: int = 10,
                 progress: bool = False) -> dict[str, Any]:
    """All diagnostics of a trained run on one split (see the module docstring).

    Returns:
        A JSON-ready dict: ``run``, ``split``, ``tag``, ``config`` (enhancement, objective,
        queue, epochs), ``hubness``, ``modality_gap``, ``similarity``, ``attention``,
        ``recall_by_group``, ``twins`` (demo only) and ``epochs`` (per-epoch spread/collapse).
    """
    from .runs import encode_run, load_run
    run = load_run(run_dir, tag=tag)
    img, cap, ds = encode_run(run, split=split, data_root=data_root, max_images=max_images,
                              progress=progress)
    report: dict[str, Any] = {"run": str(run_dir), "split": split, "tag": tag,
                              "config": run_summary(run.cfg)}
    report.update(diagnose_embeddings(img, cap, ds, k=k))
    att = collect_attention(run.model, ds)
    attention: dict[str, Any] = {}
    if "alpha" in att:
        attention["alpha"] = attention_entropy(att["alpha"], "softmax")
    if "beta" in att:
        attention["beta"] = attention_entropy(att["beta"], "l2")
        attention["beta"]["max_region_change"] = float(att["beta_change"].mean())
    if "guide_beta" in att and run.cfg.model.enhancement == "sge+cge":
        attention["cge_beta"] = attention_entropy(att["guide_beta"], "l2")
    report["attention"] = attention
    try:
        report["epochs"] = epoch_table(run_dir).to_dict("records")
    except DataError:
        report["epochs"] = []
    return report


def run_summary(cfg) -> dict[str, Any]:
    """What a run trained: enhancement, objective, queue, epochs, warm-up, boosting."""
    return {"enhancement": cfg.model.enhancement, "attention_norm": getattr(cfg.model, "attention_norm", "none"),
            "attention_lambda": cfg.model.attention_lambda, "objective": cfg.loss.objective,
            "queue": int(cfg.momentum.queue_size) if (cfg.momentum.enabled and cfg.loss.objective == "uto") else 0,
            "epochs": int(cfg.optim.epochs), "warmup_epochs": int(cfg.loss.warmup_epochs),
            "boost": "none" if cfg.boost.schedule == "none" else f"{cfg.boost.schedule}/{cfg.boost.strategy}"}


def key_numbers(report: Mapping[str, Any]) -> dict[str, float]:
    """The few diagnostics an ablation row carries."""
    out = {"hub_skew_t2i": report["hubness"]["t2i"]["skewness"],
           "hub_skew_i2t": report["hubness"]["i2t"]["skewness"],
           "modality_gap": report["modality_gap"]["gap"],
           "pos_sim": report["similarity"]["pos_mean"], "neg_sim": report["similarity"]["neg_mean"],
           "collapse": report["similarity"]["collapse"]}
    att = report.get("attention", {})
    if "beta" in att:
        out["beta_entropy"] = att["beta"]["normalised"]
    if "alpha" in att:
        out["alpha_entropy"] = att["alpha"]["normalised"]
    if "twins" in report:
        out["twin_share_t2i"] = report["twins"]["t2i"]["share_of_errors"]
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`diagnose_run`'s report."""
    lines = []
    c = report.get("config", {})
    if c:
        lines.append(f"run {report.get('run', '')} ({report.get('tag', '')}) on {report.get('split', '')}: "
                     + ", ".join(f"{k} {v}" for k, v in c.items()))
    lines.append(f"{report['n_images']} images, {report['n_captions']} captions")
    rows = []
    for d in ("t2i", "i2t"):
        h = report["hubness"][d]
        item = "image" if d == "t2i" else "caption"
        rows.append((f"hubness {d} (N_{h['k']} of each {item})",
                     f"skew {h['skewness']:.2f}, max {h['max']} = {h['max_over_expected']:.1f}x even share "
                     f"{h['expected']:.0f}, {100 * h['orphans']:.0f}% never in a top {h['k']}, top 1% {item}s "
                     f"take {100 * h['top1_share_of_top1pct']:.0f}% of top-1 results"))
        rows.append((f"  most retrieved {item}s", ", ".join(f"#{i} ({n})" for i, n in h["top_items"])))
    g = report["modality_gap"]
    rows.append(("modality gap", f"{g['gap']:.3f} (centroid cosine {g['centroid_cosine']:.3f}; "
                                 f"concentration img {g['img_concentration']:.3f}, cap {g['cap_concentration']:.3f})"))
    s = report["similarity"]
    rows.append(("similarities", f"pos {s['pos_mean']:.3f} ± {s['pos_std']:.3f}, neg {s['neg_mean']:.3f} ± "
                                 f"{s['neg_std']:.3f}, gap {s['gap']:.3f}, range [{s['sim_min']:.2f}, "
                                 f"{s['sim_max']:.2f}], collapse score {s['collapse']:.2f}"))
    for name, a in report.get("attention", {}).items():
        extra = f", largest region change {100 * a['max_region_change']:.1f}%" if "max_region_change" in a else ""
        rows.append((f"attention {name}", f"entropy {a['entropy']:.3f} nats = {a['normalised']:.2f} of uniform "
                                         f"over {a['regions']} regions, top weight {a['max_weight']:.2f}{extra}"))
    if "single_caption" in report:
        sc = report["single_caption"]
        rows.append(("one caption per image", f"i2t R@1 {sc['i2t_R@1']:.1f}, t2i R@1 {sc['t2i_R@1']:.1f} "
                                              f"(ratio {sc['i2t_over_t2i_R@1']:.2f}; with 5 captions i2t "
                                              "gets 5 chances per image)"))
    if "twins" in report:
        for d, t in report["twins"].items():
            rows.append((f"twin confusion {d}", f"{t['to_twin']} of {t['errors']} top-1 errors "
                                                f"({100 * t['share_of_errors']:.1f}%) retrieve the twin; "
                                                f"{100 * t['share_of_twin_query_errors']:.1f}% of errors on "
                                                f"{t['twin_queries']} twin queries; chance {100 * t['chance']:.2f}%"))
    width = max(len(r[0]) for r in rows)
    lines += [f"{a.ljust(width)}  {b}" for a, b in rows]
    if "recall_by_group" in report:
        rg = report["recall_by_group"]
        lines.append(f"t2i recall by {rg['grouping']}:")
        lines.append(pd.DataFrame(rg["rows"]).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    if report.get("epochs"):
        lines.append("per epoch (batch similarities from train_log; dev from eval_log):")
        lines.append(pd.DataFrame(report["epochs"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return "\n".join(lines)


def _json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a report as JSON (non-finite numbers become null)."""
    from .io import atomic_write_text
    path = Path(path)
    atomic_write_text(path, json.dumps(_json_ready(dict(report)), indent=1) + "\n")
    return path


def add_arguments(p) -> None:
    """Arguments of ``userlab diagnose``."""
    p.add_argument("run", help="run folder (or checkpoint folder)")
    p.add_argument("--split", default="test")
    p.add_argument("--data", help="data root (default: the run's own)")
    p.add_argument("--tag", default="best", help="best or last checkpoint")
    p.add_argument("--max-images", type=int, help="only the first N images of the split")
    p.add_argument("-k", type=int, default=10, help="neighbourhood size of the hubness N_k (default 10)")
    p.add_argument("--out", help=f"where to write the JSON (default: RUN/{DIAGNOSTICS_FILE})")


def cmd_diagnose(args) -> int:
    report = diagnose_run(args.run, split=args.split, data_root=args.data, tag=args.tag,
                          max_images=args.max_images, k=args.k)
    print(format_report(report))
    out = Path(args.out) if args.out else Path(args.run) / DIAGNOSTICS_FILE
    write_report(report, out)
    print(f"\nwrote {out}")
    return 0


__all__ = [
    "attention_entropy", "collapse_score", "collect_attention", "demo_caption_kinds", "diagnose_embeddings",
    "diagnose_run", "entropy", "epoch_table", "format_report", "hubness", "k_occurrence", "key_numbers",
    "length_buckets", "modality_gap", "recall_by_group", "run_summary", "similarity_stats",
    "single_caption_recall", "centred_recall", "skewness",
    "twin_confusion", "twin_partners", "write_report",
]
