"""Smoke test of benchmarks/precision.py (part 1, the error of Delta per precision mode) on tiny models."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, release_objective

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import precision  # noqa: E402

TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2, patch_size=4, data_size=8)
TINY_UNET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])


def test_round_to_tf32_known_values():
    ulp = 2.0 ** -10  # TF32 keeps 10 explicit mantissa bits
    x = torch.tensor([1 + ulp, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0 ** -20, -(1 + 3 * ulp / 2),
                      1 + ulp / 4, 0.0, 2.0 ** -126, float("inf"), float("-inf")])
    expected = [1 + ulp, 1.0, 1 + 2 * ulp, 1 + ulp, -(1 + 2 * ulp), 1.0, 0.0, 2.0 ** -126, float("inf"),
                float("-inf")]  # exact, tie to even (down), tie to even (up), above the tie, negative, below
    assert precision.round_to_tf32(x).tolist() == expected
    assert precision.round_to_tf32(torch.tensor([float("nan")])).isnan().all()
    # Every result has its 13 low mantissa bits clear, and is within half a TF32 ulp of the input.
    y = torch.randn(10_000) * 100
    r = precision.round_to_tf32(y)
    assert (r.view(torch.int32) & 0x1FFF).eq(0).all()
    assert ((r - y).abs() <= y.abs() * 2.0 ** -11).all()
    assert precision.round_to_tf32(y.double()) is not None and precision.round_to_tf32(y.double()).dtype == torch.float64
    # Autograd passes through (straight-through), as the benchmark runs call 2 with grad.
    w = torch.randn(4, requires_grad=True)
    precision.round_to_tf32(w).sum().backward()
    assert torch.equal(w.grad, torch.ones(4))


def test_emulation_rounds_matmul_operands_only():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=g) for shape in ((3, 8), (5, 8), (5,)))
    emulator = precision.EmulateTF32()
    with emulator:
        out = F.linear(x, w, b)
        mm = x @ w.t()
        plain = x + 1  # not a contraction: untouched
    rx, rw = precision.round_to_tf32(x), precision.round_to_tf32(w)
    assert torch.equal(out, F.linear(rx, rw, b)) and not torch.equal(out, F.linear(x, w, b))
    assert torch.equal(mm, rx @ rw.t())
    assert torch.equal(plain, x + 1)
    assert emulator.counts == {"linear": 1, "matmul": 1}


@pytest.fixture(scope="module")
def tiny_dit_measurement():
    model, cfg, redrawn = precision.recipe_model("imagenet", seed=0, **TINY_DIT)
    objective = cfg.objective()
    assert objective.guided and objective.l_end_ratio == release_objective("imagenet").l_end_ratio
    inputs = precision.make_inputs(model, objective, cfg.cfg_drop_rate, 6, seed=0)
    rows, ref = precision.measure(model, objective, inputs, precision.modes_for("cpu"), "cpu", log=lambda m: None)
    return model, objective, inputs, redrawn, rows, ref


def _row(rows, mode, gap):
    return next(r for r in rows if r["mode"] == mode and r["gap"] == gap)


def test_zero_layers_redrawn_and_reference_exact(tiny_dit_measurement):
    model, objective, inputs, redrawn, rows, ref = tiny_dit_measurement
    # adaLN-Zero: each block's modulation, the final layer's modulation and its output linear
    assert len(redrawn) == 2 + 2 and "network.final_layer.linear" in redrawn
    assert ref["F_t"].abs().max() > 0.05  # F is no longer zero
    # the same float64 computation twice gives exactly zero error
    again = precision.run_mode(precision.copy.deepcopy(model).double(), inputs, objective, precision.REFERENCE, "cpu")
    for gap in ("first", "last"):
        assert precision.relative_errors(again["Delta"][gap], ref["Delta"][gap]) == (0.0, 0.0, 0.0)
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
    text = precision.delta_markdown(dict(device="cpu", batch_size=6, torch="x", threads=1,
                                         recipes={"imagenet": dict(model_type="DiT", rows=rows, redrawn_layers=4,
                                                                   cfg_masked_rows=0, seconds=1.0, guided=True)}))
    assert "| imagenet (DiT) | last | 0.002 |" in text and "1:bfloat16 2:float32 3:float32" in text


def test_chain_matches_fused_loss():
    """run_mode's chain of public pieces reproduces Soflow.fused_loss's Con_MSE bit for bit in every mode."""
    assert precision.self_check(seed=1) == 0.0


def test_unguided_bf16_guidance_equals_fp32():
    """Why the benchmark skips bf16-guidance for CIFAR: without guidance it is float32 exactly."""
    model, cfg, redrawn = precision.recipe_model("cifar", seed=0, **TINY_UNET)
    objective = cfg.objective()
    assert not objective.guided and redrawn
    inputs = precision.make_inputs(model, objective, cfg.cfg_drop_rate, 2, seed=0, x0_kind="images")
    a = precision.run_mode(model, inputs, objective, precision.Mode("fp32", "fp32"), "cpu", gaps=("last",))
    b = precision.run_mode(model, inputs, objective, precision.Mode("g", "bf16-guidance"), "cpu", gaps=("last",))
    assert torch.equal(a["Delta"]["last"], b["Delta"]["last"]) and a["Delta"]["last"].abs().max() > 0
