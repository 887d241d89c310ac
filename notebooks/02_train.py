# %% [markdown]
# # 02 · Training USER: one batch by hand, then the Trainer
#
# **Learning goals**
# - follow one batch through the dual encoder: embeddings, similarity matrix, loss terms;
# - understand USER's Unified Training Objective over mini-batch and queue negatives;
# - watch the momentum (EMA) update and the two queues filling up;
# - train with the `Trainer` and read its live curves.
#
# **Equations in this notebook** ($V, T \in \mathbb{R}^{B\times E}$ unit-norm image and caption embeddings)
#
# | idea | formula | userlab |
# |---|---|---|
# | similarity | $S = V T^\top$ (rows images, columns captions) | `RetrievalModel.forward` |
# | mini-batch term | $L_{mb} = \frac1B\sum_i \big[\tfrac1\mu\log(1+\sum_{j\ne i}e^{\mu(S_{ji}-\gamma)}) + \tfrac1\mu\log(1+\sum_{j\ne i}e^{\mu(S_{ij}-\gamma)}) - \log(1+\max(0,S_{ii}))\big]$ | `losses.batch_hal_loss` |
# | queue term | $L_q = \frac1B\sum_i\big[\tfrac1\mu\log(1+\sum_k e^{\mu(v_i\cdot Q^t_k-\gamma)}) - \log(1+\max(0, v_i\cdot\hat t_i))\big] + (t \leftrightarrow v)$ | `losses.unified_objective` |
# | total | $L = \lambda L_{mb} + L_q$, $\mu=90$, $\gamma=0.5$, $\lambda=20$ (F30K) | `losses.unified_objective` |
# | momentum encoders | $\theta_k \leftarrow m\,\theta_k + (1-m)\,\theta_q$, $m = 0.999$ | `momentum.ema_update_` |
# | queues | FIFO of the last $K$ key embeddings (and their image ids) | `momentum.MomentumQueue` |

# %%
import torch
import matplotlib.pyplot as plt

from userlab import viz
from userlab.notebook import SMOKE, LiveCurves, demo_config, demo_data, figures_dir
from userlab.pipeline import prepare_data
from userlab.data.precomp import collate_batch
from userlab.models.user import RetrievalModel
from userlab.losses import batch_hal_loss
from userlab.train import Trainer, pick_device

device = pick_device()
print("smoke mode:", SMOKE, "| device:", device)
demo_data()
cfg = demo_config("demo", run="02_train")
data = prepare_data(cfg)
torch.manual_seed(cfg.optim.seed)
model = RetrievalModel(cfg, vocab=data.vocab).to(device).train()
print(cfg.model)

# %% [markdown]
# ## 1. One batch by hand

# %%
batch = collate_batch([data.train[i] for i in range(cfg.data.batch_size)])
batch = {k: v.to(device) for k, v in batch.items()}
for k, v in batch.items():
    print(f"{k:15s} {tuple(v.shape)} {v.dtype}")

img, txt = model.encoder(batch)
S = img.embedding @ txt.embedding.t()
print("image embeddings", tuple(img.embedding.shape), "caption embeddings", tuple(txt.embedding.shape))
print("SGE alpha", tuple(img.alpha.shape), "region attention beta", tuple(img.beta.shape))

fig, ax = plt.subplots(figsize=(4.5, 4))
im = ax.imshow(S.detach().cpu(), cmap="viridis")
ax.set(title="S = V Tᵀ before training", xlabel="caption", ylabel="image")
fig.colorbar(im, ax=ax)
viz.save(fig, "02_similarity_matrix", figures_dir())

# %% [markdown]
# The forward pass of `RetrievalModel` runs all five USER steps and returns every loss term.
# Positives sit on the diagonal. Two captions of the same image can share a batch: their pair is
# then an off-diagonal "negative" that is really a positive. How many such pairs this batch holds
# (built from consecutive captions, so whole images), and how many a shuffled batch of the same
# size holds on average (the Trainer shuffles):

# %%
ids = batch["image_id"]
same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
n_pairs, per_image, n_caps = len(ids) * (len(ids) - 1) // 2, 5, len(data.train)
print(f"{int(same.sum()) // 2} same-image caption pairs among {n_pairs} off-diagonal pairs of this batch "
      f"({len(set(ids.tolist()))} images for {len(ids)} captions); a shuffled batch: "
      f"{n_pairs * (per_image - 1) / (n_caps - 1):.2f} on average")

# %%
ptr_before = int(model.image_queue.ptr)
loss, outputs = model(batch)
print({k: round(float(v), 4) for k, v in loss.terms.items()}, "total", round(float(loss.total), 4))
print("queue pointer", ptr_before, "->", int(model.image_queue.ptr))
hal = batch_hal_loss(S.detach(), mu=cfg.loss.mu, gamma=cfg.loss.gamma)
print("mini-batch term recomputed from S:", round(float(hal.total), 4))

