"""inference.py: sample dumps from a trained checkpoint; what stays the same across world and batch sizes."""
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import inference
import train
from distributed import rank_bounds
from helpers import DIGITS_TINY, grid_tiles, make_tiny_vae, torchrun, write_config

pytestmark = pytest.mark.usefixtures("single_process")  # conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("digits")
    cfg = write_config("imagenet.yaml", work / "cfg.yaml", working_dir=str(work / "run"), **DIGITS_TINY)
    train.main(["--config", cfg])
    return cfg, work / "run"


def run_inference(cfg, out, *extra, nproc=1):
    """inference.py in-process (on the device that pin_device leaves it: CUDA wherever it exists), or under
    torchrun on `nproc` CPU ranks (CUDA hidden: the machine may have fewer GPUs than ranks)."""
    args = ["--config", cfg, "--ckpt-steps", "2", "--seed", "3", "--out", str(out), *extra]
    if nproc == 1:
        inference.main(args)
    else:
        torchrun("inference.py", args, nproc=nproc, env={"CUDA_VISIBLE_DEVICES": ""})


def pin_device(monkeypatch, device):
    """inference.py (setup_distributed) and sample.py take CUDA wherever it exists: the CPU case hides it."""
    if device.type == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_dump_at_any_nfe(trained, tmp_path, nfe, device, monkeypatch):
    cfg, run = trained
    pin_device(monkeypatch, device)
    run_inference(cfg, tmp_path, "--eval-NFE", str(nfe), "--num-samples", "10", "--eval-batch-size", "4")
    out = load(tmp_path / f"2_{nfe}NFE_3.npz")
    assert out["arr_0"].shape == (10, 8, 8, 3) and out["arr_0"].dtype == np.uint8
    assert out["arr_1"].shape == (10,) and out["arr_1"].max() < 10
    assert np.array_equal(out["arr_0"][..., 0], out["arr_0"][..., 2])  # grayscale -> 3 equal channels
    assert len(set(map(bytes, out["arr_0"]))) == 10  # distinct samples
    assert not any(name.endswith(".npy") or ".tmp" in name for name in os.listdir(tmp_path))


def test_what_a_dump_keeps_across_world_and_batch_sizes(trained, tmp_path, monkeypatch):
    """docs/determinism.md's claim, exactly: labels and noise of every sample are the same for any world size and
    batch size; images are bit-identical run to run for a fixed world size and batch size; across layouts they are
    equal up to the network's rounding, which moves a pixel by at most one level (bound tested: 1e-3 of the pixels)."""
    cfg, _ = trained
    # CPU-only: the 2-rank runs are CPU (gloo) ranks, and the one-process run they are compared with runs there too
    pin_device(monkeypatch, torch.device("cpu"))
    run_inference(cfg, tmp_path / "a", "--eval-NFE", "2", "--num-samples", "9", "--eval-batch-size", "9")
    run_inference(cfg, tmp_path / "b", "--eval-NFE", "2", "--num-samples", "9", "--eval-batch-size", "2", nproc=2)
    run_inference(cfg, tmp_path / "c", "--eval-NFE", "2", "--num-samples", "9", "--eval-batch-size", "9")
    a, b, c = (load(tmp_path / d / "2_2NFE_3.npz") for d in "abc")
    assert np.array_equal(a["arr_1"], b["arr_1"])  # labels
    assert np.array_equal(a["arr_0"], c["arr_0"]) and np.array_equal(a["arr_1"], c["arr_1"])  # run to run
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3
    # the inputs themselves do not depend on the layout: rank slices and batches of the same indices
    shape = (1, 8, 8)
    whole = inference.sample_inputs(range(9), 10, False, shape, 2, seed=3)
    for world in (1, 2, 4):
        for batch in (1, 2, 9):
            parts = [inference.sample_inputs(list(r)[lo:lo + batch], 10, False, shape, 2, seed=3)
                     for rank in range(world) for r in [range(*rank_bounds(9, rank, world))]
                     for lo in range(0, len(r), batch)]
            assert torch.equal(torch.cat([p[0] for p in parts if len(p[0])]), whole[0])
            assert torch.equal(torch.cat([p[1] for p in parts if p[1].shape[1]], dim=1), whole[1])


