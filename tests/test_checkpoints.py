"""Checkpoint sources: local .pt, exported .safetensors, hf://ORG/REPO/PATH through an offline Hub cache laid out
by the test (nothing is downloaded); the config found beside each."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import sample
from checkpoints import (CheckpointSourceError, HubFile, companion_path, config_beside, load_checkpoint, parse_hub,
                         resolve_checkpoint, save_weights)
from config import load_config, write_variant
from helpers import ROOT, Planted, make_run

pytestmark = pytest.mark.usefixtures("single_process")  # conftest.py

REPO = "soflow-test/tiny-digits"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-digits"
    inference.main(["--export", str(out), "--ckpt", run[1]])  # the config beside the checkpoint
    return out


def lay_out_hub_cache(cache, repo_id, files, commit=COMMIT):
    """The Hub cache's layout for `repo_id` at `commit` (the default branch): blobs named by their hash,
    snapshots/COMMIT/PATH links to them, refs/main holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for path, source in files.items():
        data = open(source, "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return cache


@pytest.fixture(scope="module")
def hub_cache(run, exported, tmp_path_factory):
    """A cache holding the exported folder at the repository's root and the run's layout under run/."""
    cfg, ckpt = run
    return lay_out_hub_cache(tmp_path_factory.mktemp("hub"), REPO, {
        "model.safetensors": exported / "model.safetensors", "config.yaml": exported / "config.yaml",
        "config.soflow.yaml": exported / "config.soflow.yaml", "run/ckpts/2.pt": ckpt, "run/config.yaml": cfg,
        "run/config.soflow.yaml": companion_path(cfg)})


@pytest.fixture
def offline(monkeypatch, hub_cache):
    """Offline mode with the test's cache as the Hub's default cache (as HF_HUB_CACHE would set it)."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def grid(ckpt, out, *args):
    sample.main(["--ckpt", str(ckpt), "--out", str(out), "--classes", "3", "1", "--per-class", "3", "--nfe", "2",
                 "--seed", "0", *args])
    return np.asarray(Image.open(out))


# ----------------------------------------------------------------------------------------------------
# Export to .safetensors


def test_export_writes_the_ema_weights_and_the_config(run, exported, tmp_path):
    cfg, ckpt = run
    assert sorted(os.listdir(exported)) == ["config.soflow.yaml", "config.yaml", "model.safetensors"]  # no temp files
    state = load_checkpoint(ckpt)
    weights = load_checkpoint(exported / "model.safetensors")
    assert set(weights) == {"ema_model", "finished_steps"} and weights["finished_steps"] == 2
    model_keys = load_config(cfg).build_model().state_dict().keys()
    assert weights["ema_model"].keys() == state["ema_model"].keys() == model_keys  # the model's keys, exactly
    assert all(torch.equal(weights["ema_model"][k], v) for k, v in state["ema_model"].items())
    assert load_config(exported / "config.yaml").to_dict() == load_config(cfg).to_dict()
    # the exported file samples exactly as the checkpoint, config found beside it, in sample.py and inference.py
    assert np.array_equal(grid(exported / "model.safetensors", tmp_path / "a.png"), grid(ckpt, tmp_path / "b.png"))
    for source, name in ((ckpt, "2"), (exported / "model.safetensors", "model")):
        inference.main(["--ckpt", str(source), "--num-samples", "6", "--eval-NFE", "2", "--seed", "1",
                        "--out", str(tmp_path)])
    with np.load(tmp_path / "2_2NFE_1.npz") as a, np.load(tmp_path / "model_2NFE_1.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_export_from_ckpt_steps_and_a_wrong_config(run, tmp_path):
    cfg, _ = run
    inference.main(["--export", str(tmp_path / "a"), "--config", cfg, "--ckpt-steps", "2"])
    assert sorted(os.listdir(tmp_path / "a")) == ["config.soflow.yaml", "config.yaml", "model.safetensors"]
    with pytest.raises(SystemExit, match="give --config too"):
        inference.main(["--export", str(tmp_path / "b"), "--ckpt-steps", "2"])
    # weights that do not fit the config are refused before anything is written
    write_variant(cfg, tmp_path / "wide.yaml", hidden_size=64)  # the written config and its companion, widened
    with pytest.raises(SystemExit, match=r"does not fit the config: the config describes DiT-B-4 with hidden 64, the checkpoint hidden 32"):
        inference.main(["--export", str(tmp_path / "c"), "--config", str(tmp_path / "wide.yaml"),
                        "--ckpt-steps", "2"])
    assert not os.path.exists(tmp_path / "c")


def test_safetensors_files_read_and_fail_clearly(tmp_path):
    save_weights({"network.w": torch.arange(6.0).reshape(2, 3).t()}, tmp_path / "w.safetensors",
                 {"finished_steps": 7})  # a non-contiguous tensor is written contiguous
    state = load_checkpoint(tmp_path / "w.safetensors")
    assert torch.equal(state["ema_model"]["network.w"], torch.arange(6.0).reshape(2, 3).t())
    assert state["finished_steps"] == 7 and os.listdir(tmp_path) == ["w.safetensors"]
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors cannot be read as safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.safetensors")


# ----------------------------------------------------------------------------------------------------
# Sources and the config beside a checkpoint


def test_hub_uris():
    assert parse_hub("hf://org/repo/model.safetensors") == HubFile("model", "org/repo", None, "model.safetensors")
    assert parse_hub("hf://org/repo@v1.0/run/ckpts/2.pt") == HubFile("model", "org/repo", "v1.0", "run/ckpts/2.pt")
    assert parse_hub("hf://org/repo@refs/pr/3/a.pt") == HubFile("model", "org/repo", "refs/pr/3", "a.pt")
    assert parse_hub("hf://org/repo@refs%2Fpr%2F3/a.pt").revision == "refs/pr/3"
    assert parse_hub("hf://datasets/org/repo/a.pt") == HubFile("dataset", "org/repo", None, "a.pt")
    assert parse_hub("hf://org/repo@v1/a.pt").uri("b/c.yaml") == "hf://org/repo@v1/b/c.yaml"
    for bad in ("hf://org/repo", "hf://org/repo/", "hf://repo/", "hf://org/repo/dir/", "/local/file.pt"):
        with pytest.raises(CheckpointSourceError, match="hf://ORG/REPO/PATH"):
            parse_hub(bad)
    assert resolve_checkpoint("/some/local/file.pt") == "/some/local/file.pt"  # local paths pass unchanged


def test_config_beside_local_checkpoints(run, exported, tmp_path):
    cfg, ckpt = run
    assert config_beside(ckpt) == os.path.abspath(cfg)  # RUN/ckpts/N.pt -> RUN/config.yaml
    assert config_beside(exported / "model.safetensors") == str(exported / "config.yaml")  # same folder
    with pytest.raises(CheckpointSourceError, match=r"no config.yaml beside .*x\.pt \(looked for .*config.yaml\)"):
        config_beside(tmp_path / "x.pt")


def test_hub_checkpoint_from_the_offline_cache(run, exported, offline, tmp_path):
    cfg, ckpt = run
    path = resolve_checkpoint(f"hf://{REPO}/model.safetensors")
    assert path.startswith(str(offline)) and open(path, "rb").read() == (exported / "model.safetensors").read_bytes()
    assert resolve_checkpoint(f"hf://{REPO}@{COMMIT}/run/ckpts/2.pt", cache_dir=str(offline)).endswith("2.pt")
    # the config beside: the repository root's for model.safetensors, run/config.yaml for run/ckpts/2.pt
    assert open(config_beside(f"hf://{REPO}/model.safetensors")).read() == (exported / "config.yaml").read_text()
    assert open(config_beside(f"hf://{REPO}/run/ckpts/2.pt")).read() == open(cfg).read()
    # sample.py and inference.py read hf:// (config beside it) and draw what the local files draw
    local = grid(ckpt, tmp_path / "local.png")
    assert np.array_equal(grid(f"hf://{REPO}/model.safetensors", tmp_path / "hub.png"), local)
    assert np.array_equal(grid(f"hf://{REPO}/run/ckpts/2.pt", tmp_path / "hub_run.png"), local)
    inference.main(["--ckpt", f"hf://{REPO}/model.safetensors", "--num-samples", "4", "--seed", "1",
                    "--out", str(tmp_path)])
    assert np.load(tmp_path / "model_1NFE_1.npz")["arr_0"].shape == (4, 8, 8, 3)


def test_hub_file_not_cached_offline_is_a_clear_error(offline, tmp_path):
    expected = (rf"hf://{REPO}/missing.pt: missing.pt of the Hub model repository {REPO} \(revision main\) is "
                rf"not in the Hugging Face cache {offline} and offline mode is on \(HF_HUB_OFFLINE=1\).*"
                rf"hf download {REPO} missing.pt")
    with pytest.raises(CheckpointSourceError, match=expected):
        resolve_checkpoint(f"hf://{REPO}/missing.pt")
    with pytest.raises(SystemExit, match=expected):  # the scripts' message (config given: the checkpoint fails)
        inference.main(["--config", str(offline / "none.yaml"), "--ckpt", f"hf://{REPO}/missing.pt"])
    with pytest.raises(SystemExit, match=r"hf://other/repo@v2/x.pt: .*hf download other/repo x.pt --revision v2"):
        sample.main(["--ckpt", "hf://other/repo@v2/x.pt", "--config", "unused.yaml"])
    # no config beside a cached checkpoint: both places named, and the fix
    with pytest.raises(CheckpointSourceError, match=rf"no config.yaml beside hf://{REPO}/sub/ckpts/2.pt could be "
                       rf"read \(looked for hf://{REPO}/sub/ckpts/config.yaml and hf://{REPO}/sub/config.yaml\); "
                       rf"pass --config"):
        config_beside(f"hf://{REPO}/sub/ckpts/2.pt")
    assert not os.listdir(tmp_path)


def test_hub_checkpoint_with_the_environment_only(run, hub_cache, tmp_path):
    """As a user runs it: a fresh process, HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the environment, no --config."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", f"hf://{REPO}/model.safetensors", "--classes",
           "3", "1", "--per-class", "3", "--nfe", "2", "--seed", "0", "--out", str(tmp_path / "hub.png")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "hub.png")), grid(run[1], tmp_path / "local.png"))
    cmd[3] = f"hf://{REPO}/other.safetensors"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "offline mode is on" in proc.stderr and str(hub_cache) in proc.stderr


