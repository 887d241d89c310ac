"""Interactive browsers: setting a control redraws the figure synchronously (no kernel)."""
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

from userlab import viz
from userlab.data.text import Vocabulary, WordTokenizer
from userlab.config import preset
from userlab.errors import ConfigError, DataError
from userlab.widgets import ALL, AttentionExplorer, MarginExplorer, RetrievalBrowser, make_caption_encoder

HIT = mcolors.to_rgba(viz.HIT_COLOUR)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _dataset(n_images: int) -> SimpleNamespace:
    return SimpleNamespace(captions=[f"a red circle number {c}" for c in range(5 * n_images)],
                           image_paths=None)


def _frames(fig) -> dict[int, object]:
    out = {}
    for ax in fig.axes:
        for p in ax.patches:
            if (p.get_gid() or "").startswith("candidate:"):
                out[int(p.get_gid().split(":")[1])] = p
    return out


def test_retrieval_browser_image_and_caption_controls():
    sims = np.random.default_rng(0).uniform(size=(6, 30))
    browser = RetrievalBrowser(sims, _dataset(6), render=True)
    assert set(browser.controls) == {"mode", "image", "caption", "text", "k"}
    first = browser.figure
    assert first.axes[0].get_title() == "image 0"
    assert browser._view.value[:4] == b"\x89PNG"

    browser.controls["image"].value = 3
    assert browser.figure is not first
    assert browser.figure.axes[0].get_title() == "image 3"
    assert browser.figure.axes[1].get_title(loc="left").startswith("image 3: top-5 captions")
    assert not plt.get_fignums()  # every drawn figure was closed in pyplot

    sims[:, 12] = [0.0, 0.2, 2.0, 0.1, 0.3, 0.4]  # caption 12 belongs to image 2, ranked first
    browser = RetrievalBrowser(sims, _dataset(6), render=False)
    browser.controls["caption"].value = 12
    assert browser.controls["mode"].value == "t2i"  # moving the caption slider switches mode
    frames = _frames(browser.figure)
    assert list(frames)[0] == 2 and mcolors.to_rgba(frames[2].get_edgecolor()) == HIT
    browser.controls["k"].value = 2
    assert len(_frames(browser.figure)) == 2
    browser.controls["image"].value = 5
    assert browser.controls["mode"].value == "i2t"
    assert browser.figure.axes[0].get_title() == "image 5"


def test_retrieval_browser_flags_unknown_words_without_encoder():
    vocab = Vocabulary.build(_dataset(2).captions, threshold=1)
    browser = RetrievalBrowser(np.zeros((2, 10)), _dataset(2), vocab=vocab, render=False)
    browser.controls["text"].value = "A red zebra near a circle"
    assert browser.controls["mode"].value == "text"
    assert browser.unknown_words == ["zebra", "near"]
    assert "zebra?" in browser.status.value and "not in the vocabulary: zebra, near" in browser.status.value
    notes = [t.get_text() for t in browser.figure.axes[0].texts if t.get_gid() == "unknown_words"]
    assert notes == ["unknown words: zebra, near"]
    assert browser.scores is None
    browser.controls["text"].value = "a red circle"
    assert browser.unknown_words == []


def test_retrieval_browser_scores_typed_caption_with_encoder():
    rng = np.random.default_rng(1)
    img_emb = rng.standard_normal((4, 3))
    query = np.array([0.0, 1.0, 0.0])
    seen = []

    def encode(text: str) -> np.ndarray:
        seen.append(text)
        return query

    with pytest.raises(ConfigError, match="image_embeddings"):
        RetrievalBrowser(np.zeros((4, 20)), _dataset(4), encode_caption=encode)
    browser = RetrievalBrowser(np.zeros((4, 20)), _dataset(4), encode_caption=encode,
                               image_embeddings=torch.from_numpy(img_emb), render=False)
    browser.controls["k"].value = 4
    browser.controls["text"].value = "A red circle number 7"   # equals caption 7 (image 1)
    assert seen == ["A red circle number 7"]
    np.testing.assert_allclose(browser.scores, img_emb @ query)
    frames = _frames(browser.figure)
    assert list(frames) == list(np.argsort(-(img_emb @ query), kind="stable"))
    for i, frame in frames.items():
        assert (mcolors.to_rgba(frame.get_edgecolor()) == HIT) == (i == 1)


def test_caption_encoder_from_a_model(tmp_path):
    from tiny import tiny_config
    from userlab.models.user import RetrievalModel
    vocab = Vocabulary.build(_dataset(3).captions, threshold=1)
    cfg = tiny_config(tmp_path / "d", tmp_path / "r")
    cfg.model.vocab_size = len(vocab)
    model = RetrievalModel(cfg, with_momentum=False)
    model.train()
    encode = make_caption_encoder(model, WordTokenizer(vocab))
    emb = encode("a red circle")
    assert emb.shape == (16,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    assert model.training  # mode restored
    tokens = WordTokenizer(vocab)("a red circle", train=False)[None]
    model.eval()
    with torch.no_grad():
        ref = model.encode_text({"tokens": tokens, "lengths": torch.tensor([tokens.shape[1]])}).embedding[0]
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-6)


