"""Cost of one SoFlow training step against flow matching, a reference-style SoFlow step and MeanFlow.

    python benchmarks/step_cost.py [--model-type DiT-B-4] [--batch-size 8] [--dtype float32|bfloat16]
                                   [--compile] [--steps 10] [--warmup 2] [--data-size 32]
                                   [--malloc system|retain] [--sequential] [--max-minutes 8.5]
                                   [--grad-checkpointing] [--config X.yaml]

Every variant trains the same class-conditional DiT (1000 classes, cfg_drop_rate 0.1) on the same random
latents [B, 4, S, S] and labels; one timed step is zero_grad + loss + backward + AdamW step. With `--config`,
the variants train that config's model on random data of its shape, with its objective (fm: its flow-matching
settings; soflow: its loss; meanflow: its meanflow_* settings), e.g. benchmarks/paper_table.py's MNIST DiT.

  fm         plain flow matching, `Soflow.get_velocity_loss` with cfg_scale 1: one forward + backward.
  soflow     `Soflow.forward` with the ImageNet reference objective (SPEC section 7): the fused step of
             three network calls (batched no-grad guidance, the grad call, the no-grad call at l).
  reference  the same loss computed the way the reference release does it: six separate network calls
             (FM: grad + no-grad unconditional; consistency: no-grad unconditional, no-grad conditional,
             grad F(x_t, t, s), no-grad F(x_l, l, s)), always fp32 and the math attention kernel.
  meanflow   a MeanFlow step (Geng et al. 2025), `Soflow.get_meanflow_loss` (`method: meanflow` of models.py):
             u(z_t, r, t) and d/dt u by one `torch.func.jvp` along (v, 0, 1), target v - (t - r) du/dt
             (stop-gradient), adaptive weight with p = 1.

`--grad-checkpointing` adds, for every named variant where it applies (fm, soflow, reference), the same
variant with activation checkpointing of every DiT block (`DiT.set_grad_checkpointing`) as `<variant>+gc`,
stepped in turn with the others; a `gc:` line per pair gives the time and memory ratios (with / without).
MeanFlow's torch.func.jvp runs the blocks plainly (checkpointing does not support forward-mode transforms).

Each variant runs in its own process (weights, optimizer and allocator state never shared). By default the
processes are stepped in turn, one step at a time, so that a change of machine load hits every variant
alike; `--sequential` runs them one after the other instead (one model in memory at a time).

Memory: on CUDA, torch.cuda.max_memory_allocated of the variant's process. On CPU, the peak resident set
(VmHWM, reset through /proc/self/clear_refs after set-up) of the variant's process. "step MiB" is that
peak minus what the process holds between steps (weights, gradients kept allocated, AdamW moments, data):
the activations and temporaries of the step, the part that depends on the objective. Ratios of memory use
"step MiB". "sys ms" and "faults k" (kernel time and minor page faults per step) show what the CPU allocator
costs when it hands freed memory back to the kernel between steps; `--malloc retain` turns that off.

The last line reads `ratios: soflow/fm=.. soflow/reference=.. soflow_mem/fm_mem=.. meanflow/fm=..` (medians);
with --grad-checkpointing the lines before it read `gc: time .., step memory .., peak memory .. (soflow+gc / soflow)`.
"""
import argparse
import itertools
import math
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench_util import (MemoryMeter, Timer, WorkerChannel, WorkerProcess, default_threads,  # noqa: E402
                        interleaved_rounds, step_bytes)
from config import load_config  # noqa: E402
from distributed import autocast  # noqa: E402
from models import (Objective, Soflow, average_velocity_jvp, draw_meanflow_times, draw_training_times,  # noqa: E402
                    logit_normal)
from train import build_optimizer  # noqa: E402

