"""posthoc_ema.py (the command): a run's snapshots reconstructed into checkpoints that inference.py and sample.py
read unchanged, refusals before any work, and the sweep's table and plot at toy size."""
import json
import os

import numpy as np
import pytest
import torch

import inference
import posthoc_ema
import sample
import train
from checkpoints import load_checkpoint
from helpers import DIGITS_TINY, write_config
from power_ema import read_snapshot

pytestmark = pytest.mark.usefixtures("single_process")


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_process):
    """A 12-step Digits run of a tiny DiT with post-hoc EMAs of sigma_rel 0.05 and 0.10, snapshots every 3 steps."""
    root = tmp_path_factory.mktemp("posthoc_run")
    cfg = write_config("imagenet.yaml", root / "cfg.yaml", working_dir=str(root / "run"),
                       **{**DIGITS_TINY, "total_steps": 12, "ckpt_saving_steps": 12, "eval_demo_steps": 100,
                          "eval_steps": 100, "tracker": "none", "posthoc_ema_sigma_rels": [0.05, 0.1],
                          "posthoc_ema_every": 3})
    assert train.main(["--config", cfg]) == 0
    return root / "run"


def test_reconstruction_is_a_checkpoint_that_sampling_reads(run, tmp_path):
    out = tmp_path / "out"
    posthoc_ema.main(["--config", str(run / "config.yaml"), "--sigma-rel", "0.07", "0.1", "--out", str(out)])
    folder = out / "sigma0.070_step12"
    state = load_checkpoint(folder / "ckpts" / "12.pt")
    record = state["posthoc_ema_reconstruction"]
    assert state["finished_steps"] == 12 and record["sigma_rel"] == 0.07 and 0 < record["profile_error"] < 0.05
    # ema_model is the recorded combination of the snapshots (an independent sum here)
    snaps = {s: read_snapshot(str(run / "posthoc_ema" / f"{s}.pt"))["emas"] for s in (3, 6, 9, 12)}
    name = "network.final_layer.linear.weight"
    combined = sum(w * snaps[c["step"]][[0.05, 0.1].index(c["sigma_rel"])][name].double()
                   for w, c in zip(record["weights"], record["snapshots"]))
    torch.testing.assert_close(state["ema_model"][name], combined.float(), rtol=1e-6, atol=1e-7)
    # the tracked sigma_rel is the snapshot's own EMA
    tracked = load_checkpoint(out / "sigma0.100_step12" / "ckpts" / "12.pt")["ema_model"]
    torch.testing.assert_close(tracked[name], snaps[12][1][name], rtol=1.2e-7, atol=0)
    # read unchanged: --config + --ckpt-steps (the release's form), --ckpt with the config beside it, sample.py
    inference.main(["--config", str(folder / "config.yaml"), "--ckpt-steps", "12", "--num-samples", "4"])
    with np.load(folder / "evals" / "12_1NFE_42.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3)
    sample.main(["--ckpt", str(folder / "ckpts" / "12.pt"), "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_refusals_come_before_any_output(run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"step 7 has no usable post-hoc EMA snapshot.*3, 6, 9, 12"):
        posthoc_ema.main(["--config", str(run / "config.yaml"), "--sigma-rel", "0.07", "--step", "7",
                          "--out", str(out)])
    with pytest.raises(SystemExit, match=r"sigma_rel 0.25 at step 12: .*representable at step 12: sigma_rel 0.0"):
        posthoc_ema.main(["--config", str(run / "config.yaml"), "--sigma-rel", "0.07", "0.25", "--out", str(out)])
    assert not any(p.is_file() for p in out.rglob("*"))


def test_sweep_prints_a_table_and_plots_the_score(run, tmp_path, capsys):
    out = tmp_path / "sweep"
    rows = posthoc_ema.main(["--config", str(run / "config.yaml"), "--sweep", "0.05", "0.07", "0.1",
                             "--num-samples", "40", "--batch-size", "40", "--out", str(out), "--device", "cpu"])
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.07, 0.1, None]  # and the run's own ema_model
    assert all(0 <= r["agreement"] <= 1 and r["frechet"] > 0 and r["n"] == 40 for r in rows)
    table = capsys.readouterr().out
    assert "| post-hoc EMA | 0.07 |" in table and "| ema_model (ema_decay_rate 0.9999) |  |" in table
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "sigma0.070_step12" / "ckpts" / "12.pt").is_file()
