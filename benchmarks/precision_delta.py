"""Part 1 of benchmarks/precision.py: the error of the consistency loss's Delta in each precision mode.

The consistency loss divides a difference of two network outputs by the gap t - l,
    Delta = (f(x_t, t, s) - f(x_l, l, s)) / (t - l),   x_l = x_t + v* (l - t),
and t - l = (t - s) r(k, K) shrinks to l_end_ratio (t - s) at the end of training (ImageNet 0.002, CIFAR
0.0003125). Rounding in the network calls 2 (F(x_t, t, s)) and 3 (F(x_l, l, s)) is therefore amplified by up
to 1 / (t - l); rounding in the no-grad guidance call 1 moves x_l by v_err (l - t) and v* by v_err, so its
error reaches Delta unamplified.

For the ImageNet recipe (DiT-B-4 on 4 x 32 x 32 latents, configs/imagenet.yaml: cfg_scale 3, mix_ratio
0.25, cfg_drop_rate 0.1) and the CIFAR recipe (the full-size U-Net of configs/cifar.yaml, unconditional, eval
mode so that dropout is off): the relative error of Delta against a float64 copy of the same model fed the
same inputs (x0, noise, t, s, l, labels, CFG mask), at the first gap (r = l_init_ratio, step 0) and the last
(r = l_end_ratio, step = total_steps). t, s and the mask come from `models.draw_training_times` with the
recipe's objective (every row a consistency row) and are the same at both gaps. Reported: the batch-level
ratio ||Delta_mode - Delta_fp64|| / ||Delta_fp64|| (Frobenius norms), its median and max per sample, and the
relative errors of F_t (call 2) and of the target velocity v* (from call 1), so that the amplification shows.

Each mode runs the code's own pieces (`SoflowLoss.guidance` under the mode's guidance autocast,
`SoflowLoss.target`, `Soflow.network_output` / `Soflow.solution_from_output` under
`distributed.precision_context`), chained as `SoflowLoss.loss_parts` chains them; `self_check` checks that the
chain reproduces fused_loss's Con_MSE bit for bit.
  fp32                     float32, no autocast (on CUDA the release's numerics: TF32 matmuls and convs on)
  fp32 strict (no TF32)    CUDA only: TF32 off
  fp32 + TF32 (emulated)   float32 under tf32_emulation.EmulateTF32 (on CUDA with real TF32 off)
  bf16                     `precision: bf16`: bf16 autocast around all three calls
  bf16-guidance            `precision: bf16-guidance`: bf16 autocast for call 1 only; calls 2 and 3 float32
  bf16-guidance + TF32 (emulated)  CPU only: calls 2 and 3 emulated in TF32, which is what bf16-guidance
                           runs on CUDA with the default `tf32: true`
Without guidance (CIFAR, cfg_scale 1) bf16-guidance is float32 by construction and is not rerun.

Weights. Freshly built DiTs output zeros (adaLN-Zero) and the U-Net nearly zeros (its residual-branch and
output convolutions are scaled by 1e-5 at init), which would make Delta = v* trivially. Every such layer (a
weight of 2+ dimensions with max |w| <= 1e-4) is re-drawn with weights N(0, 1 / fan_in) and biases
N(0, 0.02^2). Inputs: x0 ~ N(0, 1) for the latents; smooth random images in [-1, 1] (bilinear 8 -> 32
upsampled noise) for CIFAR. These are untrained networks: a trained network's error ratios may differ,
though the 1 / (t - l) amplification does not depend on the weights.
"""
import contextlib
import copy
import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F

from bench_util import ROOT, markdown_table, sync
from config import load_config
from distributed import attention_context, autocast, guidance_dtype, precision_context, tf32_mode
from models import SoflowLoss, draw_training_times
from tf32_emulation import EmulateTF32

RECIPES = {
    "imagenet": os.path.join(ROOT, "configs", "imagenet.yaml"),
    "cifar": os.path.join(ROOT, "configs", "cifar.yaml"),
}
ZERO_INIT_MAX = 1e-4   # layers whose weights are all below this are "zero-initialised"
REDRAW_BIAS_STD = 0.02


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
            stack.enter_context(tf32_mode(mode.tf32 == "cuda"))
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
    """Delta (per gap), F_t and v* (per gap) of one mode, computed as `SoflowLoss.loss_parts` and
    `SoflowLoss.consistency` compute them (every row a consistency row), on `model` converted to the mode's dtype.
    Returns a dict of CPU float64 tensors, the call audit and the seconds taken."""
    device = torch.device(device)
    emulator = EmulateTF32() if mode.tf32 == "emulate" else None
    audit = CallAudit(device, emulator)
    hooks = [model.network.register_forward_pre_hook(audit.pre), model.network.register_forward_hook(audit.post)]
    x = _to(inputs, device, mode.dtype)
    start = time.time()
    out = {"Delta": {}, "v_star": {}}
    loss = SoflowLoss(objective)
    try:
        with mode_context(mode, device, emulator):
            x_t, v_t = model.scheduler.add_noise(x["x0"], x["noise"], x["t"])
            t, s, labels, cfg_mask = x["t"], x["s"], x["labels"], x["cfg_mask"]
            guidance = None
            if objective.guided:  # call 1 (no grad), under the guidance autocast of bf16-guidance
                with autocast(device, guidance_dtype(mode.precision)):
                    guidance = loss.guidance(model, x_t, v_t, t, labels, 0)
            masked = model.masked_labels(labels, cfg_mask)
            F_t = model.network_output(x_t, t, s, masked, None)  # call 2, with grad as in training
            out["F_t"] = F_t.detach().double().cpu()
            with torch.no_grad():
                f_t = model.solution_from_output(x_t, t, s, F_t.detach())
                v_star = loss.target(v_t, guidance, guidance["v_cond"] if guidance else v_t, cfg_mask)
                for gap in gaps:
                    l = x["l"][gap]
                    x_l = x_t + v_star * _b(l - t)
                    F_l = model.network_output(x_l, l, s, masked, None)  # call 3
                    f_l = model.solution_from_output(x_l, l, s, F_l)
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