def _patch_alpha(fig, k: int, ax_index: int = 0) -> float:
    for p in fig.axes[ax_index].patches:
        if p.get_gid() == f"region:{k}":
            return p.get_edgecolor()[3]
    raise AssertionError(f"no region {k}")


def test_attention_explorer_switches_image_and_map():
    rng = np.random.default_rng(2)
    boxes = rng.uniform(0, 40, (5, 3, 2))
    boxes = np.concatenate([boxes, boxes + 10], axis=2)   # x0 y0 x1 y1
    sge = np.tile([0.2, 0.3, 0.5], (5, 1))
    cge = np.tile([0.9, 0.05, 0.05], (5, 1))
    sge[4] = [1.0, 0.0, 0.0]
    images = [np.full((60, 60, 3), i / 5) for i in range(5)]
    explorer = AttentionExplorer(images, boxes, {"SGE": sge, "CGE": cge, "none": None}, render=False)
    assert explorer.controls["name"].options == ("SGE", "CGE", "none", ALL)
    first = explorer.figure
    assert first.axes[0].get_title() == "image 0: SGE"
    explorer.controls["image"].value = 4
    assert explorer.figure is not first and explorer.figure.axes[0].get_title() == "image 4: SGE"
    assert _patch_alpha(explorer.figure, 1) == pytest.approx(0.0)
    np.testing.assert_allclose(explorer.figure.axes[0].images[0].get_array()[0, 0], [0.8] * 3)
    explorer.controls["name"].value = "CGE"
    assert explorer.figure.axes[0].get_title() == "image 4: CGE"
    assert _patch_alpha(explorer.figure, 1) == pytest.approx(0.05 / 0.9)
    explorer.controls["name"].value = ALL
    assert [ax.get_title() for ax in explorer.figure.axes] == ["SGE", "CGE", "none (no attention)"]


def test_attention_explorer_grid_and_shape_errors():
    from userlab.errors import DataError
    w = np.random.default_rng(3).uniform(size=(2, 6))
    explorer = AttentionExplorer(None, None, {"SGE": w}, grid=(2, 3), render=False)
    explorer.controls["image"].value = 1
    np.testing.assert_allclose(np.asarray(explorer.figure.axes[0].images[1].get_array()), w[1].reshape(2, 3))
    with pytest.raises(DataError, match=r"expected \(2, 6\)"):
        AttentionExplorer(None, None, {"SGE": w, "CGE": np.ones((2, 5))}, grid=(2, 3))


def _margin_records(seed: int, epochs) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.concat([viz.margin_records(0.3 * rng.standard_normal((5, 25)) + 0.1 * e, e) for e in epochs])


def test_margin_explorer_follows_epoch_and_threshold():
    records = _margin_records(4, (0, 2, 4))
    explorer = MarginExplorer(records, 0.2, render=False)     # a plain float: the rule margin < t
    assert explorer.controls["epoch"].options == (0, 2, 4)
    first = explorer.figure
    explorer.controls["epoch"].value = 4
    assert explorer.figure is not first
    m = records[records["epoch"] == 4]["margin"].tolist()
    rate = 100.0 * sum(v < 0.2 for v in m) / len(m)
    assert explorer.figure.axes[0].get_title() == f"epoch 4: margin < 0.2 for {rate:.1f}%"
    explorer.controls["threshold"].value = 0.5
    rate = 100.0 * sum(v < 0.5 for v in m) / len(m)
    assert explorer.figure.axes[0].get_title() == f"epoch 4: margin < 0.5 for {rate:.1f}%"
    assert f"{rate:.1f}%" in explorer.status.value


def test_margin_explorer_judges_by_the_objective_the_model_was_trained_with():
    records = _margin_records(6, (0, 1))
    last = records[records["epoch"] == 1]
    user = preset("demo")                      # unified objective: hardest negative > γ
    user.loss.gamma = 0.35                     # a γ no default could guess
    for threshold in (viz.objective_threshold(user), user):     # the rule, or the config itself
        explorer = MarginExplorer(records, threshold, render=False)
        explorer.controls["epoch"].value = 1
        assert explorer.controls["threshold"].value == pytest.approx(0.35)
        assert explorer.controls["threshold"].description == "γ"
        hard = last["hardest_negative"].to_numpy()
        rate = 100.0 * np.mean(hard > 0.35)
        assert 0 < rate < 100                  # the data straddles γ: the rule decides the number
        ax = explorer.figure.axes[0]
        assert ax.get_title() == f"epoch 1: hardest negative > 0.35 for {rate:.1f}%"
        assert ax.get_xlabel() == "hardest negative similarity"
        line = next(l for l in ax.get_lines() if l.get_gid() == "threshold")
        assert line.get_xdata()[0] == pytest.approx(0.35)
        assert "UTO γ = 0.35;" in explorer.objective.value and "unified objective" in explorer.objective.value
        assert explorer.objective in explorer.widget.children
        assert f"hardest negative &gt; 0.35 for {rate:.1f}%" in explorer.status.value
    explorer.controls["threshold"].value = 0.5   # the slider moves γ; the rule stays
    assert explorer.figure.axes[0].get_title().startswith("epoch 1: hardest negative > 0.5 for")
    assert "UTO γ = 0.5 (trained with 0.35)" in explorer.objective.value

    vsepp = preset("vsepp")                    # triplet objective: margin < the triplet margin
    explorer = MarginExplorer(records, viz.objective_threshold(vsepp), render=False)
    assert explorer.controls["threshold"].value == pytest.approx(vsepp.loss.margin)
    assert explorer.controls["threshold"].description == "margin"
    assert "triplet margin 0.2" in explorer.objective.value
    with pytest.raises(DataError, match="hardest_negative"):
        MarginExplorer(records.drop(columns="hardest_negative"), user, render=False)


