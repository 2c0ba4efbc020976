"""The training step of each variant benchmarks/step_cost.py times, and the process that runs one variant.

Every variant trains the same class-conditional DiT (1000 classes, cfg_drop_rate 0.1) on latents
[B, 4, S, S] (or, with step_cost's `--config`, that config's model and objective):
  fm         plain flow matching, `Soflow.get_velocity_loss` with cfg_scale 1: one forward + backward.
  soflow     `Soflow.forward` with the ImageNet reference objective (configs/imagenet.yaml): the fused step of
             three network calls (batched no-grad guidance, the grad call, the no-grad call at l).
  reference  the same loss computed the way the reference release does it: six separate network calls
             (FM: grad + no-grad unconditional; consistency: no-grad unconditional, no-grad conditional,
             grad F(x_t, t, s), no-grad F(x_l, l, s)), always fp32 and the math attention kernel.
  meanflow   a MeanFlow step (Geng et al. 2025), `Soflow.get_meanflow_loss` (`method: meanflow` of models.py):
             u(z_t, r, t) and d/dt u by one `torch.func.jvp` along (v, 0, 1), target v - (t - r) du/dt
             (stop-gradient), adaptive weight with p = 1.
A `<variant>+gc` name is the same variant with activation checkpointing of every DiT block (fm, soflow and
reference; MeanFlow's torch.func.jvp runs the blocks plainly, as checkpointing does not support forward-mode
transforms).
"""
import itertools
import os
import resource

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_util import ROOT, MemoryMeter, Timer, WorkerChannel
from config import load_config
from distributed import autocast
from models import (MeanFlowLoss, Objective, Soflow, average_velocity_jvp, draw_training_times,
                    logit_normal)
from train import build_optimizer

VARIANTS = ("fm", "soflow", "reference", "meanflow")
GC_SUFFIX = "+gc"
GC_VARIANTS = ("fm", "soflow", "reference")  # MeanFlow's JVP runs the blocks plainly: checkpointing does not apply
NUM_CLASSES = 1000
CFG_DROP_RATE = 0.1
DATA_CHANNELS = 4
IMAGENET_CONFIG = os.path.join(ROOT, "configs", "imagenet.yaml")  # the release's imagenet.yaml


