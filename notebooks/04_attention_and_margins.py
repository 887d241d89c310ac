# %% [markdown]
# # 04 · Attention and margins: what USER looks at, and how its margins evolve
#
# **Learning goals**
# - see where Self-Guided Enhancement (SGE) and CLIP-Guided Enhancement (CGE) put their attention;
# - read GPO's pooling weights;
# - follow the retrieval margin (positive minus hardest negative) of every query over training;
# - look inside the two queues, and at the joint embedding space;
# - browse retrieval results interactively.
#
# **Equations in this notebook** ($R \in \mathbb{R}^{K\times D}$ regions of one image)
#
# | idea | formula | userlab |
# |---|---|---|
# | SGE global weights | $\alpha = \mathrm{softmax}_k\big(w^\top(L_k \odot G)\big)$ | `models.image.SelfGuidedEnhancement` |
# | global vector | $g = \mathrm{l2norm}(\sum_k \alpha_k R_k)$ (CGE: $g$ = projected guide embedding) | `SelfGuidedEnhancement`, `ClipGuidedEnhancement` |
# | region attention | $\beta = \mathrm{l2norm}_k\big(\mathrm{softmax}_k(\lambda\langle g, R_k\rangle)\big)$ | `models.image.region_attention` |
# | enhancement | $\hat R_k = R_k + \beta_k\, g$ | `models.image.region_attention` |
# | margin of a query | $m = S_{\text{pos}} - \max_{\text{neg}} S_{\text{neg}}$ ($m < 0$: a miss at rank 1) | `viz.margin_records` |
# | UTO's threshold | a negative is pushed down while $S_{\text{neg}} > \gamma = 0.5$ (USER has no margin) | `viz.objective_threshold` |

# %% tags=["parameters"]
# Parameters (papermill can set them). None falls back to $USERLAB_DATA / $USERLAB_RUNS /
# $USERLAB_DEVICE / $USERLAB_PRESET, then to the demo scenes, runs/, the best device and "demo".
data_dir = None   # features: a SCAN / VSE precomp folder or the output of `userlab extract`
runs_dir = None   # checkpoints are reused from here; missing ones are trained into <runs_dir>/cache
device = None     # "cpu", "cuda", "cuda:1", ...
preset = None     # USER preset the models start from: "demo"; "f8k-cpu" for Flickr8k grid features

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from userlab import viz, widgets
from userlab.notebook import SMOKE, MarginRecorder, figures_dir, open_lesson
from userlab.runs import encode_run
from userlab.evaluate import move_batch, similarity
from userlab.data.precomp import ImageView, collate_batch

lesson = open_lesson(data_dir, runs_dir, device, preset)
# Full mode trains on the first 1000 demo scenes for 3 epochs: a few minutes per model on a
# 2-core CPU, once: the runs (and the margins recorded while they trained) are cached by config,
# so a rerun loads them. Set `train_max_images = None` to use all 5000 for sharper maps.
epochs = 2 if lesson.smoke else 3
train_max_images = None if lesson.smoke else 1000
variants = {"SGE": "sge", "CGE": "cge", "none": "none"}
if not lesson.has_guide:
    variants.pop("CGE")            # CGE needs guide features ({split}_guide.npy)
trainers, recorders = {}, {}
for name, enhancement in variants.items():
    cfg = lesson.config(**{"model.enhancement": enhancement, "optim.epochs": epochs,
                                   "optim.lr_step": 0, "data.train_max_images": train_max_images})
    recorders[name] = MarginRecorder(name)
    trainers[name] = lesson.fit(cfg, callbacks=[recorders[name]])
    print(name, "best dev rSum:", round(trainers[name].best_rsum, 1))

# %% [markdown]
# ## 1. Attention over the image
# Boxes are drawn with opacity and width proportional to their weight. SGE's $\alpha$ builds the
# global vector; $\beta$ decides how much of it each region receives.

# %%
runs = {name: trainers[name].load() for name in variants}
img, cap, test = encode_run(runs["SGE"], split=lesson.eval_split)   # test embeddings, once (sections 6-7)
n_show = min(16, test.num_images)
batch = collate_batch([ImageView(test)[i] for i in range(n_show)])
outputs = {}
with torch.no_grad():
    for name, run in runs.items():
        device = next(run.model.parameters()).device
        outputs[name] = run.model.encode_image(move_batch(batch, device))