# --------------------------------------------------------------------------- behaviour in JupyterLab

def _browsers():
    rng = np.random.default_rng(5)
    records = pd.concat([viz.margin_records(rng.standard_normal((4, 20)) + e, e) for e in (0, 1)])
    threshold = viz.objective_threshold(preset("demo"))
    boxes = np.tile([[0, 0, 10, 10], [5, 5, 20, 20]], (3, 1, 1)).astype(float)
    return [RetrievalBrowser(rng.uniform(size=(1000, 5000)), _dataset(1000), render=False),
            AttentionExplorer(None, boxes, {"SGE": rng.uniform(size=(3, 2))}, render=False),
            MarginExplorer(records, threshold, render=False)]


def test_sliders_report_on_release_only():
    import ipywidgets
    for browser in _browsers():
        sliders = [c for c in browser.controls.values()
                   if isinstance(c, (ipywidgets.IntSlider, ipywidgets.FloatSlider, ipywidgets.SelectionSlider))]
        assert sliders, type(browser).__name__
        for s in sliders:
            assert s.continuous_update is False, (type(browser).__name__, s.description)


def test_a_redraw_happens_only_when_a_control_changed():
    browser = _browsers()[0]
    assert browser.draws == 1 and browser.controls["caption"].max == 4999
    browser.update()
    browser.controls["image"].value = 0        # the value it already had
    assert browser.draws == 1
    browser.caption_box.value = 4321           # the number box drives the caption slider
    assert browser.controls["caption"].value == 4321 and browser.draws == 2
    assert browser.status.value.startswith("caption 4321") and browser.controls["mode"].value == "t2i"
    browser.controls["caption"].value = 12
    assert browser.caption_box.value == 12 and browser.draws == 3


def test_pictures_keep_their_own_size_and_are_rendered_for_high_dpi():
    from userlab.widgets import _DPI, _PIXEL_RATIO, _png_size
    browser = RetrievalBrowser(np.random.default_rng(6).uniform(size=(6, 30)), _dataset(6))
    width, height = _png_size(browser._view.value)
    assert browser._view.layout.width == f"{width // _PIXEL_RATIO}px"
    assert browser._view.layout.height == "auto" and browser._view.layout.align_self == "flex-start"
    # the PNG holds 2 px per CSS pixel at 90 dpi: about twice the figure's inches x 90
    fig_w, fig_h = browser.figure.get_size_inches()
    assert 0.6 * fig_w * _DPI * _PIXEL_RATIO < width <= fig_w * _DPI * _PIXEL_RATIO + 2
    small = _png_size(browser._view.value)
    browser.controls["k"].value = 1              # fewer results: a narrower figure, a narrower view
    assert _png_size(browser._view.value) != small
    assert browser._view.layout.width == f"{_png_size(browser._view.value)[0] // _PIXEL_RATIO}px"


def test_every_error_is_shown_in_the_widget_not_raised():
    def broken_encoder(text):
        raise RuntimeError(f"cannot encode {text!r}")

    browser = RetrievalBrowser(np.zeros((3, 15)), _dataset(3), encode_caption=broken_encoder,
                               image_embeddings=np.ones((3, 4)), render=False)
    good = browser.figure
    browser.controls["text"].value = "a red circle"        # the callback must not raise
    assert isinstance(browser.error, RuntimeError)
    assert "RuntimeError: cannot encode &#x27;a red circle&#x27;" in browser.status.value
    assert "<details>" in browser.details.value and "broken_encoder" in browser.details.value
    assert browser.figure is good and not plt.get_fignums()
    assert browser.details in browser.widget.children and browser.status in browser.widget.children
    browser.controls["mode"].value = "i2t"                 # a good redraw clears the error
    assert browser.error is None and browser.details.value == "" and browser.figure is not good

    records = pd.DataFrame({"epoch": [0, 0], "margin": [0.1, "oops"]})   # a bad column
    explorer = MarginExplorer(records, 0.2, render=False)
    assert explorer.error is not None and explorer.error.__class__.__name__ in explorer.status.value
