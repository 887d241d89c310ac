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

# %% tags=["parameters"]
# Parameters (papermill can set them). None falls back to $USERLAB_DATA / $USERLAB_RUNS /
# $USERLAB_DEVICE / $USERLAB_PRESET, then to the demo scenes, runs/, the best device and "demo".
data_dir = None   # features: a SCAN / VSE precomp folder or the output of `userlab extract`
runs_dir = None   # checkpoints are reused from here; missing ones are trained into <runs_dir>/cache
device = None     # "cpu", "cuda", "cuda:1", ...
preset = None     # USER preset the models start from: "demo"; "f8k-cpu" for Flickr8k grid features

# %%
import numpy as np
import torch

from userlab import viz
from userlab.notebook import SMOKE, figures_dir, open_lesson
from userlab.evaluate import evaluate_sims, format_table, retrieval_ranks
from userlab.runs import encode_run
from userlab.evaluate import similarity

lesson = open_lesson(data_dir, runs_dir, device, preset)
cfg = lesson.config()     # the run `make demo` / notebook 02 trained (trained here if missing)
run = lesson.fit(cfg).load()
img, cap, test = encode_run(run, split=lesson.eval_split)
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
# Queries whose ground truth ranks lowest, with their top-5 results.

# %%
fig = viz.plot_worst_failures(sims, test, n=4, direction="i2t")
viz.save(fig, "03_worst_failures", figures_dir())

# %% [markdown]
# **Are the failures twins?** About a third of the demo scenes are followed by a *twin*: the same
# objects with the colours swapped between the shapes (`colours`), or the layout mirrored
# left-right (`mirror`) or flipped top-bottom (`flip`); `twin_of` in `scenes_test.json` links
# them. Only colour-object binding and spatial relations tell a twin from its original, so a
# model that reads captions as bags of words would confuse them. If twins explained the
# failures, a large share of the wrong top-1 answers would be the query's twin; a wrong answer
# drawn at random from the other $N-1$ images hits it with probability $1/(N-1)$. Measured, not
# assumed (`diagnostics.twin_confusion`):

# %%
from userlab import diagnostics as dg
from userlab.data.scenes import load_scenes

if not lesson.demo:   # twins exist only in the demo scenes
    print("no scene descriptions here (own data): no twins to measure")
