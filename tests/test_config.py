"""Config loader: the release's files load unchanged, every shipped config validates, bad configs fail early
with a message naming the key, and this code's own keys default to the release's recipe."""
import dataclasses
import glob
import os

import pytest
import torch
import yaml

from config import (RELEASE_KEYS, Config, ConfigError, check_world_size, from_dict, keys_markdown, load_config,
                    save_config, write_variant)
from config_keys import accepted_text, check_declared, declaration
from helpers import ROOT, declared_values, release_config, release_config_path, write_release_config

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
    values = release_config(kind)
    assert list(values) == list(RELEASE_KEYS)  # configs/ holds the release's file key for key
    for key, value in values.items():
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
    # as the release's authors wrote it (learning_rate: 1e-4, a string to YAML), it loads as the shipped copy
    assert load_config(release_config_path(kind)) == cfg


def release_learner(working_dir, noising_type, coefficient_type, model_type, dataset_type, data_size, dataset_path,
                    velocity_loss_ratio, p, eps, time_mean, time_std, cfg_scale, mix_ratio, cfg_drop_rate,
                    cfg_decay_time, l_schedule, l_init_ratio, l_end_ratio, total_steps, ema_decay_rate,
                    learning_rate, betas, weight_decay, batch_size, num_workers, prefetch_factor, eval_steps,
                    eval_batch_size, eval_NFE, eval_demo_steps, eval_demo_shape, ckpt_saving_steps, logging_steps,
                    seed):
    """A constructor with exactly the release's keys, as the release's train.py builds its learner from a config
    file (`Learner(**config)`): any other key is a TypeError."""
    return dataset_type, model_type


@pytest.mark.parametrize("source", ["release", "tiny"])
def test_written_config_holds_the_release_keys_alone_and_reads_back(source, tmp_path):
    path = (write_release_config("imagenet", tmp_path / "imagenet.yaml") if source == "release" else
            os.path.join(ROOT, "configs", "tiny_imagenet_cpu.yaml"))
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    written = yaml.safe_load(text)
    assert list(written) == list(RELEASE_KEYS)  # in the release's order, nothing else
    assert written["dataset_type"] == "Imagenet" and "data_path" not in written
    assert release_learner(**written) == ("Imagenet", cfg.model_type)  # the release's train.py takes it as it is
    companion = yaml.safe_load((tmp_path / "config.soflow.yaml").read_text())
    assert set(companion) == set(cfg.to_dict()) - set(RELEASE_KEYS)  # this code's keys, beside it
    assert load_config(str(tmp_path / "config.yaml")) == cfg  # and the pair reads back as the same config
    with pytest.raises(TypeError):
        release_learner(**written, precision="fp32")  # why this code's keys stay out of config.yaml


