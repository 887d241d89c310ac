import json

import pytest

from userlab.config import ExperimentConfig, preset, validate
from userlab.errors import ConfigError


def test_defaults_match_the_papers():
    cfg = ExperimentConfig()
    assert cfg.momentum.momentum == 0.999 and cfg.momentum.queue_size == 2048
    assert (cfg.loss.mu, cfg.loss.gamma, cfg.loss.lambda_batch) == (90.0, 0.5, 20.0)
    assert (cfg.optim.lr, cfg.optim.text_lr_scale, cfg.optim.weight_decay) == (5e-4, 0.1, 1e-4)
    assert (cfg.optim.epochs, cfg.optim.lr_step, cfg.optim.grad_clip, cfg.optim.seed) == (20, 10, 2.0, 1)
    assert (cfg.boost.margin, cfg.boost.beta, cfg.boost.alpha) == (0.2, 1.0, 1.0)
    coco = preset("coco")
    assert (coco.momentum.queue_size, coco.loss.lambda_batch, coco.optim.epochs, coco.optim.lr_step) == (4096, 1.0, 25, 15)
    f30k = preset("f30k")
    assert (f30k.momentum.queue_size, f30k.loss.lambda_batch, f30k.optim.epochs, f30k.optim.lr_step) == (2048, 20.0, 20, 10)


@pytest.mark.parametrize("name", ["f30k", "coco", "demo", "vsepp"])
def test_json_round_trip(tmp_path, name):
    cfg = preset(name)
    cfg.to_json(tmp_path / "c.json")
    back = ExperimentConfig.from_json(tmp_path / "c.json")
    assert back == cfg


def test_replace_with_dotted_keys():
    cfg = preset("demo").replace(**{"optim.lr": 0.01, "model.enhancement": "cge"})
    assert cfg.optim.lr == 0.01 and cfg.model.enhancement == "cge"


@pytest.mark.parametrize("data, field, word", [
    ({"optim": {"lrr": 1}}, "optim.lrr", "unknown"),
    ({"bogus": 1}, "bogus", "unknown"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "number"),
    ({"optim": {"epochs": 2.5}}, "optim.epochs", "integer"),
    ({"momentum": {"enabled": "yes"}}, "momentum.enabled", "true/false"),
    ({"momentum": {"queue_size": -5}}, "momentum.queue_size", "must be in [1, 2^24], got -5"),
    ({"momentum": {"queue_size": 64}, "data": {"batch_size": 128}}, "momentum.queue_size", "smaller than the batch"),
    ({"model": {"enhancement": "sgee"}}, "model.enhancement", "not one of"),
    ({"momentum": {"momentum": 1.5}}, "momentum.momentum", "[0, 1]"),
    ({"model": {"text_encoder": "transformer"}}, "model.transformer_path", "local model folder"),
])
def test_bad_configs_name_the_field(data, field, word):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(data)
    assert err.value.field == field
    assert word in str(err.value)


def test_bad_json_file_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        ExperimentConfig.from_json(path)
    with pytest.raises(ConfigError, match="file not found"):
        ExperimentConfig.from_json(tmp_path / "missing.json")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("imagenet")


def test_train_max_images_must_be_positive():
    cfg = preset("demo")
    cfg.data.train_max_images = 0
    with pytest.raises(ConfigError, match="data.train_max_images"):
        validate(cfg)
