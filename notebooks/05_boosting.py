# %% [markdown]
# # 05 · Deep Boosting Learning: beating your own anchor
#
# **Learning goals**
# - state DBL's idea: a target branch must beat the anchor's *own* distances by a margin;
# - compute the relative and absolute boosting losses and their soft-adaptation margins;
# - compare the offline, online and momentum schedules;
# - read an ablation of DBL against mutual learning on the VSE++ and USER backbones (the GPU-sized
#   grid adds USER's parts one by one and a distillation baseline).
#
# **Equations in this notebook** ($S^a$, $S^t$: anchor and target score matrices, rows images; $\gamma = 0.2$, $\beta = 1$)
#
# | idea | formula | userlab |
# |---|---|---|
# | raw (VSE++) | $L_{raw} = \sum_i \max_{j\ne i}[\gamma + S_{ij} - S_{ii}]_+ + \sum_j \max_{i\ne j}[\gamma + S_{ij} - S_{jj}]_+$ | `boosting.raw_triplet` |
# | relative boosting | $L_{rel} = \sum_i \max_{j\ne i}[\gamma\beta + (S^a_{ii}-S^a_{ij}) - (S^t_{ii}-S^t_{ij})]_+ + (\text{columns})$ | `boosting.relative_boost` |
# | absolute boosting | $L_{abs} = 2\sum_i[\gamma_1 + S^a_{ii} - S^t_{ii}]_+ + \sum_i\max_{j\ne i}[\gamma_2 + S^t_{ij} - S^a_{ij}]_+ + (\text{columns})$, $\gamma_1=\gamma_2=\gamma\beta/2$ | `boosting.absolute_boost` |
# | target loss | $L = L_{raw}(S^t) + \alpha\, L_{boo}(S^t, \mathrm{sg}(S^a))$ | `boosting.dbl_loss`, `models.boosted.BoostedModel` |
# | soft adaptation | $m' = \min(m, e - r)$ (hard) or $m\tanh((e-r)/m)$ (soft) | `boosting.supremum_margin` |
# | momentum anchor | $m(t) = 1 - (1-m_0)\,\tfrac12(1+\cos(\pi t/T))$ | `momentum.cosine_momentum` |

# %% tags=["parameters"]
# Parameters (papermill can set them). None falls back to $USERLAB_DATA / $USERLAB_RUNS /
# $USERLAB_DEVICE / $USERLAB_PRESET, then to the demo scenes, runs/, the best device and "demo".
data_dir = None   # features: a SCAN / VSE precomp folder or the output of `userlab extract`
runs_dir = None   # checkpoints are reused from here; missing ones are trained into <runs_dir>/cache
device = None     # "cpu", "cuda", "cuda:1", ...
preset = None     # USER preset the models start from: "demo"; "f8k-cpu" for Flickr8k grid features

# %%
import numpy as np
import pandas as pd
import torch

from userlab import viz
from userlab.notebook import SMOKE, MarginRecorder, figures_dir, open_lesson
from userlab.config import triplet_schedule_fields
from userlab.pipeline import describe_lr_schedule
from userlab.runs import evaluate_runs

lesson = open_lesson(data_dir, runs_dir, device, preset)
# Full mode: 4 epochs over the first 1000 demo scenes with the kit's VSE++ recipe
# (`triplet_schedule`: VSE0 for the first half at lr 1e-3, then hardest negatives at 2e-4; at
# 1e-3 they near-collapse), a few minutes per run on a 2-core CPU, once: runs are cached by
# config and a rerun loads them. `None` trains on all 5000.
epochs = 2 if lesson.smoke else 4
base = {**triplet_schedule_fields(epochs), "data.train_max_images": None if lesson.smoke else 1000}
print(describe_lr_schedule(lesson.config("vsepp", **base)), "| VSE0 epochs:", base["loss.warmup_epochs"])

# %% [markdown]
# ## 1. The idea in a picture: anchor vs target
# The offline schedule trains an anchor (VSE++), then a target that starts from it and must beat
# its margins. Both margins are drawn for the same dev queries, judged by the objective both
# branches are trained with: the triplet hinge is active while a query's margin is below the
# triplet margin (dashed line).

