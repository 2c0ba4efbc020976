"""The CPU demo: configs/digits_demo.yaml and benchmarks/digits_quality.py, end to end on a tiny budget."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import digits_quality
from config import load_config
from helpers import ROOT, write_config

# The demo recipe with a tiny network and a few steps: proves the path, not the quality.
TINY = dict(hidden_size=32, depth=2, num_heads=2, total_steps=4, batch_size=32, logging_steps=2,
            eval_demo_steps=4, ckpt_saving_steps=4, eval_steps=4, num_eval_samples=20, eval_batch_size=10)


def test_demo_config_is_the_reference_recipe_on_digits():
    cfg = load_config(os.path.join(ROOT, "configs", "digits_demo.yaml"))
    assert cfg.dataset_type == "Digits" and cfg.num_classes == 10
    assert 0 < cfg.velocity_loss_ratio < 1 and cfg.cfg_scale > 1 and cfg.cfg_drop_rate > 0  # SoFlow + CFG
    assert cfg.eval_demo_shape == [10, 10] and cfg.eval_NFE == 1  # one row per class, 1-NFE
    assert cfg.total_steps % cfg.ckpt_saving_steps == 0 and cfg.batch_size % 2 == 0  # checkpoint at the end
    model = cfg.build_model()
    assert sum(p.numel() for p in model.parameters()) < 6e6  # a CPU-sized DiT


def test_frechet_distance_and_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert digits_quality.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert digits_quality.frechet_distance(a, a + [1.0, 2.0, 0.0]) == pytest.approx(5.0, rel=1e-6)
    assert digits_quality.frechet_distance(a, 2 * a) == pytest.approx(3.0, rel=0.05)  # 3 * (2 - 1)^2
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[1, :2, :2] = 255  # one 8 x 8 cell (2 x 2 pixels at 16 x 16) fully on
    feats = digits_quality.pixel_features(images)
    assert feats.shape == (2, 64) and feats[0].max() == 0 and feats[1, 0] == 1 and feats[1, 1:].max() == 0


def test_euler_sampler_integrates_the_velocity():
    class Constant:  # v(x, t) = x0 - noise direction of a straight path to the point c: x_t = (1 - t) c + t x1
        def predict_velocity(self, x, t, labels):
            return (x - self.c) / t

    model = Constant()
    model.c = torch.full((3, 1, 8, 8), 0.5)
    noise = torch.randn(3, 1, 8, 8)
    for steps in (1, 2, 50):  # exact for straight paths at any step count
        assert torch.allclose(digits_quality.euler_sample(model, noise, None, steps), model.c, atol=1e-5)


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    work = tmp_path_factory.mktemp("digits_quality")
    cfg = write_config("digits_demo.yaml", work / "tiny.yaml", working_dir=str(work / "unused"), **TINY)
    result = digits_quality.main(["--train", "--config", cfg, "--out", str(work / "out"), "--nproc", "1",
                                  "--num-samples", "100", "--batch-size", "50"])
    return cfg, work, result


def test_quality_script_trains_both_models_and_reports_every_row(quality):
    cfg, work, result = quality
    runs = work / "out"
    # the demo's outputs: the 1-NFE EMA grid (one row per class) and the checkpoint inference.py reads
    grid = np.asarray(Image.open(runs / "soflow" / "figs" / "4.png"))
    assert grid.shape == (10 * 64 + 9 * 4, 10 * 64 + 9 * 4, 3)  # 8 px digits shown 8x, 4-pixel gaps
    assert (runs / "soflow" / "ckpts" / "4.pt").exists() and (runs / "fm" / "ckpts" / "4.pt").exists()
    assert load_config(str(runs / "fm.yaml")).velocity_loss_ratio == 1.0
    assert load_config(str(runs / "soflow.yaml")).velocity_loss_ratio == load_config(cfg).velocity_loss_ratio

    rows = {(r["model"], r["nfe"]): r for r in result["rows"]}
    assert set(rows) == {("real", None), ("SoFlow", 1), ("SoFlow", 2), ("FM", 1), ("FM", 2), ("FM", 4), ("FM", 50)}
    for key, row in rows.items():
        assert 0 <= row["agreement"] <= 1 and math.isfinite(row["frechet"]) and row["frechet"] >= 0, key
        if key[0] != "real":
            assert row["n"] == 100
    floor = rows[("real", None)]
    assert floor["agreement"] > 0.9 and floor["frechet"] < 1.0  # real digits against real digits
    assert rows[("FM", 1)]["frechet"] > floor["frechet"]  # an untrained model is far from the data
    assert len(result["acceptance"]) == 3 and set(result["training_seconds"]) == {"SoFlow", "FM"}

    saved = json.loads((runs / "results.json").read_text())
    assert saved["rows"] == result["rows"]
    table = (runs / "results.md").read_text()
    assert table.count("| SoFlow |") == 2 and table.count("| FM |") == 4 and "| real |" in table


def test_quality_script_on_given_checkpoints(quality, tmp_path):
    cfg, work, first = quality
    runs = work / "out"
    result = digits_quality.main(["--ckpt", str(runs / "soflow" / "ckpts" / "4.pt"),
                                  "--fm-ckpt", str(runs / "fm" / "ckpts" / "4.pt"), "--config", cfg,
                                  "--out", str(tmp_path), "--num-samples", "100", "--batch-size", "100"])
    assert result["training_seconds"] == {}
    for new, old in zip(result["rows"], first["rows"]):  # same checkpoints and seed, another batch size
        assert (new["model"], new["nfe"], new["n"]) == (old["model"], old["nfe"], old["n"])
        assert new["agreement"] == pytest.approx(old["agreement"], abs=0.02)
        assert new["frechet"] == pytest.approx(old["frechet"], rel=1e-3)
    with pytest.raises(SystemExit, match=r"--num-samples \(15\) divisible by 10, the number of classes"):
        digits_quality.main(["--ckpt", "x.pt", "--config", cfg, "--num-samples", "15"])