VARIANTS = ("fm", "soflow", "reference", "meanflow")
GC_SUFFIX = "+gc"
GC_VARIANTS = ("fm", "soflow", "reference")  # MeanFlow's JVP runs the blocks plainly: checkpointing does not apply
WORKER_VARIANTS = VARIANTS + tuple(v + GC_SUFFIX for v in GC_VARIANTS)
NUM_CLASSES = 1000
CFG_DROP_RATE = 0.1
DATA_CHANNELS = 4
IMAGENET_CONFIG = os.path.join(ROOT, "configs", "imagenet_B4.yaml")  # the release's imagenet.yaml
# MeanFlow defaults (Geng et al. 2025), the meanflow_* defaults of models.Objective: 25% of the rows with
# r != t, logit-normal(-0.4, 1) times, adaptive weight 1 / (mse + 1e-3)^p with p = 1.
MEANFLOW_RATIO = Objective.meanflow_ratio
MEANFLOW_TIME_MEAN, MEANFLOW_TIME_STD = Objective.meanflow_time_mean, Objective.meanflow_time_std
MEANFLOW_P, MEANFLOW_EPS = Objective.meanflow_p, Objective.meanflow_eps
# `--malloc retain`: glibc keeps freed memory (fixed 32 MiB mmap threshold, no heap trimming), the way a
# caching allocator does, so that steps stop paying page faults for memory handed back to the kernel.
RETAIN_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**44)}


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
    """(t, r) as `method: meanflow` draws them (the first rows r = t, the last MEANFLOW_RATIO of them r < t)."""
    draws = draw_meanflow_times(objective or Objective(), batch_size, device)
    return draws.t.to(dtype), draws.s.to(dtype)


def meanflow_losses(model, x, labels, t, r, cfg_mask, noise, p=MEANFLOW_P, eps=MEANFLOW_EPS):
    """MeanFlow loss for fixed inputs (`Soflow.meanflow_rows`, unguided). Returns (loss, u, u_tgt)."""
    mse, weight, u, u_tgt = model.meanflow_rows(x, t, r, labels=labels, cfg_mask=cfg_mask, p=p, eps=eps,
                                                noise=noise)
    return (weight * mse).mean(), u, u_tgt


def meanflow_loss(model, x, labels, step=0, objective=None):
    """One `Soflow.get_meanflow_loss` with the meanflow_* settings of `objective` (default: MeanFlow's)."""
    o = objective or Objective()
    d = draw_meanflow_times(o, x.shape[0], x.device, model.cfg_drop_rate, conditional=labels is not None)
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
# Worker process: one variant, stepped on command
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


def worker(args):
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


def start_worker(variant, args):
    """The process of one variant (this script with --worker), its allocator as --malloc says."""
    env = dict(os.environ, **(RETAIN_MALLOC_ENV if args.malloc == "retain" else {}))
    return WorkerProcess(variant, [os.path.abspath(__file__), "--worker", variant] + _forward_args(args), env)


def step_worker(worker):
    """One training step of the worker's variant: {'seconds', 'loss', 'sys', 'faults'}."""
    message = worker.request("step")
    if not math.isfinite(message["loss"]):
        raise RuntimeError(f"variant '{worker.name}' produced a non-finite loss {message['loss']}")
    return message


def _forward_args(args):
    out = ["--model-type", args.model_type, "--batch-size", str(args.batch_size), "--dtype", args.dtype,
           "--data-size", str(args.data_size), "--threads", str(args.threads), "--seed", str(args.seed),
           "--adamw", args.adamw] + (["--config", args.config] if args.config else [])
    return out + (["--compile"] if args.compile else [])


# ------------------------------------------------------------------------------------------------------
# Driver
def measure_group(group, args, end, groups_left, log):
    """The variants of `group`, one process each, stepped in turn (interleaved_rounds) within this group's share
    of the time left until `end` (--max-minutes cuts the warm-up to >= 1 round and the timed rounds to >= 2):
    {variant: result}."""
    workers = [start_worker(v, args) for v in group]
    try:
        infos = [w.receive() for w in workers]  # each worker's 'ready' message, sent after its set-up
        now = time.perf_counter()
        steppers = [lambda _round, w=w: step_worker(w) for w in workers]
        records = interleaved_rounds(steppers, args.warmup, args.steps, now + (end - now) / groups_left,
                                     f"--max-minutes {args.max_minutes}", log)
        return {w.name: dict(info, times=[m["seconds"] for m in steps], sys=[m["sys"] for m in steps],
                             faults=[m["faults"] for m in steps], memory=w.request("report"))
                for w, info, steps in zip(workers, infos, records)}
    finally:
        for w in workers:
            w.close()