# %%
cfg = lesson.config("vsepp", **base, **{"boost.schedule": "offline", "boost.strategy": "relative"})
offline_rec = MarginRecorder("offline")
offline = lesson.fit(cfg, callbacks=[offline_rec])
records = offline_rec.records        # the anchor stage's own rows are named "offline"; keep the pair
records = records[records.model.isin(["anchor", "target"])]
threshold = viz.objective_threshold(offline.cfg)     # triplet margin 0.2 (VSE++ / DBL)
last = records[records.epoch == records.epoch.max()]
fig = viz.plot_margin_distributions(last, threshold, hue="model")
viz.save(fig, "05_anchor_vs_target", figures_dir())
summary = last.groupby("model")["margin"].describe()[["mean", "50%", "min"]]
summary[threshold.rule] = viz.violation_table(last, threshold, hue="model").set_index("model")["violation_rate"]
assert np.isfinite(summary.to_numpy()).all() and summary[threshold.rule].between(0, 1).all()
summary

# %% [markdown]
# ## 2. Margins of anchor and target during training, and boosting violations
# The online schedule trains both branches together, so the gap can be watched as it opens.

# %%
cfg = lesson.config("vsepp", **base, **{"boost.schedule": "online", "boost.strategy": "relative"})
online_rec = MarginRecorder("online")
online = lesson.fit(cfg, callbacks=[online_rec])
fig = viz.plot_margin_distributions(online_rec.records, viz.objective_threshold(online.cfg), hue="model")
viz.save(fig, "05_margins_per_epoch", figures_dir())
online_rec.violations

# %% [markdown]
# ## 3. The three schedules side by side
# Same backbone (VSE++) and the same number of *target* epochs, but not the same compute: the
# offline schedule first trains the anchor for its own epochs (a second training run), the online
# schedule trains two branches at every step, and the momentum schedule's anchor is an EMA of the
# target that only runs forward. The cost table after the recalls counts it from the run folders.

# %%
cfg = lesson.config("vsepp", **base,
                    **{"boost.schedule": "momentum", "boost.strategy": "relative", "boost.momentum_teacher": 0.99})
momentum = lesson.fit(cfg)
plain = lesson.fit(lesson.config("vsepp", **base))
runs = {"VSE++": plain.run_dir, "DBL offline": offline.run_dir,
        "DBL online": online.run_dir, "DBL momentum": momentum.run_dir}
table = evaluate_runs(runs, split="test", data_root=str(lesson.data_root))
fig = viz.plot_recall_bars(table)
viz.save(fig, "05_schedules", figures_dir())
table[["model", "i2t_R@1", "t2i_R@1", "rsum"]]

# %% [markdown]
# What each schedule cost: epochs per stage, optimiser steps, forward+backward passes of trained
# branches and forward-only passes of a frozen / EMA anchor (per batch), and logged training time.

# %%
from userlab.cost import cost_table

costs = cost_table(runs)
baseline = costs.set_index("model").loc["VSE++"]
costs["trained passes vs VSE++"] = (costs["trained_passes"] / baseline["trained_passes"]).round(2)
costs["time vs VSE++"] = (costs["train_seconds"] / baseline["train_seconds"]).round(2)
assert (costs[["epochs", "steps", "trained_passes"]] > 0).all().all() and costs["train_seconds"].notna().all()
costs

# %% [markdown]
# ## 4. The ablation
# A grid of backbones × training strategies × seeds (`userlab.ablation`). The next cell prints
# the grid this notebook runs: in smoke mode a seconds-sized one, in full mode the CPU-sized
# `default_grid` on the DBL paper's backbone (VSE++ × none, DBL relative, DBL absolute, mutual
# learning × 3 seeds, 118 steps each; the summary prints its training time). `userlab ablate
# --grid default` adds full USER; `docs/ablation-components.md` holds the same comparison at the
# demo's full budget, with paired bootstrap intervals and the compute-matched baseline.

# %%
from userlab import ablation

# the grid keeps its results (results.csv) in its folder: a rerun skips the cells it holds
data_root = str(lesson.data_root)
grid = (ablation.smoke_grid(data_root=data_root, out_dir=str(lesson.run_folder("05_ablation"))) if lesson.smoke
        else ablation.default_grid(data_root=data_root, out_dir=str(lesson.run_folder("ablation"))))
if not lesson.smoke:
    grid.backbones = ("VSE++",)   # 12 cells, ~21 trainings of a VSE++ branch
print(f"backbones: {', '.join(grid.backbones)} | strategies: {', '.join(grid.strategies)} | "
      f"seeds: {list(grid.seeds)} | {len(grid)} cells, DBL schedule {grid.dbl_schedule}")
results = ablation.run_ablation(grid, progress=True)
summary = ablation.summarize(results)
print(ablation.format_summary(summary))
print(f"{len(results)} cells, {results['train_seconds'].sum() / 60:.1f} min of training in all")
fig = ablation.plot_ablation(results)
viz.save(fig, "05_ablation", figures_dir())

