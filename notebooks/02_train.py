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

# %% tags=["parameters"]
# Parameters (papermill can set them). None falls back to $USERLAB_DATA / $USERLAB_RUNS /
# $USERLAB_DEVICE / $USERLAB_PRESET, then to the demo scenes, runs/, the best device and "demo".
data_dir = None   # features: a SCAN / VSE precomp folder or the output of `userlab extract`
runs_dir = None   # checkpoints are reused from here; missing ones are trained into <runs_dir>/cache
device = None     # "cpu", "cuda", "cuda:1", ...
preset = None     # USER preset the models start from: "demo"; "f8k-cpu" for Flickr8k grid features

# %%
import torch
import matplotlib.pyplot as plt

from userlab import viz
from userlab.notebook import SMOKE, LiveCurves, figures_dir, open_lesson
from userlab.pipeline import describe_optim, prepare_data
from userlab.data.precomp import collate_batch
from userlab.models.user import RetrievalModel
from userlab.losses import batch_hal_loss
from userlab.train import pick_device

lesson = open_lesson(data_dir, runs_dir, device, preset)
device = pick_device(lesson.device)
cfg = lesson.config()       # in full mode on the demo: the config `make demo` trained
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
# The `Trainer` optimises with AdamW on the recipe of `cfg.optim`; the cell below prints that
# recipe for this config (`describe_optim`: the learning rate of every epoch as the Trainer sets
# it, constant when `optim.lr_step = 0`, weight decay, gradient clipping, autocast). It keeps the
# best checkpoint by dev rSum and writes CSV logs into `run_dir`. `lesson.fit` first looks for a
# finished run made with this very config (`make demo` trained it as `runs/demo_user`) and loads
# it, drawing its logged curves; only a config never trained before is trained here
# (`Trainer(cfg).fit()`, with a progress bar, resumable) and cached in `runs/cache/<config hash>`.

# %%
print("optimisation:", describe_optim(cfg))

# %%
live = LiveCurves(every=10)   # redraws clear this cell's output
run = lesson.fit(cfg, callbacks=[live])
run.history

# %%
train_log, eval_log = viz.read_logs(run.run_dir)
print("lr the run logged, per epoch:", train_log.groupby("epoch")["lr"].first().rename(lambda e: int(e) + 1).to_dict()
      if "lr" in train_log else "(no train log)")
fig = viz.plot_loss_terms({"USER": train_log})
viz.save(fig, "02_loss_terms", figures_dir())

# %% [markdown]
# ## Exercises
# Write each function yourself. The check cell under it runs your function on several hidden
# inputs, edge cases included ($B = 1$, tied scores, masked keys, float16), compares the results
# with userlab's own code and says *what* is wrong (a shape, a sign, a missing term, the case that
# fails), never the expected numbers. Until you write a function its check reports
# "not implemented". The notebook forgets the library functions these exercises replace.
#
# ### Exercise 2.1: the mini-batch term
# With $S = VT^\top$ ($B\times B$, rows images, positives on the diagonal), $\mu = 90$, $\gamma = 0.5$:
#
# $$L_{mb} = \frac1B\sum_i \Big[\tfrac1\mu\log\big(1+\textstyle\sum_{j\ne i}e^{\mu(S_{ji}-\gamma)}\big) + \tfrac1\mu\log\big(1+\sum_{j\ne i}e^{\mu(S_{ij}-\gamma)}\big) - \log\big(1+\max(0,S_{ii})\big)\Big]$$
#
# Write `minibatch_term(sim, mu, gamma)` returning this scalar. Mind float16 input:
# $e^{\mu(S-\gamma)}$ can reach $e^{45}$.

# %%
from userlab import teach

for shortcut in ("batch_hal_loss", "unified_objective", "ema_update_"):
    globals().pop(shortcut, None)  # you write these below


def minibatch_term(sim, mu=90.0, gamma=0.5):
    """USER's mini-batch term L_mb of a (B, B) similarity matrix (a scalar tensor)."""
    ### BEGIN SOLUTION
    S = sim.float() if sim.dtype == torch.float16 else sim
    off_diagonal = ~torch.eye(S.shape[0], dtype=torch.bool)
    logits = (mu * (S - gamma)).masked_fill(~off_diagonal, float("-inf"))
    smooth = lambda dim: torch.nn.functional.softplus(torch.logsumexp(logits, dim=dim)) / mu  # log(1 + Σ e^x) / μ
    positive = -torch.log1p(torch.relu(S.diagonal()))
    return (smooth(0) + smooth(1) + positive).mean()
    ### END SOLUTION


teach.check_minibatch_term(minibatch_term)

