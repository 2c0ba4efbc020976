"""SoFlow training with DDP: `torchrun --nproc-per-node=N train.py --config configs/X.yaml`.

Runs on CPU (gloo) and GPUs (NCCL). Follows the release's recipe: float32 with TF32, optimizer over every
network parameter, EMA of the whole model, `ckpts/0.pt` before the first step. Writes to working_dir:
config.yaml (the release's keys) with config.soflow.yaml (this code's), log.txt, tb/ (TensorBoard),
ckpts/{step}.pt, figs/{step}.png (EMA sample grids) and evals/{step}.npz (EMA sample dumps for FID). A run resumes from its newest readable checkpoint and then
continues exactly as if it had never stopped. SIGTERM or SIGUSR1 to any rank (what SLURM sends before it
kills a job) makes every rank finish its step, write a checkpoint and exit with status 75.
"""
import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import resource
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import (CheckpointMismatchError, check_weights_fit, latest_checkpoint, list_checkpoints,
                         save_checkpoint)
from config import RESUME_NO_EFFECT, ConfigError, check_resume, check_world_size, load_config, save_config
from data import batch_loader, build_dataset
from distributed import (RowShare, all_gather_objects, attention_context, barrier, broadcast_object,
                         cleanup_distributed, configure_backends, crash_hook, first_error, get_rng_state,
                         guidance_dtype, precision_context, process_group_backend, set_rng_state, setup_distributed,
                         setup_logging)
from inference import build_decoder, dump_samples, sample_grid
from models import draw_training_times
from safe_io import Claim, OutputError, free_space
from tracking import Tracker

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; re-run the command to resume
LOG_KEYS = ("Vel_MSE", "Vel_Weight", "Con_MSE", "Con_Weight", "Grad_Norm")