# boxes when the features have boxes, a heat map over the grid for grid features
sge = viz.attention_weights(outputs["SGE"], 0)
fig = lesson.draw_attention(test, 0, sge["alpha"], title="SGE α (global-vector weights)")
viz.save(fig, "04_sge_alpha", figures_dir())
fig = lesson.draw_attention(test, 0, sge["beta"], title="SGE β (region attention)")
viz.save(fig, "04_sge_beta", figures_dir())

# %% [markdown]
# ## 2. CGE vs SGE on the same image
# CGE's global vector comes from the guide embedding (the pooled backbone here, CLIP for real data)
# instead of from the regions themselves.

# %%
maps = {(name if name == "none" else f"{name} β"): viz.attention_weights(outputs[name], 0)["beta"]
        for name in variants}
if lesson.features.layout == "boxes":      # one opacity scale for both maps
    fig = viz.plot_attention_comparison(lesson.image(test, 0), test.boxes[0], maps, shared_scale=True)
else:
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.8), squeeze=False)
    for ax, (name, w) in zip(axes[0], maps.items()):
        lesson.draw_attention(test, 0, w, title=name if w is not None else f"{name} (no attention)", ax=ax)
    fig.tight_layout()
viz.save(fig, "04_cge_vs_sge", figures_dir())

# %% [markdown]
# ## 3. GPO weights
# GPO sorts every feature dimension over the regions and learns how much each *rank* counts.

# %%
fig = viz.plot_gpo_weights({name: viz.attention_weights(out, 0)["gpo"] for name, out in outputs.items()},
                           title="GPO weights over sorted positions")
viz.save(fig, "04_gpo_weights", figures_dir())

# %% [markdown]
# ## 4. Margins over training, judged by USER's own objective
# The three models are trained with the unified objective (UTO). UTO has no margin: a negative is
# pushed down while its similarity exceeds the absolute threshold γ. So each dev query is judged
# by its **hardest negative**: above γ (dashed line), the objective still works on that query.
# The margin (positive minus hardest negative; below 0 a miss at rank 1) is printed alongside.
# Compare the two columns: a query whose hardest negative wins (an R@1 miss) but stays below γ
# gets no push from UTO's negative terms at all.

# %%
import pandas as pd
records = pd.concat([r.records for r in recorders.values()], ignore_index=True)
threshold = viz.objective_threshold(*(t.cfg for t in trainers.values()))
print("threshold:", threshold.label, "| violation:", threshold.rule)
fig = viz.plot_margin_distributions(records, threshold, hue="model")
viz.save(fig, "04_margin_distributions", figures_dir())
table = viz.violation_table(records, threshold, hue="model").rename(
    columns={"violation_rate": threshold.rule})
table["R@1 misses (margin < 0)"] = viz.violation_table(records, 0.0, hue="model")["violation_rate"]
assert table.iloc[:, 2:].apply(lambda c: c.between(0, 1).all()).all()
final = table[table.epoch == table.epoch.max()].set_index("model")
for name, row in final.iterrows():
    print(f"{name}, epoch {int(row.epoch)}: the negative term is active for {100 * row[threshold.rule]:.0f}% of "
          f"the dev queries, {100 * row['R@1 misses (margin < 0)']:.0f}% are R@1 misses")
table

# %% [markdown]
# ## 5. Inside the queues
# After training, the SGE model's queues against 32 training captions and their images: key
# ages, queue negatives beside the batch negatives of the same queries (image queries against
# the text queue, caption queries against the image queue), and the keys of each query's own
# image in the queue (the false negatives that `momentum.mask_same_image` removes).

# %%
sge_trainer = trainers["SGE"].trainer()     # the run's last checkpoint, queues included
model = sge_trainer.model
cap_batch = move_batch(collate_batch([sge_trainer.data.train[i] for i in range(32)]), sge_trainer.device)
with torch.no_grad():
    model.eval()
    v, t = model.encode_image(cap_batch).embedding, model.encode_text(cap_batch).embedding
