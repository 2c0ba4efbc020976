"""benchmarks/precision.py: part 1 (precision_delta.py, the error of Delta per precision mode) on tiny models, and
part 2 (precision_digits.py) without its trainings."""
import copy
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import ROOT, release_objective

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import precision_delta as delta  # noqa: E402
import precision_digits as digits  # noqa: E402
from config import load_config  # noqa: E402

TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2, patch_size=4, data_size=8)
TINY_UNET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])


@pytest.fixture(scope="module")
def tiny_dit_measurement():
    model, cfg, redrawn = delta.recipe_model("imagenet", seed=0, **TINY_DIT)
    objective = cfg.objective()
    assert objective.guided and objective.l_end_ratio == release_objective("imagenet").l_end_ratio
    inputs = delta.make_inputs(model, objective, cfg.cfg_drop_rate, 6, seed=0)
    rows, ref = delta.measure(model, objective, inputs, delta.modes_for("cpu"), "cpu", log=lambda m: None)
    return model, objective, inputs, redrawn, rows, ref


def _row(rows, mode, gap):
    return next(r for r in rows if r["mode"] == mode and r["gap"] == gap)


def test_zero_layers_redrawn_and_reference_exact(tiny_dit_measurement):
    model, objective, inputs, redrawn, rows, ref = tiny_dit_measurement
    # adaLN-Zero: each block's modulation, the final layer's modulation and its output linear
    assert len(redrawn) == 2 + 2 and "network.final_layer.linear" in redrawn
    assert ref["F_t"].abs().max() > 0.05  # F is no longer zero
    # the same float64 computation twice gives exactly zero error
    again = delta.run_mode(copy.deepcopy(model).double(), inputs, objective, delta.REFERENCE, "cpu")
    for gap in ("first", "last"):
        assert delta.relative_errors(again["Delta"][gap], ref["Delta"][gap]) == (0.0, 0.0, 0.0)
    # the last gap is the recipe's: t - l = l_end_ratio (t - s) (or the 1e-4 floor)
    t, s, l = inputs["t"].double(), inputs["s"].double(), inputs["l"]["last"].double()
    expected = torch.maximum((t - s) * objective.l_end_ratio, torch.full_like(t, 1e-4))
    assert torch.allclose(t - l, expected, rtol=1e-3, atol=1e-7)


def test_error_ordering_and_dtypes(tiny_dit_measurement):
    *_, rows, _ = tiny_dit_measurement
    fp32, bf16 = _row(rows, "fp32", "last"), _row(rows, "bf16", "last")
    assert 0 < fp32["delta_batch"] < bf16["delta_batch"]
    # amplification: the last gap is worse than the first for bf16 everywhere
    assert _row(rows, "bf16", "first")["delta_batch"] < bf16["delta_batch"]
    # where each mode puts bf16 (output dtypes of calls 1, 2, 3) and where the TF32 emulation acts
    assert [c["out"] for c in fp32["audit"].values()] == ["float32"] * 4
    assert [c["out"] for c in bf16["audit"].values()] == ["bfloat16"] * 4
    guidance_only = _row(rows, "bf16-guidance", "last")["audit"]
    assert [c["out"] for c in guidance_only.values()] == ["bfloat16", "float32", "float32", "float32"]
    assert guidance_only["guidance"]["autocast"] and not guidance_only["F_t"]["autocast"]
    emulated = _row(rows, "fp32 + TF32 (emulated)", "last")
    assert all(c["tf32_rounded_ops"] > 0 and c["out"] == "float32" for c in emulated["audit"].values())
    assert _row(rows, "fp32", "last")["tf32_ops"] == {}
    mixed = _row(rows, "bf16-guidance + TF32 (emulated)", "last")["audit"]  # autocast calls are not TF32
    assert [c["tf32_rounded_ops"] > 0 for c in mixed.values()] == [False, True, True, True]
    text = delta.delta_markdown(dict(device="cpu", batch_size=6, torch="x", threads=1,
                                     recipes={"imagenet": dict(model_type="DiT", rows=rows, redrawn_layers=4,
                                                               cfg_masked_rows=0, seconds=1.0, guided=True)}))
    assert "| imagenet (DiT) | last | 0.002 |" in text and "1:bfloat16 2:float32 3:float32" in text


def test_chain_matches_fused_loss():
    """run_mode's chain of public pieces reproduces Soflow.fused_loss's Con_MSE bit for bit in every mode."""
    assert delta.self_check(seed=1) == 0.0