def test_release_defaults_name_the_dump(trained, tmp_path, device, monkeypatch):
    """The release's inference.py defaults: --eval-NFE 1, --eval-batch-size 32, --seed 42 (so the dump of a
    command without them is N_1NFE_42.npz)."""
    cfg, _ = trained
    pin_device(monkeypatch, device)
    args = inference.parse_args(["--config", cfg, "--ckpt-steps", "2"])
    assert (args.eval_NFE, args.eval_batch_size, args.seed) == (1, 32, 42)
    inference.main(["--config", cfg, "--ckpt-steps", "2", "--num-samples", "4", "--out", str(tmp_path / "a")])
    run_inference(cfg, tmp_path / "b", "--num-samples", "4", "--seed", "42", "--eval-batch-size", "32")
    a, b = load(tmp_path / "a" / "2_1NFE_42.npz"), load(tmp_path / "b" / "2_1NFE_42.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_class_balanced_counts(trained, tmp_path, device, monkeypatch):
    cfg, _ = trained
    pin_device(monkeypatch, device)
    run_inference(cfg, tmp_path, "--num-samples", "30", "--class-balanced")
    labels = load(tmp_path / "2_1NFE_3.npz")["arr_1"]
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    with pytest.raises(SystemExit, match="divisible by 10"):
        run_inference(cfg, tmp_path, "--num-samples", "25", "--class-balanced")


def test_released_checkpoint_layout_loads_strictly(trained, tmp_path, device, monkeypatch):
    cfg, run = trained
    pin_device(monkeypatch, device)
    state = torch.load(run / "ckpts" / "2.pt", weights_only=True)
    released = {k: state[k] for k in ("model", "ema_model", "optimizer", "finished_steps", "finished_epochs")}
    torch.save(released, tmp_path / "released.pt")
    inference.main(["--config", cfg, "--ckpt", str(tmp_path / "released.pt"), "--num-samples", "4", "--seed", "3",
                    "--out", str(tmp_path)])
    assert load(tmp_path / "released_1NFE_3.npz")["arr_0"].shape == (4, 8, 8, 3)
    with pytest.raises(SystemExit, match="exactly one of"):
        inference.main(["--config", cfg])
    with pytest.raises(SystemExit, match="--ckpt-steps K reads .*give --config"):
        inference.main(["--ckpt-steps", "2"])
    with pytest.raises(SystemExit, match="does not exist"):
        inference.main(["--config", cfg, "--ckpt", str(tmp_path / "none.pt")])


def test_training_grid_has_one_row_per_class(trained, tmp_path):
    _, run = trained
    from PIL import Image
    import sample
    grid = np.asarray(Image.open(run / "figs" / "2.png"))
    assert grid.shape == (10 * 64 + 9 * 4, 2 * 64 + 4, 3)  # 8 x 8 digits enlarged 8x, 4 pixels apart
    grid_tiles(grid, 10, 2)
    assert inference.grid_labels(10, 2, 10).tolist() == [r for r in range(10) for _ in range(2)]
    assert inference.grid_labels(2, 3, 10, classes=[7, 2]).tolist() == [7, 7, 7, 2, 2, 2]
    with pytest.raises(ValueError, match=r"2 classes in \[0, 10\)"):
        inference.grid_labels(2, 3, 10, classes=[7, 10])
    assert inference.grid_labels(2, 3, 0) is None
    # sample.py's defaults (the config's grid shape, seed and NFE; the config beside the checkpoint) redraw the
    # training grid bit for bit from the saved EMA weights: one sampling function
    sample.main(["--ckpt", str(run / "ckpts" / "2.pt"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), grid)


def test_grid_enlargement_rule(tmp_path):
    from PIL import Image
    assert [inference.grid_scale(s) for s in (1, 8, 16, 28, 32, 63, 64, 256)] == [64, 8, 4, 3, 2, 2, 1, 1]
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    inference.save_grid(images, 2, str(tmp_path / "g.png"))  # 5 tiles in 2 rows of 3, the last one empty
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 64 + 4, 3 * 64 + 2 * 4, 3)  # 16 px tiles enlarged 4x, 4 pixels apart
    tiles = grid_tiles(grid, 2, 3, size=16, scale=4)
    assert np.array_equal(tiles.reshape(6, 16, 16, 3)[:5], images) and not tiles[1, 2].any()
    inference.save_grid(images, 2, str(tmp_path / "sub" / "raw.png"), scale=1, gap=0)  # raw; folder created
    raw = np.asarray(Image.open(tmp_path / "sub" / "raw.png"))
    assert np.array_equal(raw, tiles.swapaxes(1, 2).reshape(32, 48, 3))
    inference.save_grid(images[:1], 1, str(tmp_path / "big.jpg"), scale=3)  # the format of the file's name
    with Image.open(tmp_path / "big.jpg") as im:
        assert im.format == "JPEG" and im.size == (48, 48)
    assert sorted(os.listdir(tmp_path)) == ["big.jpg", "g.png", "sub"]  # no temporary files left
    with pytest.raises(ValueError, match="scale"):
        inference.save_grid(images, 2, str(tmp_path / "x.png"), scale=0)


def test_vae_decoder_in_chunks(tmp_path, device):
    vae = make_tiny_vae(tmp_path / "vae").to(device)
    decode = inference.build_decoder(str(tmp_path / "vae"), 0.18215, device, chunk_size=2)
    latents = torch.randn(5, 4, 4, 4).to(device)
    with torch.no_grad():
        images = decode(latents)
        direct = vae.decode(latents / 0.18215).sample
    assert images.shape == (5, 3, 8, 8) and torch.allclose(images, direct, atol=1e-5)


def test_per_sample_inputs_depend_on_seed_and_index_only():
    shape = (1, 4, 4)
    labels, noise = inference.sample_inputs(range(6), 10, False, shape, 2, seed=0)
    assert noise.shape == (2, 6, 1, 4, 4) and noise.dtype == torch.float32 and labels.shape == (6,)
    # another seed changes every sample's noise (a torch CPU generator would keep only 32 seed bits)
    for seed in (1, 2**32, 2**40 + 7):
        other_labels, other = inference.sample_inputs(range(6), 10, False, shape, 2, seed=seed)
        assert all(not torch.allclose(noise[:, i], other[:, i]) for i in range(6)), seed
    # sample 4 is the same whether drawn alone or within a batch, and differs from its neighbours
    alone_labels, alone = inference.sample_inputs([4], 10, False, shape, 2, seed=0)
    assert torch.equal(alone[:, 0], noise[:, 4]) and alone_labels[0] == labels[4]
    assert len({tuple(noise[0, i].flatten().tolist()) for i in range(6)}) == 6
    # standard normal noise, uniform labels
    many_labels, many = inference.sample_inputs(range(2000), 10, False, shape, 1, seed=5)
    assert abs(many.mean().item()) < 0.03 and abs(many.std().item() - 1) < 0.03
    assert np.bincount(many_labels.numpy(), minlength=10).min() > 150
    with pytest.raises(ValueError, match="seed"):
        inference.sample_inputs([0], 10, False, shape, 1, seed=-1)


def test_a_second_writer_of_the_same_dump_is_refused(trained, tmp_path, device):
    """A second dump to the same file while the first is under way (as a re-submitted job would be) is refused
    with the writer's pid and host; the first completes, whole, and leaves nothing beside its file."""
    from config import load_config
    from safe_io import ClaimError
    cfg, _ = trained
    model = inference.load_sampling_model(load_config(cfg), os.path.join(load_config(cfg).working_dir, "ckpts",
                                                                         "2.pt"), device)
    out = str(tmp_path / "dump.npz")
    refusals = []

    def second_writer(images):
        if not refusals:
            with pytest.raises(ClaimError, match=rf"sample dump {out} is in use by another process: pid "
                                                 rf"{os.getpid()} on this host .*use another --out") as refused:
                inference.dump_samples(model, out, 4, 1, 5, 2, device, progress=False)
            refusals.append(refused)
    inference.dump_samples(model, out, 6, 1, 3, 2, device, progress=False, on_batch=second_writer)
    alone = inference.dump_samples(model, str(tmp_path / "alone.npz"), 6, 1, 3, 2, device, progress=False)
    assert len(refusals) == 1 and np.array_equal(load(out)["arr_0"], load(alone)["arr_0"])
    assert sorted(os.listdir(tmp_path)) == ["alone.npz", "dump.npz"]


def test_a_failed_dump_write_is_reported_and_leaves_nothing(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    monkeypatch.setattr(inference, "_write_npz_streaming", lambda *a: (_ for _ in ()).throw(
        RuntimeError("disk quota exceeded")))
    with pytest.raises(SystemExit, match=r"error: sample dump .*2_1NFE_3.npz not written: rank 0: could not write "
                                         r"sample dump .* \(RuntimeError: disk quota exceeded\); .*GiB free"):
        run_inference(cfg, tmp_path, "--num-samples", "4")
    assert os.listdir(tmp_path) == []


def test_sampling_precision_refuses_flash_in_float32():
    """--precision fp32 over a config with attention: flash (valid with its precision bf16) stops before any
    work: CUDA's flash kernel has no float32."""
    from config import from_dict
    cfg = from_dict({**DIGITS_TINY, "attention": "flash", "precision": "bf16"})
    assert inference.sampling_precision(cfg) == "bf16"
    with pytest.raises(SystemExit, match="--precision fp32: attention 'flash'.*set precision: bf16"):
        inference.sampling_precision(cfg, "fp32")
    assert inference.sampling_precision(from_dict(DIGITS_TINY), "bf16") == "bf16"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_dump_says_nothing_was_kept(trained, tmp_path, monkeypatch, capsys, signum):
    """Ctrl-C, or SIGTERM (what torchrun forwards when it is interrupted), at the second batch: status 130, a line
    saying that nothing was written and how to start again, and no partial file, part or lock left."""
    cfg, _ = trained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    generate, calls = inference.generate, []

    def interrupted_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return generate(*args, **kwargs)
    monkeypatch.setattr(inference, "generate", interrupted_at_the_second_batch)

    def unhandled(signum, frame):  # what SIGTERM would do to a process that does not handle it: not kill pytest
        raise AssertionError("SIGTERM not handled by inference.py")
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as stop:
            run_inference(cfg, tmp_path / "out", "--num-samples", "4", "--eval-batch-size", "2")
        assert signal.getsignal(signal.SIGTERM) is unhandled  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 130 and len(calls) == 2
    assert (f"interrupted: nothing was written to {tmp_path / 'out' / '2_1NFE_3.npz'} (each rank's partial file "
            f"was removed); re-run the same command") in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == []


def test_a_checkpoint_copied_alone_samples_with_the_config_inside(trained, tmp_path, monkeypatch, caplog):
    """train.py's checkpoints carry the run's full config: sample.py and inference.py sample a checkpoint copied
    alone into another folder as they sample it in its run; a --config given wins, and each key where it differs
    from the checkpoint's own is named."""
    import sample
    from checkpoints import load_checkpoint
    from config import load_config, write_variant
    cfg, run = trained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_checkpoint(run / "ckpts" / "2.pt")["config"] == load_config(cfg).to_dict()
    alone = tmp_path / "elsewhere" / "2.pt"
    os.makedirs(alone.parent)
    shutil.copy(run / "ckpts" / "2.pt", alone)
    grid = sample.main(["--ckpt", str(alone), "--out", str(tmp_path / "a.png"), "--seed", "0"])
    in_run = sample.main(["--ckpt", str(run / "ckpts" / "2.pt"), "--config", cfg, "--out", str(tmp_path / "b.png"),
                          "--seed", "0"])
    assert np.array_equal(grid, in_run)
    inference.main(["--ckpt", str(alone), "--seed", "3", "--num-samples", "4", "--out", str(tmp_path / "alone")])
    run_inference(cfg, tmp_path / "in_run", "--num-samples", "4")
    assert_same_dump(load(tmp_path / "alone" / "2_1NFE_3.npz"), load(tmp_path / "in_run" / "2_1NFE_3.npz"))
    other = write_variant(cfg, tmp_path / "other.yaml", eval_NFE=2)
    with caplog.at_level("WARNING"):
        two_steps = sample.main(["--ckpt", str(alone), "--config", other, "--out", str(tmp_path / "c.png"),
                                 "--seed", "0"])
    assert f"--config {other} sets eval_NFE: 2, the config inside {alone} 1; 2 (the command line's) is used" \
        in caplog.text
    assert not np.array_equal(two_steps, grid)  # drawn at the command line's 2 NFE


def assert_same_dump(a, b):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