else:
    scenes = load_scenes(test.folder, "test")[: sims.shape[0]]
    partner = dg.twin_partners([s["twin_of"] for s in scenes], sims.shape[0])
    twins = dg.twin_confusion(sims, partner)
    for direction, t in twins.items():
        share = t["share_of_errors"]
        if t["errors"] == 0:
            print(f"{direction}: no top-1 errors")
            continue
        lift = share / t["chance"]
        verdict = ("most failures are twin confusions" if share >= 0.5 else
                   "twins are a sizeable minority of the failures" if share >= 0.1 else
                   "twins are a small part of the failures: most wrong answers are other scenes")
        print(f"{direction}: {t['to_twin']} of {t['errors']} wrong top-1 answers ({100 * share:.1f}%) are the "
              f"query's twin, {lift:.0f}x the {100 * t['chance']:.2f}% of a random wrong answer; on queries "
              f"that have a twin, {100 * t['share_of_twin_query_errors']:.1f}% of errors -> {verdict}")
    i2t_ranks = retrieval_ranks(sims)[0].cpu().numpy()
    worst = np.argsort(-i2t_ranks, kind="stable")[:4]
    top1 = (sims.argmax(1) // (sims.shape[1] // sims.shape[0])).numpy()
    for q in worst:
        kind = scenes[q]["twin_kind"] or (scenes[partner[q]]["twin_kind"] if partner[q] >= 0 else None)
        print(f"worst query image {q}: twin {partner[q] if partner[q] >= 0 else 'none'}"
              f"{f' ({kind})' if kind else ''}, top-1 caption belongs to image {top1[q]}"
              f"{' = its twin' if partner[q] >= 0 and top1[q] == partner[q] else ''}")

# %% [markdown]
# ## Diagnostics
# Numbers that explain a model's retrieval beyond recall (`userlab.diagnostics`, also
# `userlab diagnose RUN` on the command line):
# - **hubness**: $N_{10}(x)$ counts the queries that have item $x$ in their top 10; a strongly
#   right-skewed $N_{10}$ (skewness $\gg 0$) means a few *hub* images (or captions) crowd the top
#   of many lists;
# - **modality gap**: the distance between the image and the caption embedding centroids;
# - **similarity spread and collapse**: mean positive and negative similarity and a collapse score
#   (1 when positives and negatives are equal at 1, 0 when positives lead by the margin 0.2);
# - **attention entropy** of SGE's $\alpha$ and of $\beta$ (1 = uniform over regions, 0 = one-hot);
# - **t2i recall by caption kind** (counts / relations / colour binding / partial).

# %%
report = dg.diagnose_embeddings(img, cap, test)
attention = dg.collect_attention(run.model, test)
report["attention"] = {name: dg.attention_entropy(attention[name], "softmax" if name == "alpha" else "l2")
                       for name in ("alpha", "beta") if name in attention}
print(dg.format_report(report))
h, s = report["hubness"], report["similarity"]
assert all(np.isfinite([h["t2i"]["skewness"], h["i2t"]["skewness"], report["modality_gap"]["gap"],
                        s["pos_mean"], s["neg_mean"]]))
assert 0.0 <= s["collapse"] <= 1.0
assert all(0.0 <= a["normalised"] <= 1.0 + 1e-9 for a in report["attention"].values())
assert sum(r["captions"] for r in report["recall_by_group"]["rows"]) == sims.shape[1]

# %% [markdown]
# ## Exercises
# Write each function yourself. The check cell under it runs your function on several hidden
# inputs, edge cases included (one image, tied scores, masked scores, float16), compares the
# results with userlab's own code and says *what* is wrong, never the expected numbers. Until you
# write a function its check reports "not implemented". The notebook forgets the library
# functions these exercises replace.
#
# ### Exercise 3.1: Recall@K in both directions
# `sims` is $N\times 5N$ (rows images; captions $5i..5i+4$ belong to image $i$). **i2t**: the rank
# of image $i$ is the best 0-based position of any of its 5 captions in its row sorted in
# descending order. **t2i**: the rank of caption $c$ is the position of image $\lfloor c/5\rfloor$
# in its sorted column. Among equal scores the lower index comes first.
# $\mathrm{R@K} = 100\cdot\mathrm{mean}(\mathrm{rank} < K)$. Write `recall_at_k(sims, k)` returning
# the pair `(i2t R@K, t2i R@K)`.

# %%
from userlab import teach

for shortcut in ("retrieval_ranks", "evaluate_sims"):
    globals().pop(shortcut, None)  # you write these below


def recall_at_k(sims, k):
    """(i2t R@K, t2i R@K) in percent of an (N, 5N) similarity matrix."""
    ### BEGIN SOLUTION
    S = torch.as_tensor(sims).double().numpy()
    n_images, n_captions = S.shape
    per_image = n_captions // n_images
    order = lambda scores: np.argsort(-scores, kind="stable")      # ties: lower index first
    i2t = [np.flatnonzero(order(S[i]) // per_image == i).min() for i in range(n_images)]
    t2i = [np.flatnonzero(order(S[:, c]) == c // per_image)[0] for c in range(n_captions)]
    return 100.0 * np.mean(np.array(i2t) < k), 100.0 * np.mean(np.array(t2i) < k)
    ### END SOLUTION


teach.check_recall_at_k(recall_at_k)

# %% [markdown]
# ### Exercise 3.2: median rank
# $\mathrm{medr} = \lfloor \mathrm{median}(\mathrm{rank}) \rfloor + 1$ of 0-based ranks (1 is the
# best). Write `median_rank(ranks)` for a 1-d array or tensor of ranks.

# %%
def median_rank(ranks):
    """medr of 0-based ranks."""
    ### BEGIN SOLUTION
    return float(np.floor(np.median(np.asarray(ranks, dtype=np.float64))) + 1)
    ### END SOLUTION


teach.check_median_rank(median_rank)
