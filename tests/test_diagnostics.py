"""Diagnostics against independent computations (scipy, brute force, hand-built cases)."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import scipy.stats
import torch

from userlab import diagnostics as dg
from userlab.data.scenes import (CAPTION_KINDS, FRAME_KINDS, SceneConfig, describe_scene,
                                 describe_scene_with_frames, generate_scenes, random_scene)
from userlab.errors import ConfigError, DataError
from userlab.evaluate import retrieval_ranks


# -- statistics ---------------------------------------------------------------------------------
def test_skewness_matches_scipy():
    hand = [1, 1, 1, 2, 2, 3, 10]
    assert dg.skewness(hand) == pytest.approx(scipy.stats.skew(hand, bias=True), rel=1e-12)
    rng = np.random.default_rng(0)
    for x in (rng.exponential(size=500), rng.normal(size=300), rng.integers(0, 50, 1000)):
        assert dg.skewness(x) == pytest.approx(scipy.stats.skew(x, bias=True), rel=1e-9, abs=1e-12)
    assert dg.skewness([4, 4, 4]) == 0.0
    assert dg.skewness(rng.exponential(size=2000)) > 1.5      # exponential: skew 2
    with pytest.raises(DataError):
        dg.skewness([])


def test_entropy_uniform_and_one_hot():
    r = 12
    uniform = np.full((3, r), 1 / r)
    one_hot = np.eye(r)[:3]
    assert dg.entropy(uniform) == pytest.approx(np.full(3, math.log(r)))
    assert dg.entropy(one_hot) == pytest.approx(np.zeros(3))
    a = dg.attention_entropy(uniform)
    assert a["normalised"] == pytest.approx(1.0) and a["max_weight"] == pytest.approx(1 / r)
    b = dg.attention_entropy(one_hot)
    assert b["normalised"] == pytest.approx(0.0) and b["max_weight"] == pytest.approx(1.0)
    # beta is l2norm(softmax(.)): "l2" recovers the softmax distribution before the entropy
    logits = torch.randn(5, r, generator=torch.Generator().manual_seed(0))
    w = torch.softmax(logits, 1)
    beta = w / w.norm(dim=1, keepdim=True)
    expect = scipy.stats.entropy(w.numpy(), axis=1).mean()
    assert dg.attention_entropy(beta, "l2")["entropy"] == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ConfigError):
        dg.attention_entropy(beta, "other")


# -- hubness ------------------------------------------------------------------------------------
def _brute_k_occurrence(S: np.ndarray, k: int, direction: str) -> np.ndarray:
    scores = S.T if direction == "t2i" else S
    counts = np.zeros(scores.shape[1], dtype=int)
    for row in scores:
        for j in np.argsort(-row, kind="stable")[:k]:
            counts[j] += 1
    return counts


def test_k_occurrence_against_brute_force():
    rng = np.random.default_rng(3)
    S = rng.normal(size=(7, 35)).astype(np.float32)
    for direction in ("t2i", "i2t"):
        for k in (1, 3):
            got = dg.k_occurrence(S, k, direction, chunk=4)
            assert got.tolist() == _brute_k_occurrence(S, k, direction).tolist()
            assert got.sum() == k * (35 if direction == "t2i" else 7)
    with pytest.raises(ConfigError):
        dg.k_occurrence(S, 0)
    with pytest.raises(ConfigError):
        dg.k_occurrence(S, 2, "sideways")


def test_hub_image_found_and_skewed():
    rng = np.random.default_rng(4)
    S = rng.normal(scale=0.1, size=(50, 250))
    S[17] += 0.5        # image 17 scores high against every caption: a hub
    h = dg.hubness(S, k=5)
    assert h["t2i"]["top_items"][0] == [17, 250]            # in every caption's top 5
    assert h["t2i"]["skewness"] > 5
    assert h["t2i"]["expected"] == pytest.approx(5 * 250 / 50)
    flat = dg.hubness(rng.normal(size=(50, 250)), k=5)
    assert flat["t2i"]["skewness"] < h["t2i"]["skewness"]


# -- gap, spread, collapse ----------------------------------------------------------------------
def test_modality_gap_hand_case():
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    cap = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    g = dg.modality_gap(img, cap)
    assert g["gap"] == pytest.approx(math.sqrt(2))
    assert g["centroid_cosine"] == pytest.approx(0.0)
    assert g["img_concentration"] == pytest.approx(1.0)
    same = dg.modality_gap(img, img)
    assert same["gap"] == pytest.approx(0.0)


def test_similarity_stats_and_collapse():
    # 2 images x 2 captions each: positives at [0,0:2] and [1,2:4]
    S = np.array([[0.9, 0.7, 0.1, 0.3], [0.2, 0.0, 0.8, 0.6]])
    s = dg.similarity_stats(S)
    assert s["pos_mean"] == pytest.approx((0.9 + 0.7 + 0.8 + 0.6) / 4)
    assert s["neg_mean"] == pytest.approx((0.1 + 0.3 + 0.2 + 0.0) / 4)
    assert s["hard_gap"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.2)) / 2)
    assert s["collapse"] == 0.0        # gap 0.6 > margin
    collapsed = 0.98 + 0.01 * np.random.default_rng(0).random((10, 50))
    c = dg.similarity_stats(collapsed)
    assert c["collapse"] > 0.9
    assert dg.collapse_score(1.0, 1.0) == 1.0
    assert dg.collapse_score(0.5, 0.5) == pytest.approx(0.5)
    assert dg.collapse_score(0.5, 0.4, margin=0.2) == pytest.approx(0.4 * 0.5)
    assert dg.collapse_score(0.2, -0.3) == 0.0
    with pytest.raises(ConfigError):
        dg.collapse_score(0.1, 0.1, margin=0)


# -- recall by group, twins ---------------------------------------------------------------------
def test_recall_by_group_matches_hand_count():
    ranks = np.array([0, 3, 0, 12, 5, 0])
    groups = ["a", "a", "b", "b", "b", "c"]
    df = dg.recall_by_group(ranks, groups).set_index("group")
    assert df.loc["a", "R@1"] == 50.0 and df.loc["a", "R@5"] == 100.0
    assert df.loc["b", "R@1"] == pytest.approx(100 / 3) and df.loc["b", "R@10"] == pytest.approx(200 / 3)
    assert df.loc["c", "captions"] == 1
    with pytest.raises(DataError):
        dg.recall_by_group(ranks, groups[:-1])


def test_length_buckets():
    caps = ["a b c", "one two three four five six seven eight nine", "x " * 12, "y " * 20]
    assert dg.length_buckets(caps) == ["<=8", "9-11", "12-14", ">14"]


def test_twin_confusion_hand_case():
    # 4 images, 1 caption each; images 0 and 1 are twins, 2 and 3 are not
    partner = dg.twin_partners([None, 0, None, None])
    assert partner.tolist() == [1, 0, -1, -1]
    S = np.array([[0.5, 0.9, 0.0, 0.0],    # col 1: image 0 beats image 1 -> caption 1 errs to its twin
                  [0.9, 0.8, 0.0, 0.0],    # col 0: image 1 beats image 0 -> caption 0 errs to its twin
                  [0.0, 0.0, 0.7, 0.8],    # col 3: image 2 beats image 3 -> error, no twin
                  [0.0, 0.0, 0.1, 0.2]])
    t = dg.twin_confusion(S, partner)["t2i"]
    assert (t["errors"], t["to_twin"], t["errors_with_twin"]) == (3, 2, 2)
    assert t["share_of_errors"] == pytest.approx(2 / 3)
    assert t["chance"] == pytest.approx(1 / 3)
    i = dg.twin_confusion(S, partner)["i2t"]
    # image 0's best caption is 1 (twin), image 1's is 0 (twin), 2's is 3 (no twin), 3's is 3 (right)
    assert (i["errors"], i["to_twin"]) == (3, 2)


# -- demo caption kinds --------------------------------------------------------------------------
def test_recording_frames_keeps_captions():
    cfg = SceneConfig.tiny()
    for seed in range(20):
        scene = random_scene(cfg, random.Random(seed))
        plain = describe_scene(scene, random.Random(f"c{seed}"))
        caps, frames = describe_scene_with_frames(scene, random.Random(f"c{seed}"))
        assert caps == plain
        assert all(FRAME_KINDS[f] in CAPTION_KINDS for f in frames)


def test_caption_kinds_say_what_the_captions_say():
    scenes = generate_scenes(SceneConfig.tiny(), "train")
    numbers = ("one", "two", "three", "four", "five", "six", "seven")
    seen = set()
    for s in scenes:
        for cap, frame in zip(s.captions, s.caption_frames):
            kind = FRAME_KINDS[frame]
            seen.add(kind)
            text = cap.lower()
            if frame == "count_caption":
                assert any(w in text.split() for w in numbers) or "total" in text
            if frame == "relation_caption":
                assert any(w in text for w in ("left", "right", "above", "below", "over", "under",
                                               "beneath", "another"))
    assert seen == set(CAPTION_KINDS)


def test_demo_caption_kinds_from_folder(tmp_path):
    cfg = SceneConfig.tiny()
    scenes = generate_scenes(cfg, "test")
    record = {"scenes": [s.to_json() for s in scenes]}
    (tmp_path / "scenes_test.json").write_text(json.dumps(record))
    kinds = dg.demo_caption_kinds(tmp_path, "test")
    assert kinds == [FRAME_KINDS[f] for s in scenes for f in s.caption_frames]
    # an older scene file without frames: regenerated from the manifest and checked
    for s in record["scenes"]:
        s.pop("caption_frames")
    (tmp_path / "scenes_test.json").write_text(json.dumps(record))
    assert dg.demo_caption_kinds(tmp_path, "test") is None          # no manifest: unknown
    import dataclasses
    (tmp_path / "demo_manifest.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    assert dg.demo_caption_kinds(tmp_path, "test") == kinds
    record["scenes"][0]["captions"][0] = "something else"             # not the generator's
    (tmp_path / "scenes_test.json").write_text(json.dumps(record))
    assert dg.demo_caption_kinds(tmp_path, "test") is None


# -- a trained tiny run, through the CLI -----------------------------------------------------------
def test_diagnose_cli_on_tiny_run(tmp_path, capsys, one_thread):
    from tiny import tiny_config, tiny_data
    from userlab.cli import main
    from userlab.train import Trainer
    data = tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", **{"optim.epochs": 2})
    Trainer(cfg, progress=False).fit()
    ev = __import__("pandas").read_csv(tmp_path / "run" / "eval_log.csv")
    assert {"dev_collapse", "dev_hub_skew_t2i", "dev_pos_sim"} <= set(ev.columns)
    assert main(["diagnose", str(tmp_path / "run"), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "hubness t2i" in out and "attention alpha" in out and "attention beta" in out
    report = json.loads((tmp_path / "run" / dg.DIAGNOSTICS_FILE).read_text())
    assert 0 <= report["attention"]["beta"]["normalised"] <= 1
    assert 0 <= report["attention"]["alpha"]["normalised"] <= 1
    assert report["recall_by_group"]["grouping"] == "caption length (words)"
    assert sum(r["captions"] for r in report["recall_by_group"]["rows"]) == report["n_captions"]
    assert [r["epoch"] for r in report["epochs"]] == [1, 2]
    # the t2i R@1 of the groups, weighted, is the overall t2i R@1
    from userlab.runs import encode_run, load_run
    from userlab.evaluate import similarity
    run = load_run(tmp_path / "run")
    img, cap, _ = encode_run(run, progress=False)
    _, t2i = retrieval_ranks(similarity(img, cap))
    rows = report["recall_by_group"]["rows"]
    weighted = sum(r["R@1"] * r["captions"] for r in rows) / sum(r["captions"] for r in rows)
    assert weighted == pytest.approx(100 * float((t2i < 1).float().mean()))
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2


def test_single_caption_recall_symmetric_case():
    # a symmetric N x N score pattern repeated for every caption slot: i2t == t2i
    rng = np.random.default_rng(5)
    base = rng.normal(size=(30, 30))
    base = base + base.T + 2.0 * np.eye(30)
    sims = np.repeat(base, 5, axis=1)      # captions 5i..5i+4 all copy column i
    sc = dg.single_caption_recall(sims)
    assert sc["i2t_R@1"] == pytest.approx(sc["t2i_R@1"])
    # against evaluate_sims on one slot
    from userlab.evaluate import evaluate_sims
    ref = evaluate_sims(np.ascontiguousarray(sims[:, 0::5]), captions_per_image=1).iloc[0]
    assert sc["i2t_R@5"] == pytest.approx(float(ref["i2t_R@5"]))
    assert sc["t2i_R@10"] == pytest.approx(float(ref["t2i_R@10"]))


def test_centred_recall_removes_a_hub_offset():
    rng = np.random.default_rng(6)
    n = 40
    sims = rng.normal(scale=0.1, size=(n, 5 * n))
    sims[np.arange(n).repeat(5), np.arange(5 * n)] += 0.5     # every caption's image is its best match
    from userlab.evaluate import evaluate_sims
    clean = evaluate_sims(sims).iloc[0]
    hubbed = sims.copy()
    hubbed[3] += 1.0                                            # image 3 now wins every caption
    hub = evaluate_sims(hubbed).iloc[0]
    assert hub["t2i_R@1"] < 10 and hub["i2t_R@1"] == clean["i2t_R@1"]   # row offset: i2t unchanged
    c = dg.centred_recall(hubbed)
    assert c["t2i_R@1"] > 95                                    # centring the rows removes the hub ...
    assert c["t2i_R@1"] == pytest.approx(dg.centred_recall(sims)["t2i_R@1"])   # ... exactly: offsets cancel