# %% [markdown]
# ## 2. The momentum update and the queues filling up
# A step of the optimiser moves the query encoder; the next forward pass moves the key encoder a
# fraction $1-m$ of the way towards it. Before each forward pass we keep a copy of both queues:
# the forward pass enqueues the batch's own keys, and a queue looked at afterwards would hold
# every query's own image.

# %%
opt = torch.optim.AdamW(model.query_parameters(), lr=cfg.optim.lr)
name, q = next(iter(model.encoder.named_parameters()))
k_param = dict(model.key_encoder.named_parameters())[name]
fills = []
for step in range(6):
    b = collate_batch([data.train[i] for i in range(step * cfg.data.batch_size, (step + 1) * cfg.data.batch_size)])
    b = {k: v.to(device) for k, v in b.items()}
    gap_before = (k_param - q).abs().mean().item()
    queues_before = {"image": viz.snapshot_queue(model.image_queue), "text": viz.snapshot_queue(model.text_queue)}
    loss, outputs = model(b)
    gap_after = (k_param - q).abs().mean().item()   # the forward pass took the EMA step
    opt.zero_grad(); loss.total.backward(); opt.step()
    fills.append(int((model.image_queue.ids >= 0).sum()))
    ratio = (f"after/before {gap_after / gap_before:.4f} (m = {cfg.momentum.momentum})"
             if gap_before > 1e-5 else "")   # below that, float32 rounding hides the step
    print(f"step {step}: |θk-θq| before EMA {gap_before:.2e} {ratio}, filled queue slots {fills[-1]}")

# %% [markdown]
# The queues as the last step's loss saw them: image queries against the **text** queue (top),
# caption queries against the **image** queue (bottom), queue negatives beside the batch
# negatives of the same queries, and the keys of each query's own image already in the queue
# (false negatives unless `momentum.mask_same_image` is on).

# %%
fig = viz.plot_queues(queues_before["image"], queues_before["text"], outputs["img"].detach(),
                      outputs["txt"].detach(), b["image_id"], batch_sims=outputs["sim"].detach())
viz.save(fig, "02_queue_state", figures_dir())
S_last = outputs["sim"].detach().cpu()
off = ~torch.eye(len(S_last), dtype=torch.bool)
written = queues_before["text"].written_at >= 0       # the rest are USER's random initial keys
q_neg = (outputs["img"].detach().cpu() @ queues_before["text"].keys[:, written]).flatten()
same_keys = viz.same_image_counts(queues_before["text"].ids, b["image_id"])
print(f"mean similarity: batch negatives {S_last[off].mean():.3f}, text-queue negatives {q_neg.mean():.3f} "
      f"({int(written.sum())} written keys, {int((~written).sum())} random), positives {S_last.diag().mean():.3f}")
print(f"queries with a same-image key in the text queue before the enqueue: {(same_keys > 0).mean():.0%}")
assert torch.isfinite(q_neg).all() and 0.0 <= (same_keys > 0).mean() <= 1.0

# %% [markdown]
# ## 3. The Trainer with live curves
# AdamW, step decay, gradient clipping at 2.0, dev evaluation each epoch (rSum), best checkpoint,
# CSV logs in `run_dir`, AMP on a GPU. Re-running the cell resumes from the last checkpoint.

# %%
live = LiveCurves(every=10)
trainer = Trainer(cfg, data=data, callbacks=[live])
history = trainer.fit()
history

# %%
train_log, eval_log = viz.read_logs(cfg.run_dir)
fig = viz.plot_loss_terms({"USER": train_log})
viz.save(fig, "02_loss_terms", figures_dir())

# %% [markdown]
# ## Exercises
# 1. Compute the mini-batch term $L_{mb}$ of `S_ex` below with $\mu=90$, $\gamma=0.5$ (a number).
# 2. One EMA step: given `theta_k`, `theta_q` and $m=0.9$, what is the new $\theta_k$?
# 3. A queue of $K=100$ keys starts at pointer 0 and receives batches of $B=32$: where is the
#    pointer after 7 steps?

# %%
from userlab import teach

torch.manual_seed(0)
S_ex = torch.nn.functional.normalize(torch.randn(6, 8), dim=1) @ torch.nn.functional.normalize(torch.randn(6, 8), dim=1).t()
answer_1 = None   # your computation
teach.check_hal_term(S_ex, answer_1)

# %%
theta_k, theta_q = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
answer_2 = None   # your computation
teach.check_ema(theta_k, theta_q, 0.9, answer_2)

# %%
answer_3 = None   # your answer
teach.check_queue_pointer(100, 32, 7, answer_3)
