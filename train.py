"""SoFlow training with DDP: `torchrun --nproc-per-node=N train.py --config configs/X.yaml`.

Runs on CPU (gloo) and GPUs (NCCL). Writes to working_dir: config.yaml, log.txt, ckpts/{step}.pt,
figs/{step}.png (EMA sample grids) and evals/{step}.npz (EMA sample dumps for FID). A run resumes
from its newest readable checkpoint and then continues exactly as if it had never stopped.
"""
import argparse
import copy
import contextlib
import os
import resource
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import latest_checkpoint, save_checkpoint
from config import ConfigError, load_config, save_config, validate
from data import batch_loader, build_dataset
from inference import autocast_context, build_decoder, dump_samples, sample_grid


# ----------------------------------------------------------------------------------------------------
# Distributed set-up


def setup_distributed():
    """(rank, world_size, device). Uses NCCL + cuda:LOCAL_RANK where CUDA exists, gloo + CPU otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60),
                                device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj, world_size):
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------
# Random state (saved in checkpoints so that a resumed run is bit-exact)


def get_rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        state[device.type] = torch.get_device_module(device.type).get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type != "cpu" and device.type in state:
        torch.get_device_module(device.type).set_rng_state(state[device.type], device)


# ----------------------------------------------------------------------------------------------------
# EMA


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model on floating-point parameters (one fused foreach op);
    buffers are copied."""
    ema_params = [p for p in ema.parameters() if p.is_floating_point()]
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay(cfg):
    """Per-update decay: the reference's CIFAR variant updates every 16 steps with decay**16 in float64."""
    return float(torch.tensor(cfg.ema_decay_rate, dtype=torch.float64) ** cfg.ema_steps)


# ----------------------------------------------------------------------------------------------------
# Logging


class Logger:
    def __init__(self, path, rank):
        self.path = path
        self.rank = rank

    def __call__(self, msg):
        if self.rank != 0:
            return
        tqdm.write(msg)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


class NonFiniteLoss(RuntimeError):
    pass


def crash_hook(point, step, rank):
    """Test-only fault injection: SOFLOW_TEST_CRASH="step:N" or "ckpt:N" (optionally "@RANK") kills this
    process with SIGKILL at the start of step N, or in the middle of writing checkpoint N."""
    spec = os.environ.get("SOFLOW_TEST_CRASH")
    if not spec:
        return
    where, _, at_rank = spec.partition("@")
    kind, _, n = where.partition(":")
    if kind == point and int(n) == step and rank == int(at_rank or 0):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------
# Training