# %% [markdown]
# ## Diagnostics
# The same diagnostics for the boosted targets and the plain baseline of section 3
# (`userlab.diagnostics.diagnose_run`): hubness (skewness of $N_{10}$), modality gap, mean
# positive / negative test similarity and the collapse score (1 when positives and negatives are
# equal at 1), and t2i R@1 per caption kind. A boosted target that collapses shows it here as a
# collapse score near its negative similarity and a vanishing gap.

# %%
from userlab import diagnostics as dg

diag_rows = []
for name, run_dir in runs.items():
    rep = dg.diagnose_run(run_dir, split="test", data_root=str(lesson.data_root))
    diag_rows.append({"model": name, **dg.key_numbers(rep),
                      **{f"t2i R@1 {r['group']}": r["R@1"] for r in rep["recall_by_group"]["rows"]}})
diag = pd.DataFrame(diag_rows).set_index("model")
assert np.isfinite(diag.select_dtypes("number").fillna(0).to_numpy()).all()
assert diag["collapse"].between(0, 1).all()
diag.round(3).T

# %% [markdown]
# ## Exercises
# Write each function yourself. The check cell under it runs your function on several hidden
# inputs, edge cases included ($B = 1$, tied scores, anchors near the score bound, float16),
# compares the results with userlab's own code and says *what* is wrong, never the expected
# numbers. Until you write a function its check reports "not implemented".
#
# ### Exercise 5.1: soft-adapted margins
# A margin $m$ should never ask the target to pass the score bound. With `ref` the anchor's score
# (or gap) and `edge` its bound (1 for scores, 2 for gaps):
#
# | | hard | soft |
# |---|---|---|
# | supremum (upper bound `edge`) | $\min(m,\ \mathrm{edge}-\mathrm{ref})$ | $\frac{2m}{1+e^{(2/m)(\mathrm{ref}-\mathrm{edge})}} - m$ |
# | infimum (lower bound `−edge`) | $\min(m,\ \mathrm{edge}+\mathrm{ref})$ | $\frac{2m}{1+e^{-(2/m)(\mathrm{ref}+\mathrm{edge})}} - m$ |
#
# Write `supremum_margin(ref, m, edge, mode)` and `infimum_margin(ref, m, edge, mode)`
# (`mode` is "hard" or "soft"; at $m = 0$ the margin is 0).

# %%
from userlab import teach


def supremum_margin(ref, m, edge, mode="hard"):
    """Margin that shrinks so that ref + margin never passes edge."""
    ### BEGIN SOLUTION
    room = edge - ref.float()
    if mode == "hard":
        return torch.clamp(room, max=m)
    return m * torch.tanh(room / m) if m > 0 else torch.zeros_like(room)  # = 2m/(1+e^{-2 room/m}) − m
    ### END SOLUTION


def infimum_margin(ref, m, edge, mode="hard"):
    """Margin that shrinks so that ref − margin never passes −edge."""
    ### BEGIN SOLUTION
    return supremum_margin(-ref, m, edge, mode)
    ### END SOLUTION


teach.check_supremum_margin(supremum_margin)
teach.check_infimum_margin(infimum_margin)

# %% [markdown]
# ### Exercise 5.2: relative boosting
# With target scores $S^t$ and anchor scores $S^a$ ($B\times B$, rows images), $\gamma$ = `margin`,
# both directions summed over the batch, hardest negative per query:
#
# $$L_{rel} = \sum_i \max_{j\ne i}\big[\gamma\beta + (S^a_{ii}-S^a_{ij}) - (S^t_{ii}-S^t_{ij})\big]_+ + \sum_j \max_{i\ne j}\big[\gamma\beta + (S^a_{jj}-S^a_{ij}) - (S^t_{jj}-S^t_{ij})\big]_+$$
#
# With `soft` = "hard" or "soft", each $\gamma\beta$ becomes `supremum_margin(anchor gap, γβ, 2, soft)`.
# Write `relative_boost(S_t, S_a, margin, beta, soft)`.

# %%
def relative_boost(S_t, S_a, margin=0.2, beta=1.0, soft=None):
    """DBL's relative boosting loss L_rel (a scalar tensor)."""
    ### BEGIN SOLUTION
    S_t, S_a = S_t.float(), S_a.float()
    negatives = ~torch.eye(S_t.shape[0], dtype=torch.bool)
    total = 0.0
    for dim in (1, 0):                                  # rows: image queries; columns: caption queries
        positive = lambda S: S.diagonal().unsqueeze(dim)       # S_ii beside its row (or column)
        gap_t, gap_a = positive(S_t) - S_t, positive(S_a) - S_a
        m = margin * beta if soft is None else supremum_margin(gap_a, margin * beta, 2.0, soft)
        cost = (m + gap_a - gap_t).clamp_min(0) * negatives
        total = total + cost.amax(dim=dim).sum()
    return total
    ### END SOLUTION