def _bcast(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def imagenet_objective():
    return load_config(IMAGENET_CONFIG).objective()


def build_model(model_type="DiT-B-4", data_size=32, dit_sizes=None):
    """The class-conditional latent DiT of the benchmark; `dit_sizes` overrides the DiT size (tests)."""
    extra = {} if dit_sizes is None else {"network_kwargs": dit_sizes}
    return Soflow(DATA_CHANNELS, data_size, NUM_CLASSES, CFG_DROP_RATE, "Linear", "Euler", model_type, **extra)


def _cfg_mask(model, batch_size, device):
    return torch.rand(batch_size, device=device) < model.cfg_drop_rate


def _with_null(model, labels, mask):
    return torch.where(mask, model.null_labels(labels.shape[0], labels.device), labels)


# ------------------------------------------------------------------------------------------------------
# 1. flow matching
def fm_loss(model, x, labels, step=0, objective=None):
    """Flow Matching only: one network call with gradient, no guidance passes (cfg_scale 1). Labels are dropped
    here, at cfg_drop_rate (the loss uses a CFG mask only when guided)."""
    o = objective or imagenet_objective()
    t = logit_normal(x.shape[0], o.time_mean[0], o.time_std[0], x.device)
    labels = _with_null(model, labels, _cfg_mask(model, x.shape[0], x.device))
    return model.get_velocity_loss(x, t, labels, cfg_scale=1.0, p=o.p, eps=o.eps)[0]


# ------------------------------------------------------------------------------------------------------
# 2. SoFlow, fused (the code under test)
def soflow_loss(model, x, labels, step=0, objective=None):
    return model(x, labels, objective=objective or imagenet_objective(), finished_steps=step)[0]


# ------------------------------------------------------------------------------------------------------
# 3. SoFlow as the reference release computes it: one network call per quantity
def reference_losses(model, samples, *, t, s, l, n_fm, objective, labels, cfg_mask, noise):
    """The SoFlow losses of rows [:n_fm] (Flow Matching) and [n_fm:] (consistency), six network calls.

    Same inputs and same return value as `Soflow.fused_loss` (class-conditional DiT, no augment labels):
    {'fm': (loss, mse, weight), 'cons': (surrogate loss, mse, weight)} for the non-empty parts.
    """
    sch = model.scheduler
    cfg_scale, cfg_decay_time, mix_ratio = objective.cfg_scale, objective.cfg_decay_time, objective.mix_ratio
    p, eps = objective.p, objective.eps
    B = samples.shape[0]
    guided = cfg_scale > 1
    out = {}
    parts = {"fm": slice(0, n_fm), "cons": slice(n_fm, B)}
    for name, rows in parts.items():
        x0, x1, t_, y = samples[rows], noise[rows], t[rows], labels[rows]
        # the CFG mask acts only when guided, as in the release
        m = cfg_mask[rows] if cfg_mask is not None and guided else torch.zeros_like(y, dtype=torch.bool)
        if x0.shape[0] == 0:
            continue
        x_t, v_t = sch.add_noise(x0, x1, t_)
        y_masked = _with_null(model, y, m)
        null = model.null_labels(x0.shape[0], x0.device)
        if name == "fm":
            pred = model.predict_velocity(x_t, t_, y_masked)  # network call with gradient
            target = v_t
            if guided:
                with torch.no_grad():
                    v_uncond = model.predict_velocity(x_t, t_, null)
                    w_cfg = _bcast(Soflow.get_cfg_decay_scale(t_, cfg_decay_time), x_t)
                    v_guided = v_t + w_cfg * (cfg_scale - 1) * (v_t - v_uncond)
                    v_guided = mix_ratio * v_guided + (1 - mix_ratio) * pred.detach()
                    target = torch.where(_bcast(m, x_t), v_t, v_guided)
            delta = pred - target
            mse = delta.square().flatten(1).mean(1)
            weight = 1 / (sch.db_ds(t_, t_).abs() * (mse.detach() + eps) ** p)
            out[name] = ((weight * mse).mean(), mse.detach().mean(), weight.mean())
            continue
        s_, l_ = s[rows], l[rows]
        target = v_t
        if guided:
            with torch.no_grad():
                v_uncond = model.predict_velocity(x_t, t_, null)
                v_cond = model.predict_velocity(x_t, t_, y)
                w_cfg = _bcast(Soflow.get_cfg_decay_scale(t_, cfg_decay_time), x_t)
                v_guided = v_t + w_cfg * (cfg_scale - 1) * (v_t - v_uncond)
                v_guided = mix_ratio * v_guided + (1 - mix_ratio) * v_cond
                target = torch.where(_bcast(m, x_t), v_t, v_guided)
        F_t = model.network(x_t, t_, s_, y_masked)  # network call with gradient
        f_t = _bcast(sch.a(t_, s_), x_t) * x_t + _bcast(sch.b(t_, s_), x_t) * F_t
        with torch.no_grad():
            x_l = x_t + target * _bcast(l_ - t_, x_t)
            f_l = model.solution_operator(x_l, l_, s_, y_masked)
        Delta = (f_t.detach() - f_l) / _bcast(t_ - l_, x_t)
        mse = Delta.square().flatten(1).mean(1)
        weight = 1 / (mse + eps) ** p
        sign_b = _bcast(torch.sign(sch.b(t_, s_)), x_t)
        surrogate = (sign_b * F_t * (Delta * _bcast(weight, Delta))).flatten(1).mean(1)
        out[name] = (surrogate.mean(), mse.mean(), weight.mean())
    return out


def sample_soflow_inputs(model, samples, objective, finished_steps):
    """Times and CFG mask exactly as `Soflow.forward` draws them, then the noise: (draws, noise)."""
    draws = draw_training_times(objective, samples.shape[0], finished_steps, samples.device, model.cfg_drop_rate,
                                conditional=True)
    noise = torch.randn_like(samples)
    if samples.dtype == torch.float64:
        draws.t, draws.s, draws.l = draws.t.double(), draws.s.double(), draws.l.double()
    return draws, noise


def reference_loss(model, x, labels, step=0, objective=None):
    """Total reference-style SoFlow loss, fp32 (no autocast) and the math attention kernel."""
    o = objective or imagenet_objective()
    d, noise = sample_soflow_inputs(model, x, o, step)
    B = x.shape[0]
    with torch.autocast(x.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        parts = reference_losses(model, x, t=d.t, s=d.s, l=d.l, n_fm=d.n_fm, objective=o, labels=labels,
                                 cfg_mask=d.cfg_mask, noise=noise)
    zero = x.new_zeros(())
    return parts.get("fm", (zero,))[0] * (d.n_fm / B) + parts.get("cons", (zero,))[0] * ((B - d.n_fm) / B)


# ------------------------------------------------------------------------------------------------------
# 4. MeanFlow: the loss of models.py (`method: meanflow`), with MeanFlow's settings (Objective defaults)
def meanflow_jvp(network, z, r, t, v, labels):
    """(u(z, r, t), d/dt u) along (v, 0, 1): models.average_velocity_jvp (kept under this name)."""
    return average_velocity_jvp(network, z, t, r, v, labels)


def sample_meanflow_times(batch_size, device, dtype=torch.float32, objective=None):
    """(t, r) as `method: meanflow` draws them (the first rows r = t, the last meanflow_ratio of them r < t)."""
    draws = MeanFlowLoss(objective or Objective()).draw(batch_size, 0, device)
    return draws.t.to(dtype), draws.s.to(dtype)


def meanflow_losses(model, x, labels, t, r, cfg_mask, noise, p=Objective.meanflow_p, eps=Objective.meanflow_eps):
    """MeanFlow loss for fixed inputs (`MeanFlowLoss.rows`, unguided; MeanFlow's p = 1 and eps = 1e-3 by
    default, the meanflow_* defaults of models.Objective). Returns (loss, u, u_tgt)."""
    loss = MeanFlowLoss(Objective(method="meanflow", meanflow_p=p, meanflow_eps=eps))
    mse, weight, u, u_tgt = loss.rows(model, x, t, r, labels=labels, cfg_mask=cfg_mask, noise=noise)
    return (weight * mse).mean(), u, u_tgt


def meanflow_loss(model, x, labels, step=0, objective=None):
    """One `Soflow.get_meanflow_loss` with the meanflow_* settings of `objective` (default: MeanFlow's)."""
    o = objective or Objective()
    d = MeanFlowLoss(o).draw(x.shape[0], step, x.device, model.cfg_drop_rate, conditional=labels is not None)
    return model.get_meanflow_loss(x, d.t, d.s, labels, d.cfg_mask, cfg_scale=o.meanflow_cfg_scale,
                                   cfg_kappa=o.meanflow_cfg_kappa, p=o.meanflow_p, eps=o.meanflow_eps)[0]


LOSSES = {"fm": fm_loss, "soflow": soflow_loss, "reference": reference_loss, "meanflow": meanflow_loss}


# ------------------------------------------------------------------------------------------------------
# Step, pass counting
def make_optimizer(model, impl="fused"):
    """The release's ImageNet AdamW (lr 1e-4, betas (0.9, 0.99), no weight decay) over every parameter, built by
    train.build_optimizer: `fused` one kernel (fused_optimizer: true), `default` what torch picks."""
    cfg = load_config(IMAGENET_CONFIG)
    cfg.fused_optimizer = impl == "fused"
    return build_optimizer(cfg, model)


def split_variant(name):
    """'soflow+gc' -> ('soflow', True); 'soflow' -> ('soflow', False)."""
    if name.endswith(GC_SUFFIX):
        return name[:-len(GC_SUFFIX)], True
    return name, False


def autocast_for(variant, device, dtype):
    """The variant's autocast: none for float32 and for the reference variant (always fp32)."""
    return autocast(device, None if variant == "reference" or dtype == torch.float32 else dtype)


def train_step(model, optimizer, variant, x, labels, step, dtype=torch.float32, objective=None):
    """zero_grad + loss + backward + optimizer step; returns the detached loss."""
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the between-steps memory
    with autocast_for(variant, x.device, dtype):
        loss = LOSSES[variant](model, x, labels, step, objective)
    loss.backward()
    optimizer.step()
    return loss.detach()


class PassCounter:
    """Counts the calls of `module` and the batch rows they see, split by gradient / no-gradient / JVP."""

    def __init__(self, module):
        self.calls = 0
        self.rows = {"grad": 0, "nograd": 0, "jvp": 0}
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0]
        kind = ("jvp" if torch._C._functorch.is_functorch_wrapped_tensor(x)
                else "grad" if torch.is_grad_enabled() else "nograd")
        self.calls += 1
        self.rows[kind] += x.shape[0]

    def remove(self):
        self._handle.remove()


def count_passes(model, variant, x, labels, dtype=torch.float32, objective=None):
    counter = PassCounter(model.network)
    try:
        with autocast_for(variant, x.device, dtype):
            LOSSES[variant](model, x, labels, 0, objective)
    finally:
        counter.remove()
    B = x.shape[0]
    return {"calls": counter.calls, **{k: v / B for k, v in counter.rows.items()}}


# ------------------------------------------------------------------------------------------------------
# The process of one variant (step_cost.py --worker), stepped on command
def worker_inputs(args):
    """(model, batch, labels, objective) of a worker: the latent DiT on random latents and the ImageNet
    objective, or with `--config` that config's model, random data of its shape and its objective."""
    g = torch.Generator().manual_seed(args.seed + 1)
    if args.config is None:
        model = build_model(args.model_type, args.data_size)
        x = torch.randn(args.batch_size, DATA_CHANNELS, args.data_size, args.data_size, generator=g)
        return model, x, torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g), None
    cfg = load_config(args.config)
    model = cfg.build_model()
    x = torch.randn(args.batch_size, cfg.data_channels, cfg.data_size, cfg.data_size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (args.batch_size,), generator=g) if cfg.conditional else None
    return model, x, labels, cfg.objective()