def build_optimizer(cfg, params, device):
    kw = dict(lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    # Fused AdamW runs on CUDA and CPU alike (on CPU it is ~20x faster than the foreach kernel at DiT-B-4).
    fast = cfg.fused_optimizer or None
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(params, fused=fast, **kw)
    return torch.optim.RAdam(params, foreach=fast, **kw)  # RAdam has no fused kernel


def attention_context(cfg):
    """`attention: math` pins SDPA to the reference's math kernel; `auto` lets PyTorch choose (flash /
    memory-efficient on CUDA: the consistency loss has no JVP, so nothing rules them out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH) if cfg.attention == "math" else contextlib.nullcontext()


def configure_backends(cfg, device):
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--no-resume", action="store_true", help="refuse to start when working_dir has checkpoints")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        validate(cfg, args.config, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    rank, world_size, device = setup_distributed()
    try:
        train(cfg, args, rank, world_size, device)
    finally:
        cleanup_distributed()


def train(cfg, args, rank, world_size, device):
    configure_backends(cfg, device)
    work = cfg.working_dir
    ckpt_dir, eval_dir, fig_dir = (os.path.join(work, d) for d in ("ckpts", "evals", "figs"))
    if rank == 0:
        for d in (ckpt_dir, eval_dir, fig_dir):
            os.makedirs(d, exist_ok=True)
        save_config(cfg, os.path.join(work, "config.yaml"))
    log = Logger(os.path.join(work, "log.txt"), rank)

    dataset = build_dataset(cfg)  # fails early, with a clear message, when data are missing
    decode = build_decoder(cfg.vae, cfg.latent_scale, device) if cfg.dataset_type == "ImageNet" else None

    torch.manual_seed(cfg.seed + rank)
    model = cfg.build_model().to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(cfg, [p for p in model.network.parameters() if p.requires_grad], device)
    finished_steps = 0

    ckpt_path, state = latest_checkpoint(ckpt_dir, log=log)
    if state is not None:
        if args.no_resume:
            raise SystemExit(f"{ckpt_dir} holds checkpoints and --no-resume was given")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema_model"])
        optimizer.load_state_dict(state["optimizer"])
        finished_steps = int(state["finished_steps"])
        rng = state.get("rng_states")
        if rng is not None and len(rng) == world_size:
            set_rng_state(rng[rank], device)
            exact = "bit-exact continuation"
        else:
            torch.manual_seed(cfg.seed + rank + 1_000_003 * finished_steps)
            exact = "random states reseeded (world size changed or no saved states)"
        log(f"resumed from {ckpt_path} at step {finished_steps} ({exact})")
    else:
        log(f"starting a new run in {work} on {world_size} rank(s), device {device.type}")
    log(f"model {cfg.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"dataset {cfg.dataset_type}: {len(dataset)} samples; global batch {cfg.batch_size}")

    if device.type == "cuda" and cfg.channels_last and cfg.model_type == "UNet":
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.network.compile()  # in place: state-dict keys stay those of the reference
    # Gradients as views of DDP's buckets: no copy into and out of the buckets on every step.
    ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
           if world_size > 1 else model)
    objective = cfg.objective()
    decay = ema_decay(cfg)
    params = [p for p in model.network.parameters() if p.requires_grad]

    num_workers = cfg.num_workers if cfg.dataset_type == "ImageNet" else 0
    loader, steps_per_epoch = batch_loader(dataset, cfg.batch_size, rank, world_size, cfg.seed, finished_steps,
                                           cfg.total_steps, num_workers, pin_memory=device.type == "cuda")
    keys = ("Vel_MSE", "Vel_Weight", "Con_MSE", "Con_Weight", "Grad_Norm")
    window = torch.zeros(len(keys), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # checked without per-step syncs
    last_good = ckpt_path
    window_start, window_steps = time.time(), 0
    bar = tqdm(total=cfg.total_steps, initial=finished_steps, desc="train", disable=rank != 0, dynamic_ncols=True)

    def check_finite(step):
        flag = first_bad_step.clone()
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() >= 0:
            raise NonFiniteLoss(f"non-finite loss or gradient at step {flag.item() + 1}; stopped at step {step} "
                                f"without writing these weights. Last good checkpoint: {last_good or 'none'}")

    model.train()
    for x, labels in loader:
        step = finished_steps
        crash_hook("step", step, rank)
        x = x.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if cfg.conditional else None
        samples, augment_labels = dataset.prepare(x)
        if device.type == "cuda" and cfg.channels_last and cfg.model_type == "UNet":
            samples = samples.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, cfg.precision), attention_context(cfg):
            loss, stats = ddp(samples, labels, augment_labels, objective=objective, finished_steps=step)
        optimizer.zero_grad(set_to_none=True)
        with attention_context(cfg):
            loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        first_bad_step.copy_(torch.where((first_bad_step < 0) & ~finite, step, first_bad_step))
        optimizer.step()
        finished_steps = step + 1
        if finished_steps % cfg.ema_steps == 0:
            ema_update(ema, model, decay)
        window += torch.stack([stats[k] for k in keys[:-1]] + [grad_norm]).float()
        window_steps += 1
        bar.update(1)

        if finished_steps % cfg.logging_steps == 0 or finished_steps == cfg.total_steps:
            check_finite(finished_steps)
            if world_size > 1:
                dist.all_reduce(window)
                window /= world_size
            values = (window / window_steps).tolist()
            elapsed = time.time() - window_start
            log(f"Step {finished_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in zip(keys, values))
                + f" | Peak_Mem {peak_memory_gib(device):.2f}GiB | Time {elapsed:.1f}s")
            bar.set_postfix(loss=f"{values[0] + values[2]:.4f}")
            window.zero_()
            window_start, window_steps = time.time(), 0
        if finished_steps % cfg.eval_demo_steps == 0 or finished_steps == cfg.total_steps:
            check_finite(finished_steps)
            if rank == 0:
                path = os.path.join(fig_dir, f"{finished_steps}.png")
                sample_grid(ema, cfg.eval_demo_shape, cfg.eval_NFE, cfg.seed, device, path, decode, cfg.precision)
        if finished_steps % cfg.ckpt_saving_steps == 0 or finished_steps == cfg.total_steps:
            check_finite(finished_steps)
            rng_states = all_gather_objects(get_rng_state(device), world_size)
            if rank == 0:
                path = os.path.join(ckpt_dir, f"{finished_steps}.pt")
                save_checkpoint({"model": model.state_dict(), "ema_model": ema.state_dict(),
                                 "optimizer": optimizer.state_dict(), "finished_steps": finished_steps,
                                 "finished_epochs": finished_steps // steps_per_epoch,
                                 "rng_states": rng_states}, path,
                                before_rename=lambda tmp: crash_hook("ckpt", finished_steps, rank))
                log(f"saved checkpoint {path}")
            last_good = os.path.join(ckpt_dir, f"{finished_steps}.pt")
            if world_size > 1:
                dist.barrier()
        if finished_steps % cfg.eval_steps == 0 or finished_steps == cfg.total_steps:
            check_finite(finished_steps)
            out = os.path.join(eval_dir, f"{finished_steps}.npz")
            dump_samples(ema, out, cfg.num_eval_samples, cfg.eval_NFE, cfg.seed, cfg.eval_batch_size, device, rank,
                         world_size, decode, precision=cfg.precision, progress=True)
            log(f"wrote {cfg.num_eval_samples} EMA samples ({cfg.eval_NFE} NFE) to {out}")
    bar.close()
    log(f"finished {finished_steps} steps")


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