def run_benchmark(args, log=print):
    variants = list(args.variants)
    if "fm" not in variants:
        variants.insert(0, "fm")
    if getattr(args, "grad_checkpointing", False):
        variants += [v + GC_SUFFIX for v in args.variants if v in GC_VARIANTS]
    end = time.perf_counter() + args.max_minutes * 60
    groups = [variants] if not args.sequential else [[v] for v in variants]
    results = {}
    for k, group in enumerate(groups):
        results.update(measure_group(group, args, end, len(groups) - k, log))
    return results


NOTES = {"fm": "velocity loss, cfg_scale 1",
         "soflow": "fused 3-call step",
         "reference": "6 calls, fp32, math SDPA",
         "meanflow": "torch.func.jvp, math SDPA"}


def _note(name):
    base, gc = split_variant(name)
    return NOTES[base] + (", grad checkpointing" if gc else "")


def _table_order(results):
    """The variants in VARIANTS order, each followed by its checkpointed twin."""
    return [name for v in VARIANTS for name in (v, v + GC_SUFFIX) if name in results]


def format_table(results, args=None):
    """The printed table and the final `ratios:` line (medians of the same run; memory = step MiB)."""
    med = {v: statistics.median(r["times"]) for v, r in results.items()}
    mem = {v: step_bytes(r["memory"]) for v, r in results.items()}
    fm_t, fm_m = med["fm"], mem["fm"]
    name_width = max([10] + [len(v) for v in results])  # 12 with 'reference+gc'
    columns = [("variant", f"<{name_width}"), ("median ms", ">9"), ("min ms", ">8"), ("x fm", ">6"), ("sys ms", ">7"),
               ("faults k", ">8"), ("peak MiB", ">8"), ("step MiB", ">8"), ("x fm", ">6"), ("calls", ">5"),
               ("rows/B", ">6"), ("grad", ">4"), ("jvp", ">4"), ("notes", "")]
    lines = [" ".join(f"{name:{fmt}}" for name, fmt in columns)]
    lines.append("-" * (len(lines[0]) + 24))
    for v in _table_order(results):
        r, p = results[v], results[v]["passes"]
        cells = [v, f"{med[v] * 1e3:.1f}", f"{min(r['times']) * 1e3:.1f}", f"{med[v] / fm_t:.3f}",
                 f"{statistics.median(r.get('sys') or [0]) * 1e3:.0f}",
                 f"{statistics.median(r.get('faults') or [0]) / 1e3:.1f}",
                 f"{r['memory']['peak'] / 2**20:.1f}", f"{mem[v] / 2**20:.1f}",
                 f"{mem[v] / fm_m:.3f}" if fm_m > 0 else "nan", str(p["calls"]),
                 f"{p['grad'] + p['nograd'] + p['jvp']:.2f}", f"{p['grad']:.2f}", f"{p['jvp']:.2f}", _note(v)]
        lines.append(" ".join(f"{c:{fmt}}" for c, (_, fmt) in zip(cells, columns)))
    ratio = []
    if "soflow" in results:
        ratio.append(f"soflow/fm={med['soflow'] / fm_t:.3f}")
        if "reference" in results:
            ratio.append(f"soflow/reference={med['soflow'] / med['reference']:.3f}")
        ratio.append(f"soflow_mem/fm_mem={mem['soflow'] / fm_m:.3f}")
    if "meanflow" in results:
        ratio.append(f"meanflow/fm={med['meanflow'] / fm_t:.3f}")
    return "\n".join(lines), "ratios: " + " ".join(ratio)


