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

# %%
import numpy as np
import pandas as pd
import torch

from userlab import viz
from userlab.notebook import SMOKE, MarginRecorder, demo_config, demo_data, figures_dir
from userlab.experiment import fit_experiment
from userlab.runs import evaluate_runs

demo_data()
# Full mode: 4 epochs over the first 1000 demo scenes (the first with VSE0 warm-up, see
# `preset("vsepp")`), a few minutes per run on a 2-core CPU; `None` trains on all 5000.
epochs = 2 if SMOKE else 4
base = {"optim.epochs": epochs, "optim.lr_step": 0, "data.train_max_images": None if SMOKE else 1000}

# %% [markdown]
# ## 1. The idea in a picture: anchor vs target
# The offline schedule trains an anchor (VSE++), then a target that starts from it and must beat
# its margins. Both margins are drawn for the same dev queries, judged by the objective both
# branches are trained with: the triplet hinge is active while a query's margin is below the
# triplet margin (dashed line).

# %%
cfg = demo_config("vsepp", run="05_offline", **base, **{"boost.schedule": "offline", "boost.strategy": "relative"})
offline_rec = MarginRecorder("offline")
offline = fit_experiment(cfg, callbacks=[offline_rec], resume=False)
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
cfg = demo_config("vsepp", run="05_online", **base, **{"boost.schedule": "online", "boost.strategy": "relative"})
online_rec = MarginRecorder("online")
online = fit_experiment(cfg, callbacks=[online_rec], resume=False)
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
cfg = demo_config("vsepp", run="05_momentum", **base,
                  **{"boost.schedule": "momentum", "boost.strategy": "relative", "boost.momentum_teacher": 0.99})
momentum = fit_experiment(cfg)
plain = fit_experiment(demo_config("vsepp", run="05_plain", **base))
runs = {"VSE++": plain.cfg.run_dir, "DBL offline": offline.cfg.run_dir,
        "DBL online": online.cfg.run_dir, "DBL momentum": momentum.cfg.run_dir}
table = evaluate_runs(runs, split="test", data_root=demo_config("vsepp").data.root)
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
# `default_grid` (VSE++ and full USER × none, DBL relative, DBL absolute, mutual learning × 3
# seeds; the summary prints its training time). The GPU-sized `full_grid` adds the +SGE,
# +queue/UTO and +CGE backbones and the distillation baseline (`userlab ablate --grid full`). The
# README's results section holds the CPU-sized run.

# %%
from userlab import ablation

from userlab.notebook import repo_root

data_root = demo_config("vsepp").data.root
grid = (ablation.smoke_grid(data_root=data_root, out_dir=str(repo_root() / "runs" / "05_ablation_smoke")) if SMOKE
        else ablation.default_grid(data_root=data_root, out_dir=str(repo_root() / "runs" / "ablation")))
print(f"backbones: {', '.join(grid.backbones)} | strategies: {', '.join(grid.strategies)} | "
      f"seeds: {list(grid.seeds)} | {len(grid)} cells, DBL schedule {grid.dbl_schedule}")
results = ablation.run_ablation(grid, progress=False)
summary = ablation.summarize(results)
print(ablation.format_summary(summary))
print(f"{len(results)} cells, {results['train_seconds'].sum() / 60:.1f} min of training in all")
fig = ablation.plot_ablation(results)
viz.save(fig, "05_ablation", figures_dir())

# %% [markdown]
# ## Exercises
# 1. Compute the relative boosting loss (max form, both directions) of `S_t`, `S_a` below.
# 2. What are the absolute-boosting margins $(\gamma_1, \gamma_2)$ for $\gamma = 0.2$, $\beta = 1$?
# 3. Momentum schedule: with $m_0 = 0.9995$, what is the anchor momentum half-way through training (step 500 of 1000)?

# %%
from userlab import teach

torch.manual_seed(0)
S_t, S_a = torch.rand(4, 4) * 2 - 1, torch.rand(4, 4) * 2 - 1
answer_1 = None   # your computation
teach.check_relative_boost(S_t, S_a, answer_1)

# %%
answer_2 = None   # your answer: a pair (gamma_1, gamma_2)
teach.check_absolute_margins(answer_2)

# %%
answer_3 = None   # your computation
teach.check_momentum_schedule(500, 1000, answer_3)
