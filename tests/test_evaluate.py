"""Tests of userlab.evaluate: ranks, metrics, protocols, encoding, ensembles, saved sims.

The reference for every rank is the straightforward per-query loop of the SCAN / VSE++
evaluation: sort each query's scores with a stable descending argsort and read off the
position of the ground truth. The vectorised ranks must equal it number for number.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from userlab.errors import ConfigError, DataError
from userlab.evaluate import (METRIC_COLUMNS, average_sims, encode_split, evaluate,
                              evaluate_ensemble, evaluate_sims, format_table, i2t_ranks,
                              load_sims, move_batch, recall_metrics, retrieval_ranks, save_sims,
                              similarity, t2i_ranks)

BACKENDS = ("torch", "numpy")


# ---------------------------------------------------------------------------------------------
# References written out per query
# ---------------------------------------------------------------------------------------------
def reference_ranks(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query loop: stable descending argsort, position of the (best) ground truth."""
    n_img, n_cap = sims.shape
    i2t = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        order = np.argsort(-sims[i], kind="stable")
        i2t[i] = min(int(np.where(order == c)[0][0]) for c in range(k * i, k * i + k))
    t2i = np.empty(n_cap, dtype=np.int64)
    for c in range(n_cap):
        order = np.argsort(-sims[:, c], kind="stable")
        t2i[c] = int(np.where(order == c // k)[0][0])
    return i2t, t2i


def reference_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """Metrics by explicit float64 loops (independent of userlab's numpy expressions)."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", list(i2t)), ("t2i", list(t2i))):
        n = len(ranks)
        for kk in (1, 5, 10):
            out[f"{name}_R@{kk}"] = 100.0 * sum(1 for r in ranks if r < kk) / n
        s = sorted(ranks)
        median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0
        out[f"{name}_medr"] = math.floor(median) + 1.0
        out[f"{name}_meanr"] = sum(float(r) for r in ranks) / n + 1.0
    out["rsum"] = sum(out[f"{d}_R@{kk}"] for d in ("i2t", "t2i") for kk in (1, 5, 10))
    return out


def random_sims(n_img: int, k: int, seed: int, decimals: int | None = None) -> np.ndarray:
    sims = np.random.default_rng(seed).standard_normal((n_img, k * n_img)).astype(np.float32)
    if decimals is not None:
        sims = np.round(sims, decimals)   # many exact ties
    return sims


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [5, 1])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_ranks_equal_per_query_argsort(backend, k, decimals):
    sims = random_sims(48 if k == 5 else 150, k, seed=10 * k + (decimals or 7), decimals=decimals)
    if decimals is not None:
        assert len(np.unique(sims)) < sims.size // 10  # the tie case really has ties
    ref_i2t, ref_t2i = reference_ranks(sims, k)
    i2t, t2i = retrieval_ranks(sims, k, chunk_size=7, backend=backend)
    assert i2t.dtype == torch.long and t2i.dtype == torch.long
    assert i2t.shape == (sims.shape[0],) and t2i.shape == (sims.shape[1],)
    np.testing.assert_array_equal(i2t.numpy(), ref_i2t)
    np.testing.assert_array_equal(t2i.numpy(), ref_t2i)
    np.testing.assert_array_equal(i2t_ranks(sims, k, backend=backend).numpy(), ref_i2t)
    np.testing.assert_array_equal(t2i_ranks(sims, k, backend=backend).numpy(), ref_t2i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_of_constant_matrix_follow_index_order(backend):
    # every score ties: the stable order is the index order
    sims = np.zeros((6, 30), dtype=np.float32)
    i2t, t2i = retrieval_ranks(sims, 5, backend=backend)
    np.testing.assert_array_equal(i2t.numpy(), 5 * np.arange(6))
    np.testing.assert_array_equal(t2i.numpy(), np.repeat(np.arange(6), 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 64, 1000, None])
def test_chunk_size_does_not_change_ranks(backend, chunk):
    sims = random_sims(40, 5, seed=3, decimals=1)
    ref_i2t, ref_t2i = retrieval_ranks(sims, 5, chunk_size=40, backend="torch")
    i2t, t2i = retrieval_ranks(sims, 5, chunk_size=chunk, backend=backend)
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ranks_for_other_float_dtypes(dtype):
    sims = torch.from_numpy(random_sims(30, 5, seed=4)).to(dtype)
    ref = reference_ranks(sims.double().numpy(), 5)  # widening keeps order and ties
    for backend in BACKENDS:
        i2t, t2i = retrieval_ranks(sims, 5, backend=backend)
        np.testing.assert_array_equal(i2t.numpy(), ref[0])
        np.testing.assert_array_equal(t2i.numpy(), ref[1])


def test_ranks_reject_bad_input():
    with pytest.raises(DataError, match=r"\(4, 20\)"):
        retrieval_ranks(np.zeros((4, 19), np.float32), 5)
    with pytest.raises(DataError, match="2-d"):
        retrieval_ranks(np.zeros(20, np.float32), 5)
    nan = np.zeros((3, 15), np.float32)
    nan[1, 4] = np.nan
    for backend in BACKENDS:
        with pytest.raises(DataError, match="NaN"):
            retrieval_ranks(nan, 5, backend=backend)
    with pytest.raises(ConfigError, match="backend"):
        retrieval_ranks(np.zeros((3, 15), np.float32), 5, backend="jax")
    with pytest.raises(ConfigError, match="chunk_size"):
        retrieval_ranks(np.zeros((3, 15), np.float32), 5, chunk_size=0)


def test_infinite_scores_are_ranked_not_rejected():
    sims = random_sims(10, 5, seed=5)
    sims[2, 0] = np.inf
    sims[3, 16] = -np.inf
    ref = reference_ranks(sims, 5)
    for backend in BACKENDS:
        i2t, t2i = retrieval_ranks(sims, 5, backend=backend)
        np.testing.assert_array_equal(i2t.numpy(), ref[0])
        np.testing.assert_array_equal(t2i.numpy(), ref[1])


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
# 3 images, 2 captions each (captions 2i, 2i+1 belong to image i), ties included.
TINY = np.array([[0.9, 0.1, 0.5, 0.9, 0.3, 0.0],
                 [0.3, 0.8, 0.4, 0.1, 0.8, 0.7],
                 [0.6, 0.2, 0.4, 0.5, 0.3, 0.6]], dtype=np.float32)
# Worked out by hand:
#  i2t row 0: c0 (0.9) ties c3 but has the lower index -> 0
#      row 1: order c1 c4 c5 c2 ... -> best positive c2 at 3
#      row 2: order c0 c5 ... (0.6 tie, c0 first) -> c5 at 1
#  t2i c0 [.9 .3 .6] -> 0; c1 [.1 .8 .2] -> 2; c2 [.5 .4 .4] -> img1 beats tied img2 -> 1;
#      c3 [.9 .1 .5] -> 2; c4 [.3 .8 .3] -> img2 loses the tie to img0 -> 2; c5 [0 .7 .6] -> 1
TINY_I2T = [0, 3, 1]
TINY_T2I = [0, 2, 1, 2, 2, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_matrix_ranks_and_metrics_by_hand(backend):
    i2t, t2i = retrieval_ranks(TINY, captions_per_image=2, backend=backend)
    assert i2t.tolist() == TINY_I2T
    assert t2i.tolist() == TINY_T2I
    m = recall_metrics(i2t, t2i)
    assert list(m) == list(METRIC_COLUMNS)
    expected = {
        "i2t_R@1": 100 / 3, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
        "i2t_medr": 2.0,                 # median of [0, 1, 3] is 1
        "i2t_meanr": 4 / 3 + 1,
        "t2i_R@1": 100 / 6, "t2i_R@5": 100.0, "t2i_R@10": 100.0,
        "t2i_medr": 2.0,                 # median of [0, 1, 1, 2, 2, 2] is 1.5, floored to 1
        "t2i_meanr": 8 / 6 + 1,
        "rsum": 100 / 3 + 100 / 6 + 400,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key


def test_recall_thresholds_are_strict():
    # rank 1 is not within R@1, rank 4 is within R@5, rank 9 within R@10, rank 10 is not
    m = recall_metrics(np.array([0, 1, 4, 5]), np.array([9, 10, 0, 0]))
    assert m["i2t_R@1"] == 25.0 and m["i2t_R@5"] == 75.0 and m["i2t_R@10"] == 100.0
    assert m["t2i_R@1"] == 50.0 and m["t2i_R@5"] == 50.0 and m["t2i_R@10"] == 75.0
    assert m["i2t_medr"] == 3.0       # median 2.5 -> floor 2 -> +1
    assert m["t2i_meanr"] == pytest.approx(19 / 4 + 1)


@pytest.mark.parametrize("k", [5, 1])
def test_perfect_sims_give_full_recall(k):
    n = 20
    sims = np.full((n, k * n), -1.0, np.float32)
    for i in range(n):
        sims[i, k * i:k * i + k] = 1.0
    df = evaluate_sims(sims, "full", captions_per_image=k)
    row = df.iloc[0]
    for d in ("i2t", "t2i"):
        assert row[f"{d}_R@1"] == 100.0 and row[f"{d}_medr"] == 1.0 and row[f"{d}_meanr"] == 1.0
    assert row["rsum"] == 600.0


def test_random_sims_are_near_chance():
    n, k = 300, 5
    m = evaluate_sims(random_sims(n, k, seed=11), "full").iloc[0]
    n_cap = n * k
    # t2i: the image's position is uniform over n -> R@K = 100 K / n, mean rank (n + 1) / 2
    for kk, tol in ((1, 0.6), (5, 1.2), (10, 1.6)):
        assert abs(m[f"t2i_R@{kk}"] - 100 * kk / n) < tol
    assert abs(m["t2i_meanr"] - (n + 1) / 2) < 10
    # i2t: best of k positives among n*k shuffled captions
    for kk in (1, 5, 10):
        p_hit = 1 - math.comb(n_cap - k, kk) / math.comb(n_cap, kk)
        assert abs(m[f"i2t_R@{kk}"] - 100 * p_hit) < 2.5
    assert abs(m["i2t_meanr"] - (n_cap + 1) / (k + 1)) < 50   # E[min of k uniform positions]
    assert m["rsum"] < 40


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------
def test_full_protocol_matches_reference_metrics():
    sims = random_sims(60, 5, seed=12, decimals=1)
    sims[np.arange(60)[:, None], 5 * np.arange(60)[:, None] + np.arange(5)] += 1.5  # some signal
    df = evaluate_sims(sims, "full")
    assert df.shape[0] == 1 and df.loc[0, "protocol"] == "full"
    assert df.loc[0, "n_images"] == 60 and df.loc[0, "n_captions"] == 300
    ref = reference_metrics(*reference_ranks(sims, 5))
    for key, value in ref.items():
        assert df.loc[0, key] == pytest.approx(value, abs=1e-9), key


def _fold_matrix() -> np.ndarray:
    """5000 images x 5000 captions (1 caption per image) with different signal per fold."""
    rng = np.random.default_rng(13)
    sims = rng.standard_normal((5000, 5000)).astype(np.float32)
    strength = np.repeat([0.5, 1.0, 1.5, 2.0, 3.0], 1000).astype(np.float32)
    sims[np.arange(5000), np.arange(5000)] += strength
    return np.round(sims, 2)  # some ties too


def test_coco_5fold_averages_per_fold_metrics():
    sims = _fold_matrix()
    df = evaluate_sims(sims, "coco_1k_5fold", captions_per_image=1)
    folds = []
    for f in range(5):
        block = sims[1000 * f:1000 * (f + 1), 1000 * f:1000 * (f + 1)]
        folds.append(reference_metrics(*reference_ranks(block, 1)))
    assert len(df.attrs["folds"]) == 5
    for f in range(5):
        for key in METRIC_COLUMNS:
            assert df.attrs["folds"][f][key] == pytest.approx(folds[f][key], abs=1e-9)
    for key in METRIC_COLUMNS:
        assert df.loc[0, key] == pytest.approx(np.mean([m[key] for m in folds]), abs=1e-9), key
    averaged_recalls = sum(df.loc[0, f"{d}_R@{kk}"] for d in ("i2t", "t2i") for kk in (1, 5, 10))
    assert df.loc[0, "rsum"] == pytest.approx(averaged_recalls, abs=1e-9)
    # folds differ, so the average is not just the first or last fold (DBL's returned rsum)
    assert folds[0]["rsum"] < df.loc[0, "rsum"] < folds[4]["rsum"]


def test_coco_5fold_ignores_scores_across_folds():
    sims = _fold_matrix()
    before = evaluate_sims(sims, "coco_1k_5fold", captions_per_image=1)
    sims[:1000, 1000:] = 100.0   # off-fold captions outrank everything for images of fold 0
    after = evaluate_sims(sims, "coco_1k_5fold", captions_per_image=1)
    pd.testing.assert_frame_equal(before, after)
    assert evaluate_sims(sims, "coco_5k", captions_per_image=1).loc[0, "i2t_R@1"] < \
        after.loc[0, "i2t_R@1"]


@pytest.mark.parametrize("protocol, shape, expected", [
    ("f30k_1k", (999, 4995), "(1000, 5000)"),
    ("f30k_1k", (5000, 25000), "(1000, 5000)"),
    ("coco_5k", (1000, 5000), "(5000, 25000)"),
    ("coco_1k_5fold", (1000, 5000), "(5000, 25000)"),
])
def test_protocol_rejects_wrong_shape(protocol, shape, expected):
    sims = np.zeros(shape, np.float32)
    with pytest.raises(DataError) as err:
        evaluate_sims(sims, protocol)
    message = str(err.value)
    assert protocol in message and expected in message and str(shape) in message


def test_protocol_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown protocol"):
        evaluate_sims(np.zeros((2, 10), np.float32), "coco_2k")
    with pytest.raises(DataError, match="3 captions per image"):
        evaluate_sims(np.zeros((2, 10), np.float32), "full", captions_per_image=3)
    with pytest.raises(ValueError):   # DataError is a ValueError too
        evaluate_sims(np.zeros((1000, 4000), np.float32), "f30k_1k")


def test_f30k_protocol_accepts_its_shape():
    sims = random_sims(1000, 5, seed=14)
    df = evaluate_sims(sims, "f30k_1k")
    full = evaluate_sims(sims, "full")
    assert df.loc[0, "protocol"] == "f30k_1k"
    pd.testing.assert_frame_equal(df.drop(columns="protocol"), full.drop(columns="protocol"))


def test_format_table_is_markdown_with_every_metric():
    df = pd.concat([evaluate_sims(TINY, "full", captions_per_image=2)] * 2, ignore_index=True)
    text = format_table(df)
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.startswith("|") for line in lines)
    assert "i2t R@1" in lines[0] and "t2i meanr" in lines[0] and "rsum" in lines[0]
    assert "| full | 33.3 | 100.0 | 100.0 | 2.0 | 2.3 | 16.7 |" in lines[2]
    assert lines[2].endswith("| 450.0 |")


# ---------------------------------------------------------------------------------------------
# Ensembles and saved matrices
# ---------------------------------------------------------------------------------------------
def test_ensemble_of_identical_sims_has_same_metrics():
    sims = random_sims(50, 5, seed=15, decimals=1)
    single = evaluate_sims(sims, "full")
    ens = evaluate_ensemble([sims, sims.copy(), torch.from_numpy(sims)], "full")
    assert ens.loc[0, "members"] == 3
    pd.testing.assert_frame_equal(ens.drop(columns="members"), single)


def test_ensemble_averages_matrices():
    a, b = random_sims(30, 5, seed=16), random_sims(30, 5, seed=17)
    avg = average_sims([a, b])
    np.testing.assert_allclose(avg.numpy(), (a.astype(np.float64) + b) / 2, atol=1e-6)
    weighted = average_sims([a, b], weights=[3, 1])
    np.testing.assert_allclose(weighted.numpy(), 0.75 * a.astype(np.float64) + 0.25 * b,
                               atol=1e-6)
    ens = evaluate_ensemble([a, b], "full")
    ref = reference_metrics(*reference_ranks(avg.numpy(), 5))
    for key, value in ref.items():
        assert ens.loc[0, key] == pytest.approx(value, abs=1e-9)
    with pytest.raises(DataError, match="member 1"):
        average_sims([a, b[:, :-5][:-1]])
    with pytest.raises(ConfigError, match="weights"):
        average_sims([a, b], weights=[1.0])


def test_save_and_load_sims_round_trip(tmp_path):
    sims = random_sims(7, 5, seed=18)
    path = tmp_path / "run" / "sims.npy"
    save_sims(path, torch.from_numpy(sims))
    loaded = load_sims(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, sims)
    mapped = load_sims(path, mmap=True)
    np.testing.assert_array_equal(mapped, sims)
    pd.testing.assert_frame_equal(evaluate_sims(mapped, "full"), evaluate_sims(sims, "full"))
    assert [p.name for p in path.parent.iterdir()] == ["sims.npy"]   # no temp file left


def test_load_sims_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_sims(tmp_path / "missing.npy")
    np.save(tmp_path / "flat.npy", np.zeros(5, np.float32))
    with pytest.raises(DataError, match="2-d float"):
        load_sims(tmp_path / "flat.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="junk.npy"):
        load_sims(tmp_path / "junk.npy")
    with pytest.raises(DataError, match="2-d"):
        save_sims(tmp_path / "bad.npy", np.zeros(3))


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------
def test_move_batch_moves_tensors_only():
    batch = {"regions": torch.ones(2, 3), "caption": ["a", "b"], "n": 3}
    moved = move_batch(batch, torch.device("cpu"))
    assert moved is not batch and moved["caption"] == ["a", "b"] and moved["n"] == 3
    assert torch.equal(moved["regions"], batch["regions"])
    meta = move_batch(batch, "meta")
    assert meta["regions"].device.type == "meta" and meta["caption"] == ["a", "b"]


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_similarity_in_chunks_equals_matmul(chunk):
    g = torch.Generator().manual_seed(0)
    img, cap = torch.randn(7, 16, generator=g), torch.randn(35, 16, generator=g)
    sims = similarity(img, cap, chunk=chunk)
    assert sims.dtype == torch.float32 and sims.shape == (7, 35)
    ref = img.double() @ cap.double().T
    torch.testing.assert_close(sims.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="same E"):
        similarity(img, cap[:, :8])


def _tokenize(caption: str, train: bool) -> torch.Tensor:
    # a deterministic toy tokenizer: word lengths as token ids (never 0, the padding id)
    return torch.tensor([len(w) + 1 for w in caption.split()], dtype=torch.long)


class RecordingModel(nn.Module):
    """Embeds an image as its mean region and a caption as (token-sum, length, 0...)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)          # parameters give the model a device
        self.frozen = nn.BatchNorm1d(dim)        # a submodule kept in eval on purpose
        self.frozen.eval()
        self.images_seen = 0
        self.captions_seen = 0
        self.calls_in_train_mode = 0
        self.calls_outside_inference = 0

    def _check_context(self):
        self.calls_in_train_mode += any(m.training for m in self.modules())
        self.calls_outside_inference += not torch.is_inference_mode_enabled()

    def encode_image(self, batch):
        self._check_context()
        self.images_seen += batch["regions"].shape[0]
        return SimpleNamespace(embedding=batch["regions"].mean(1), alpha=None)

    def encode_text(self, batch):
        self._check_context()
        self.captions_seen += batch["tokens"].shape[0]
        emb = torch.zeros(batch["tokens"].shape[0], self.proj.in_features)
        emb[:, 0] = (batch["tokens"] * batch["attention_mask"]).sum(1).float()
        emb[:, 1] = batch["lengths"].float()
        return SimpleNamespace(embedding=emb)


@pytest.mark.parametrize("im_div", [5, 1])
def test_encode_split_encodes_each_image_once_in_order(tmp_path, write_precomp, im_div):
    from userlab.data.precomp import PrecompDataset

    src = write_precomp(tmp_path, split="test", n_images=11, regions=4, dim=8, im_div=im_div)
    dataset = PrecompDataset(src.folder, "test", tokenizer=_tokenize)
    model = RecordingModel(8)
    model.train()
    model.frozen.eval()
    img, cap = encode_split(model, dataset, batch_size=4, progress=False)

    assert model.images_seen == 11 and model.captions_seen == 55   # images once, not per caption
    assert model.calls_in_train_mode == 0 and model.calls_outside_inference == 0
    assert model.training and model.proj.training and not model.frozen.training  # restored
    assert img.shape == (11, 8) and cap.shape == (55, 8) and img.dtype == torch.float32
    np.testing.assert_allclose(img.numpy(), src.per_image.mean(1), rtol=1e-6, atol=1e-6)
    for c, caption in enumerate(src.captions):
        words = caption.strip().split()
        assert cap[c, 0].item() == sum(len(w) + 1 for w in words)
        assert cap[c, 1].item() == len(words)


class OneHotModel(nn.Module):
    """Image i and its captions share the one-hot embedding e_i: perfect retrieval."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.scale = nn.Parameter(torch.ones(()))

    def encode_image(self, batch):
        return SimpleNamespace(embedding=nn.functional.one_hot(batch["image_index"], self.n).float())

    def encode_text(self, batch):
        return SimpleNamespace(embedding=nn.functional.one_hot(batch["image_index"], self.n).float())


def test_evaluate_end_to_end_and_return_sims(tmp_path, write_precomp):
    from userlab.data.precomp import PrecompDataset

    src = write_precomp(tmp_path, split="test", n_images=9, regions=3, dim=4)
    dataset = PrecompDataset(src.folder, "test", tokenizer=_tokenize)
    df, sims = evaluate(OneHotModel(9), dataset, "full", batch_size=4, progress=False,
                        return_sims=True)
    assert sims.shape == (9, 45)
    expected = np.repeat(np.eye(9, dtype=np.float32), 5, axis=1)
    np.testing.assert_array_equal(sims.numpy(), expected)
    assert df.loc[0, "rsum"] == 600.0 and df.loc[0, "i2t_medr"] == 1.0
    assert set(df.attrs["timing"]) == {"encode_s", "similarity_s", "metrics_s"}
    only_df = evaluate(OneHotModel(9), dataset, progress=False)
    assert isinstance(only_df, pd.DataFrame)
    with pytest.raises(DataError, match="f30k_1k"):
        evaluate(OneHotModel(9), dataset, "f30k_1k", progress=False)


def test_bench_script_runs_and_agrees_at_small_size(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--images", "60", "--repeats", "1", "--no-write"]) == 0  # 0: identical
    out = capsys.readouterr().out
    assert "| full | 60 x 300 |" in out and "| yes |" in out


def test_format_table_labels_models_and_blanks_missing_numbers():
    row = evaluate_sims(TINY, "full", captions_per_image=2)
    chance = row.copy()
    chance["i2t_medr"] = float("nan")
    df = pd.concat([row.assign(model="USER"), chance.assign(model="chance")], ignore_index=True)
    lines = format_table(df).splitlines()
    assert lines[0].startswith("| model | protocol |")
    assert lines[2].startswith("| USER | full |") and lines[3].startswith("| chance | full |")
    assert "| - |" in lines[3] and "| - |" not in lines[2]