teach.check_relative_boost(relative_boost)

# %% [markdown]
# ### Exercise 5.3: absolute boosting
# The target's positive must rise $\gamma_1$ above the anchor's, each hardest negative fall $\gamma_2$
# below it, with $\gamma_1 = \gamma_2 = 0.5\,\gamma\beta$ in the released code:
#
# $$L_{abs} = 2\sum_i\big[\gamma_1 + S^a_{ii} - S^t_{ii}\big]_+ + \sum_i \max_{j\ne i}\big[\gamma_2 + S^t_{ij} - S^a_{ij}\big]_+ + \sum_j \max_{i\ne j}\big[\gamma_2 + S^t_{ij} - S^a_{ij}\big]_+$$
#
# With `soft`, $\gamma_1$ = `supremum_margin(S^a_ii, γ1, 1, soft)` and $\gamma_2$ =
# `infimum_margin(S^a_ij, γ2, 1, soft)`. Write `absolute_boost(S_t, S_a, margin, beta, soft)`.

# %%
def absolute_boost(S_t, S_a, margin=0.2, beta=1.0, soft=None):
    """DBL's absolute boosting loss L_abs (a scalar tensor)."""
    ### BEGIN SOLUTION
    S_t, S_a = S_t.float(), S_a.float()
    half = 0.5 * margin * beta
    m_pos = half if soft is None else supremum_margin(S_a.diagonal(), half, 1.0, soft)
    m_neg = half if soft is None else infimum_margin(S_a, half, 1.0, soft)
    positive = 2 * (m_pos + S_a.diagonal() - S_t.diagonal()).clamp_min(0).sum()
    cost = (m_neg + S_t - S_a).clamp_min(0) * ~torch.eye(S_t.shape[0], dtype=torch.bool)
    return positive + cost.amax(dim=1).sum() + cost.amax(dim=0).sum()
    ### END SOLUTION


teach.check_absolute_boost(absolute_boost)

# %% [markdown]
# ### Predict, then run: DBL's α on a UTO backbone
# DBL's defaults ($\alpha = 1$, $\gamma = 0.2$) were tuned on a VSE++ backbone, whose own loss is
# the triplet loss. On a USER backbone (`BoostedModel` with the unified objective) the target
# minimises $\mathrm{UTO} + \alpha L_{rel}$. With $\alpha = 1$, which term drives the gradient on
# the similarity matrix?
#
# - **(a)** UTO: $\alpha L_{rel}$ is a small correction at every batch size.
# - **(b)** Both about equally, whatever the batch size.
# - **(c)** $\alpha L_{rel}$, and more so as the batch grows.
#
# Write your prediction, then run the next cell.

# %%
### BEGIN SOLUTION
prediction_alpha = "c"
### END SOLUTION

# %%
import torch.nn.functional as F
from userlab import boosting, losses

rows = []
for B in (8, 32, 128):
    gen = torch.Generator().manual_seed(B)
    V = F.normalize(torch.randn(B, 32, generator=gen), dim=1)
    T = F.normalize(V + 0.8 * torch.randn(B, 32, generator=gen), dim=1)      # matching pairs
    S = (V @ T.t()).requires_grad_()
    S_anchor = (S + 0.05 * torch.randn(B, B, generator=gen)).detach()
    uto = losses.unified_objective(S, V, T, lambda_batch=20.0).total          # USER's λ = 20, no queue
    boost = 1.0 * boosting.relative_boost(S, S_anchor).total                  # α = 1
    grads = [torch.autograd.grad(term, S)[0].norm().item() for term in (uto, boost)]
    rows.append({"B": B, "|∇S UTO|": grads[0], "|∇S α·L_rel|": grads[1], "ratio": grads[1] / grads[0]})
alpha_table = pd.DataFrame(rows).set_index("B")
print(alpha_table.round(2).to_string())
ratios = alpha_table["ratio"].to_numpy()
growing = bool(np.all(np.diff(ratios) > 0))
measured = "a" if ratios.max() < 0.5 else ("c" if ratios[-1] > 2 and growing else "b")
teach.reveal(prediction_alpha, measured, {
    "a": "UTO dominates.", "b": "the two are comparable.",
    "c": "α·L_rel dominates, more so for larger batches: on a UTO backbone α needs scaling down."},
    evidence=f"gradient ratio α·L_rel / UTO = {', '.join(f'{r:.1f}' for r in ratios)} at B = 8, 32, 128.")
