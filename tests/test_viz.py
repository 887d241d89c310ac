"""Figures of userlab.viz: structure of the drawn artists against independent computations."""
from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import LineCollection
from PIL import Image

from userlab import viz
from userlab.boosting import margins as boosting_margins
from userlab.errors import ConfigError, DataError

HIT = mcolors.to_rgba(viz.HIT_COLOUR)
MISS = mcolors.to_rgba(viz.MISS_COLOUR)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _captions(n_images: int) -> list[str]:
    return [f"caption {c} of image {c // 5}" for c in range(5 * n_images)]


def _planted_sims(n_images: int, seed: int = 0) -> np.ndarray:
    """Random scores in [0, 1) with known structure set by the tests."""
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n_images, 5 * n_images))


def _rank_loop(scores: np.ndarray, target) -> int:
    """0-based position of the best target among scores sorted descending (stable, float64)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return min(order.index(t) for t in np.atleast_1d(target))


# -- run figures -------------------------------------------------------------------------------
def _recall_row(model: str, protocol: str, value: float) -> dict:
    row = {"model": model, "protocol": protocol}
    row.update({f"{d}_R@{k}": value + k for d in ("i2t", "t2i") for k in (1, 5, 10)})
    return row


def test_recall_bars_one_panel_per_protocol():
    table = pd.DataFrame([_recall_row(m, p, v) for m, v in (("a", 10.0), ("b", 40.0))
                          for p in ("coco_1k_5fold", "coco_5k")])
    fig = viz.plot_recall_bars(table)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["retrieval recall (coco_1k_5fold)",
                                                   "retrieval recall (coco_5k)"]
    for ax in fig.axes:
        heights = sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() > 0)
        # 2 models x 6 metrics, values value + k
        assert heights == sorted([v + k for v in (10.0, 40.0) for _ in ("i2t", "t2i") for k in (1, 5, 10)])
    single = viz.plot_recall_bars(table[table["protocol"] == "coco_5k"])
    assert len(single.axes) == 1


def test_recall_bars_rejects_missing_columns():
    with pytest.raises(DataError, match="t2i_R@10"):
        viz.plot_recall_bars(pd.DataFrame([{"model": "a", "i2t_R@1": 1, "i2t_R@5": 2, "i2t_R@10": 3,
                                            "t2i_R@1": 1, "t2i_R@5": 2}]))


def test_save_writes_png(tmp_path):
    fig = viz.plot_dev_rsum({"run": pd.DataFrame({"epoch": [0, 1], "rsum": [10.0, 20.0]})})
    path = viz.save(fig, "curve", tmp_path)
    assert path == tmp_path / "curve.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_loss_terms_one_line_per_term():
    log = pd.DataFrame({"step": np.arange(10), "loss_batch": np.linspace(2, 1, 10),
                        "loss_queue": np.linspace(3, 1, 10), "lr": 0.1})
    fig = viz.plot_loss_terms({"user": log}, smooth=1)
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.lines] == ["batch", "queue"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.linspace(2, 1, 10))


# -- attention ---------------------------------------------------------------------------------
BOXES = np.array([[0, 0, 40, 30], [10, 10, 70, 50], [5, 20, 30, 55], [50, 5, 78, 58]], float)


def _region_patches(ax) -> dict[int, plt.Rectangle]:
    return {int(p.get_gid().split(":")[1]): p for p in ax.patches
            if (p.get_gid() or "").startswith("region:")}


def test_region_attention_alpha_and_width_proportional_to_weights():
    weights = np.array([0.1, 0.6, 0.3, 0.0])
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    fig = viz.plot_region_attention(image, BOXES, weights, title="t", max_linewidth=4.0)
    patches = _region_patches(fig.axes[0])
    assert sorted(patches) == [0, 1, 2, 3]
    for k, patch in patches.items():
        assert patch.get_edgecolor()[3] == pytest.approx(weights[k] / 0.6)
        assert patch.get_linewidth() == pytest.approx(4.0 * weights[k] / 0.6)
        x0, y0, x1, y1 = BOXES[k]
        assert (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()) == \
            pytest.approx((x0, y0, x1 - x0, y1 - y0))
    # strongest drawn last (on top)
    drawn = [int(p.get_gid().split(":")[1]) for p in fig.axes[0].patches if (p.get_gid() or "").startswith("region:")]
    assert drawn[-1] == 1 and drawn[0] == 3
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels[0] == "#1 0.60" and len(labels) == 3


def test_region_attention_shared_scale_and_no_image():
    w = torch.tensor([0.2, 0.4, 0.1, 0.3])  # a tensor works as well as an array
    fig = viz.plot_region_attention(None, BOXES, w, scale=0.8)
    patches = _region_patches(fig.axes[0])
    assert patches[1].get_edgecolor()[3] == pytest.approx(0.5)
    assert fig.axes[0].images[0].get_array().shape[:2] == (58, 78)  # canvas fits the boxes


def test_region_attention_rejects_mismatch():
    with pytest.raises(DataError, match="3 attention weights for 4 boxes"):
        viz.plot_region_attention(None, BOXES, np.ones(3))


def test_grid_attention_overlay_is_the_weight_grid():
    weights = np.arange(12, dtype=float)
    fig = viz.plot_grid_attention(np.zeros((30, 40, 3)), weights, grid=(3, 4), title="grid")
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # image axis + colour bar
    np.testing.assert_array_equal(np.asarray(ax.images[1].get_array()), weights.reshape(3, 4))
    assert ax.images[1].get_extent() == [0, 40, 30, 0]
    with pytest.raises(DataError, match="3x5"):
        viz.plot_grid_attention(None, weights, grid=(3, 5))


def test_gpo_weights_bars():
    fig = viz.plot_gpo_weights({"image": np.array([0.5, 0.3, 0.2]), "text": np.array([0.6, 0.4, 0.0, 0.0])})
    assert len(fig.axes) == 2
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx([0.5, 0.3, 0.2])
    assert len(fig.axes[1].patches) == 4
    assert len(viz.plot_gpo_weights(np.ones(5) / 5, title="one").axes) == 1


def test_attention_comparison_panels():
    sge, cge = np.array([0.1, 0.6, 0.3, 0.0]), np.array([0.7, 0.1, 0.1, 0.1])
    fig = viz.plot_attention_comparison(None, BOXES, {"SGE": sge, "CGE": cge, "none": None})
    assert [ax.get_title() for ax in fig.axes] == ["SGE", "CGE", "none (no attention)"]
    assert _region_patches(fig.axes[1])[0].get_edgecolor()[3] == pytest.approx(1.0)
    flat = [p.get_edgecolor()[3] for p in _region_patches(fig.axes[2]).values()]
    assert len(set(flat)) == 1  # no weights: every box alike
    shared = viz.plot_attention_comparison(None, BOXES, {"SGE": sge, "CGE": cge}, shared_scale=True)
    assert _region_patches(shared.axes[0])[1].get_edgecolor()[3] == pytest.approx(0.6 / 0.7)


def test_attention_weights_of_a_model_output():
    from userlab.models import ImageOutput
    out = ImageOutput(embedding=torch.zeros(2, 3), alpha=torch.tensor([[0.2, 0.8], [0.5, 0.5]]),
                      beta=None, gpo_weights=torch.tensor([[1.0, 0.0], [0.9, 0.1]]))
    maps = viz.attention_weights(out, index=1)
    np.testing.assert_allclose(maps["alpha"], [0.5, 0.5])
    assert maps["beta"] is None and maps["guide_beta"] is None
    np.testing.assert_allclose(maps["gpo"], [0.9, 0.1])


# -- margins -------------------------------------------------------------------------------------
def _margin_loop(S: np.ndarray) -> tuple[list[float], list[float]]:
    n_img, n_cap = S.shape
    k = n_cap // n_img
    i2t, t2i = [], []
    for i in range(n_img):
        pos = max(float(S[i, c]) for c in range(n_cap) if c // k == i)
        neg = max((float(S[i, c]) for c in range(n_cap) if c // k != i), default=float("-inf"))
        i2t.append(pos - neg)
    for c in range(n_cap):
        pos = float(S[c // k, c])
        neg = max((float(S[i, c]) for i in range(n_img) if i != c // k), default=float("-inf"))
        t2i.append(pos - neg)
    return i2t, t2i


@pytest.mark.parametrize("shape", [(6, 6), (4, 20)])
def test_margin_records_equal_a_float64_loop(shape):
    S = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    df = viz.margin_records(torch.from_numpy(S), epoch=3, name="target")
    i2t, t2i = _margin_loop(S.astype(np.float64))
    np.testing.assert_allclose(df[df.direction == "i2t"]["margin"].to_numpy(), i2t, rtol=0, atol=1e-12)
    np.testing.assert_allclose(df[df.direction == "t2i"]["margin"].to_numpy(), t2i, rtol=0, atol=1e-12)
    assert set(df["epoch"]) == {3} and set(df["model"]) == {"target"}
    assert len(df) == shape[0] + shape[1]
    if shape[0] == shape[1]:  # agrees with the boosting diagnostics on square batches
        row, col = boosting_margins(torch.from_numpy(S).double())
        np.testing.assert_allclose(i2t, row.numpy(), atol=1e-12)
        np.testing.assert_allclose(t2i, col.numpy(), atol=1e-12)


def test_margin_records_positive_iff_ranked_first():
    S = np.random.default_rng(2).standard_normal((5, 25))
    df = viz.margin_records(S, 0)
    for i in range(5):
        hit = _rank_loop(S[i], range(5 * i, 5 * i + 5)) == 0
        assert (df[(df.direction == "i2t") & (df["query"] == i)]["margin"].item() > 0) == hit


def test_margin_distributions_violation_rate():
    rng = np.random.default_rng(3)
    records = pd.concat([viz.margin_records(rng.standard_normal((6, 30)) + e * np.repeat(np.eye(6), 5, 1),
                                            e, name) for e in range(3) for name in ("anchor", "target")])
    fig = viz.plot_margin_distributions(records, threshold=0.2)
    assert len(fig.axes) == 2
    lines = {l.get_label(): l for l in fig.axes[1].lines}
    assert set(lines) == {"anchor", "target"}
    for name, line in lines.items():
        expected = []
        for e in range(3):
            m = records[(records["model"] == name) & (records["epoch"] == e)]["margin"].tolist()
            expected.append(100.0 * sum(v < 0.2 for v in m) / len(m))
        np.testing.assert_allclose(line.get_ydata(), expected)
    only_i2t = viz.plot_margin_distributions(records, direction="i2t", threshold=0.0)
    assert len(only_i2t.axes) == 2


def test_margin_epoch_title_gives_rate():
    records = pd.DataFrame({"epoch": [1, 1, 1, 1, 2], "margin": [-0.5, 0.1, 0.3, 0.9, 0.0]})
    fig = viz.plot_margin_epoch(records, 1, threshold=0.2)
    assert fig.axes[0].get_title() == "epoch 1: margin < 0.2 for 50.0%"
    with pytest.raises(DataError, match="epoch 7"):
        viz.plot_margin_epoch(records, 7)


# -- queues --------------------------------------------------------------------------------------
def _tiny_model(tmp_path):
    from tiny import tiny_config
    from userlab.models.user import RetrievalModel
    cfg = tiny_config(tmp_path / "data", tmp_path / "run")
    cfg.model.vocab_size = 50
    cfg.momentum.mask_same_image = False
    torch.manual_seed(0)
    return RetrievalModel(cfg)


def _batch(ids: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(ids)
    return {"regions": torch.randn(b, 4, 8, generator=g), "guide": torch.randn(b, 6, generator=g),
            "tokens": torch.randint(5, 50, (b, 6), generator=g), "lengths": torch.full((b,), 6),
            "attention_mask": torch.ones(b, 6, dtype=torch.long), "image_id": torch.tensor(ids)}


def test_queue_state_counts_same_image_keys(tmp_path):
    model = _tiny_model(tmp_path)  # queue of 20 slots, batches of 8
    steps = [[0, 1, 2, 3, 0, 1, 2, 3], [4, 5, 0, 0, 6, 7, 8, 9], [1, 1, 1, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        for s, ids in enumerate(steps):
            _, out = model(_batch(ids, s))
    queue = model.text_queue
    query_ids = torch.tensor([0, 1, 9, 42])
    stored = queue.ids.tolist()
    expected = [sum(1 for q in stored if q == i) for i in query_ids.tolist()]
    assert expected[-1] == 0 and expected[0] > 1  # the data really has repeats
    np.testing.assert_array_equal(viz.same_image_counts(queue.ids, query_ids), expected)

    fig = viz.plot_queue_state(queue, None, out["img"][:4], out["sim"], query_ids)
    assert len(fig.axes) == 3
    ax_age, ax_sim, ax_same = fig.axes
    assert [p.get_height() for p in ax_same.patches] == expected
    # ages: 24 writes into 20 slots, every slot filled; ages measured in enqueue calls
    ages = [p.get_height() for p in ax_age.patches]
    assert sum(ages) == 20
    assert "20 keys, 0 unfilled" == ax_age.get_title()
    labels = [t.get_text() for t in ax_sim.get_legend().get_texts()]
    assert labels[0].startswith("queue negatives") and labels[1].startswith("batch negatives")
    assert len(viz.plot_queue_state(queue).axes) == 1


def test_queue_state_ages_with_unfilled_slots():
    from userlab.momentum import MomentumQueue
    q = MomentumQueue(4, 10)
    for _ in range(3):
        q.enqueue(torch.randn(3, 4), torch.tensor([1, 2, 1]))
    fig = viz.plot_queue_state(q, current_step=5)
    ax = fig.axes[0]
    assert ax.get_title() == "9 keys, 1 unfilled"
    # written at enqueue 0, 1, 2 (three keys each), measured from step 5: ages 5, 4, 3
    heights = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches}
    assert heights == {3: 3, 4: 3, 5: 3}


# -- embedding map -------------------------------------------------------------------------------
def test_embedding_map_pca_and_links():
    rng = np.random.default_rng(4)
    img, cap = rng.standard_normal((12, 6)), rng.standard_normal((60, 6))
    xy = viz.embedding_map_2d(np.concatenate([img, cap]))
    from sklearn.decomposition import PCA
    ref = PCA(2, svd_solver="full").fit_transform(np.concatenate([img, cap]))
    np.testing.assert_allclose(np.abs(xy), np.abs(ref), atol=1e-8)  # equal up to axis signs
    fig = viz.plot_embedding_map(img, cap, labels=["a", "b", "c"] * 4, n_linked=3)
    links = [c for c in fig.axes[0].collections if isinstance(c, LineCollection) and c.get_gid() == "links"]
    assert len(links) == 1 and len(links[0].get_segments()) == 15
    fig = viz.plot_embedding_map(img, cap, linked=[2])
    seg = [c for c in fig.axes[0].collections if c.get_gid() == "links"][0].get_segments()
    np.testing.assert_allclose([s[0] for s in seg], [xy[2]] * 5, atol=1e-8)
    np.testing.assert_allclose([s[1] for s in seg], xy[12 + 10:12 + 15], atol=1e-8)


@pytest.mark.slow
def test_embedding_map_tsne_runs():
    rng = np.random.default_rng(5)
    fig = viz.plot_embedding_map(rng.standard_normal((8, 4)), rng.standard_normal((40, 4)), method="tsne")
    assert "TSNE" in fig.axes[0].get_title()


# -- retrieval galleries ---------------------------------------------------------------------------
def _candidates(artists) -> dict[int, object]:
    return {int(a.get_gid().split(":")[1]): a for a in artists if (a.get_gid() or "").startswith("candidate:")}


def test_gallery_i2t_marks_ground_truth():
    S = _planted_sims(4)
    S[1, 7] = 5.0   # image 1's caption 7 first
    S[1, 0] = 4.0   # image 0's caption second
    S[1, 9] = 3.0   # image 1's caption 9 third
    ds = SimpleNamespace(captions=_captions(4), image_paths=None)
    fig = viz.plot_retrieval_gallery(S, ds, [1, 2], k=3, direction="i2t")
    assert len(fig.axes) == 4
    texts = _candidates(fig.axes[1].texts)
    assert list(texts) == [7, 0, 9]
    assert mcolors.to_rgba(texts[7].get_color()) == HIT
    assert mcolors.to_rgba(texts[0].get_color()) == MISS
    assert mcolors.to_rgba(texts[9].get_color()) == HIT
    assert texts[0].get_text().startswith("2. (4.00) caption 0 of image 0")
    # row of image 2: colours follow c // 5 == 2 for every listed caption
    for c, t in _candidates(fig.axes[3].texts).items():
        assert mcolors.to_rgba(t.get_color()) == (HIT if c // 5 == 2 else MISS)


def test_gallery_i2t_names_ground_truth_outside_top_k():
    S = _planted_sims(4, seed=1)
    S[0, 0:5] = -1.0          # every caption of image 0 last ...
    S[0, 3] = -0.5            # ... the best of them at rank 15 (0-based)
    ds = SimpleNamespace(captions=_captions(4), image_paths=None)
    fig = viz.plot_retrieval_gallery(S, ds, [0], k=5)
    gt = [t for t in fig.axes[1].texts if (t.get_gid() or "").startswith("ground_truth:")]
    assert len(gt) == 1 and gt[0].get_gid() == "ground_truth:3"
    assert gt[0].get_text().startswith("16. ")
    assert fig.axes[1].get_title(loc="left") == "image 0: top-5 captions, ground truth at rank 16"
    assert all(mcolors.to_rgba(t.get_color()) == MISS for t in _candidates(fig.axes[1].texts).values())


def test_gallery_t2i_frames_ground_truth_with_thumbnails(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (60 * i, 20, 200)).save(p)
        paths.append(p)
    S = _planted_sims(4, seed=2)
    S[:, 6] = [0.5, 0.9, 0.1, 0.95]  # caption 6 (image 1): image 3 first, image 1 second
    ds = SimpleNamespace(captions=_captions(4), image_paths=paths)
    fig = viz.plot_retrieval_gallery(S, ds, [6], k=3, direction="t2i")
    assert len(fig.axes) == 4
    frames = {}
    for ax in fig.axes[1:]:
        frames.update(_candidates(ax.patches))
        assert ax.images[0].get_array().shape == (30, 40, 3)  # the thumbnail itself
    assert list(frames) == [3, 1, 0]
    assert mcolors.to_rgba(frames[1].get_edgecolor()) == HIT
    assert mcolors.to_rgba(frames[3].get_edgecolor()) == MISS
    assert frames[1].get_linewidth() > frames[3].get_linewidth()
    assert "ground truth: image 1\nat rank 2" in fig.axes[0].texts[0].get_text()


def test_gallery_placeholder_tiles_without_images():
    ds = SimpleNamespace(captions=_captions(3), image_paths=None)
    fig = viz.plot_retrieval_gallery(_planted_sims(3), ds, [0], k=2, direction="t2i")
    tiles = [t.get_text() for ax in fig.axes[1:] for t in ax.texts]
    assert all(t.startswith("image\n") for t in tiles) and len(tiles) == 2


def test_gallery_with_a_precomp_dataset(tmp_path, write_precomp):
    from userlab.data.precomp import PrecompDataset
    src = write_precomp(tmp_path, "test", n_images=3, image_list=True)
    (tmp_path / "img").mkdir()
    for name in src.image_names:
        Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / name, format="JPEG")
    ds = PrecompDataset(tmp_path, "test")
    fig = viz.plot_retrieval_gallery(_planted_sims(3), ds, [2], k=2, direction="t2i")
    assert all(ax.images[0].get_array().shape == (20, 20, 3) for ax in fig.axes[1:])
    with pytest.raises(DataError, match="outside"):
        viz.plot_retrieval_gallery(_planted_sims(3), ds, [3], direction="i2t")


def test_worst_failures_picks_worst_ranks():
    S = _planted_sims(5, seed=3)
    for i in range(5):
        S[i, 5 * i:5 * i + 5] += 2.0   # everything ranks first ...
    S[3, 15:20] = -1.0                 # ... except image 3 (i2t) whose captions are last in its row
    ds = SimpleNamespace(captions=_captions(5), image_paths=None)
    fig = viz.plot_worst_failures(S, ds, n=2, direction="i2t", k=3)
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles[0] == "image 3: top-3 captions, ground truth at rank 21"
    assert titles[1].endswith("rank 1")  # every other image ranks first; lowest index wins ties
    loop = [_rank_loop(S[i], range(5 * i, 5 * i + 5)) for i in range(5)]
    assert loop[3] == 20 and max(loop[:3] + loop[4:]) == 0


# -- conventions: one colour per model, integer ticks, objective thresholds (docs/figures.md) -----
def _line_colours(ax) -> dict[str, tuple]:
    return {l.get_label(): mcolors.to_rgba(l.get_color()) for l in ax.lines if not l.get_label().startswith("_")}


def _margin_records(names, epochs=(1, 2, 3), seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.concat([viz.margin_records(rng.uniform(-1, 1, (6, 30)) + 0.3 * e * np.repeat(np.eye(6), 5, 1),
                                         float(e), name) for e in epochs for name in names],
                     ignore_index=True)


def test_palette_for_is_fixed_and_strict():
    assert viz.palette_for(["target", "anchor"]) == {"target": viz.MODEL_COLOURS["target"],
                                                     "anchor": viz.MODEL_COLOURS["anchor"]}
    assert list(viz.palette_for(["VSE++", "USER", "VSE++"])) == ["VSE++", "USER"]
    with pytest.raises(ConfigError, match="my run"):
        viz.palette_for(["USER", "my run"])
    loose = viz.palette_for(["my run", "other run", "USER"], strict=False)
    again = viz.palette_for(["USER", "my run"], strict=False)
    assert loose["my run"] == again["my run"]                      # stable from figure to figure
    assert loose["my run"] != loose["other run"]                   # distinct within one figure
    assert not {loose["my run"], loose["other run"]} & set(viz.MODEL_COLOURS.values())
    assert viz.hue_order(["target", "x", "anchor"]) == ["anchor", "target", "x"]


def test_register_colours_checks_the_colour():
    viz.register_colours({"test model": "#123456"})
    try:
        assert viz.palette_for(["test model"]) == {"test model": "#123456"}
        with pytest.raises(ConfigError, match="not a matplotlib colour"):
            viz.register_colours({"bad": "no-such-colour"})
    finally:
        viz.MODEL_COLOURS.pop("test model")


def test_same_model_same_colour_across_figures():
    # the old bug: violins coloured by appearance order, rate lines by sorted order
    first = viz.plot_margin_distributions(_margin_records(["target", "anchor"]), 0.2)
    second = viz.plot_margin_distributions(_margin_records(["anchor", "target"], seed=1), 0.2)
    rsum = viz.plot_dev_rsum({"target": pd.DataFrame({"epoch": [1, 2], "rsum": [10.0, 20.0]}),
                              "anchor": pd.DataFrame({"epoch": [1, 2], "rsum": [5.0, 9.0]})})
    expected = {n: mcolors.to_rgba(viz.MODEL_COLOURS[n]) for n in ("anchor", "target")}
    for fig in (first, second):
        assert _line_colours(fig.axes[1]) == expected
        # the violins of each model (PolyCollections, hue order anchor, target per epoch) too
        bodies = [c for c in fig.axes[0].collections if c.get_paths()]
        faces = [tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in bodies]
        assert faces[:2] == [tuple(np.round(expected[n][:3], 3)) for n in ("anchor", "target")]
    assert _line_colours(rsum.axes[0]) == expected


def test_recall_bars_colour_models_by_the_palette():
    table = pd.DataFrame([_recall_row("VSE++", "", 10.0), _recall_row("USER", "", 20.0)])
    fig = viz.plot_recall_bars(table)
    colours = {mcolors.to_hex(p.get_facecolor()) for p in fig.axes[0].patches if p.get_height() > 0}
    assert colours == {viz.MODEL_COLOURS["USER"], viz.MODEL_COLOURS["VSE++"]}


def _tick_values(axis) -> list[float]:
    lo, hi = axis.get_view_interval()
    return [t for t in axis.get_major_locator()() if lo - 1e-9 <= t <= hi + 1e-9]


_WHOLE_NUMBER_LABELS = ("epoch", "step", "rank", "key age", "keys", "same-image keys")


def _assert_whole_number_axes(fig) -> int:
    """Every axis labelled with an epoch, step, rank or count has only whole-number ticks;
    returns how many such axes there were."""
    checked = 0
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            label = axis.get_label().get_text()
            if label.startswith(_WHOLE_NUMBER_LABELS):
                ticks = _tick_values(axis)
                assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), label, ticks)
                checked += 1
    return checked


def test_live_curves_draw_steps_and_epochs_on_whole_numbers(tmp_path):
    from userlab.notebook import LiveCurves
    live = LiveCurves(every=1)
    for step in range(4):            # four logged steps: a plain locator ticks 0.5, 1.5, ...
        live.on_step(None, {"step": step, "epoch": 0, "loss_batch": 1.0 / (step + 1), "loss_queue": 0.5})
    live.on_eval(None, {"epoch": 1, "rsum": 10.0})
    first = live.figure
    steps, epochs = first.axes[:2]
    assert (steps.get_xlabel(), epochs.get_xlabel()) == ("step", "epoch")
    assert _tick_values(epochs.xaxis) == [1.0]                   # one epoch: one tick, not 0.95 ... 1.05
    assert _tick_values(steps.xaxis) == [0.0, 1.0, 2.0, 3.0]
    for epoch, rsum in ((2, 15.0), (3, 18.0)):
        live.on_eval(None, {"epoch": epoch, "rsum": rsum})
    fig = live.figure
    assert _tick_values(fig.axes[1].xaxis) == [1.0, 2.0, 3.0]   # a plain locator: 1.0, 1.25, 1.5, ...
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [10.0, 15.0, 18.0])
    assert [l.get_label() for l in fig.axes[0].lines] == ["batch", "queue"]
    assert _assert_whole_number_axes(fig) == 2
    # a reused run draws its logs once, through the same panels
    pd.DataFrame(live.steps).to_csv(tmp_path / "train_log.csv", index=False)
    pd.DataFrame(live.evals).to_csv(tmp_path / "eval_log.csv", index=False)
    reused = LiveCurves()
    assert reused.load(tmp_path / "records") and _assert_whole_number_axes(reused.figure) == 2
    assert first not in [plt.figure(n) for n in plt.get_fignums()]   # a redraw closes the one it replaces


def test_every_epoch_step_and_rank_axis_of_viz_has_whole_number_ticks():
    logs = {"USER": pd.DataFrame({"step": np.arange(4), "loss_batch": np.linspace(2, 1, 4)})}
    evals = {"USER": pd.DataFrame({"epoch": [1, 2, 3], "rsum": [5.0, 9.0, 12.0]})}
    figures = [viz.plot_loss_terms(logs), viz.plot_dev_rsum(evals),
               viz.plot_training_curves(logs["USER"], evals["USER"]),
               viz.plot_margin_distributions(_margin_records(["anchor", "target"]), 0.2),
               viz.plot_gpo_weights({"SGE": np.full(5, 0.2)})]
    assert [_assert_whole_number_axes(f) for f in figures] == [1, 1, 2, 2, 1]


def test_epoch_and_rank_ticks_are_integers():
    records = _margin_records(["anchor", "target"])          # epochs stored as floats 1.0, 2.0, 3.0
    fig = viz.plot_margin_distributions(records, 0.2)
    ticks = _tick_values(fig.axes[1].xaxis)
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "3"]
    gpo = viz.plot_gpo_weights({"SGE": np.full(12, 1 / 12), "CGE": np.full(12, 1 / 12)})
    for ax in gpo.axes:
        assert all(float(t).is_integer() for t in _tick_values(ax.xaxis))
    assert gpo.axes[0].get_ylim() == gpo.axes[1].get_ylim()      # compared panels share a scale
    fig, ax = plt.subplots()
    ax.plot([1, 2], [0, 1])
    viz.integer_ticks(ax, "x")
    assert _tick_values(ax.xaxis) == [1.0, 2.0]
    with pytest.raises(ConfigError):
        viz.integer_ticks(ax, "z")
    one_epoch = viz.plot_margin_distributions(_margin_records(["anchor"], epochs=(2,)), 0.2)
    assert _tick_values(one_epoch.axes[1].xaxis) == [2.0]   # not 1.900, 1.925, ...


def test_objective_threshold_follows_the_training_objective():
    from userlab.config import preset
    user, vsepp = preset("demo"), preset("vsepp")
    uto = viz.objective_threshold(user)
    assert (uto.column, uto.value) == ("hardest_negative", user.loss.gamma) and "UTO" in uto.label
    tri = viz.objective_threshold(vsepp, vsepp)
    assert (tri.column, tri.value) == ("margin", vsepp.loss.margin) and "triplet" in tri.label
    with pytest.raises(ConfigError, match="separate figures"):
        viz.objective_threshold(user, vsepp)
    np.testing.assert_array_equal(uto.violated([0.4, 0.5, 0.6]), [False, False, True])
    np.testing.assert_array_equal(tri.violated([0.1, 0.2, 0.3]), [True, False, False])


def test_margin_view_draws_the_objective_threshold():
    from userlab.config import preset
    records = _margin_records(["SGE", "CGE"])
    uto = viz.objective_threshold(preset("demo"))
    fig = viz.plot_margin_distributions(records, uto, hue="model")
    ax_d, ax_v = fig.axes[:2]
    lines = [l for l in ax_d.lines if l.get_gid() == "threshold"]
    assert len(lines) == 1 and lines[0].get_ydata()[0] == pytest.approx(uto.value)
    assert "UTO γ = 0.5" in ax_d.get_title() and "hardest negative > 0.5" in ax_v.get_title()
    assert ax_d.get_ylabel() == "hardest negative similarity"
    for name, line in {l.get_label(): l for l in ax_v.lines}.items():
        expected = [100.0 * (records[(records.model == name) & (records.epoch == e)]["hardest_negative"]
                             > uto.value).mean() for e in (1, 2, 3)]
        np.testing.assert_allclose(line.get_ydata(), expected)
    legend = ax_v.get_legend()
    fig.canvas.draw()                                     # the legend sits beside the data, not on it
    assert legend is not None and legend.get_window_extent().x0 >= ax_v.get_window_extent().x1
    far = viz.plot_margin_distributions(records.assign(hardest_negative=records["hardest_negative"] * 0.01),
                                        uto, hue="model")
    notes = [t for t in far.axes[0].texts if t.get_gid() == "threshold"]
    assert len(notes) == 1 and "off the scale, at 0.5" in notes[0].get_text()
    assert far.axes[0].get_ylim()[1] < 0.1                   # the violins keep their scale
    epoch_fig = viz.plot_margin_epoch(records, 2.0, uto)
    assert [l.get_xdata()[0] for l in epoch_fig.axes[0].lines if l.get_gid() == "threshold"] == [0.5]
    assert epoch_fig.axes[0].get_title().startswith("epoch 2.0: hardest negative > 0.5 for")


def test_colour_scatter_draws_each_word_in_its_colour():
    fig = viz.plot_colour_scatter(np.arange(8.0).reshape(4, 2), ["blue", "red", "blue", "yellow"])
    drawn = {c.get_gid(): mcolors.to_hex(c.get_facecolor()[0]) for c in fig.axes[0].collections}
    assert drawn == {"colour:blue": "#0000ff", "colour:red": "#ff0000", "colour:yellow": "#ffff00"}
    with pytest.raises(ConfigError, match="sky-ish"):
        viz.colour_word_palette(["sky-ish"])


def test_queue_views_snapshot_before_the_enqueue(tmp_path):
    model = _tiny_model(tmp_path)  # queue of 20 slots, batches of 8
    with torch.no_grad():
        model(_batch([0, 1, 2, 3, 4, 5, 6, 7], 0))
        ids = [10, 11, 12, 13, 14, 15, 16, 3]          # only image 3 was seen before
        before = {"image": viz.snapshot_queue(model.image_queue), "text": viz.snapshot_queue(model.text_queue)}
        _, out = model(_batch(ids, 1))
    # after the forward pass every query finds its own keys: the artefact the snapshot avoids
    assert (viz.same_image_counts(model.text_queue.ids, torch.tensor(ids)) > 0).all()
    fig = viz.plot_queues(before["image"], before["text"], out["img"], out["txt"], torch.tensor(ids),
                          batch_sims=out["sim"])
    axes = np.array(fig.axes).reshape(2, 3)
    for r in range(2):
        assert [p.get_height() for p in axes[r, 2].patches] == [0] * 7 + [1]
    # top row: image queries against the TEXT queue; bottom: captions against the IMAGE queue
    assert "text queue" in axes[0, 1].get_title() and "image queue" in axes[1, 1].get_title()
    img, txt = out["img"].numpy().astype(np.float64), out["txt"].numpy().astype(np.float64)
    written = before["text"].written_at.numpy() >= 0            # 8 real keys, 12 random initial ones
    assert written.sum() == 8

    def legend(ax, start):
        return next(t.get_text() for t in ax.get_legend().get_texts() if t.get_text().startswith(start))
    text_keys = before["text"].keys.numpy().astype(np.float64)
    label = legend(axes[0, 1], "queue")
    assert f"mean {(img @ text_keys[:, written]).mean():.2f}" in label and "n=64" in label
    assert f"mean {(img @ text_keys[:, ~written]).mean():.2f}" in legend(axes[0, 1], "random initial")
    image_keys = before["image"].keys.numpy().astype(np.float64)
    assert f"mean {(txt @ image_keys[:, written]).mean():.2f}" in legend(axes[1, 1], "queue")
    batch_label = next(t.get_text() for t in axes[0, 1].get_legend().get_texts() if t.get_text().startswith("batch"))
    assert "n=56" in batch_label                        # 8 x 8 off-diagonal
    assert axes[0, 1].get_xlim() == axes[1, 1].get_xlim()
    with pytest.raises(DataError, match="same batch"):
        viz.plot_queues(before["image"], before["text"], out["img"], out["txt"][:4], torch.tensor(ids))


def test_embedding_map_centred_removes_the_modality_gap():
    rng = np.random.default_rng(6)
    img = rng.standard_normal((20, 5)) * 0.1
    cap = np.repeat(img, 5, axis=0) + rng.standard_normal((100, 5)) * 0.01
    img[:, 0] += 5.0                                      # a big gap along axis 0
    gap = viz.modality_gap(img, cap)
    assert gap["gap"] == pytest.approx(np.linalg.norm(img.mean(0) - cap.mean(0)))
    assert gap["gap_variance_share"] > 0.9
    fig = viz.plot_embedding_map(img, cap, centre=True, linked=[0])
    seg = [c for c in fig.axes[0].collections if c.get_gid() == "links"][0].get_segments()
    lengths = [np.linalg.norm(np.subtract(*s)) for s in seg]
    span = np.ptp(fig.axes[0].collections[1].get_offsets(), axis=0).max()
    assert max(lengths) < 0.2 * span                      # centred: captions sit by their image
    raw = viz.plot_embedding_map(img, cap, linked=[0])
    seg = [c for c in raw.axes[0].collections if c.get_gid() == "links"][0].get_segments()
    assert min(np.linalg.norm(np.subtract(*s)) for s in seg) > 4.0   # raw: the gap dominates


def test_probe_bars_are_the_per_class_recalls():
    from userlab.probe import ProbeResult
    result = ProbeResult(accuracy=0.6, std=0.0, chance=0.25, n=40, folds=4, classes=("blue", "red"),
                         per_class=(0.5, 0.7))
    ax = viz.plot_probe(result).axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([50.0, 70.0])
    assert [mcolors.to_hex(p.get_facecolor()) for p in ax.patches] == ["#0000ff", "#ff0000"]
    assert [l.get_ydata()[0] for l in ax.lines] == [25.0] and "60% overall" in ax.get_title()