# ----------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """EMA of the whole model (parameters blended, buffers copied), on the release's cadence: after the
    optimizer steps 1, 1 + every, 1 + 2 every, ... with decay ema_decay_rate ** every. With every > 1 (the
    release's CIFAR variant) the blend is done in float64; with every = 1 it is DiT's
    ema = ema * decay + param * (1 - decay) in the parameters' dtype."""

    def __init__(self, model, decay_rate, every=1):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.every = every
        self.decay = float(torch.tensor(decay_rate, dtype=torch.float64) ** every)

    @torch.no_grad()
    def update(self, model, step):
        """`step`: optimizer steps finished before the one just taken (0 after the first step)."""
        if step % self.every:
            return
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if self.every > 1:
            for e, p in zip(ema_params, params):
                e.copy_(e.double() * self.decay + p.double() * (1 - self.decay))
        else:
            torch._foreach_mul_(ema_params, self.decay)
            torch._foreach_add_(ema_params, params, alpha=1 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------------
# Faults: non-finite losses, failed writes, preemption


class NonFiniteLoss(RuntimeError):
    pass


class CheckpointWriteError(OutputError):
    pass


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; `requested()` (a collective, once per step on every rank) tells every
    rank whether any rank got one. The flag travels on a CPU (gloo) group, so no device synchronisation."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, world_size):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def _handler(self, signum, frame):
        self.signum = signum

    def requested(self):
        flag = torch.tensor([self.signum or 0])
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def close(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def prune_checkpoints(directory, keep_last, keep_every, newest):
    """Deletes periodic checkpoints beyond the newest `keep_last`, except those whose step is divisible by
    `keep_every`, and never `newest` (the one just written, already durable). Returns the deleted paths."""
    if not keep_last:
        return []
    found = [(step, path) for step, path in list_checkpoints(directory) if path != newest]
    removable = [(step, path) for step, path in found if not (keep_every and step % keep_every == 0)]
    doomed = removable[:max(len(removable) - (keep_last - 1), 0)]
    for _, path in doomed:
        os.remove(path)
    return [path for _, path in doomed]


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


# ----------------------------------------------------------------------------------------------------
# FID inside training


class TrainingFID:
    """Scores the periodic dumps in the training processes with the evaluator's PyTorch Inception backend:
    each rank computes the features of its share as it is sampled and writes them next to the dump; every rank
    reads them all and computes its rows of the precision/recall work (evaluator.compute_metrics with a
    RowShare); rank 0 computes IS, FID and sFID and writes the evaluator's line to log.txt and
    evals/eval_results.txt. The reference batch is checked, and its statistics and radii computed (or read
    from the evaluator's cache), before step 1."""

    def __init__(self, cfg, device, rank, eval_dir):
        import evaluator
        self.evaluator, self.rank, self.eval_dir = evaluator, rank, eval_dir
        if rank == 0:  # a download, if any, happens once
            evaluator.check_batch(cfg.fid_ref_batch, role="reference batch")
            evaluator.resolve_inception_graph(cfg.fid_inception_graph)
        barrier()
        graph = evaluator.resolve_inception_graph(cfg.fid_inception_graph)
        # The TensorFlow self-check of the first batch runs on rank 0 when TensorFlow is importable.
        self.features = evaluator.make_feature_extractor("torch", graph, device=device, tf_check=rank == 0)
        self.reference = evaluator.load_reference(cfg.fid_ref_batch, self.features) if rank == 0 else None
        # The precision/recall rows are split over the ranks, which all need the reference pool features (and
        # their radii, computed here the same way unless the evaluator's cache holds them).
        self.device = device
        self.share = RowShare() if dist.is_initialized() else None
        if self.share is not None:
            received = broadcast_object(dataclasses.replace(self.reference, spatial=None) if rank == 0 else None)
            self.reference = self.reference if rank == 0 else received
        self.reference.radii(device=device, share=self.share)
        self.parts = None

    def start(self):
        self.parts = ([], [], [])

    def add(self, images):
        for out, value in zip(self.parts, self.features.features_of(images)):
            out.append(value)

    def finish(self, name, world_size):
        """The line of `name` (rank 0; None elsewhere)."""
        stem = os.path.join(self.eval_dir, f".{name}.features")
        np.savez(f"{stem}{self.rank}.npz", *(np.concatenate(p) if p else np.zeros((0, 0), np.float32)
                                             for p in self.parts))
        barrier()
        line = None
        loaded = [np.load(f"{stem}{r}.npz") for r in range(world_size)]
        pool, spatial, probs = (np.concatenate([f[f"arr_{i}"] for f in loaded if f[f"arr_{i}"].size])
                                for i in range(3))
        # Every rank takes part (its rows of the precision/recall work); rank 0 gets the result.
        result = self.evaluator.compute_metrics(self.reference, pool, spatial, probs, device=self.device,
                                                share=self.share)
        if self.rank == 0:
            line = self.evaluator.format_result({"file": name, **result})
            with open(os.path.join(self.eval_dir, "eval_results.txt"), "a") as f:
                f.write(line + "\n")
            for r in range(world_size):
                os.remove(f"{stem}{r}.npz")
        barrier()
        return line


# ----------------------------------------------------------------------------------------------------
# Set-up


def build_optimizer(cfg, model):
    """The release's optimizer over every parameter of the model, the DiT's frozen position table included
    (it never gets a gradient, but optimizer state dicts then have one entry per parameter, as the release's)."""
    kw = dict(lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(model.parameters(), fused=cfg.fused_optimizer or None, **kw)
    return torch.optim.RAdam(model.parameters(), foreach=cfg.fused_optimizer or None, **kw)  # no fused RAdam


def is_due(step, period, total_steps):
    """Whether a periodic event (grid, dump) falls on `step`: every `period` steps, and at the last step
    when the period fits in the run."""
    return step % period == 0 or (step == total_steps and period <= total_steps)


def decoder_needed(cfg, start_step, owed=False):
    """An Imagenet run decodes latents only for grids and dumps: those `owed` by the resumed step, and those of
    the steps left to do (none when both periods exceed total_steps or nothing is left to do)."""
    return cfg.dataset_type == "Imagenet" and (owed or start_step < cfg.total_steps
                                               and min(cfg.eval_demo_steps, cfg.eval_steps) <= cfg.total_steps)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/; the release's files load as they are)")
    p.add_argument("--no-resume", action="store_true", help="refuse to start when working_dir has checkpoints")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# One optimizer step


def train_step(ddp, model, optimizer, batch, objective, step, cfg, device):
    """Loss and backward over `grad_accum_steps` micro-batches of this rank's batch, then the optimizer step.

    The Flow Matching / consistency rows, times, CFG mask and noise are drawn for the whole batch (as without
    accumulation); each micro-batch's loss is weighted by its share of the batch's rows, so the gradients
    equal the whole batch's up to float rounding, and DDP all-reduces once, in the last micro-batch's
    backward. Returns (loss, stats, grad_norm) as device tensors (no host synchronisation)."""
    samples, labels, augment_labels = batch
    B = samples.shape[0]
    draws = draw_training_times(objective, B, step, device, model.cfg_drop_rate, conditional=labels is not None)
    noise = torch.randn_like(samples)
    bounds = [round(i * B / cfg.grad_accum_steps) for i in range(cfg.grad_accum_steps + 1)]
    optimizer.zero_grad(set_to_none=True)
    loss = samples.new_zeros(())
    stats = dict.fromkeys(LOG_KEYS[:-1], samples.new_zeros(()))
    n_cons = B - draws.n_fm
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        last = i == cfg.grad_accum_steps - 1
        part = draws.rows(lo, hi)
        sync = ddp.no_sync() if isinstance(ddp, DDP) and not last else contextlib.nullcontext()

        def rows(x):
            return None if x is None else x[lo:hi]
        with sync:
            with precision_context(device, cfg.precision), attention_context(cfg.attention, device):
                part_loss, part_stats = ddp(samples[lo:hi], rows(labels), rows(augment_labels), objective=objective,
                                            finished_steps=step, guidance_dtype=guidance_dtype(cfg.precision),
                                            draws=part, noise=noise[lo:hi], batch_rows=B)
            with attention_context(cfg.attention, device):
                part_loss.backward()
        loss = loss + part_loss.detach()
        shares = {"Vel": part.n_fm / max(draws.n_fm, 1), "Con": (hi - lo - part.n_fm) / max(n_cons, 1)}
        stats = {k: stats[k] + part_stats[k] * shares[k[:3]] for k in stats}
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    return loss, stats, grad_norm


# ----------------------------------------------------------------------------------------------------
# Training


# ----------------------------------------------------------------------------------------------------
# Before anything is written: the working_dir's lock, the resume's checks


LOCK_NAME = "train.lock"


def claim_working_dir(work, rank):
    """Rank 0 claims `work` (the lock file working_dir/train.lock, naming its host and pid) before anything is
    written there; every rank learns the outcome. Returns (claim, note on a stale lock taken over); SystemExit on
    every rank, with the other run's host and pid, when another live run holds it."""
    claim, error, note = Claim(os.path.join(work, LOCK_NAME), work, "working_dir", "another working_dir"), None, None
    if rank == 0:
        try:
            note = claim.acquire()
        except (OutputError, OSError) as e:
            error = str(e)
    error = first_error(error)
    if error:
        raise SystemExit(f"error: {error}")
    return claim, note


def recorded_changes(cfg, config_path, work):
    """The keys of `cfg` that differ from the run's own config.yaml, except the optimizer's (which the optimizer
    state decides, see apply_optimizer_settings); SystemExit naming each model or data key that changed."""
    recorded = os.path.join(work, "config.yaml")
    if not os.path.isfile(recorded):
        return []
    try:
        return check_resume(load_config(recorded), cfg, recorded, config_path)[1]
    except ConfigError as e:
        raise SystemExit(f"config error: {e}. (The run's config.yaml is its record: fix or restore it if it cannot "
                         f"be read.)") from None


def apply_optimizer_settings(optimizer, cfg):
    """The config's learning_rate, betas and weight_decay replace those a loaded optimizer state brought back.
    Returns [(key, checkpoint's value, config's value)] of those that changed."""
    wanted = {"lr": cfg.learning_rate, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    names = {"lr": "learning_rate", "betas": "betas", "weight_decay": "weight_decay"}
    changes = []
    for group in optimizer.param_groups:
        for key, value in wanted.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                if (names[key], old, value) not in changes:
                    changes.append((names[key], old, value))
                group[key] = value
    return changes


def load_training_state(model, ema, optimizer, state, cfg, ckpt_path):
    """The checkpoint's weights (checked to fit the config's model first: SystemExit naming the sizes that differ)
    and optimizer state, with the config's optimizer settings applied; returns those that changed."""
    try:
        for key, module in (("model", model), ("ema_model", ema.model)):
            check_weights_fit(module, state[key], cfg.model_type, ckpt_path)
    except CheckpointMismatchError as e:
        raise SystemExit(f"error: {e}") from None
    model.load_state_dict(state["model"])
    ema.model.load_state_dict(state["ema_model"])
    optimizer.load_state_dict(state["optimizer"])
    return apply_optimizer_settings(optimizer, cfg)


def weights_finite(*modules):
    """A device bool: every parameter of `modules` is finite (no host synchronisation)."""
    return torch.stack([torch.isfinite(p).all() for m in modules for p in m.parameters()]).all()


# ----------------------------------------------------------------------------------------------------
# Grids and dumps


class PeriodicOutputs:
    """The EMA sample grid (figs/{step}.png, drawn on rank 0) and dump (evals/{step}.npz, all ranks) of a step.
    The checkpoint of a step is written before them, so a run stopped in between (a failed write, a kill, a
    preemption) owes them, and the resumed run draws them first. A failure on any rank stops every rank."""

    def __init__(self, cfg, device, rank, world_size, work, decode, fid, tracker):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        self.fig_dir, self.eval_dir = os.path.join(work, "figs"), os.path.join(work, "evals")
        self.decode, self.fid, self.tracker = decode, fid, tracker

    def due(self, step):
        return is_due(step, self.cfg.eval_demo_steps, self.cfg.total_steps), is_due(step, self.cfg.eval_steps,
                                                                                  self.cfg.total_steps)

    def owed(self, step):
        """(grid, dump) due at `step` and not on disk."""
        grid, dump = self.due(step)
        return grid and not os.path.isfile(os.path.join(self.fig_dir, f"{step}.png")), dump and not self.dumped(step)

    def dumped(self, step):
        name = f"{step}.npz"
        if self.cfg.fid_ref_batch:
            from evaluator import RESULTS_FILENAME, evaluated_files
            if name not in evaluated_files(os.path.join(self.eval_dir, RESULTS_FILENAME)):
                return False
        return not self.cfg.eval_save_samples or os.path.isfile(os.path.join(self.eval_dir, name))

    def write(self, ema_model, step, which, log):
        grid, dump = which
        if grid:
            self.grid(ema_model, step)
        if dump:
            self.dump(ema_model, step, log)

    def grid(self, ema_model, step):
        cfg, error = self.cfg, None
        if self.rank == 0:
            path = os.path.join(self.fig_dir, f"{step}.png")
            try:
                with attention_context(cfg.attention, self.device):
                    sample_grid(ema_model, cfg.eval_demo_shape, cfg.eval_NFE, cfg.seed, self.device, path,
                                self.decode, cfg.precision)
                if self.tracker.kind != "none":
                    self.tracker.image(step, "samples/ema_grid", np.asarray(Image.open(path).convert("RGB")))
            except Exception as e:
                error = str(e) if isinstance(e, OutputError) else f"grid {path}: {type(e).__name__}: {e}"
        error = first_error(error)
        if error:
            raise OutputError(error)

    def dump(self, ema_model, step, log):
        cfg = self.cfg
        out = os.path.join(self.eval_dir, f"{step}.npz")
        if self.fid is not None:
            self.fid.start()
        with attention_context(cfg.attention, self.device):
            dump_samples(ema_model, out, cfg.num_eval_samples, cfg.eval_NFE, cfg.seed, cfg.eval_batch_size,
                         self.device, self.rank, self.world_size, self.decode, precision=cfg.precision, progress=True,
                         on_batch=self.fid.add if self.fid is not None else None, write=cfg.eval_save_samples)
        if cfg.eval_save_samples:
            log(f"wrote {cfg.num_eval_samples} EMA samples ({cfg.eval_NFE} NFE) to {out}")
        if self.fid is not None:
            line = self.fid.finish(os.path.basename(out), self.world_size)
            if line:
                log(line)


# ----------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", 1)), args.config)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    rank, world_size, device = setup_distributed()
    preemption = Preemption(world_size)
    tracker = claim = None
    work = cfg.working_dir
    created = not os.path.isdir(work)
    try:
        configure_backends(device, cfg.tf32)
        ckpt_dir, eval_dir, fig_dir = (os.path.join(work, d) for d in ("ckpts", "evals", "figs"))
        # Nothing is written into working_dir (config.yaml, log.txt, ckpts/) before the lock and the checks.
        claim, note = claim_working_dir(work, rank)
        deferred = [note] if note else []  # messages for log.txt, which is opened once the checks have passed
        log = setup_logging("train", rank).info

        dataset = build_dataset(cfg)  # fails early, with a clear message, when data are missing or mislabelled
        ckpt_path, state = latest_checkpoint(ckpt_dir, log=deferred.append)
        if state is not None and args.no_resume:
            raise SystemExit(f"{ckpt_dir} holds checkpoints and --no-resume was given")
        changes = recorded_changes(cfg, args.config, work) if state is not None else []
        finished_steps = int(state["finished_steps"]) if state is not None else 0
        outputs = PeriodicOutputs(cfg, device, rank, world_size, work, None, None, None)
        # A checkpoint of this code whose step's grid or dump is missing: drawn before the next step.
        owed = outputs.owed(finished_steps) if state is not None and "rng_states" in state else (False, False)
        dumps_due = owed[1] or finished_steps < cfg.total_steps and cfg.eval_steps <= cfg.total_steps
        # The SD-VAE is loaded (before step 1) only when something will be decoded.
        decode = (build_decoder(cfg.vae, cfg.latent_scale, device) if decoder_needed(cfg, finished_steps, any(owed))
                  else None)

        torch.manual_seed(cfg.seed + rank)  # the release's seeding; DDP then broadcasts rank 0's weights
        model = cfg.build_model().to(device)
        if cfg.grad_checkpointing:
            model.network.set_grad_checkpointing(True)
        if device.type == "cuda" and cfg.channels_last and cfg.model_type == "UNet":
            model.to(memory_format=torch.channels_last)
        # Gradients as views of DDP's buckets: no copy into and out of the buckets on every step.
        ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True) if dist.is_initialized() else model)
        ema = EMA(model, cfg.ema_decay_rate, cfg.ema_steps)  # after DDP's broadcast: the same EMA on every rank
        if cfg.compile:
            model.network.compile()  # in place (state-dict keys stay the release's); the EMA copy stays eager
        optimizer = build_optimizer(cfg, model)
        applied = load_training_state(model, ema, optimizer, state, cfg, ckpt_path) if state is not None else []

        # The checks passed: the run's record is written now.
        error = None
        if rank == 0:
            try:
                for d in (ckpt_dir, eval_dir, fig_dir):
                    os.makedirs(d, exist_ok=True)
                save_config(cfg, os.path.join(work, "config.yaml"))
            except (OSError, OutputError) as e:
                error = f"{e}; {free_space(work)}" if isinstance(e, OSError) else str(e)
        error = first_error(error)
        if error:
            raise SystemExit(f"error: {error}")
        log = setup_logging("train", rank, os.path.join(work, "log.txt")).info
        for message in deferred:
            logging.getLogger("train").warning(message)

        if state is not None:
            rng = state.get("rng_states")
            for key, old, new in changes:
                log(f"changed since the run's config.yaml: {key}: {old!r} -> {new!r}")
            for key, old, new in applied:
                log(f"applied to the optimizer: {key} {old!r} -> {new!r} (the checkpoint's value)")
            altered = [k for k, _, _ in changes if k not in RESUME_NO_EFFECT] + [k for k, _, _ in applied]
            if rng is not None and len(rng) == world_size:
                set_rng_state(rng[rank], device)
                exact = ("bit-exact continuation" if not altered else
                         f"continued with changed settings ({', '.join(altered)}), not a bit-exact continuation")
            else:
                torch.manual_seed(cfg.seed + rank + 1_000_003 * finished_steps)
                exact = ("random states reseeded: a checkpoint without them, e.g. the release's" if rng is None else
                         f"world size {len(rng)} -> {world_size}: the same global batches follow (the batch "
                         f"order depends on seed and step only), random states reseeded")
            log(f"resumed from {ckpt_path} at step {finished_steps} ({exact})")
        else:
            log(f"starting a new run in {work} on {world_size} rank(s), device {device.type}")
        backend = process_group_backend()
        log(f"process group: {backend}, the model in DDP" if backend else
            "process group: none (one process outside torchrun), the model without DDP")
        log(f"model {cfg.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
            f"dataset {cfg.dataset_type}: {len(dataset)} samples; global batch {cfg.batch_size}"
            + (f" in {cfg.grad_accum_steps} micro-batches per rank" if cfg.grad_accum_steps > 1 else "")
            + f"; precision {cfg.precision}" + (f" (TF32 {'on' if cfg.tf32 else 'off'})" if device.type == "cuda"
                                                else ""))
        tracker = Tracker(cfg.tracker, work, rank, config=cfg.to_dict(), project=cfg.wandb_project)
        if tracker.path:
            log(f"TensorBoard: tensorboard --logdir {tracker.path}")

        fid = TrainingFID(cfg, device, rank, eval_dir) if cfg.fid_ref_batch and dumps_due else None
        outputs = PeriodicOutputs(cfg, device, rank, world_size, work, decode, fid, tracker)
        loader, steps_per_epoch = batch_loader(dataset, cfg.batch_size, rank, world_size, cfg.seed, finished_steps,
                                               cfg.total_steps, cfg.num_workers, pin_memory=device.type == "cuda",
                                               prefetch_factor=cfg.prefetch_factor)
        last_good = ckpt_path

        def save(step):
            """Writes ckpts/{step}.pt on rank 0; every rank learns whether it worked (a failed write stops all)."""
            nonlocal last_good
            rng_states = all_gather_objects(get_rng_state(device))
            path = os.path.join(ckpt_dir, f"{step}.pt")
            error = None
            if rank == 0:
                try:
                    save_checkpoint({"model": model.state_dict(), "ema_model": ema.model.state_dict(),
                                     "optimizer": optimizer.state_dict(), "finished_steps": step,
                                     "finished_epochs": step // steps_per_epoch, "rng_states": rng_states}, path,
                                    before_rename=lambda tmp: crash_hook("ckpt", step, rank))
                except Exception as e:  # any type: torch.save raises RuntimeError on a full or read-only disk
                    reason = str(e) if isinstance(e, OutputError) else (f"could not write checkpoint {path} "
                                                                         f"({type(e).__name__}: {e})")
                    error = (f"{reason}. Earlier checkpoints are intact (newest: {last_good or 'none'}); free space "
                             f"or fix the permissions, then re-run the same command to resume")
                else:
                    log(f"saved checkpoint {path}")
                    for old in prune_checkpoints(ckpt_dir, cfg.ckpt_keep_last, cfg.ckpt_keep_every, path):
                        log(f"removed {old} (ckpt_keep_last={cfg.ckpt_keep_last})")
            error = first_error(error)
            if error:
                raise CheckpointWriteError(error)
            last_good = path

        if state is None:
            save(0)  # as the release: the initial weights, before the first step

        objective = cfg.objective()
        window = torch.zeros(len(LOG_KEYS), device=device)
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # checked without per-step syncs
        window_start, window_steps = time.time(), 0
        bar = tqdm(total=cfg.total_steps, initial=finished_steps, desc="train", disable=rank != 0,
                   dynamic_ncols=True)

        def check_finite(step):
            """Stops every rank when a loss or gradient was non-finite since the start, or the weights are now."""
            flag = torch.stack([first_bad_step, torch.where(weights_finite(model, ema.model), -1, step)])
            if world_size > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad_loss, bad_weights = flag.tolist()
            if bad_loss >= 0:
                raise NonFiniteLoss(f"non-finite loss or gradient at step {bad_loss + 1}; stopped at step {step} "
                                    f"without writing these weights. Last good checkpoint: {last_good or 'none'}")
            if bad_weights >= 0:
                raise NonFiniteLoss(f"non-finite weights after step {step} although the losses and gradients were "
                                    f"finite (an update too large: learning_rate {cfg.learning_rate}?); stopped "
                                    f"without writing them. Last good checkpoint: {last_good or 'none'}")

        def write_outputs(step, which):
            """The grid and dump of `step` (its checkpoint already written, or written now if one fails)."""
            if not any(which):
                return
            check_finite(step)
            try:
                outputs.write(ema.model, step, which, log)
            except OutputError as e:
                if last_good != os.path.join(ckpt_dir, f"{step}.pt"):
                    save(step)
                raise OutputError(f"{e}. Checkpoint {last_good} holds step {step}: fix the cause, then re-run the "
                                  f"same command; it resumes there and draws this step's grid and dump first") from None

        write_outputs(finished_steps, owed)
        model.train()
        for x, labels in loader:
            step = finished_steps
            crash_hook("step", step, rank)
            x = x.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if cfg.conditional else None
            samples, augment_labels = dataset.prepare(x)
            if device.type == "cuda" and cfg.channels_last and cfg.model_type == "UNet":
                samples = samples.contiguous(memory_format=torch.channels_last)
            loss, stats, grad_norm = train_step(ddp, model, optimizer, (samples, labels, augment_labels), objective,
                                                step, cfg, device)
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            first_bad_step.copy_(torch.where((first_bad_step < 0) & ~finite, step, first_bad_step))
            ema.update(model, step)
            finished_steps = step + 1
            window += torch.stack([stats[k] for k in LOG_KEYS[:-1]] + [grad_norm]).float()
            window_steps += 1
            bar.update(1)
            last = finished_steps == cfg.total_steps
            signum = preemption.requested()

            if finished_steps % cfg.logging_steps == 0 or last or signum:
                check_finite(finished_steps)
                if world_size > 1:
                    dist.all_reduce(window)
                    window /= world_size
                values = dict(zip(LOG_KEYS, (window / window_steps).tolist()))
                elapsed = time.time() - window_start
                per_rank = window_steps * cfg.batch_size / world_size / elapsed
                log(f"Step {finished_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in values.items())
                    + f" | Peak_Mem {peak_memory_gib(device):.2f}GiB | Img/s {per_rank * world_size:.1f} "
                    f"({per_rank:.1f}/rank) | Time {elapsed:.1f}s")
                tracker.scalars(finished_steps, {
                    **{f"train/{k}": v for k, v in values.items()}, "train/Peak_Mem_GiB": peak_memory_gib(device),
                    "train/l_ratio": objective.l_ratio(finished_steps),
                    "train/learning_rate": optimizer.param_groups[0]["lr"],
                    "speed/images_per_s": per_rank * world_size, "speed/images_per_s_per_rank": per_rank})
                bar.set_postfix(loss=f"{values['Vel_MSE'] + values['Con_MSE']:.4f}")
                window.zero_()
                window_start, window_steps = time.time(), 0
            # The checkpoint first: a grid or dump that fails, or a stop, loses no training.
            if finished_steps % cfg.ckpt_saving_steps == 0 or last or signum:
                check_finite(finished_steps)
                save(finished_steps)
            if signum and not last:
                log(f"stopped by {signal.Signals(signum).name} after step {finished_steps}: checkpoint {last_good} "
                    f"written; re-run the same command to resume (exit status {PREEMPTED_EXIT_CODE})")
                bar.close()
                return PREEMPTED_EXIT_CODE
            write_outputs(finished_steps, outputs.due(finished_steps))
        bar.close()
        log(f"finished {finished_steps} steps")
        return 0
    finally:
        if tracker is not None:
            tracker.close()
        if claim is not None:
            claim.release()
        if created and rank == 0 and os.path.isdir(work) and not os.listdir(work):
            os.rmdir(work)  # a run refused before it wrote anything leaves no folder behind
        preemption.close()
        cleanup_distributed()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (NonFiniteLoss, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