def test_unguided_bf16_guidance_equals_fp32():
    """Why the benchmark skips bf16-guidance for CIFAR: without guidance it is float32 exactly."""
    model, cfg, redrawn = delta.recipe_model("cifar", seed=0, **TINY_UNET)
    objective = cfg.objective()
    assert not objective.guided and redrawn
    inputs = delta.make_inputs(model, objective, cfg.cfg_drop_rate, 2, seed=0, x0_kind="images")
    a = delta.run_mode(model, inputs, objective, delta.Mode("fp32", "fp32"), "cpu", gaps=("last",))
    b = delta.run_mode(model, inputs, objective, delta.Mode("g", "bf16-guidance"), "cpu", gaps=("last",))
    assert torch.equal(a["Delta"]["last"], b["Delta"]["last"]) and a["Delta"]["last"].abs().max() > 0


# ----------------------------------------------------------------------------------------------------
# Part 2 (precision_digits.py), without the trainings


def test_sample_count_checked_before_part_one(capsys):
    import precision
    with pytest.raises(SystemExit):
        precision.parse_args(["--num-samples", "15"])  # 15 digits are not class-balanced
    assert "--num-samples (15) divisible by 10, the number of classes" in capsys.readouterr().err
    assert precision.parse_args(["--num-samples", "15", "--skip-digits"]).num_samples == 15


def test_digits_step_cost_steps_every_mode_on_one_ranks_batch():
    cfg = load_config(digits.DIGITS_CONFIG)
    cost = digits.digits_step_cost(cfg, ["fp32", "bf16-guidance"], steps=1, warmup=0)
    assert list(cost) == ["fp32", "bf16-guidance"]
    assert all(c["median_s"] > 0 and c["batch"] == cfg.batch_size // 2 and c["steps"] == 1 for c in cost.values())


WINDOWS = "".join(f"Step {step} | Vel_MSE 0.2000 | Con_MSE {con} | Grad_Norm 1.0000 | Peak_Mem 0.90GiB | "
                  f"Img/s 700.0 (350.0/rank) | Time {seconds}s\n" for step, con, seconds in
                  ((100, "0.3000", "18.0"), (200, "0.2500", "16.5")))


def test_finished_runs_are_reused_and_others_trained(tmp_path, monkeypatch):
    cfg = SimpleNamespace(working_dir=str(tmp_path), total_steps=200)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "100.pt").write_bytes(b"")
    (tmp_path / "log.txt").write_text("starting a new run\n" + WINDOWS)
    trained = []
    monkeypatch.setattr(digits.dq, "run_training", lambda path, nproc, log: trained.append((path, nproc))
                        or (str(tmp_path / "ckpts" / "200.pt"), 61.5))
    # not finished (the newest checkpoint is at step 100): trained, and its wall time recorded
    ckpt, seconds, timing = digits._trained_run(cfg, "run.yaml", 2, "fp32", log=lambda m: None)
    assert trained == [("run.yaml", 2)] and (ckpt, seconds, timing) == (str(tmp_path / "ckpts" / "200.pt"), 61.5, "wall")
    # finished: reused with the recorded wall time, or without one with the sum of the logged windows
    (tmp_path / "ckpts" / "200.pt").write_bytes(b"")
    assert digits._trained_run(cfg, "run.yaml", 2, "fp32", log=lambda m: None)[1:] == (61.5, "wall (earlier run)")
    os.remove(tmp_path / "training_seconds.json")
    assert digits._trained_run(cfg, "run.yaml", 2, "fp32", log=lambda m: None)[1:] == (34.5, "sum of logged windows")
    assert len(trained) == 1


def test_digits_markdown_rows_ratios_and_marks():
    def row(mode, sampled_in, frechet, timing="wall"):
        return dict(mode=mode, sampled_in=sampled_in, agreement=0.9, frechet=frechet, training_seconds=120.4,
                    timing=timing, final_window={"Con_MSE": 0.25})
    result = dict(config="configs/digits_demo.yaml", num_samples=100, nproc=2,
                  real_floor=dict(agreement=0.99, frechet=0.01),
                  rows=[row("fp32", "fp32", 0.5), row("bf16", "fp32", 1.5), row("bf16", "bf16", 2.0),
                        row("fp32-seed43", "fp32", 0.6, timing="sum of logged windows")],
                  step_cost={m: dict(median_s=0.0123, steps=3, batch=64, threads=1) for m in ("fp32", "bf16")})
    text = digits.digits_markdown(result)
    assert "| fp32 | fp32 | 0.9000 | 0.5000 | 1.00 | 120 | 12.3 | 0.2500 |" in text
    assert "| bf16 | bf16 | 0.9000 | 2.0000 | 4.00 | 120 | 12.3 | 0.2500 |" in text
    assert "| fp32-seed43 | fp32 | 0.9000 | 0.6000 | 1.20 | 120* |  | 0.2500 |" in text  # no step cost, summed windows
    assert "*: sum of the logged step windows" in text and "median of 3 training steps" in text
