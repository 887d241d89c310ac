"""Issue 15's speed levers: CPU bf16 choice, rows only when logged, in-place torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch

from tiny import tiny_config, tiny_data
from userlab import train as train_mod
from userlab.accel import compile_dense_parts
from userlab.config import ExperimentConfig
from userlab.errors import ConfigError
from userlab.models.user import RetrievalModel
from userlab.train import Trainer, amp_dtype

CPU = torch.device("cpu")


def test_cpu_amp_choices(monkeypatch):
    assert amp_dtype("off", CPU) is None
    assert amp_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="optim.amp"):
        amp_dtype("fp16", CPU)
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    assert amp_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    assert amp_dtype("auto", CPU) is None


def test_native_bf16_needs_the_cpu_flag(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *a, **k):
        return real_open(fake if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr("builtins.open", fake_open)
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert train_mod.cpu_has_native_bf16() is False          # AVX512 alone: bf16 is emulated
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert train_mod.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert train_mod.cpu_has_native_bf16() is False


def _trainer(tmp_path, **overrides):
    cfg = tiny_config(tiny_data(tmp_path / "data"), tmp_path / "run",
                      **{"optim.amp": "off", "data.caption_augment": False, **overrides})
    return Trainer(cfg, progress=False, resume=False)


def test_train_step_row_matches_the_step_and_can_be_skipped(tmp_path):
    trainer = _trainer(tmp_path)
    batch = next(iter(trainer._loader(epoch=0, skip=0)))
    twin = copy.deepcopy(trainer.model).train()
    torch.manual_seed(3)
    loss, outputs = twin(batch)                      # same weights, queues and dropout draws
    sim = outputs["sim"].detach().double()
    torch.manual_seed(3)
    row = trainer.train_step(batch)
    assert row["loss"] == pytest.approx(float(loss.total.detach()), rel=1e-5)
    assert row["loss_queue"] == pytest.approx(float(loss.terms["queue"].detach()), rel=1e-5)
    assert row["pos_sim"] == pytest.approx(float(sim.diagonal().mean()), rel=1e-5)
    off = (sim.sum() - sim.diagonal().sum()) / (sim.numel() - sim.shape[0])
    assert row["neg_sim"] == pytest.approx(float(off), rel=1e-5)
    before = [p.detach().clone() for p in trainer.model.query_parameters()]
    assert trainer.train_step(batch, with_row=False) is None
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.query_parameters()))


def test_fit_logs_the_same_rows_when_no_callback_asks_for_every_step(tmp_path):
    import pandas as pd
    trainer = _trainer(tmp_path, **{"log_every": 2, "optim.epochs": 1})
    trainer.fit()
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    # rows at the first step of the epoch and at every log_every-th step, as before issue 15
    per_epoch = trainer._loader(0, 0).batch_sampler.batches_per_epoch()
    expected = sorted({0} | {s - 1 for s in range(1, per_epoch + 1) if s % 2 == 0})
    assert list(log["step"]) == expected
    assert log["loss"].notna().all() and log["grad_norm"].notna().all()


def test_compile_dense_parts_keeps_names_and_results():
    cfg = ExperimentConfig()
    cfg.model.region_dim, cfg.model.num_regions, cfg.model.embed_size = 8, 4, 16
    cfg.model.mlp_hidden, cfg.model.word_dim, cfg.model.vocab_size = 16, 16, 30
    cfg.momentum.queue_size, cfg.data.batch_size = 16, 4
    torch.manual_seed(0)
    eager = RetrievalModel(cfg).eval()
    compiled = copy.deepcopy(eager)
    assert compile_dense_parts(compiled, backend="eager") == 4   # SGE + MLP, query and key encoder
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = {"regions": torch.randn(4, 4, 8), "tokens": torch.tensor([[5, 6, 7], [8, 9, 0], [5, 0, 0], [9, 9, 9]]),
             "lengths": torch.tensor([3, 2, 1, 3])}
    assert torch.equal(compiled.encode_image(batch).embedding, eager.encode_image(batch).embedding)
    assert ExperimentConfig.from_dict({"optim": {"compile": True}}).optim.compile is True


def test_captions_are_tokenised_and_augmented_in_the_workers(tmp_path):
    """With data.num_workers > 0 the training process never tokenises: the workers do, and the
    batches equal the in-process ones (augmentation is a function of seed, epoch and caption)."""
    trainer = _trainer(tmp_path, **{"data.caption_augment": True, "data.num_workers": 1})
    tokenizer = trainer.data.train.tokenizer
    calls = []
    real_encode = tokenizer.encode

    def counting_encode(*args, **kwargs):
        calls.append(1)
        return real_encode(*args, **kwargs)

    tokenizer.encode = counting_encode
    with_workers = list(trainer._loader(epoch=1, skip=0))
    assert calls == []                                   # nothing ran in this process
    trainer.cfg.data.num_workers = 0
    in_process = list(trainer._loader(epoch=1, skip=0))
    assert len(calls) == sum(len(b["tokens"]) for b in in_process) > 0
    for a, b in zip(with_workers, in_process):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["regions"], b["regions"])


def test_similarities_stay_float32_under_bf16_autocast():
    cfg = ExperimentConfig()
    cfg.model.region_dim, cfg.model.num_regions, cfg.model.embed_size = 8, 4, 16
    cfg.model.mlp_hidden, cfg.model.word_dim, cfg.model.vocab_size = 16, 16, 30
    cfg.momentum.queue_size, cfg.data.batch_size = 16, 4
    torch.manual_seed(0)
    model = RetrievalModel(cfg).eval()
    batch = {"regions": torch.randn(4, 4, 8), "tokens": torch.tensor([[5, 6, 7], [8, 9, 0], [5, 0, 0], [9, 9, 9]]),
             "lengths": torch.tensor([3, 2, 1, 3]), "image_id": torch.arange(4)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, out = model(batch)
    assert out["img"].dtype == out["txt"].dtype == out["sim"].dtype == torch.float32
    expected = out["img"].double() @ out["txt"].double().t()
    assert torch.allclose(out["sim"].double(), expected, atol=1e-6)   # not bf16-rounded (~4e-3)