fig = viz.plot_queues(model.image_queue, model.text_queue, v, t, cap_batch["image_id"], batch_sims=v @ t.T)
viz.save(fig, "04_queue_state", figures_dir())
queue_neg = (v @ model.text_queue.keys).flatten()
batch_neg = (v @ t.T)[~torch.eye(len(v), dtype=torch.bool, device=v.device)]
print(f"mean similarity of image queries: text-queue negatives {queue_neg.mean():.3f}, "
      f"batch negatives {batch_neg.mean():.3f}")
assert torch.isfinite(queue_neg).all() and torch.isfinite(batch_neg).all()

# %% [markdown]
# ## 6. The joint embedding space
# Left: images (dots) and captions (crosses) projected together; lines join five images to their
# five captions. The leading axis is mostly the *modality gap*: images on one side, captions on
# the other (the cell prints the share of variance along the gap). Middle: each modality centred
# on its own mean and scaled to the same spread, which removes the gap; scenes are coloured by
# the shape of their largest object. Right: what retrieval rests on, gap or not: the cosine of
# matching image-caption pairs against all other pairs. Linear probes on the image and the
# caption embeddings (5-fold held-out accuracy) say which scene properties each side carries: a
# caption only carries what its sentence says (few captions name the background), an image
# carries what it shows.

# %%
from userlab.probe import linear_probe

fig, (left, middle, right) = plt.subplots(1, 3, figsize=(21, 6), gridspec_kw={"width_ratios": [1, 1.3, 0.9]})
viz.plot_embedding_map(img, cap, method="pca", ax=left)
if lesson.demo:      # colour the scenes by the shape of their largest object
    from userlab.data.scenes import load_scenes
    scenes_test = load_scenes(test.folder, "test")[:len(img)]
    largest = [max(sc["objects"], key=lambda o: o["radius"])["shape"] for sc in scenes_test]
    viz.plot_embedding_map(img, cap, labels=largest, method="pca", centre=True, ax=middle,
                           label_name="shape of the largest object")
else:
    viz.plot_embedding_map(img, cap, method="pca", centre=True, ax=middle)
viz.plot_pair_similarity(img, cap, ax=right)
fig.tight_layout()
viz.save(fig, "04_embedding_map", figures_dir())
gap = viz.modality_gap(img, cap)
print({k: round(v, 3) for k, v in gap.items()})
assert np.isfinite(list(gap.values())).all() and 0.0 <= gap["gap_variance_share"] <= 1.0
names_bg = np.mean([any(w in c.lower() for w in ("background", "backdrop")) for c in test.captions])
print(f"captions that name the background: {100 * names_bg:.0f}%")
folds = 5 if not SMOKE else 2
scene_labels = {} if not lesson.demo else {   # own data has no scene labels to probe for
    "objects in the scene": [sc["n_objects"] for sc in scenes_test],
    "shape of the largest object": largest,
    "background": [sc["background"] for sc in scenes_test]}
for name, labels in scene_labels.items():
    counts = pd.Series(labels).value_counts()
    keep = np.isin(labels, counts[counts >= folds].index)
    if keep.sum() > folds and (counts >= folds).sum() > 1:
        probes = {side: linear_probe(emb.cpu().numpy()[keep], np.asarray(labels)[keep], folds=folds)
                  for side, emb in (("image", img), ("caption", cap[::5]))}   # first caption per image
        print(f"{name:28s} probe accuracy: image {100 * probes['image'].accuracy:.1f}%, caption "
              f"{100 * probes['caption'].accuracy:.1f}%, chance {100 * probes['image'].chance:.1f}%")

# %% [markdown]
# ## 7. Interactive browsers
# Move the sliders: the retrieval browser shows the top-k for an image or a caption (type one in
# the text box; unknown words are flagged), the attention explorer switches checkpoints, the
# margin explorer steps through epochs, judging each query by the threshold of the objective the
# three models were trained with (the line above its sliders names it; the slider moves its value).

# %%
sims = similarity(img, cap).cpu()
browser = widgets.RetrievalBrowser(sims, test, vocab=runs["SGE"].vocab,
                                   encode_caption=widgets.make_caption_encoder(runs["SGE"].model, runs["SGE"].tokenizer),
                                   image_embeddings=img)
browser.widget