def serve_variant(args):
    """The body of one variant's process: builds the model, the batch and the optimizer, sends 'ready' with
    the pass counts, then answers 'step' (one timed training step) and 'report' (the memory) on stdin/stdout."""
    channel = WorkerChannel()
    variant, grad_checkpointing = split_variant(args.worker)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model, x, labels, objective = worker_inputs(args)
    model, x, labels = model.to(device).train(), x.to(device), labels.to(device) if labels is not None else None
    model.network.set_grad_checkpointing(grad_checkpointing)
    optimizer = make_optimizer(model, args.adamw)
    # Allocate gradients and AdamW moments now (a zero-gradient step leaves the weights unchanged when
    # weight_decay = 0), so that the memory baseline holds everything that lives between steps.
    for p in model.network.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    passes = count_passes(model, variant, x, labels, dtype, objective)
    if args.compile:
        model.network = torch.compile(model.network)
    torch.manual_seed(args.seed + 2)
    meter = MemoryMeter(device)
    meter.start()
    channel.send(ready=True, passes=passes, params=sum(p.numel() for p in model.parameters()), device=str(device),
                 device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    counter = itertools.count()  # the step number of train_step (0, 1, ...)

    def step():
        before = resource.getrusage(resource.RUSAGE_SELF)
        with Timer(device) as timer:
            loss = train_step(model, optimizer, variant, x, labels, next(counter), dtype, objective)
        after = resource.getrusage(resource.RUSAGE_SELF)
        return dict(seconds=timer.seconds, loss=float(loss), sys=after.ru_stime - before.ru_stime,
                    faults=after.ru_minflt - before.ru_minflt)
    channel.serve({"step": step, "report": meter.report})
