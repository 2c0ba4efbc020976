"""Config loader: the release's files load unchanged, every shipped config validates, bad configs fail early
with a message naming the key, and this code's own keys default to the release's recipe."""
import glob
import os

import pytest
import yaml

from config import RELEASE_KEYS, ConfigError, check_world_size, from_dict, load_config, save_config
from helpers import RELEASE_CONFIGS, write_release_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    if "tiny" in path or "digits" in path:
        assert cfg.build_model().num_classes == cfg.num_classes  # small enough to build
    assert cfg.objective().total_steps == cfg.total_steps


@pytest.mark.parametrize("kind", ["imagenet", "cifar"])
def test_release_config_loads_unchanged_and_runs_its_recipe(kind, tmp_path):
    path = write_release_config(kind, tmp_path / f"{kind}.yaml")
    cfg = load_config(path)
    for key, value in RELEASE_CONFIGS[kind].items():
        assert getattr(cfg, key) == value, key
    # this code's own keys, at their defaults: the release's recipe
    assert (cfg.precision, cfg.tf32, cfg.compile, cfg.fused_optimizer, cfg.channels_last) == ("fp32", True, False,
                                                                                           False, False)
    assert cfg.attention == "auto" and cfg.num_eval_samples == 50_000
    if kind == "imagenet":
        assert (cfg.data_channels, cfg.num_classes, cfg.optimizer, cfg.ema_steps) == (4, 1000, "AdamW", 1)
        assert cfg.conditional and cfg.vae == "stabilityai/sd-vae-ft-mse" and cfg.latent_scale == 0.18215
    else:
        assert (cfg.data_channels, cfg.num_classes, cfg.optimizer, cfg.ema_steps) == (3, 0, "RAdam", 16)
        assert not cfg.conditional and cfg.dropout == 0.3 and cfg.augment_p == 0.12
    # the shipped copy of the release's file holds the same values
    shipped = load_config(os.path.join(ROOT, "configs", "imagenet_B4.yaml" if kind == "imagenet" else "cifar.yaml"))
    assert shipped == cfg


def test_written_config_uses_the_release_names_in_its_order(tmp_path):
    cfg = load_config(write_release_config("imagenet", tmp_path / "imagenet.yaml"))
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    written = yaml.safe_load(text)
    assert list(written)[:len(RELEASE_KEYS)] == list(RELEASE_KEYS)
    assert written["dataset_type"] == "Imagenet" and "data_path" not in written
    assert load_config(str(tmp_path / "config.yaml")) == cfg  # and it reads back as the same config


@pytest.mark.parametrize("change, message", [
    ({"data_path": "./x"}, "'data_path' is now 'dataset_path'"),
    ({"dataset_type": "ImageNet"}, "dataset_type: ImageNet is spelled 'Imagenet'"),
])
def test_previous_spellings_are_refused_with_the_new_name(change, message):
    values = dict(RELEASE_CONFIGS["imagenet"])
    values.pop("dataset_path")
    with pytest.raises(ConfigError, match=message):
        from_dict({**values, **change}, source="old.yaml")


def test_reference_values():
    b4 = load_config(os.path.join(ROOT, "configs", "imagenet_B4.yaml"))
    assert (b4.cfg_scale, b4.mix_ratio, b4.cfg_drop_rate, b4.cfg_decay_time) == (3.0, 0.25, 0.1, 0.8)
    assert b4.optimizer == "AdamW" and b4.ema_steps == 1 and b4.batch_size == 256 and b4.total_steps == 400_000
    cifar = load_config(os.path.join(ROOT, "configs", "cifar.yaml"))
    assert cifar.optimizer == "RAdam" and cifar.ema_steps == 16 and cifar.model_type == "UNet"
    assert cifar.l_end_ratio == 0.0003125 and cifar.time_mean == [-0.9, -4.0, -0.9]
    for name in ("B2", "M2", "L2", "XL2"):
        cfg = load_config(os.path.join(ROOT, "configs", f"imagenet_{name}.yaml"))
        assert cfg.total_steps == 1_200_000 and cfg.model_type == f"DiT-{name[:-1]}-2"
        assert cfg.objective() == b4.objective().__class__(**{**b4.objective().__dict__, "total_steps": 1_200_000})


def base():
    return dict(RELEASE_CONFIGS["imagenet"])


@pytest.mark.parametrize("change, message", [
    ({"learning_rat": 1e-4}, r"unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    ({"batch_size": "many"}, "'batch_size' must be an integer"),
    ({"time_mean": [0.1, 0.2]}, "'time_mean' needs 3 values"),
    ({"cfg_drop_rate": 0.0}, "cfg_scale=3.0 > 1 needs cfg_drop_rate > 0"),
    ({"model_type": "UNet", "num_classes": 0, "cfg_scale": 1.0}, "'Imagenet'.*'UNet'"),
    ({"model_type": "UNet"}, "model_type 'UNet' is unconditional, but num_classes=1000"),
    ({"data_channels": 3}, "4-channel SD-VAE latents"),
    ({"num_classes": 0}, "cfg_scale=3.0 > 1 needs a class-conditional model"),
    ({"model_type": "DiT-H-2"}, "'model_type' is 'DiT-H-2'; accepted: UNet, DiT-B-4"),
    ({"l_schedule": "Step"}, "'Step'; accepted: Const, Linear, Cosine, Exponent"),
    ({"noising_type": "VP"}, "'noising_type' is 'VP'"),
    ({"data_size": 30}, "data_size=30 is not divisible by the DiT patch size 4"),
    ({"velocity_loss_ratio": 1.5}, r"'velocity_loss_ratio' must lie in \[0, 1\]"),
    ({"model_channels": 64}, "do not apply to model_type 'DiT-B-4'"),
    ({"use_fp16": True}, "unknown key"),
    ({"betas": [0.9, 1.2]}, "betas"),
    ({"betas": [0.9]}, "'betas' must be a list of 2"),
    ({"precision": "auto"}, "'precision' is 'auto'; accepted: fp32, bf16, bf16-guidance"),
    ({"eval_demo_shape": [4, "x"]}, "'eval_demo_shape' must be a list of ints"),
    ({"attention": "flash"}, "attention 'flash' with precision 'fp32'.*set precision: bf16, or attention: auto"),
    ({"attention": "flash", "precision": "bf16-guidance"}, "flash kernel takes only float16 / bfloat16"),
])
def test_bad_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({**base(), **change}, source="x.yaml")


def test_unconditional_imagenet_is_allowed():
    cfg = from_dict({**base(), "num_classes": 0, "cfg_scale": 1.0, "cfg_drop_rate": 0.0, "mix_ratio": 1.0})
    assert not cfg.conditional and cfg.build_model.__self__ is cfg


def test_batch_not_divisible_by_world_size():
    cfg = from_dict({**base(), "batch_size": 255})
    with pytest.raises(ConfigError, match="batch_size'=255 .* world size 2"):
        check_world_size(cfg, 2)
    check_world_size(from_dict(base()), 8)


def test_cifar_defaults_and_bad_yaml(tmp_path):
    cfg = from_dict({"dataset_type": "CIFAR10"})
    assert (cfg.model_type, cfg.num_classes, cfg.data_channels, cfg.optimizer, cfg.ema_steps) == ("UNet", 0, 3, "RAdam", 16)
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="dataset_type 'CIFAR10' is unconditional"):
        from_dict({"dataset_type": "CIFAR10", "model_type": "DiT-B-4", "num_classes": 10})