# %%
attention = {name: (None if out.beta is None else out.beta.cpu().numpy()) for name, out in outputs.items()}
explorer = lesson.attention_explorer(test, attention, n_show)   # boxes or grid heat maps
explorer.widget

# %%
margins = widgets.MarginExplorer(records, threshold)   # section 4's rule, from the models' configs
margins.widget

# %% [markdown]
# ## Diagnostics
# What the three models' attention and embeddings look like on the test split
# (`userlab.diagnostics`): the entropy of $\beta$ (and SGE's $\alpha$) as a fraction of the
# uniform entropy $\log R$ (1 = uniform, 0 = one-hot), the largest relative change
# $\beta_k / \lVert R_k \rVert$ the enhancement $\hat R_k = R_k + \beta_k g$ makes to a region,
# hubness (skewness of $N_{10}$), the modality gap and t2i R@1 per caption kind. With the released
# formulation the affinities $\langle g, R_k \rangle$ use raw regions whose norms are tens, so
# the softmax is nearly one-hot; `model.attention_norm = "l2"` is the documented variant.

# %%
import pandas as pd

from userlab import diagnostics as dg

diag_rows = []
for name, run in runs.items():
    img_d, cap_d, ds = encode_run(run, split=lesson.eval_split, progress=False)
    rep = dg.diagnose_embeddings(img_d, cap_d, ds)
    att = dg.collect_attention(run.model, ds)
    row = {"model": name, "hub skew t2i": rep["hubness"]["t2i"]["skewness"],
           "hub skew i2t": rep["hubness"]["i2t"]["skewness"], "modality gap": rep["modality_gap"]["gap"],
           "pos sim": rep["similarity"]["pos_mean"], "neg sim": rep["similarity"]["neg_mean"],
           "collapse": rep["similarity"]["collapse"]}
    if "alpha" in att:
        row["alpha entropy"] = dg.attention_entropy(att["alpha"])["normalised"]
    if "beta" in att:
        row["beta entropy"] = dg.attention_entropy(att["beta"], "l2")["normalised"]
        row["beta top weight"] = dg.attention_entropy(att["beta"], "l2")["max_weight"]
        row["max region change %"] = 100 * float(att["beta_change"].mean())
    row.update({f"t2i R@1 {r['group']}": r["R@1"] for r in rep["recall_by_group"]["rows"]})
    diag_rows.append(row)
diag = pd.DataFrame(diag_rows).set_index("model")
numeric = diag.select_dtypes("number")
assert np.isfinite(numeric.fillna(0).to_numpy()).all()
for col in ("alpha entropy", "beta entropy", "collapse"):
    if col in diag:
        assert diag[col].dropna().between(0, 1 + 1e-9).all(), col
diag.round(3).T

# %% [markdown]
# ## Exercises
# Write the function yourself. The check cell under it runs it on several hidden inputs, edge
# cases included ($B = 1$, identical regions, zero-padded regions, large affinities, float16),
# compares the results with userlab's own code and says *what* is wrong, never the expected
# numbers. Until you write it the check reports "not implemented".
#
# ### Exercise 4.1: region attention (SGE steps 5 and 6)
# Given regions $R \in \mathbb{R}^{B\times K\times D}$ and a global vector $g \in \mathbb{R}^{B\times D}$:
#
# $$\beta = \mathrm{l2norm}_k\big(\mathrm{softmax}_k(\lambda\,\langle g, R_k\rangle)\big), \qquad \hat R_k = R_k + \beta_k\, g$$
#
# Write `region_attention(regions, g, lam)` returning the pair `(enhanced, beta)`, shapes
# `(B, K, D)` and `(B, K)`.

# %%
from userlab import teach


def region_attention(regions, g, lam=1.0):
    """USER's region attention: (enhanced regions (B, K, D), beta (B, K))."""
    ### BEGIN SOLUTION
    affinity = torch.einsum("bkd,bd->bk", regions.float(), g.float())
    weights = torch.softmax(lam * affinity, dim=1)              # over the regions
    beta = (weights / weights.norm(dim=1, keepdim=True)).to(regions.dtype)
    return regions + beta.unsqueeze(-1) * g.unsqueeze(1), beta
    ### END SOLUTION


teach.check_region_attention(region_attention)