def test_a_malicious_checkpoint_is_called_unsafe_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"w": torch.ones(1)}, "payload": Planted(str(marker))}, tmp_path / "2.pt")
    with pytest.raises(ValueError, match=r"2.pt is unsafe or not a weights-only checkpoint") as refused:
        load_checkpoint(tmp_path / "2.pt")
    assert "truncated" not in str(refused.value) and not marker.exists()


def test_hub_path_traversal_is_refused_without_a_download_hint():
    for bad in ("hf://org/repo/../../etc/passwd", "hf://org/repo/a/./b.pt", "hf://org/repo/a//b.pt"):
        with pytest.raises(CheckpointSourceError, match="is refused: it must name a file inside the repository") as e:
            resolve_checkpoint(bad)
        assert "hf download" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# A training run's checkpoints: save, prune, the newest good one, failed writes


def test_checkpoint_keeper_saves_prunes_and_remembers_the_newest(tmp_path):
    from checkpoints import CheckpointKeeper, list_checkpoints
    logged = []
    keeper = CheckpointKeeper(str(tmp_path), rank=0, keep_last=2, keep_every=4, log=logged.append)
    for step in range(7):
        keeper.save(step, {"model": {"w": torch.full((2,), float(step))}, "finished_steps": step})
        assert keeper.newest == keeper.path(step) == os.path.join(str(tmp_path), f"{step}.pt")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [0, 4, 5, 6]  # the newest two, and steps % 4 == 0
    assert load_checkpoint(keeper.newest)["model"]["w"].tolist() == [6.0, 6.0]
    assert logged[:2] == [f"saved checkpoint {keeper.path(0)}", f"saved checkpoint {keeper.path(1)}"]
    assert f"removed {keeper.path(1)} (ckpt_keep_last=2)" in logged


@pytest.mark.parametrize("error", [RuntimeError("PytorchStreamWriter failed writing file"),
                                   OSError(28, "No space left on device")])
def test_checkpoint_keeper_reports_a_failed_write_of_any_type(error, tmp_path, monkeypatch):
    from checkpoints import CheckpointKeeper, CheckpointWriteError
    keeper = CheckpointKeeper(str(tmp_path), rank=0, newest=str(tmp_path / "2.pt"), log=lambda s: None)

    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(CheckpointWriteError, match=rf"could not write checkpoint .*4\.pt \({type(error).__name__}: .*"
                                                   rf"GiB free on its file system.*newest: .*2\.pt.*re-run"):
        keeper.save(4, {"model": {}})
    assert keeper.newest == str(tmp_path / "2.pt") and os.listdir(tmp_path) == []  # no temporary left


def test_checkpoint_keeper_on_other_ranks_writes_nothing(tmp_path):
    from checkpoints import CheckpointKeeper
    keeper = CheckpointKeeper(str(tmp_path), rank=1, log=lambda s: None)
    keeper.save(3, {"model": {}})
    assert os.listdir(tmp_path) == [] and keeper.newest == keeper.path(3)  # rank 0 wrote it (first_error agrees)
