# %% [markdown]
# # 05 · Deep Boosting Learning: beating your own anchor
#
# **Learning goals**
# - state DBL's idea: a target branch must beat the anchor's *own* distances by a margin;
# - compute the relative and absolute boosting losses and their soft-adaptation margins;
# - compare the offline, online and momentum schedules;
# - read an ablation of USER's parts and of DBL against distillation and mutual learning.
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
# its margins. Both margins are drawn for the same dev queries.

# %%
cfg = demo_config("vsepp", run="05_offline", **base, **{"boost.schedule": "offline", "boost.strategy": "relative"})
offline_rec = MarginRecorder("offline")
offline = fit_experiment(cfg, callbacks=[offline_rec], resume=False)
records = offline_rec.records
last = records[records.epoch == records.epoch.max()]
fig = viz.plot_margin_distributions(last, hue="model")
viz.save(fig, "05_anchor_vs_target", figures_dir())
last.groupby("model")["margin"].describe()[["mean", "50%", "min"]]

# %% [markdown]
# ## 2. Margins of anchor and target during training, and boosting violations
# The online schedule trains both branches together, so the gap can be watched as it opens.

# %%
cfg = demo_config("vsepp", run="05_online", **base, **{"boost.schedule": "online", "boost.strategy": "relative"})
online_rec = MarginRecorder("online")
online = fit_experiment(cfg, callbacks=[online_rec], resume=False)
fig = viz.plot_margin_distributions(online_rec.records, hue="model")
viz.save(fig, "05_margins_per_epoch", figures_dir())
online_rec.violations

# %% [markdown]
# ## 3. The three schedules side by side
# Same backbone (VSE++), same epochs; the momentum schedule's anchor is an EMA of the target.

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
# ## 4. The ablation
# A grid of backbones (VSE++, +SGE, +queue/UTO, +CGE, full USER) × strategies (none, DBL relative,
# DBL absolute, distillation, mutual learning) × seeds. Here a smoke-sized grid; the README's
# results section holds the CPU-sized one (`userlab ablate`).

# %%
from userlab import ablation

from userlab.notebook import repo_root

data_root = demo_config("vsepp").data.root
grid = (ablation.smoke_grid(data_root=data_root, out_dir=str(repo_root() / "runs" / "05_ablation_smoke")) if SMOKE
        else ablation.default_grid(data_root=data_root, out_dir=str(repo_root() / "runs" / "ablation")))
results = ablation.run_ablation(grid, progress=False)
summary = ablation.summarize(results)
print(ablation.format_summary(summary))
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
    rep = dg.diagnose_run(run_dir, split="test", data_root=demo_config("vsepp").data.root)
    diag_rows.append({"model": name, **dg.key_numbers(rep),
                      **{f"t2i R@1 {r['group']}": r["R@1"] for r in rep["recall_by_group"]["rows"]}})
diag = pd.DataFrame(diag_rows).set_index("model")
assert np.isfinite(diag.select_dtypes("number").fillna(0).to_numpy()).all()
assert diag["collapse"].between(0, 1).all()
diag.round(3).T

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