def test_companion_file_errors(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_imagenet_cpu.yaml"))
    save_config(cfg, tmp_path / "config.yaml")
    os.rename(tmp_path / "config.soflow.yaml", tmp_path / "kept.yaml")
    with pytest.raises(ConfigError, match=r"config.yaml keeps this code's other keys in .*config.soflow.yaml, "
                                          r"which is missing; copy that file beside it"):
        load_config(str(tmp_path / "config.yaml"))
    companion = yaml.safe_load((tmp_path / "kept.yaml").read_text())
    (tmp_path / "config.soflow.yaml").write_text(yaml.safe_dump({**companion, "seed": 1}))
    with pytest.raises(ConfigError, match=r"both set \['seed'\]; keep each key in one"):
        load_config(str(tmp_path / "config.yaml"))
    # a variant of a written config keeps the companion's keys, in one file
    os.replace(tmp_path / "kept.yaml", tmp_path / "config.soflow.yaml")
    variant = write_variant(tmp_path / "config.yaml", tmp_path / "variant.yaml", seed=7)
    assert load_config(variant) == from_dict({**cfg.to_dict(), "seed": 7})


@pytest.mark.parametrize("change, message", [
    ({"data_path": "./x"}, "'data_path' is now 'dataset_path'"),
    ({"dataset_type": "ImageNet"}, "dataset_type: ImageNet is spelled 'Imagenet'"),
])
def test_previous_spellings_are_refused_with_the_new_name(change, message):
    values = release_config("imagenet")
    values.pop("dataset_path")
    with pytest.raises(ConfigError, match=message):
        from_dict({**values, **change}, source="old.yaml")


def test_reference_values():
    b4 = load_config(os.path.join(ROOT, "configs", "imagenet.yaml"))
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
    return release_config("imagenet")


@pytest.mark.parametrize("change, message", [
    ({"learning_rat": 1e-4}, r"unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    ({"batch_size": "many"}, "'batch_size' must be an integer"),
    ({"time_mean": [0.1, 0.2]}, r"'time_mean' must be a list of 3 values, got \[0.1, 0.2\]"),
    ({"cfg_drop_rate": 0.0}, "cfg_scale=3.0 > 1 needs cfg_drop_rate > 0"),
    ({"cfg_scale": 1.0}, r"cfg_drop_rate=0.1 with cfg_scale=1.0: .*release requires cfg_drop_rate 0.*set "
                         r"cfg_drop_rate: 0.0, or cfg_scale > 1"),
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
    ({"posthoc_ema_sigma_rels": [0.05, 0.05]}, r"'posthoc_ema_sigma_rels' must be distinct .*got \[0.05, 0.05\]"),
    ({"learning_rate": float("inf")}, "'learning_rate' must be a finite number, got inf"),
    ({"eps": float("nan")}, "'eps' must be a finite number, got nan"),
    ({"weight_decay": float("nan")}, "'weight_decay' must be a finite number"),
    ({"time_mean": [0.0, float("-inf"), 0.0]}, "'time_mean' must be a finite number"),
    ({"precision": "auto"}, "'precision' is 'auto'; accepted: fp32, bf16, bf16-guidance"),
    ({"eval_demo_shape": [4, "x"]}, "'eval_demo_shape' must be a list of ints"),
    ({"attention": "flash"}, "attention 'flash' with precision 'fp32'.*set precision: bf16, or attention: auto"),
    ({"attention": "flash", "precision": "bf16-guidance"}, "flash kernel takes only float16 / bfloat16"),
])
def test_bad_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({**base(), **change}, source="x.yaml")


def test_unconditional_imagenet_is_allowed():
    """num_classes 0 on ImageNet latents, unguided: the config loads and builds a DiT whose label table is the
    null class alone, trained with labels=None; labels, and guidance (which needs classes), are refused."""
    unconditional = {**base(), "num_classes": 0, "cfg_scale": 1.0, "cfg_drop_rate": 0.0, "mix_ratio": 1.0}
    cfg = from_dict({**unconditional, "hidden_size": 32, "depth": 1, "num_heads": 2})
    model = cfg.build_model()
    assert not cfg.conditional and model.num_classes == 0
    assert model.network.y_embedder.embedding_table.num_embeddings == 1
    x = torch.randn(2, cfg.data_channels, cfg.data_size, cfg.data_size)
    loss, _ = model(x, objective=cfg.objective())
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="unconditional but labels were given"):
        model(x, torch.zeros(2, dtype=torch.long), objective=cfg.objective())
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        from_dict({**unconditional, "cfg_scale": 2.0, "cfg_drop_rate": 0.1})


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


def test_keys_page_matches_the_declarations():
    """docs/config_keys.md is the output of `python config.py --keys`: one home for the keys' meanings and accepted
    values, the fields' declarations."""
    generated = keys_markdown()
    with open(os.path.join(ROOT, "docs", "config_keys.md")) as f:
        assert f.read() == generated, \
            "docs/config_keys.md is out of date: regenerate it with `python config.py --keys > docs/config_keys.md`"
    for f in dataclasses.fields(Config):  # every key has a row with its meaning and what it accepts
        row = f"| `{f.name}` | {'yes' if f.name in RELEASE_KEYS else ''} | "
        assert row in generated and generated.split(row)[1].split("\n")[0].endswith(
            f"| {declaration(f)['help'].replace('|', chr(92) + '|')} | {accepted_text(f)} |".rstrip()), f.name
    assert "| `batch_size` | yes | `256` | global, over all ranks | >= 1 |" in generated
    assert "| `tracker` |  | `auto` | training's scalars and grids (auto: TensorBoard when importable) | one of: " \
           "`auto`, `tensorboard`, `wandb`, `none` |" in generated


def test_every_key_is_declared_with_its_meaning():
    for f in dataclasses.fields(Config):
        assert isinstance(declaration(f)["help"], str) and declaration(f)["help"].strip(), f.name
    assert declaration(dataclasses.fields(Config)[0])["section"]  # the page's first section has a name


DECLARED = [f for f in dataclasses.fields(Config) if declared_values(f) != ([], [])]


@pytest.mark.parametrize("f", DECLARED, ids=lambda f: f.name)
def test_every_declared_constraint_is_enforced(f):
    """Each value just outside a key's declaration is refused by the loader, naming the key; each value inside it
    passes the declared check (the combinations of keys have their own tests)."""
    outside, inside = declared_values(f)
    assert outside and inside
    for value in outside:
        with pytest.raises(ConfigError, match=rf"^x.yaml: '{f.name}' (must|items must|is )"):
            from_dict({**base(), f.name: value}, source="x.yaml")
    cfg = from_dict(base())
    for value in inside:
        setattr(cfg, f.name, value)
        check_declared(cfg)


def test_keys_command_prints_the_page(capsys):
    from config import main
    main(["--keys"])
    with open(os.path.join(ROOT, "docs", "config_keys.md")) as f:
        assert capsys.readouterr().out == f.read()


def test_non_finite_numbers_and_empty_files_are_refused(tmp_path):
    """YAML's .inf / .nan (and "inf" written as a string) are floats to PyYAML: refused for every key."""
    for text in ("learning_rate: .inf", "eps: .nan", "cfg_scale: 'inf'"):
        (tmp_path / "c.yaml").write_text(f"dataset_type: Imagenet\n{text}\n")
        with pytest.raises(ConfigError, match="must be a finite number"):
            load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(str(tmp_path / "empty.yaml"))


def test_meanflow_keys_default_to_soflow_and_are_checked():
    cfg = from_dict(base())
    assert cfg.method == "soflow"  # the release's configs train SoFlow
    mnist = dict(dataset_type="MNIST", data_size=28, patch_size=4, method="meanflow")
    cfg = from_dict(mnist)
    assert (cfg.data_channels, cfg.num_classes, cfg.model_type) == (1, 10, "DiT-B-4")
    assert (cfg.meanflow_ratio, cfg.meanflow_time_mean, cfg.meanflow_time_std) == (0.25, -0.4, 1.0)
    assert cfg.objective().method == "meanflow" and not cfg.objective().meanflow_guided
    for change, message in [
        ({"method": "shortcut"}, "'method' is 'shortcut'; accepted: soflow, meanflow"),
        ({"coefficient_type": "Trig"}, "method 'meanflow' needs noising_type: Linear and coefficient_type: Euler"),
        ({"meanflow_cfg_kappa": 0.5}, "needs a class-conditional model with cfg_drop_rate > 0"),
        ({"compile": True}, r"eager float32 network: remove \['compile'\]"),
        ({"precision": "bf16"}, r"remove \['precision'\]"),
        ({"meanflow_ratio": 1.5}, r"'meanflow_ratio' must lie in \[0, 1\]"),
        ({"meanflow_eps": 0.0}, "'meanflow_eps' must be > 0"),
        ({"data_size": 6, "patch_size": 2}, "dataset_type 'MNIST' needs .* data_size >= 8"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict({**mnist, **change}, source="x.yaml")
    guided = from_dict({**mnist, "meanflow_cfg_kappa": 0.5, "cfg_drop_rate": 0.1})
    assert guided.objective().meanflow_guided
