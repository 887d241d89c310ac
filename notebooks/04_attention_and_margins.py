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
# | margin of a query | $m = S_{\text{pos}} - \max_{\text{neg}} S_{\text{neg}}$ (hinge active when $m < 0.2$) | `viz.margin_records` |

# %% tags=["parameters"]
# Parameters (papermill can set them). None falls back to $USERLAB_DATA / $USERLAB_RUNS /
# $USERLAB_DEVICE, then to the demo scenes, runs/ and the best device.
data_dir = None   # features: a SCAN / VSE precomp folder or the output of `userlab extract`
runs_dir = None   # checkpoints are reused from here; missing ones are trained into <runs_dir>/cache
device = None     # "cpu", "cuda", "cuda:1", ...

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from userlab import viz, widgets
from userlab.notebook import SMOKE, MarginRecorder, figures_dir, open_lesson
from userlab.runs import encode_run
from userlab.evaluate import move_batch, similarity
from userlab.data.precomp import ImageView, collate_batch

lesson = open_lesson(data_dir, runs_dir, device)
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
    cfg = lesson.config("demo", **{"model.enhancement": enhancement, "optim.epochs": epochs,
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
img, cap, test = encode_run(runs["SGE"], split="test")   # test embeddings, once (sections 6-7)
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
if lesson.features.layout == "boxes":
    fig = viz.plot_attention_comparison(lesson.image(test, 0), test.boxes[0], maps)
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
# ## 4. Margins over training
# Each dot is one dev query; a margin below 0 is a retrieval miss at rank 1, below 0.2 an active
# VSE++ hinge.

# %%
import pandas as pd
records = pd.concat([r.records for r in recorders.values()], ignore_index=True)
fig = viz.plot_margin_distributions(records, hue="model")
viz.save(fig, "04_margin_distributions", figures_dir())
viz.violation_table(records)

# %% [markdown]
# ## 5. Inside the queues
# Key age, queue negatives vs batch negatives, and how many keys of the query's own image sit in
# the queue (the false negatives that `momentum.mask_same_image` removes).

# %%
sge_trainer = trainers["SGE"].trainer()     # the run's last checkpoint, queues included
model = sge_trainer.model
cap_batch = collate_batch([sge_trainer.data.train[i] for i in range(32)])
with torch.no_grad():
    model.eval()
    q = model.encode_image(move_batch(cap_batch, sge_trainer.device)).embedding
fig = viz.plot_queue_state(model.text_queue, query_emb=q, query_ids=cap_batch["image_id"])
viz.save(fig, "04_queue_state", figures_dir())

# %% [markdown]
# ## 6. The joint embedding space
# Images (large dots) and their captions (small dots), projected to 2-D; lines join an image to
# its 5 captions.

# %%
fig = viz.plot_embedding_map(img, cap, method="pca")
viz.save(fig, "04_embedding_map", figures_dir())

# %% [markdown]
# ## 7. Interactive browsers
# Move the sliders: the retrieval browser shows the top-k for an image or a caption (type one in
# the text box; unknown words are flagged), the attention explorer switches checkpoints, the
# margin explorer steps through epochs.

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
margins = widgets.MarginExplorer(records)
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
    img_d, cap_d, ds = encode_run(run, split="test", progress=False)
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
