"""Numerical precision of the consistency loss: which `precision` setting is safe for SoFlow training.

    python benchmarks/precision.py [--out results/precision] [--device cpu|cuda] [--batch-size 8]
                                   [--skip-digits | --only-digits] [--num-samples 10000]

The consistency loss divides a difference of two network outputs by the gap t - l,
    Delta = (f(x_t, t, s) - f(x_l, l, s)) / (t - l),   x_l = x_t + v* (l - t),
and t - l = (t - s) r(k, K) shrinks to l_end_ratio (t - s) at the end of training (ImageNet 0.002, CIFAR
0.0003125). Rounding in the network calls 2 (F(x_t, t, s)) and 3 (F(x_l, l, s)) is therefore amplified by up
to 1 / (t - l); rounding in the no-grad guidance call 1 moves x_l by v_err (l - t) and v* by v_err, so its
error reaches Delta unamplified.

Part 1 (Delta). For the ImageNet recipe (DiT-B-4 on 4 x 32 x 32 latents, 1000 classes, configs/imagenet_B4.yaml:
cfg_scale 3, mix_ratio 0.25, cfg_drop_rate 0.1) and the CIFAR recipe (the full-size U-Net of configs/cifar.yaml,
unconditional, eval mode so that dropout is off), the relative error of Delta against a float64 copy of the
same model fed the same inputs (x0, noise, t, s, l, labels, CFG mask), at the FIRST gap (r = l_init_ratio,
step 0) and the LAST gap (r = l_end_ratio, step = total_steps); t, s and the mask come from
`models.draw_training_times` with the recipe's objective (its consistency-time distribution; every row is a
consistency row) and are the same at both gaps. Errors are reported
  batch:       ||Delta_mode - Delta_fp64|| / ||Delta_fp64|| over the whole batch (Frobenius norms),
  per sample:  the same ratio per sample; median and max over the batch.
Also the relative errors of F_t (call 2) and of the target velocity v* (from call 1), so that the
amplification is visible.

Modes, each through the code's own pieces (`Soflow.guidance` under the mode's guidance autocast,
`Soflow.mixed_target`, `Soflow._F` / `Soflow._f` for calls 2 and 3 under `distributed.precision_context`,
exactly as `Soflow.fused_loss` / `consistency_part` chain them; `self_check` and tests/test_precision.py
check that this chain reproduces `fused_loss`'s Con_MSE bit for bit):
  fp32                     float32, no autocast (on CUDA the release's numerics: TF32 matmuls and convs on)
  fp32 strict (no TF32)    CUDA only: TF32 off
  fp32 + TF32 (emulated)   float32 with the inputs of every linear / matmul / mm / bmm / baddbmm / addmm /
                           conv / scaled_dot_product_attention rounded to TF32 (10 explicit mantissa bits,
                           round to nearest even) by a TorchFunctionMode; products of TF32 numbers are exact
                           in float32, accumulation stays float32. An EMULATION of TF32 tensor cores: the
                           hardware may truncate rather than round, cuBLAS may split K differently, and in
                           SDPA only q, k, v are rounded (the attention probabilities are not; on CUDA the
                           memory-efficient kernel may not use TF32 at all). On CUDA it runs with TF32 off.
  bf16                     `precision: bf16`: bf16 autocast around all three calls
  bf16-guidance            `precision: bf16-guidance`: bf16 autocast for call 1 only; calls 2 and 3 float32
  bf16-guidance + TF32 (emulated)  CPU only: calls 2 and 3 with the TF32 emulation, which is what
                           bf16-guidance runs on CUDA with the default `tf32: true`
For CIFAR (cfg_scale 1) there is no guidance call, so bf16-guidance is float32 by construction; its rows are
not recomputed (tests/test_precision.py checks the identity on a tiny unguided model).

Weights. Freshly built DiTs output zeros (adaLN-Zero: zero modulation and final layers) and the U-Net nearly
zeros (its residual-branch and output convolutions are scaled by 1e-5 at init), which would make Delta = v*
trivially. Every such layer (a weight of 2+ dimensions with max |w| <= 1e-4) is re-drawn here with weights
N(0, 1 / fan_in) (unit gain) and biases N(0, 0.02^2); all other weights keep their initialisation. Inputs:
x0 ~ N(0, 1) for the latents; smooth random images in [-1, 1] (bilinear 8 -> 32 upsampled noise) for CIFAR.
These are untrained networks: a trained network's error ratios may differ, though the 1 / (t - l)
amplification does not depend on the weights.

Part 2 (digits). configs/digits_demo.yaml trained with `precision: fp32`, `bf16` and `bf16-guidance`
(variants written with `config.write_variant` into `--out`/digits/MODE, trained by digits_quality's
`run_training` on `--nproc` ranks, default 2 as in the runs docs/precision.md reports; a run with its final
checkpoint is reused), each EMA checkpoint scored at 1 NFE with digits_quality's class agreement and Frechet
distance on `--num-samples` class-balanced samples (sampled in float32; the bf16 run also sampled in bf16, as its own
grids and dumps are). Training wall time per mode (noisy on a shared machine), and the median time of one
training step per mode with the modes stepped in turn in one process (`digits_step_cost`: robust to load
changes). `--control-seeds 43,...` adds fp32 runs with other training seeds: the run-to-run spread that the
modes' differences are to be compared with. `--skip-digits` / `--only-digits` run one part; results of the
other part already in `--out`/precision.json are kept.

Output: markdown tables on stdout and in `--out`/precision.md, everything in `--out`/precision.json.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from bench_util import Timer, interleaved_rounds, markdown_table, num_threads, sync  # noqa: E402
from config import load_config  # noqa: E402
from distributed import attention_context, autocast, guidance_dtype, precision_context, tf32_mode  # noqa: E402
from models import draw_training_times  # noqa: E402

RECIPES = {
    "imagenet": os.path.join(ROOT, "configs", "imagenet_B4.yaml"),
    "cifar": os.path.join(ROOT, "configs", "cifar.yaml"),
}
DIGITS_CONFIG = os.path.join(ROOT, "configs", "digits_demo.yaml")
DIGITS_MODES = ("fp32", "bf16", "bf16-guidance")
ZERO_INIT_MAX = 1e-4   # layers whose weights are all below this are "zero-initialised"
REDRAW_BIAS_STD = 0.02


# ----------------------------------------------------------------------------------------------------
# TF32 emulation


def _tf32_bits(value):
    """float32 (no grad) -> nearest TF32 value, ties to even, as float32; inf and NaN unchanged."""
    bits = value.view(torch.int32)
    lsb = (bits >> 13) & 1                                          # last kept mantissa bit, for ties to even
    rounded = ((bits + 0xFFF + lsb) & -8192).view(torch.float32)    # -8192 == ~0x1FFF: clears 13 bits
    return torch.where(torch.isfinite(value), rounded, value)


class _StraightThrough(torch.autograd.Function):
    """Returns `rounded` in the forward pass; the gradient goes to `x` unchanged."""

    @staticmethod
    def forward(ctx, x, rounded):
        return rounded.view_as(rounded)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_to_tf32(x, rounded=None):
    """float32 -> the nearest TF32 value (8 exponent bits, 10 explicit mantissa bits), ties to even, kept in
    float32, with a straight-through gradient. Other dtypes, infinities and NaNs pass through unchanged.
    `rounded`: the rounded value when already known (the weight cache of EmulateTF32)."""
    if x.dtype != torch.float32:
        return x
    if rounded is None:
        rounded = _tf32_bits(x.detach())
    return _StraightThrough.apply(x, rounded) if x.requires_grad and torch.is_grad_enabled() else rounded


# func -> positions of the arguments a TF32 tensor core reads (biases and addends stay float32)
_TF32_OPERANDS = {
    F.linear: (0, 1),
    F.conv1d: (0, 1), F.conv2d: (0, 1), F.conv3d: (0, 1),
    F.conv_transpose1d: (0, 1), F.conv_transpose2d: (0, 1), F.conv_transpose3d: (0, 1),
    torch.matmul: (0, 1), torch.Tensor.matmul: (0, 1), torch.Tensor.__matmul__: (0, 1),
    torch.Tensor.__rmatmul__: (0, 1),
    torch.mm: (0, 1), torch.Tensor.mm: (0, 1), torch.bmm: (0, 1), torch.Tensor.bmm: (0, 1),
    torch.addmm: (1, 2), torch.Tensor.addmm: (1, 2), torch.baddbmm: (1, 2), torch.Tensor.baddbmm: (1, 2),
    F.scaled_dot_product_attention: (0, 1, 2),
}
_TF32_KWARGS = {"input", "weight", "mat1", "mat2", "batch1", "batch2", "other", "query", "key", "value"}


class EmulateTF32(TorchFunctionMode):
    """Rounds the matmul / convolution / attention operands of float32 calls to TF32 (see the module doc).
    Calls under autocast are left alone (they run in the autocast dtype, as on CUDA). Rounded weights (views
    of Parameters) are cached per parameter version. `counts` tallies the rounded calls by function name
    (the audit that the emulation is applied)."""

    def __init__(self):
        super().__init__()
        self.counts = {}
        self._cache = {}

    def _round(self, a):
        if not isinstance(a, torch.Tensor) or a.dtype != torch.float32:
            return a
        base = a._base if a._base is not None else a
        if not isinstance(base, torch.nn.Parameter):
            return round_to_tf32(a)
        key = (id(base), base._version, tuple(a.shape), a.stride(), a.storage_offset())
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = (base, _tf32_bits(a.detach()))  # base kept alive: id stays unique
        return round_to_tf32(a, hit[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions = _TF32_OPERANDS.get(func)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if positions is not None and first is not None and not torch.is_autocast_enabled(first.device.type):
            args = tuple(self._round(a) if i in positions else a for i, a in enumerate(args))
            kwargs = {k: self._round(v) if k in _TF32_KWARGS else v for k, v in kwargs.items()}
            name = getattr(func, "__name__", str(func))
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)


def cuda_tf32(enabled):
    """Sets TF32 for CUDA matmuls and cuDNN convolutions, restoring the previous settings on exit."""
    return tf32_mode(enabled)


# ----------------------------------------------------------------------------------------------------
# Modes


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    precision: str          # a config `precision`: fp32, bf16, bf16-guidance
    tf32: str = "off"       # off | emulate | cuda (real TF32, CUDA only)
    dtype: torch.dtype = torch.float32

    @property
    def uses_guidance_autocast(self):
        return self.precision == "bf16-guidance"


REFERENCE = Mode("fp64 (reference)", "fp32", dtype=torch.float64)


def modes_for(device):
    if torch.device(device).type == "cuda":
        return [Mode("fp32 (TF32, release)", "fp32", "cuda"), Mode("fp32 strict (no TF32)", "fp32"),
                Mode("fp32 + TF32 (emulated)", "fp32", "emulate"), Mode("bf16", "bf16", "cuda"),
                Mode("bf16-guidance (TF32 calls 2-3)", "bf16-guidance", "cuda")]
    return [Mode("fp32", "fp32"), Mode("fp32 + TF32 (emulated)", "fp32", "emulate"), Mode("bf16", "bf16"),
            Mode("bf16-guidance", "bf16-guidance"),
            Mode("bf16-guidance + TF32 (emulated)", "bf16-guidance", "emulate")]


@contextlib.contextmanager
def mode_context(mode, device, emulator=None):
    """The numerics of one mode around the whole loss: TF32 setting, `precision_context` (bf16 autocast for
    `bf16`), the attention kernel (train.py's `auto`; the math kernel for float64, which the CUDA
    memory-efficient kernel does not take) and the TF32 emulation."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(cuda_tf32(mode.tf32 == "cuda"))
        elif mode.tf32 == "cuda":
            raise ValueError(f"mode {mode.name!r} needs CUDA")
        stack.enter_context(precision_context(device, mode.precision))
        stack.enter_context(attention_context("math" if mode.dtype == torch.float64 else "auto", device))
        if mode.tf32 == "emulate":
            stack.enter_context(emulator if emulator is not None else EmulateTF32())
        yield


