"""sample.py: grids of chosen classes from a checkpoint, drawn by the sampling function of training and inference.py."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import sample
from checkpoints import companion_path
from config import load_config
from distributed import attention_context
from helpers import grid_tiles, make_run, make_tiny_vae

pytestmark = pytest.mark.usefixtures("single_process")  # conftest.py

UNCONDITIONAL = dict(num_classes=0, cfg_scale=1.0, cfg_drop_rate=0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sample"))


def draw(ckpt, out, *args, device=None):
    """sample.py in-process (on `device`, else its default); returns (the written image, the raw uint8 samples)."""
    images = sample.main(["--ckpt", str(ckpt), "--out", str(out), *args,
                          *(["--device", str(device)] if device is not None else [])])
    return np.asarray(Image.open(out)), images


def test_grid_of_chosen_classes_enlarged_one_row_per_class(run, tmp_path, device):
    _, ckpt = run
    grid, images = draw(ckpt, tmp_path / "a.png", "--classes", "3", "1", "4", "--per-class", "2", "--nfe", "1",
                        "--seed", "0", device=device)
    assert grid.shape == (3 * 64 + 2 * 4, 2 * 64 + 4, 3)  # 8 px digits enlarged 8x, 4 black pixels apart
    t = grid_tiles(grid, rows=3, cols=2)
    assert np.array_equal(t.reshape(6, 8, 8, 3), images)  # row-major: sample i = row * per_class + column
    assert len({bytes(x) for x in images}) == 6
    # deterministic per seed; another seed changes every sample
    again, _ = draw(ckpt, tmp_path / "b.png", "--classes", "3", "1", "4", "--per-class", "2", "--seed", "0", device=device)
    assert np.array_equal(again, grid)
    other, _ = draw(ckpt, tmp_path / "c.png", "--classes", "3", "1", "4", "--per-class", "2", "--seed", "1", device=device)
    assert all(not np.array_equal(a, b) for a, b in zip(grid_tiles(other, 3, 2).reshape(6, -1), t.reshape(6, -1)))
    # the class makes the row: the same noise (same sample indices) under class 7 instead of 3 gives another row
    swapped, _ = draw(ckpt, tmp_path / "d.png", "--classes", "7", "1", "4", "--per-class", "2", "--seed", "0",
                      device=device)
    s = grid_tiles(swapped, 3, 2)
    assert np.array_equal(s[1:], t[1:]) and all(not np.array_equal(s[0, c], t[0, c]) for c in range(2))
    # --scale 1 --gap 0: the raw size
    raw, _ = draw(ckpt, tmp_path / "e.png", "--classes", "3", "1", "4", "--per-class", "2", "--seed", "0",
                  "--scale", "1", "--gap", "0", device=device)
    assert np.array_equal(raw, t.swapaxes(1, 2).reshape(3 * 8, 2 * 8, 3))


def test_sample_py_draws_what_inference_draws(run, tmp_path, device, monkeypatch):
    """The shared sampling path: sample.py's grid of classes 0..9 (one each) is, pixel for pixel, the
    class-balanced dump of inference.py and inference.generate for the same seed and NFE (on one device)."""
    cfg, ckpt = run
    if device.type == "cpu":  # inference.py takes CUDA (cuda:LOCAL_RANK) wherever it exists
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, images = draw(ckpt, tmp_path / "grid.png", "--classes", *map(str, range(10)), "--per-class", "1",
                     "--nfe", "2", "--seed", "5", device=device)
    inference.main(["--ckpt", ckpt, "--class-balanced", "--num-samples", "10", "--eval-batch-size", "10",
                    "--eval-NFE", "2", "--seed", "5", "--out", str(tmp_path)])  # --config: the one beside
    with np.load(tmp_path / "2_2NFE_5.npz") as f:
        assert np.array_equal(f["arr_0"], images) and f["arr_1"].tolist() == list(range(10))
    model = inference.load_sampling_model(load_config(cfg), ckpt, device)
    with attention_context(load_config(cfg).attention, device):  # sample.py's and inference.py's SDPA kernel
        generated, labels = inference.generate(model, range(10), 2, 5, device, class_balanced=True)
    assert np.array_equal(generated.numpy(), images) and labels.tolist() == list(range(10))


def test_defaults_and_the_config_beside_the_checkpoint(run, tmp_path, device):
    cfg, ckpt = run
    # no --config: the run's config.yaml (the parent of ckpts/); defaults: eval_demo_shape [10, 2], seed 42, 1 NFE
    grid, images = draw(ckpt, tmp_path / "a.png", device=device)
    grid_tiles(grid, rows=10, cols=2)
    model = inference.load_sampling_model(load_config(cfg), ckpt, device)
    with attention_context(load_config(cfg).attention, device):  # sample.py's SDPA kernel (none pinned on the CPU)
        expected = inference.sample_grid(model, (10, 2), 1, 42, device, str(tmp_path / "b.png"))
    assert np.array_equal(images, expected)
    # an explicit --config; a config.yaml in the checkpoint's own folder
    assert np.array_equal(draw(ckpt, tmp_path / "c.png", "--config", cfg, device=device)[0], grid)
    (tmp_path / "alone").mkdir()
    shutil.copy(ckpt, tmp_path / "alone" / "2.pt")
    with pytest.raises(SystemExit, match=r"no --config given and no config.yaml beside .*alone.*--config"):
        draw(tmp_path / "alone" / "2.pt", tmp_path / "d.png", device=device)
    shutil.copy(cfg, tmp_path / "alone" / "config.yaml")
    # config.yaml names its companion (this code's keys): without it, a clear error rather than other defaults
    with pytest.raises(SystemExit, match=r"alone/config.yaml keeps this code's other keys in .*alone/config.soflow"
                                         r".yaml, which is missing"):
        draw(tmp_path / "alone" / "2.pt", tmp_path / "e.png", device=device)
    shutil.copy(companion_path(cfg), tmp_path / "alone" / "config.soflow.yaml")
    assert np.array_equal(draw(tmp_path / "alone" / "2.pt", tmp_path / "e.png", device=device)[0], grid)


def test_bad_arguments(run, tmp_path):
    _, ckpt = run
    with pytest.raises(SystemExit, match=r"--classes must lie in \[0, 10\)"):
        draw(ckpt, tmp_path / "a.png", "--classes", "2", "10")
    with pytest.raises(SystemExit, match="contradicts"):
        draw(ckpt, tmp_path / "a.png", "--classes", "2", "3", "--rows", "3")
    with pytest.raises(SystemExit, match="must be >= 1"):
        draw(ckpt, tmp_path / "a.png", "--nfe", "0")
    with pytest.raises(SystemExit, match="does not exist"):
        draw(tmp_path / "none.pt", tmp_path / "a.png")
    assert not os.path.exists(tmp_path / "a.png")


def test_unconditional_model_ignores_classes(tmp_path, caplog, device):
    _, ckpt = make_run(tmp_path, **UNCONDITIONAL)
    with caplog.at_level(logging.INFO, logger="sample"):
        grid, images = draw(ckpt, tmp_path / "a.png", "--classes", "1", "2", "3", "--per-class", "2", device=device)
    assert "unconditional: --classes 1 2 3 ignored" in caplog.text
    grid_tiles(grid, rows=10, cols=2)  # the config's eval_demo_shape rows, not one per --classes entry
    plain, _ = draw(ckpt, tmp_path / "b.png", "--per-class", "2", "--rows", "10", device=device)
    assert np.array_equal(plain, grid) and len({bytes(x) for x in images}) == 20


def test_imagenet_latents_decoded_by_the_vae(tmp_path, monkeypatch, device):
    """ImageNet checkpoints sample latents and decode them with the config's SD-VAE, or --vae's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_tiny_vae(tmp_path / "vae")
    _, ckpt = make_run(tmp_path, base="tiny_imagenet_cpu.yaml", vae=str(tmp_path / "no_such_vae"))
    grid, images = draw(ckpt, tmp_path / "a.png", "--classes", "2", "0", "--per-class", "3", "--vae",
                        str(tmp_path / "vae"), device=device)
    assert images.shape == (6, 16, 16, 3)  # 8 x 8 latents -> 16 x 16 images, enlarged 4x
    grid_tiles(grid, rows=2, cols=3, size=16, scale=4)
    with pytest.raises(SystemExit, match=r"no_such_vae.*offline mode is on.*--vae"):
        draw(ckpt, tmp_path / "b.png", "--classes", "2", device=device)