# %% [markdown]
# ### Exercise 2.2: the queue term
# Image queries $v_i$ meet the **text** queue $Q_t$ ($E\times K$) as negatives and their own
# caption's momentum key $\hat t_i$ as the positive; caption queries $t_i$ meet the image queue $Q_v$
# and $\hat v_i$:
#
# $$L_q = \frac1B\sum_i\Big[\tfrac1\mu\log\big(1+\textstyle\sum_k e^{\mu(v_i\cdot Q_t[:,k]-\gamma)}\big) - \log\big(1+\max(0, v_i\cdot\hat t_i)\big)\Big] + \big(\text{the same with } t_i, Q_v, \hat v_i\big)$$
#
# Write `queue_term(v, t, v_hat, t_hat, Q_v, Q_t, mu, gamma, mask)`. `mask` is None or a bool
# `(B, K)` (True: the key may be a negative), used in both directions.

# %%
def queue_term(v, t, v_hat, t_hat, Q_v, Q_t, mu=90.0, gamma=0.5, mask=None):
    """USER's queue term L_q (a scalar tensor)."""
    ### BEGIN SOLUTION
    def one_direction(query, key, queue):
        query, key, queue = query.float(), key.float(), queue.float()
        logits = mu * (query @ queue - gamma)                                  # (B, K)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        negative = torch.nn.functional.softplus(torch.logsumexp(logits, dim=1)) / mu
        positive = -torch.log1p(torch.relu((query * key).sum(dim=1)))
        return (negative + positive).mean()
    return one_direction(v, t_hat, Q_t) + one_direction(t, v_hat, Q_v)
    ### END SOLUTION


teach.check_queue_term(queue_term)

# %% [markdown]
# ### Exercise 2.3: the momentum (EMA) step
# The key encoder follows the query encoder: $\theta_k \leftarrow m\,\theta_k + (1-m)\,\theta_q$.
# Write `ema_step(theta_k, theta_q, m)` returning the new key weights (do not change `theta_q`).

# %%
def ema_step(theta_k, theta_q, m):
    """Key weights after one momentum step."""
    ### BEGIN SOLUTION
    return m * theta_k + (1 - m) * theta_q
    ### END SOLUTION


teach.check_ema_step(ema_step)

# %% [markdown]
# ### Predict, then run: masking same-image keys in the queue
# The text queue holds the momentum keys of the last few batches, with their image ids. With
# `momentum.mask_same_image = True`, userlab passes `MomentumQueue.negatives_mask(ids)` to the
# queue term. What happens to the queue negatives of an image query?
#
# - **(a)** Nothing: the queue only holds captions of *earlier* batches, never of the query's own image.
# - **(b)** Keys of captions of the query's own image leave its negatives, and the queue term's
#   negative part drops, since those keys are the ones most similar to the query.
# - **(c)** Those keys become extra positives, and the queue term grows.
#
# Write your prediction, then run the next cell.

# %%
### BEGIN SOLUTION
prediction_queue_mask = "b"
### END SOLUTION

# %%
import torch.nn.functional as F
from userlab import losses
from userlab.momentum import MomentumQueue

torch.manual_seed(0)
E, K, B = 16, 24, 4
images = F.normalize(torch.randn(8, E), dim=1)                      # 8 images
caption_of = lambda i: F.normalize(images[i] + 0.4 * torch.randn(E), dim=0)  # noisy copy
text_queue = MomentumQueue(E, K)
for step in range(K // B):                                          # fill the queue
    ids = torch.randint(0, 8, (B,))
    text_queue.enqueue(torch.stack([caption_of(int(i)) for i in ids]), ids)
query_ids = torch.arange(B)
v, t = images[query_ids], torch.stack([caption_of(int(i)) for i in query_ids])
image_queue = F.normalize(torch.rand(E, K), dim=0)
mask = text_queue.negatives_mask(query_ids, same_image=True)
negative_part = {name: float(losses.unified_objective(v @ t.T, v, t, v, t, image_queue, text_queue.keys,
                                                      queue_mask=(m, None)).terms["queue_negative"])
                 for name, m in (("no mask", None), ("mask_same_image", mask))}
same = (text_queue.ids[None, :] == query_ids[:, None]).sum(1)
print("same-image keys per query:", same.tolist(), "| negatives kept:", mask.sum(1).tolist(), "of", K)
print("queue negative part:", {k: round(x, 4) for k, x in negative_part.items()})
dropped = bool((mask.sum(1) == K - same).all() and same.sum() > 0)
lower = negative_part["mask_same_image"] < negative_part["no mask"]
measured = "b" if dropped and lower else ("a" if bool((mask.sum(1) == K).all()) else "c")
teach.reveal(prediction_queue_mask, measured, {
    "a": "nothing changes.", "b": "same-image keys leave the negatives and the negative part drops.",
    "c": "same-image keys become positives."},
    evidence=f"{int(same.sum())} same-image keys removed, negative part "
             f"{negative_part['no mask']:.4f} → {negative_part['mask_same_image']:.4f}.")