def format_gc_ratios(results):
    """One `gc:` line per variant measured with and without checkpointing: the ratios (with / without) of the
    median step time, of the step memory (activations and temporaries) and of the process peak."""
    lines = []
    for v in VARIANTS:
        if v not in results or v + GC_SUFFIX not in results:
            continue
        off, on = results[v], results[v + GC_SUFFIX]
        time_ratio = statistics.median(on["times"]) / statistics.median(off["times"])
        step = {k: step_bytes(r["memory"]) for k, r in (("off", off), ("on", on))}
        step_ratio = step["on"] / step["off"] if step["off"] > 0 else float("nan")
        peak_ratio = on["memory"]["peak"] / off["memory"]["peak"]
        lines.append(f"gc: time {time_ratio:.2f}, step memory {step_ratio:.2f}, peak memory {peak_ratio:.2f} "
                     f"({v}{GC_SUFFIX} / {v})")
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="DiT-B-4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="autocast dtype of the forward passes (weights stay fp32); default float32, the "
                         "release's numerics; the reference variant always runs fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (the MeanFlow JVP "
                                                           "runs on the eager module)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, 4 with --compile)")
    ap.add_argument("--data-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every variant "
                                                              "(default: the CPUs this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adamw", choices=("fused", "default"), default="fused",
                    help="AdamW implementation (fused: one kernel; default: what torch picks, the release's)")
    ap.add_argument("--malloc", choices=("system", "retain"), default="system",
                    help="CPU allocator of the variant processes: glibc as configured, or glibc told to keep "
                         "freed memory (no page faults from trimming; what a caching allocator does)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--sequential", action="store_true",
                    help="run the variants one after another instead of stepping them in turn")
    ap.add_argument("--max-minutes", type=float, default=8.5,
                    help="wall-time budget: fewer warm-up (>= 1) and timed (>= 2) steps when the next round "
                         "would end past it")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="also run every named variant where it applies (fm, soflow, reference) with activation "
                         "checkpointing of the DiT blocks, as '<variant>+gc', and print the time and memory ratios")
    ap.add_argument("--config", help="time the model, data shape and objective of this training config instead "
                                     "of the latent DiT (--model-type and --data-size are then unused)")
    ap.add_argument("--worker", choices=WORKER_VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 4 if args.compile else 2
    if args.threads is None:
        args.threads = default_threads()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 4:
        ap.error("--steps >= 1, --warmup >= 0 and --batch-size >= 4 (so that every part of the SoFlow "
                 "batch is non-empty) are required")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    wall = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# step_cost: {args.model_type}, batch {args.batch_size}, latents {DATA_CHANNELS}x{args.data_size}x"
          f"{args.data_size}, {NUM_CLASSES} classes, cfg_drop_rate {CFG_DROP_RATE}; device {device}, "
          f"torch {torch.__version__}, {args.threads} threads, autocast {args.dtype}, "
          f"compile {args.compile}, AdamW {args.adamw}, malloc {args.malloc}, "
          f"grad checkpointing {args.grad_checkpointing}", flush=True)
    print(f"# {args.warmup} warm-up + {args.steps} timed steps per variant, one process per variant, "
          f"{'sequential' if args.sequential else 'stepped in turn'}; seed {args.seed}", flush=True)
    results = run_benchmark(args, log=lambda s: print(s, flush=True))
    first = next(iter(results.values()))
    method = first["memory"]["method"]
    print(f"# device: {first['device_name']}; model parameters {first['params']:,}; memory: {method}")
    print("# peak MiB: process peak (CUDA: max allocated; CPU: peak resident set). step MiB: peak minus the "
          "between-steps memory (weights, grads, AdamW moments, data) = activations and temporaries")
    print("# rows/B: network rows per step / batch size (forward passes of the whole batch); grad / jvp: "
          "of which with gradient / forward-mode JVP; the rest no-grad")
    print("# sys ms, faults k: median kernel CPU time and minor page faults (thousands) per step, the cost of "
          "the allocator handing memory back and touching it anew")
    table, ratios = format_table(results, args)
    print(table)
    counts = ", ".join(f"{v}={len(r['times'])}" for v, r in results.items())
    print(f"# timed steps per variant: {counts}; total wall time {time.perf_counter() - wall:.0f} s")
    if args.grad_checkpointing:
        if "meanflow" in args.variants:
            print("# meanflow: no '+gc' run (torch.func.jvp runs the blocks without checkpointing)")
        for line in format_gc_ratios(results):
            print(line)
    print(ratios)


if __name__ == "__main__":
    main()