# ----------------------------------------------------------------------------------------------------
# Models and inputs


def redraw_zero_layers(model, seed=0):
    """Re-draws every zero-initialised layer (adaLN-Zero modulations and final layers of the DiT; the U-Net's
    1e-5-scaled residual-branch, attention-projection and output convolutions): weights N(0, 1 / fan_in),
    biases N(0, REDRAW_BIAS_STD^2). Returns the names of the re-drawn modules."""
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.nn.Parameter) or w.dim() < 2 or w.abs().max() > ZERO_INIT_MAX:
                continue
            fan_in = w[0].numel()
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(fan_in))
            b = getattr(module, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                b.copy_(torch.randn(b.shape, generator=g) * REDRAW_BIAS_STD)
            names.append(name)
    return names


def recipe_model(recipe, seed=0, **size_overrides):
    """(model in eval mode with re-drawn zero layers, config, names of the re-drawn layers) of a recipe;
    `size_overrides` (config keys, e.g. hidden_size / model_channels) shrink it for tests."""
    cfg = load_config(RECIPES[recipe])
    if size_overrides:
        cfg = dataclasses.replace(cfg, **size_overrides)
    torch.manual_seed(seed)
    model = cfg.build_model()
    names = redraw_zero_layers(model, seed)
    return model.eval(), cfg, names


def make_inputs(model, objective, cfg_drop_rate, batch_size, seed=0, x0_kind="gaussian"):
    """The inputs shared by every mode: x0, noise, labels (conditional models), the CFG mask and the times;
    t, s and the mask are the same at both gaps, l is drawn at step 0 ("first") and at step total_steps
    ("last"). All float32 (the float64 reference converts them exactly)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, model.data_channels, model.data_size, model.data_size)
    if x0_kind == "gaussian":
        x0 = torch.randn(shape, generator=g)
    else:  # smooth random images in [-1, 1]
        low = torch.randn((batch_size, model.data_channels, 8, 8), generator=g)
        x0 = torch.tanh(F.interpolate(low, size=model.data_size, mode="bilinear", align_corners=False))
    noise = torch.randn(shape, generator=g)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=g) if model.conditional else None
    consistency_only = dataclasses.replace(objective, velocity_loss_ratio=0.0)  # same time distributions
    draws = {}
    for gap, step in (("first", 0), ("last", objective.total_steps)):
        torch.manual_seed(seed + 1)  # draw_training_times uses the global generator: same t, s, mask
        draws[gap] = draw_training_times(consistency_only, batch_size, step, "cpu", cfg_drop_rate,
                                         conditional=model.conditional)
    first, last = draws["first"], draws["last"]
    assert first.n_fm == 0 and torch.equal(first.t, last.t) and torch.equal(first.s, last.s)
    return dict(x0=x0, noise=noise, labels=labels, cfg_mask=first.cfg_mask, t=first.t, s=first.s,
                l={"first": first.l, "last": last.l},
                r={"first": objective.l_ratio(0), "last": objective.l_ratio(objective.total_steps)})


def _to(inputs, device, dtype):
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        return v
    return {k: conv(v) for k, v in inputs.items()}


def _b(t):
    return t.reshape(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------------
# One mode


class CallAudit:
    """Forward hook on the backbone: per network call, whether autocast is on, the output dtype, and the
    number of TF32-rounded operations inside it."""

    def __init__(self, device, emulator=None):
        self.device_type = torch.device(device).type
        self.emulator = emulator
        self.calls = []
        self._before = {}

    def pre(self, module, args):
        self._before = dict(self.emulator.counts) if self.emulator is not None else {}

    def post(self, module, args, output):
        rounded = 0
        if self.emulator is not None:
            rounded = sum(self.emulator.counts.values()) - sum(self._before.values())
        self.calls.append(dict(autocast=torch.is_autocast_enabled(self.device_type), out=str(output.dtype)[6:],
                               tf32_rounded_ops=rounded))


def run_mode(model, inputs, objective, mode, device, gaps=("first", "last")):
    """Delta (per gap), F_t and v* (per gap) of one mode, computed as `Soflow.fused_loss` and
    `consistency_part` compute them (every row a consistency row), on `model` converted to the mode's dtype.
    Returns a dict of CPU float64 tensors, the call audit and the seconds taken."""
    device = torch.device(device)
    emulator = EmulateTF32() if mode.tf32 == "emulate" else None
    audit = CallAudit(device, emulator)
    hooks = [model.network.register_forward_pre_hook(audit.pre), model.network.register_forward_hook(audit.post)]
    x = _to(inputs, device, mode.dtype)
    start = time.time()
    out = {"Delta": {}, "v_star": {}}
    try:
        with mode_context(mode, device, emulator):
            x_t, v_t = model.scheduler.add_noise(x["x0"], x["noise"], x["t"])
            t, s, labels, cfg_mask = x["t"], x["s"], x["labels"], x["cfg_mask"]
            guidance = None
            if objective.guided:  # call 1 (no grad), under the guidance autocast of bf16-guidance
                with autocast(device, guidance_dtype(mode.precision)):
                    guidance = model.guidance(x_t, v_t, t, labels, 0, objective)
            masked = model._masked_labels(labels, cfg_mask)
            F_t = model._F(x_t, t, s, masked, None)  # call 2, with grad as in training
            out["F_t"] = F_t.detach().double().cpu()
            with torch.no_grad():
                f_t = model._f(x_t, t, s, F_t.detach())
                v_star = model.mixed_target(v_t, guidance, guidance["v_cond"] if guidance else v_t, cfg_mask,
                                            objective.mix_ratio)
                for gap in gaps:
                    l = x["l"][gap]
                    x_l = x_t + v_star * _b(l - t)
                    f_l = model._f(x_l, l, s, model._F(x_l, l, s, masked, None))  # call 3
                    out["Delta"][gap] = ((f_t - f_l) / _b(t - l)).double().cpu()
                out["v_star"] = v_star.double().cpu()
        sync(device)
    finally:
        for h in hooks:
            h.remove()
    names = (["guidance"] if objective.guided else []) + ["F_t"] + [f"F_l ({g})" for g in gaps]
    out["audit"] = {n: c for n, c in zip(names, audit.calls)}
    out["tf32_ops"] = dict(emulator.counts) if emulator is not None else {}
    out["seconds"] = time.time() - start
    return out


def relative_errors(value, reference):
    """(batch-level, per-sample median, per-sample max) of ||value - reference|| / ||reference||."""
    diff = (value - reference).flatten(1).norm(dim=1)
    ref = reference.flatten(1).norm(dim=1)
    per = diff / ref
    return float(diff.norm() / ref.norm()), float(per.median()), float(per.max())


def measure(model, objective, inputs, modes, device, log=print, skip_guidance_modes=None):
    """Rows (gap x mode) of relative errors against the float64 copy of `model`. Modes whose only change is
    the guidance autocast are skipped for unguided objectives (they equal their float32 counterpart)."""
    device = torch.device(device)
    ref_model = copy.deepcopy(model).double().to(device)
    ref = run_mode(ref_model, inputs, objective, REFERENCE, device)
    del ref_model
    log(f"  {REFERENCE.name}: {ref['seconds']:.1f}s")
    rows = []
    model = model.to(device)
    for mode in modes:
        if mode.uses_guidance_autocast and not objective.guided and skip_guidance_modes is not False:
            log(f"  {mode.name}: skipped (no guidance call: cfg_scale {objective.cfg_scale}; equals its "
                f"float32 counterpart)")
            continue
        res = run_mode(model, inputs, objective, mode, device)
        log(f"  {mode.name}: {res['seconds']:.1f}s  audit {res['audit']}" +
            (f"  TF32-rounded {res['tf32_ops']}" if res["tf32_ops"] else ""))
        F_err = relative_errors(res["F_t"], ref["F_t"])
        v_err = relative_errors(res["v_star"], ref["v_star"])
        for gap in ref["Delta"]:
            d = relative_errors(res["Delta"][gap], ref["Delta"][gap])
            t_minus_l = (inputs["t"] - inputs["l"][gap]).double()
            rows.append(dict(gap=gap, r=inputs["r"][gap], median_t_minus_l=float(t_minus_l.median()),
                             mode=mode.name, delta_batch=d[0], delta_median=d[1], delta_max=d[2],
                             delta_abs_rms=float((res["Delta"][gap] - ref["Delta"][gap]).square().mean().sqrt()),
                             F_t_batch=F_err[0], v_star_batch=v_err[0] if objective.guided else None,
                             delta_rms=float(ref["Delta"][gap].square().mean().sqrt()),
                             F_rms=float(ref["F_t"].square().mean().sqrt()),
                             seconds=res["seconds"], audit=res["audit"], tf32_ops=res["tf32_ops"]))
    return rows, ref


def self_check(seed=0):
    """The chain of `run_mode` against `Soflow.fused_loss` on a tiny guided DiT (float32, every mode): the
    mean of Delta^2 must equal fused_loss's Con_MSE. Returns the largest relative difference."""
    model, cfg, _ = recipe_model("imagenet", seed=seed, hidden_size=32, depth=2, num_heads=2, patch_size=4,
                                 data_size=8)
    objective = cfg.objective()
    inputs = make_inputs(model, objective, cfg.cfg_drop_rate, 4, seed)
    worst = 0.0
    for mode in modes_for("cpu"):
        res = run_mode(model, inputs, objective, mode, "cpu", gaps=("last",))
        with mode_context(mode, "cpu"):
            cons = model.fused_loss(inputs["x0"], t=inputs["t"], s=inputs["s"], l=inputs["l"]["last"], n_fm=0,
                                    objective=objective, labels=inputs["labels"], cfg_mask=inputs["cfg_mask"],
                                    noise=inputs["noise"], guidance_dtype=guidance_dtype(mode.precision))["cons"]
        mine = res["Delta"]["last"].float().square().flatten(1).mean(1).mean()
        worst = max(worst, float((mine - cons[1].float()).abs() / cons[1].float().abs()))
    return worst


def delta_part(args, log):
    device = torch.device(args.device)
    modes = modes_for(device)
    worst = self_check(args.seed)
    log(f"self-check (run_mode's chain vs Soflow.fused_loss Con_MSE, tiny DiT, all modes): max rel. diff {worst:.2e}")
    result = dict(device=str(device), batch_size=args.batch_size, seed=args.seed, self_check=worst,
                  torch=torch.__version__, threads=torch.get_num_threads(), recipes={})
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for recipe in args.recipes:
        start = time.time()
        model, cfg, redrawn = recipe_model(recipe, seed=args.seed)
        objective = cfg.objective()
        inputs = make_inputs(model, objective, cfg.cfg_drop_rate, args.batch_size, args.seed,
                             "gaussian" if cfg.dataset_type == "Imagenet" else "images")
        log(f"{recipe}: {cfg.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{len(redrawn)} zero-initialised layers re-drawn; batch {args.batch_size}")
        rows, ref = measure(model, objective, inputs, modes, device, log)
        seconds = time.time() - start
        result["recipes"][recipe] = dict(
            config=os.path.relpath(RECIPES[recipe], ROOT), model_type=cfg.model_type, guided=objective.guided,
            cfg_scale=objective.cfg_scale, l_init_ratio=objective.l_init_ratio, l_end_ratio=objective.l_end_ratio,
            redrawn_layers=len(redrawn), cfg_masked_rows=int(inputs["cfg_mask"].sum()) if inputs["cfg_mask"]
            is not None else 0, rows=rows, seconds=seconds)
        log(f"{recipe}: {seconds:.0f}s")
        del model, ref
    return result


# ----------------------------------------------------------------------------------------------------
# Part 2: the digits demo trained under each precision


def _training_seconds_from_log(path):
    """Sum of the logged window times (excludes start-up, checkpoints and grids): a lower bound."""
    total = 0.0
    with open(path) as f:
        for line in f:
            m = re.search(r"\| Time ([0-9.]+)s", line)
            if m:
                total += float(m.group(1))
    return total


def _last_logged(path):
    values = {}
    with open(path) as f:
        for line in f:
            if line.startswith("Step "):
                values = {k: float(v) for k, v in re.findall(r"(Vel_MSE|Con_MSE|Grad_Norm) ([-+0-9.eE]+)", line)}
    return values


def _digits_stepper(cfg, mode, images, labels, batches, objective, seed):
    """A fresh digits model and optimizer, and the function that times training step `step` of `mode` on it."""
    from train import build_optimizer
    torch.manual_seed(seed)
    model = cfg.build_model().train()
    optimizer = build_optimizer(cfg, model)
    device = torch.device("cpu")

    def step(index):
        idx = batches[index]
        with Timer() as timer:
            with precision_context(device, mode):
                loss, _ = model(images[idx], labels[idx], objective=objective, finished_steps=index,
                                guidance_dtype=guidance_dtype(mode))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return timer.seconds
    return step


def digits_step_cost(cfg, modes, steps=40, warmup=3, threads=1, seed=0):
    """Median seconds of one training step (loss + backward + optimizer step) per precision, on the digits
    model at the per-rank batch of a 2-rank run, the modes stepped in turn (one step each, round robin) so
    that a change of machine load hits every mode alike. Single process, `threads` threads (torchrun's ranks
    run with OMP_NUM_THREADS=1)."""
    from data import load_digits
    with num_threads(threads):
        images, labels = load_digits(cfg.data_size, cfg.data_channels)
        batch = cfg.batch_size // 2
        g = torch.Generator().manual_seed(seed)
        batches = [torch.randint(0, len(images), (batch,), generator=g) for _ in range(warmup + steps)]
        objective = cfg.objective()
        steppers = [_digits_stepper(cfg, mode, images, labels, batches, objective, seed) for mode in modes]
        times = interleaved_rounds(steppers, warmup, steps)
    return {mode: dict(median_s=statistics.median(t), steps=steps, batch=batch, threads=threads)
            for mode, t in zip(modes, times)}


def digits_part(args, log):
    import digits_quality as dq
    from checkpoints import list_checkpoints
    from config import write_variant
    from inference import generate, load_sampling_model

    runs = os.path.join(os.path.abspath(args.out), "digits")
    base = load_config(args.digits_config)
    real = dq.RealReference(base.data_size, base.data_channels)
    result = dict(config=os.path.relpath(os.path.abspath(args.digits_config), ROOT), num_samples=args.num_samples,
                  seed=args.sample_seed, nproc=args.nproc, real_floor=real.floor, rows=[])
    if args.step_cost_steps > 0:
        result["step_cost"] = digits_step_cost(base, args.digits_modes, steps=args.step_cost_steps)
        log("digits step cost (interleaved, 1 thread): " + ", ".join(
            f"{m} {v['median_s'] * 1e3:.1f} ms" for m, v in result["step_cost"].items()))
    plan = [(mode, mode, {}) for mode in args.digits_modes]
    # control runs: fp32 with other training seeds, the run-to-run spread the modes' differences compare with
    plan += [("fp32", f"fp32-seed{seed}", dict(seed=seed)) for seed in args.control_seeds]
    for mode, name, changes in plan:
        path = write_variant(args.digits_config, os.path.join(runs, f"{name}.yaml"),
                             working_dir=os.path.join(runs, name), precision=mode, **changes)
        cfg = load_config(path)
        work = cfg.working_dir
        timing_file = os.path.join(work, "training_seconds.json")
        found = list_checkpoints(os.path.join(work, "ckpts"))
        if found and found[-1][0] == cfg.total_steps:
            ckpt = found[-1][1]
            if os.path.isfile(timing_file):
                with open(timing_file) as f:
                    seconds, timing = json.load(f)["seconds"], "wall (earlier run)"
            else:
                seconds, timing = _training_seconds_from_log(os.path.join(work, "log.txt")), "sum of logged windows"
            log(f"digits {name}: reusing {ckpt}")
        else:
            log(f"digits {name}: training {path}")
            ckpt, seconds = dq.run_training(path, args.nproc, log)
            timing = "wall"
            with open(timing_file, "w") as f:
                json.dump(dict(seconds=seconds, nproc=args.nproc), f)
        model = load_sampling_model(cfg, ckpt)
        logged = _last_logged(os.path.join(work, "log.txt"))
        sample_precisions = ["fp32"] + (["bf16"] if mode == "bf16" else [])
        for sp in sample_precisions:
            start = time.time()
            images, labels = dq.batched_samples(
                lambda idx: generate(model, idx, 1, args.sample_seed, torch.device("cpu"), class_balanced=True,
                                     precision=sp), args.num_samples, args.sample_batch_size)
            score = real.score(images, labels)
            result["rows"].append(dict(mode=name, precision=mode, training_seed=cfg.seed, sampled_in=sp,
                                       training_seconds=seconds, timing=timing,
                                       checkpoint=ckpt, final_window=logged, sampling_seconds=time.time() - start,
                                       **score))
            log(f"digits {name} (sampled {sp}): agreement {score['agreement']:.4f}, FD {score['frechet']:.4f}, "
                f"training {seconds:.0f}s ({timing})")
    return result


# ----------------------------------------------------------------------------------------------------
# Report


def _fmt(v, digits=2):
    if v is None:
        return "-"
    return f"{v:.{digits}e}" if v != 0 else "0"


def _audit_text(audit):
    """'1:bfloat16 2:float32 3:float32+TF32': output dtype per call (call 3 at the last gap)."""
    calls = [("1", audit.get("guidance")), ("2", audit.get("F_t")), ("3", audit.get("F_l (last)"))]
    return " ".join(f"{n}:{c['out']}{'+TF32' if c['tf32_rounded_ops'] else ''}" for n, c in calls if c)


def delta_markdown(delta):
    lines = [f"Relative error of Delta against float64 (device {delta['device']}"
             + (f", {delta['gpu']}" if delta.get("gpu") else "") + f", batch {delta['batch_size']}, "
             f"torch {delta['torch']}, {delta['threads']} threads). Delta batch = ||dDelta|| / ||Delta_fp64|| over the "
             f"batch; median / max: the same ratio per sample; rms dDelta: the absolute error (root mean square over "
             f"all elements); F_t and v*: batch-level relative errors of call 2's output and of the target velocity. "
             f"Calls: 1 guidance, 2 F(x_t, t, s), 3 F(x_l, l, s), with their output dtypes (+TF32: operands "
             f"rounded by the emulation).", ""]
    rows = []
    for recipe, rec in delta["recipes"].items():
        for gap in ("first", "last"):
            for row in (r for r in rec["rows"] if r["gap"] == gap):
                rows.append((f"{recipe} ({rec['model_type']})", gap, f"{row['r']:g}", f"{row['median_t_minus_l']:.2e}",
                             row["mode"], *(_fmt(row[k]) for k in ("delta_batch", "delta_median", "delta_max",
                                                                  "delta_abs_rms", "F_t_batch", "v_star_batch")),
                             _audit_text(row["audit"])))
    lines.append(markdown_table(("recipe", "gap", "r", "median t - l", "mode", "Delta batch", "Delta median",
                                 "Delta max", "rms dDelta", "F_t (call 2)", "v* (call 1)", "calls"), rows,
                                "llrrlrrrrrrl"))
    notes = [f"- {recipe}: rms |Delta_fp64| first / last gap "
             + " / ".join(f"{next(r['delta_rms'] for r in rec['rows'] if r['gap'] == g):.3f}"
                          for g in ("first", "last"))
             + f", rms F_t {rec['rows'][0]['F_rms']:.3f}, {rec['redrawn_layers']} zero-initialised layers re-drawn, "
             f"{rec['cfg_masked_rows']} CFG-masked rows, {rec['seconds']:.0f}s"
             + ("" if rec["guided"] else "; unguided (cfg_scale 1): bf16-guidance = fp32 by construction, not rerun")
             for recipe, rec in delta["recipes"].items()]
    return "\n".join(lines + [""] + notes)


def digits_markdown(digits):
    rows = digits["rows"]
    fp32 = next((r["frechet"] for r in rows if r["mode"] == "fp32" and r["sampled_in"] == "fp32"), None)
    floor = digits["real_floor"]
    lines = [f"Digits demo ({digits['config']}), 1-NFE EMA samples, N = {digits['num_samples']} class-balanced, "
             f"training on {digits['nproc']} CPU ranks (shared machine: timings are noisy).", ""]
    table = [("real digits (half B vs A)", "-", f"{floor['agreement']:.3f}", f"{floor['frechet']:.4f}", "", "", "", "")]
    cost = digits.get("step_cost", {})
    for r in rows:
        ratio = f"{r['frechet'] / fp32:.2f}" if fp32 else ""
        con = r["final_window"].get("Con_MSE")
        step = f"{cost[r['mode']]['median_s'] * 1e3:.1f}" if r["mode"] in cost else ""  # not for control runs
        wall = f"{r['training_seconds']:.0f}{'' if r['timing'].startswith('wall') else '*'}"
        table.append((r["mode"], r["sampled_in"], f"{r['agreement']:.4f}", f"{r['frechet']:.4f}", ratio, wall, step,
                      "" if con is None else f"{con:.4f}"))
    lines.append(markdown_table(("run (training precision)", "sampled in", "1-NFE class agreement",
                                 "Frechet distance", "FD / fp32 FD", "training wall time (s)",
                                 "step, interleaved (ms)", "final-window Con_MSE"), table, "llrrrrrr"))
    if cost:
        c = next(iter(cost.values()))
        lines.append(f"\nStep, interleaved: median of {c['steps']} training steps (loss, backward, AdamW) per mode, "
                     f"batch {c['batch']} (one rank's share), {c['threads']} thread, the modes stepped in turn in "
                     f"one process so that load changes hit them alike.")
    if any(not r["timing"].startswith("wall") for r in rows):
        lines.append("\n*: sum of the logged step windows (no wall time recorded for a reused run).")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "precision"), help="results folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (real TF32 rows on CUDA)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per Delta measurement")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs of part 1")
    p.add_argument("--recipes", default="imagenet,cifar", help="comma-separated: imagenet, cifar")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--skip-digits", action="store_true", help="part 1 only")
    part.add_argument("--only-digits", action="store_true", help="part 2 only")
    p.add_argument("--digits-config", default=DIGITS_CONFIG)
    p.add_argument("--digits-modes", default=",".join(DIGITS_MODES), help="comma-separated precisions")
    p.add_argument("--nproc", type=int, default=2, help="training ranks for the digits runs")
    p.add_argument("--num-samples", type=int, default=10000, help="1-NFE samples per digits model (multiple of 10)")
    p.add_argument("--sample-batch-size", type=int, default=1000, help="digits samples per forward pass")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--control-seeds", default="",
                   help="comma-separated training seeds of extra fp32 digits runs (run-to-run spread), e.g. 43")
    p.add_argument("--step-cost-steps", type=int, default=40,
                   help="interleaved training steps per mode for the digits step cost (0: skip)")
    args = p.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.digits_modes = [m for m in args.digits_modes.split(",") if m]
    args.control_seeds = [int(v) for v in args.control_seeds.split(",") if v]
    unknown = [r for r in args.recipes if r not in RECIPES] + [m for m in args.digits_modes if m not in DIGITS_MODES]
    if unknown:
        p.error(f"unknown recipe(s) / mode(s): {unknown}")
    if args.num_samples < 10 or args.num_samples % 10:
        p.error("--num-samples must be a positive multiple of 10")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "precision.json"), os.path.join(args.out, "precision.md")
    result = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            result = json.load(f)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if not args.only_digits:
        result["delta"] = delta_part(args, log)
        _save(result, json_path, md_path)
    if not args.skip_digits:
        result["digits"] = digits_part(args, log)
        _save(result, json_path, md_path)
    print(_markdown(result))
    return result


def _markdown(result):
    parts = []
    if "delta" in result:
        parts.append(delta_markdown(result["delta"]))
    if "digits" in result:
        parts.append(digits_markdown(result["digits"]))
    return "\n\n".join(parts) + "\n"


def _save(result, json_path, md_path):
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    with open(md_path, "w") as f:
        f.write(_markdown(result))


if __name__ == "__main__":
    main()
