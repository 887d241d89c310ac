# %% [markdown]
# # 03 · Evaluating retrieval: protocols, metrics, galleries, failures
#
# **Learning goals**
# - compute Recall@K, median and mean rank for image→text (i2t) and text→image (t2i) with 5
#   captions per image, and rSum;
# - know the standard protocols: Flickr30K 1K, COCO 5-fold 1K and COCO 5K, and why they differ;
# - look at what the model retrieves, and at its worst failures.
#
# **Equations in this notebook** ($S \in \mathbb{R}^{N \times 5N}$, captions $5i..5i+4$ belong to image $i$)
#
# | idea | formula | userlab |
# |---|---|---|
# | i2t rank of image $i$ | $r_i = \min_{c \in \{5i..5i+4\}} \mathrm{pos}_i(c)$ in the descending sort of row $i$ | `evaluate.retrieval_ranks` |
# | t2i rank of caption $c$ | $r_c = \mathrm{pos}_c(\lfloor c/5 \rfloor)$ in the descending sort of column $c$ | `evaluate.retrieval_ranks` |
# | recall | $R@K = 100 \cdot \mathrm{mean}(r < K)$ | `evaluate.recall_metrics` |
# | ranks | medr $= \lfloor \mathrm{median}(r) \rfloor + 1$, meanr $= \mathrm{mean}(r) + 1$ | `evaluate.recall_metrics` |
# | rSum | $\sum_{K\in\{1,5,10\}} R@K_{i2t} + R@K_{t2i}$ (max 600) | `evaluate.recall_metrics` |
#
# **Protocols.** F30K: the 1K test images. COCO 5K: all 5000 `testall` images at once. COCO 1K:
# five folds of 1000 images, every metric averaged over folds and rSum recomputed from the averages.
# Same model, very different numbers: always say which protocol a number comes from.

# %%
import numpy as np
import torch

from userlab import viz
from userlab.notebook import SMOKE, demo_config, demo_data, figures_dir
from userlab.evaluate import evaluate_sims, format_table, retrieval_ranks
from userlab.experiment import fit_experiment
from userlab.runs import encode_run, load_run
from userlab.evaluate import similarity

demo_data()
cfg = demo_config("demo", run="02_train")      # the run notebook 02 trained (trained here if missing)
fit_experiment(cfg)
run = load_run(cfg.run_dir)
img, cap, test = encode_run(run, split="test")
sims = similarity(img, cap).cpu()
print("similarity matrix", tuple(sims.shape))

# %% [markdown]
# ## 1. The metrics table

# %%
table = evaluate_sims(sims, protocol="full")
table.insert(0, "model", "USER")      # the name that is blue in every figure (docs/figures.md)
print(format_table(table))

# %% [markdown]
# The same numbers by hand, for two metrics: i2t ranks take the best of the five captions.

# %%
i2t, t2i = retrieval_ranks(sims)
print("i2t R@1 by hand:", 100 * float((i2t < 1).float().mean() if torch.is_tensor(i2t) else (i2t < 1).mean()))
print("t2i medr by hand:", int(np.floor(np.median(np.asarray(t2i)))) + 1)

# %% [markdown]
# **Protocols on sub-matrices.** A 1K protocol evaluates 1000 images against their 5000 captions;
# on the demo test split we can mimic the 5-fold protocol with smaller folds. Each fold holds a
# fifth of the distractors, so we expect higher numbers per fold than on all images at once; the
# cell prints whether that holds here.

# %%
n = sims.shape[0]
fold = max(1, n // 5)
folds = [evaluate_sims(sims[f * fold:(f + 1) * fold, 5 * f * fold:5 * (f + 1) * fold]) for f in range(5)]
fold_rsum = np.array([float(f["rsum"].iloc[0]) for f in folds])
all_rsum = float(table["rsum"].iloc[0])
print("rSum per fold:", fold_rsum.round(1).tolist(), "| mean", round(fold_rsum.mean(), 1))
print("rSum on all images at once:", round(all_rsum, 1), "->",
      "all at once is harder (more distractors per query)" if all_rsum < fold_rsum.mean()
      else "all at once is NOT lower here")
assert np.isfinite(fold_rsum).all() and 0 <= all_rsum <= 600
fig = viz.plot_recall_bars(table)
viz.save(fig, "03_recall_bars", figures_dir())

# %% [markdown]
# ## 2. Retrieval gallery
# Top-5 captions for some images (ground truth in green) and top-5 images for some captions.

# %%
fig = viz.plot_retrieval_gallery(sims, test, queries=[0, 1, 2], k=5, direction="i2t")
viz.save(fig, "03_gallery_i2t", figures_dir())

# %%
fig = viz.plot_retrieval_gallery(sims, test, queries=[0, 7, 12], k=5, direction="t2i")
viz.save(fig, "03_gallery_t2i", figures_dir())

# %% [markdown]
# ## 3. The worst failures
# Queries whose ground truth ranks lowest. On the demo scenes these are usually hard negatives:
# the same shapes with colours swapped, or the same objects in another arrangement.

# %%
fig = viz.plot_worst_failures(sims, test, n=4, direction="i2t")
viz.save(fig, "03_worst_failures", figures_dir())

# %% [markdown]
# ## Exercises
# 1. Compute image→text R@1 of `S_ex` (3 images, 15 captions) as a percentage.
# 2. Compute rSum from the metrics dictionary `m`.
# 3. Compute medr of the ranks `r` (0-based ranks).

# %%
from userlab import teach

rng = np.random.default_rng(0)
S_ex = rng.standard_normal((3, 15))
answer_1 = None   # your computation
teach.check_recall_at_k(S_ex, 1, answer_1, direction="i2t")

# %%
m = table.iloc[0].to_dict()
answer_2 = None   # your computation
teach.check_rsum(m, answer_2)

# %%
r = np.array([0, 3, 1, 8, 2, 0])
answer_3 = None   # your computation
teach.check_medr(r, answer_3)
