"""SoFlow training with DDP: `torchrun --nproc-per-node=N train.py --config configs/X.yaml`.

Runs on CPU (gloo) and GPUs (NCCL). Follows the release's recipe: float32 with TF32, optimizer over every
network parameter, EMA of the whole model, `ckpts/0.pt` before the first step. Writes to working_dir:
config.yaml (the release's keys) with config.soflow.yaml (this code's), log.txt, tb/ (TensorBoard),
ckpts/{step}.pt, figs/{step}.png (EMA sample grids), evals/{step}.npz (EMA sample dumps for FID) and, with
posthoc_ema_sigma_rels, posthoc_ema/{step}.pt (post-hoc EMA snapshots, power_ema.py). A run resumes
from its newest readable checkpoint and then continues exactly as if it had never stopped. SIGTERM or SIGUSR1 to
any rank (what SLURM sends before it kills a job) makes every rank finish its step, write a checkpoint and exit
with status 75; Ctrl-C (SIGINT) does the same with status 130, and a second Ctrl-C stops at once. A write that fails (any exception type, on any of these files) stops every rank with the path, the
cause and the free space, after the checkpoint of the last finished step is written (unless that is the write that
failed: then the previous one is the newest); the same command resumes there.
"""
import argparse
import contextlib
import copy
import dataclasses
import os
import resource
import signal
import sys
import time
from typing import Optional

from config import RESUME_NO_EFFECT, ConfigError, check_resume, check_world_size, load_config, save_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/; the release's files load as they are)")
    p.add_argument("--no-resume", action="store_true", help="refuse to start when working_dir has checkpoints")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads per rank (default: OMP_NUM_THREADS when set, else the usable cores but "
                        "one, divided among the ranks on this node, at least 1; docs/performance.md)")
    return p.parse_args(argv)


def checked_config(args):
    """The run's config, checked (against the world size too). A config error ends every rank with status 1, its
    message printed once, by rank 0."""
    try:
        cfg = load_config(args.config)
        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", 1)), args.config)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1) from None
    return cfg


if __name__ == "__main__":  # a config error is reported before the imports below, which only the training needs
    ARGS = parse_args()
    CONFIG = checked_config(ARGS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoints import (CheckpointKeeper, CheckpointMismatchError, CheckpointWriteError,  # noqa: E402,F401
                         check_weights_fit, latest_checkpoint)
from data import batch_loader, build_dataset, dataset_identity  # noqa: E402
from distributed import (INTERRUPTED_EXIT_CODE, FaultInjection, all_gather_objects, attention_context,  # noqa: E402
                         cleanup_distributed, configure_backends, first_error, get_rng_state, guidance_dtype,
                         log_file_failure, precision_context, process_group_backend, set_rng_state, setup_distributed,
                         setup_logging)
from inference import build_decoder, dump_samples, sample_grid  # noqa: E402
from models import draw_training_times  # noqa: E402
from power_ema import SNAPSHOT_DIR, tracker_of_run  # noqa: E402
from safe_io import Claim, OutputError, free_space  # noqa: E402
from tracking import Tracker  # noqa: E402

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGUSR1 after a checkpoint; re-run the command to resume
# Ctrl-C (SIGINT): distributed.INTERRUPTED_EXIT_CODE, 130, after the same checkpoint
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


class RecordWriteError(OutputError):
    """log.txt or the tracker (TensorBoard's tb/) could not be written; the message names the path, the cause, the
    free space and the checkpoint the run stopped with."""


class Preemption:
    """SIGTERM / SIGUSR1 (a scheduler) and SIGINT (Ctrl-C) set a flag; `poll()` (a collective, once per step on
    every rank) tells every rank whether any rank got one, and whether a rank's run record could not be written
    (RecordWriteError). The flags travel on a CPU (gloo) group, so no device synchronisation. A second SIGINT
    raises KeyboardInterrupt at once (the steps since the newest checkpoint are lost). Under torchrun a terminal's
    Ctrl-C reaches torchrun alone (its workers run in sessions of their own), which forwards it to every worker
    and kills them after --shutdown-timeout seconds (30 by default)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, world_size, rank=0):
        self.signum, self.rank, self._interrupted = None, rank, False
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            if self.rank == 0:
                print("\nCtrl-C: finishing this step and writing its checkpoint; Ctrl-C again to stop at once "
                      "(losing the steps since the newest checkpoint)", file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def requested(self):
        return self.poll()[0]

    def poll(self, write_failed=False):
        """(the signal any rank got, 0 for none; whether any rank's `write_failed`): one collective for both."""
        flag = torch.tensor([self.signum or 0, int(write_failed)])
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        signum, failed = flag.tolist()
        return signum, bool(failed)

    def close(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


class LogWindow:
    """The figures of a "Step N | ..." log line over the steps since the previous one: the running sums of
    LOG_KEYS and the first step whose loss or gradient was non-finite, kept as device tensors (no host
    synchronisation per step), averaged over the ranks when the line is written (with the tracker's scalars)."""

    def __init__(self, cfg, device, world_size, tracker, log, weights):
        self.cfg, self.world_size, self.tracker, self.log, self.weights = cfg, world_size, tracker, log, weights
        self.device = device
        self.sums = torch.zeros(len(LOG_KEYS), device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.start, self.steps = time.time(), 0

    def add(self, step, loss, stats, grad_norm):
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.first_bad_step.copy_(torch.where((self.first_bad_step < 0) & ~finite, step, self.first_bad_step))
        self.sums += torch.stack([stats[k] for k in LOG_KEYS[:-1]] + [grad_norm]).float()
        self.steps += 1

    def check_finite(self, step, last_good):
        """Stops every rank (NonFiniteLoss) when a loss or gradient was non-finite since the start, or the weights
        (`weights`: the model and its EMA) are now; a collective."""
        flag = torch.stack([self.first_bad_step, torch.where(weights_finite(*self.weights), -1, step)])
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad_loss, bad_weights = flag.tolist()
        if bad_loss >= 0:
            raise NonFiniteLoss(f"non-finite loss or gradient at step {bad_loss + 1}; stopped at step {step} "
                                f"without writing these weights. Last good checkpoint: {last_good or 'none'}")
        if bad_weights >= 0:
            raise NonFiniteLoss(f"non-finite weights after step {step} although the losses and gradients were "
                                f"finite (an update too large: learning_rate {self.cfg.learning_rate}?); stopped "
                                f"without writing them. Last good checkpoint: {last_good or 'none'}")

    def write(self, step, objective, optimizer):
        """The log line and tracker scalars of the window ending at `step` (a collective); returns the averages and
        starts the next window."""
        if self.world_size > 1:
            dist.all_reduce(self.sums)
            self.sums /= self.world_size
        values = dict(zip(LOG_KEYS, (self.sums / self.steps).tolist()))
        elapsed = time.time() - self.start
        per_rank = self.steps * self.cfg.batch_size / self.world_size / elapsed
        peak = peak_memory_gib(self.device)
        self.log(f"Step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in values.items())
                 + f" | Peak_Mem {peak:.2f}GiB | Img/s {per_rank * self.world_size:.1f} ({per_rank:.1f}/rank) | "
                 f"Time {elapsed:.1f}s")
        self.tracker.scalars(step, {
            **{f"train/{k}": v for k, v in values.items()}, "train/Peak_Mem_GiB": peak,
            "train/l_ratio": objective.l_ratio(step), "train/learning_rate": optimizer.param_groups[0]["lr"],
            "speed/images_per_s": per_rank * self.world_size, "speed/images_per_s_per_rank": per_rank})
        self.sums.zero_()
        self.start, self.steps = time.time(), 0
        return values


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
    when the period fits in the run; never at step 0 (the release draws nothing before the first step), so a run
    resumed from `0.pt` owes nothing there either."""
    return step > 0 and (step % period == 0 or (step == total_steps and period <= total_steps))


def intra_op_threads(requested, environ, usable_cores, local_ranks):
    """Threads per rank: --threads when given, else OMP_NUM_THREADS when set, else the usable cores but one, shared
    among this node's ranks (at least 1 each): the ranks never run more threads than cores, and one core is left
    to the rest of the machine. An intra-op thread that must wait for a core stalls the whole step
    (docs/performance.md#cpu-threads: on 2 cores beside one busy process, 2 threads ran 13x slower than 1)."""
    if requested is not None:
        if requested < 1:
            raise SystemExit(f"--threads must be >= 1, got {requested}")
        return requested
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) >= 1:
        return int(environ["OMP_NUM_THREADS"])
    return max((usable_cores - 1) // local_ranks, 1)


def multinode_store_warning(environ):
    """A warning for a multi-node torchrun job on torchrun's shared store, where a lost node cannot rejoin
    (docs/cluster.md), or None."""
    if int(environ.get("GROUP_WORLD_SIZE", 1)) > 1 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("warning: a multi-node job on torchrun's shared store: a node lost and started again cannot rejoin "
                "it (torch 2.14.1). Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node before torchrun "
                "(docs/cluster.md#multi-node)")
    return None


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


def device_batch(x, labels, dataset, cfg, device):
    """(samples, labels or None, augmentation labels or None) of a loader's batch, on `device`."""
    x = x.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True) if cfg.conditional else None
    samples, augment_labels = dataset.prepare(x)
    if cfg.uses_channels_last(device):
        samples = samples.contiguous(memory_format=torch.channels_last)
    return samples, labels, augment_labels


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


@dataclasses.dataclass
class ResumePlan:
    """What a (re)started run finds in working_dir and owes, decided before any data, model or decoder is built."""
    ckpt_path: Optional[str] = None  # the newest readable checkpoint; None: a new run
    state: Optional[dict] = None     # that checkpoint's contents
    finished_steps: int = 0
    changes: list = dataclasses.field(default_factory=list)  # [(key, recorded, now)] since the run's config.yaml
    owed: tuple = (False, False)     # (grid, dump) of finished_steps that the stopped run did not write
    finished: bool = False           # nothing left to train or to write: the run is done
    decoder: bool = False            # the SD-VAE decoder is needed (ImageNet grids or dumps ahead)
    dumps_ahead: bool = False        # a dump will be written (in-training FID then needs its reference)


def plan_resume(cfg, config_path, work, no_resume, note):
    """The ResumePlan of `work`: its newest readable checkpoint (unreadable ones skipped, each `note`d), the
    config keys changed since the run's config.yaml (SystemExit naming model or data keys), the grid and dump the
    checkpoint's step owes, and whether anything is left to do."""
    ckpt_path, state = latest_checkpoint(os.path.join(work, "ckpts"), log=note)
    if state is None:
        return ResumePlan(decoder=decodes(cfg, 0, (False, False)), dumps_ahead=dumps_ahead(cfg, 0, (False, False)))
    if no_resume:
        raise SystemExit(f"{os.path.join(work, 'ckpts')} holds checkpoints and --no-resume was given")
    changes = recorded_changes(cfg, config_path, work)
    step = int(state["finished_steps"])
    # Only this code's checkpoints (they carry random states; the release's do not) can owe a grid or dump.
    owed = outputs_missing(cfg, work, step) if "rng_states" in state else (False, False)
    return ResumePlan(ckpt_path, state, step, changes, owed, finished=step >= cfg.total_steps and not any(owed),
                      decoder=decodes(cfg, step, owed), dumps_ahead=dumps_ahead(cfg, step, owed))


def dumps_ahead(cfg, step, owed):
    """Whether a dump is owed or falls on a step after `step` (is_due: at the latest the last, if the period fits)."""
    return owed[1] or step < cfg.total_steps and cfg.eval_steps <= cfg.total_steps


def decodes(cfg, step, owed):
    """An ImageNet run decodes latents only for the grids and dumps owed or ahead after `step`."""
    ahead = any(owed) or step < cfg.total_steps and min(cfg.eval_demo_steps, cfg.eval_steps) <= cfg.total_steps
    return cfg.dataset_type == "Imagenet" and ahead


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


def check_same_data(state, identity, cfg, ckpt_path):
    """SystemExit when the training data differ from those the checkpoint was trained on (data.dataset_identity:
    sample count and a digest of the labels and of spread samples), e.g. a latent file re-extracted in place under
    the same dataset_path: a resume would continue on other data. Checkpoints without the record (the release's)
    pass."""
    recorded = state.get("dataset")
    if recorded is None or recorded == identity:
        return
    raise SystemExit(f"config error: the training data at {cfg.dataset_path or cfg.dataset_type} differ from those "
                     f"{ckpt_path} was trained on ({recorded['samples']} samples, digest {recorded['sha256'][:12]}; "
                     f"now {identity['samples']}, {identity['sha256'][:12]}): the data were changed or re-extracted "
                     f"in place. Restore the data the run started with, or start a new run with another working_dir")


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


def outputs_due(cfg, step):
    """(grid, dump): whether a sample grid and a sample dump fall on `step`."""
    return is_due(step, cfg.eval_demo_steps, cfg.total_steps), is_due(step, cfg.eval_steps, cfg.total_steps)


def outputs_missing(cfg, work, step):
    """(grid, dump) due at `step` and not done: what a run stopped after writing the step's checkpoint owes."""
    grid, dump = outputs_due(cfg, step)
    return grid and not os.path.isfile(os.path.join(work, "figs", f"{step}.png")), dump and not dump_done(cfg, work,
                                                                                                          step)


def dump_done(cfg, work, step):
    """A dump is done once written (with eval_save_samples) and scored (with fid_ref_batch)."""
    eval_dir, name = os.path.join(work, "evals"), f"{step}.npz"
    if cfg.fid_ref_batch:
        from evaluator import RESULTS_FILENAME, evaluated_files
        if name not in evaluated_files(os.path.join(eval_dir, RESULTS_FILENAME)):
            return False
    return not cfg.eval_save_samples or os.path.isfile(os.path.join(eval_dir, name))


class PeriodicOutputs:
    """The EMA sample grid (figs/{step}.png, drawn on rank 0) and dump (evals/{step}.npz, all ranks) of a step.
    The checkpoint of a step is written before them, so a run stopped in between (a failed write, a kill, a
    preemption) owes them, and the resumed run draws them first. A failure on any rank stops every rank."""

    def __init__(self, cfg, device, rank, world_size, work, decode, fid, tracker):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        self.fig_dir, self.eval_dir = os.path.join(work, "figs"), os.path.join(work, "evals")
        self.decode, self.fid, self.tracker = decode, fid, tracker

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
                self.tracker.scalars(step, {f"eval/{key}": value for key, value in self.fid.scores.items()})


# ----------------------------------------------------------------------------------------------------
# Start-up: the model, the run's record, the resumed state


def build_training(cfg, device, rank):
    """(model, its DDP wrapper or the model itself outside a process group, EMA, optimizer), seeded as the release:
    seed + rank, and DDP then broadcasts rank 0's weights."""
    torch.manual_seed(cfg.seed + rank)
    model = cfg.build_model().to(device)
    if cfg.grad_checkpointing:
        model.network.set_grad_checkpointing(True)
    if cfg.uses_channels_last(device):
        model.to(memory_format=torch.channels_last)
    # Gradients as views of DDP's buckets: no copy into and out of the buckets on every step.
    ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True) if dist.is_initialized() else model)
    ema = EMA(model, cfg.ema_decay_rate, cfg.ema_steps)  # after DDP's broadcast: the same EMA on every rank
    if cfg.compile:
        model.network.compile()  # in place (state-dict keys stay the release's); the EMA copy stays eager
    return model, ddp, ema, build_optimizer(cfg, model)


def open_run_record(cfg, work, rank):
    """Once the checks have passed: the run's folders and config.yaml written, log.txt and the tracker (TensorBoard's
    tb/) opened, on rank 0. A failure stops every rank before step 1 (SystemExit naming the path and the free
    space). Returns (logger, tracker)."""
    logger = tracker = error = None
    try:
        if rank == 0:
            for d in ("ckpts", "evals", "figs"):
                os.makedirs(os.path.join(work, d), exist_ok=True)
            save_config(cfg, os.path.join(work, "config.yaml"))
        logger = setup_logging("train", rank, os.path.join(work, "log.txt"))
        tracker = Tracker(cfg.tracker, work, rank, config=cfg.to_dict(), project=cfg.wandb_project)
    except (OSError, OutputError) as e:
        error = f"{e}; {free_space(work)}" if isinstance(e, OSError) else str(e)
    error = first_error(error)
    if error:
        raise SystemExit(f"error: {error}")
    return logger, tracker


def restore_random_state(state, changes, applied, cfg, rank, world_size, device):
    """This rank's random state from the checkpoint, or reseeded when the checkpoint has none (the release's) or
    was written by another number of ranks. Returns how the run continues, for the log."""
    rng = state.get("rng_states")
    if rng is not None and len(rng) == world_size:
        set_rng_state(rng[rank], device)
        altered = [k for k, _, _ in changes if k not in RESUME_NO_EFFECT] + [k for k, _, _ in applied]
        return ("bit-exact continuation" if not altered else
                f"continued with changed settings ({', '.join(altered)}), not a bit-exact continuation")
    torch.manual_seed(cfg.seed + rank + 1_000_003 * int(state["finished_steps"]))
    return ("random states reseeded: a checkpoint without them, e.g. the release's" if rng is None else
            f"world size {len(rng)} -> {world_size}: the same global batches follow (the batch order depends on "
            f"seed and step only), random states reseeded")


def log_resume(log, ckpt_path, step, changes, applied, how):
    for key, old, new in changes:
        log(f"changed since the run's config.yaml: {key}: {old!r} -> {new!r}")
    for key, old, new in applied:
        log(f"applied to the optimizer: {key} {old!r} -> {new!r} (the checkpoint's value)")
    log(f"resumed from {ckpt_path} at step {step} ({how})")


def log_setup(log, cfg, model, dataset, device, tracker):
    backend = process_group_backend()
    log(f"process group: {backend}, the model in DDP" if backend else
        "process group: none (one process outside torchrun), the model without DDP")
    if device.type == "cpu":
        log(f"CPU threads: {torch.get_num_threads()} per rank (--threads; docs/performance.md#cpu-threads)")
    if multinode_store_warning(os.environ):
        log(multinode_store_warning(os.environ))
    log(f"model {cfg.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"dataset {cfg.dataset_type}: {len(dataset)} samples; global batch {cfg.batch_size}"
        + (f" in {cfg.grad_accum_steps} micro-batches per rank" if cfg.grad_accum_steps > 1 else "")
        + f"; precision {cfg.precision}" + (f" (TF32 {'on' if cfg.tf32 else 'off'})" if device.type == "cuda"
                                            else ""))
    if tracker.path:
        log(f"TensorBoard: tensorboard --logdir {tracker.path}")


def training_fid(cfg, device, rank, eval_dir):
    from training_fid import TrainingFID  # imports the evaluator, which a run without in-training FID never needs
    return TrainingFID(cfg, device, rank, eval_dir)


# ----------------------------------------------------------------------------------------------------
# Checkpoints, outputs and the run's record during training


class RunCheckpoints:
    """The checkpoint of a step (the model, its EMA, the optimizer and every rank's random state), written through
    checkpoints.CheckpointKeeper (`keeper`: save, prune, the newest good one) once the window has found the losses,
    gradients and weights finite: a non-finite run stops without writing them."""

    def __init__(self, keeper, window, model, ema, optimizer, steps_per_epoch, device, data_identity, config,
                 posthoc=None):
        self.keeper, self.window, self.model, self.ema, self.optimizer = keeper, window, model, ema, optimizer
        self.steps_per_epoch, self.device, self.data_identity = steps_per_epoch, device, data_identity
        self.config = config  # the run's full config (every key, both files'): a checkpoint copied alone samples
        self.posthoc = posthoc  # power_ema.PowerEMATracker, or None

    @property
    def newest(self):
        return self.keeper.newest

    def check_finite(self, step):
        self.window.check_finite(step, self.keeper.newest)

    def save(self, step):
        """A collective: every rank stops (CheckpointWriteError) when the write fails."""
        self.check_finite(step)
        rng_states = all_gather_objects(get_rng_state(self.device))
        self.keeper.save(step, {"model": self.model.state_dict(), "ema_model": self.ema.model.state_dict(),
                                "optimizer": self.optimizer.state_dict(), "finished_steps": step,
                                "finished_epochs": step // self.steps_per_epoch, "rng_states": rng_states,
                                "dataset": self.data_identity, "config": self.config,
                                **({"posthoc_ema": self.posthoc.state_dict()} if self.posthoc else {})})


def write_outputs(outputs, checkpoints, step, which, log):
    """The grid and dump of `step` (its checkpoint already written, or written now if one fails)."""
    if not any(which):
        return
    checkpoints.check_finite(step)
    try:
        outputs.write(checkpoints.ema.model, step, which, log)
    except OutputError as e:
        if checkpoints.newest != checkpoints.keeper.path(step):
            checkpoints.save(step)
        raise OutputError(f"{e}. Checkpoint {checkpoints.newest} holds step {step}: fix the cause, then re-run the "
                          f"same command; it resumes there and draws this step's grid and dump first") from None


def write_posthoc_snapshot(posthoc, checkpoints, step, folder, rank, log, only_if_missing=False):
    """The post-hoc EMA snapshot of `step` (weights checked finite first). When it cannot be written, the step's
    checkpoint is written before the run stops; the resumed run then writes the snapshot first."""
    checkpoints.check_finite(step)
    try:
        posthoc.snapshot(step, folder, rank, log, only_if_missing)
    except OutputError as e:
        if checkpoints.newest != checkpoints.keeper.path(step):
            checkpoints.save(step)
        raise OutputError(f"{e}. Checkpoint {checkpoints.newest} holds step {step}: fix the cause, then re-run the "
                          f"same command; it resumes there and writes this snapshot first") from None


def record_failure(logger, tracker):
    """The first failed write of log.txt or of the tracker on this rank (only rank 0 writes them), or None."""
    return log_file_failure(logger) or tracker.failure


def stop_on_record_failure(logger, tracker, checkpoints, step):
    """A collective: RecordWriteError on every rank when rank 0 could not write log.txt or the tracker.

    A failed write of the run's record, of any exception type, neither kills the run silently nor crashes it: it
    is noted where it happens (distributed.LogFile, tracking.Tracker); the step that is running finishes, its
    checkpoint is written, and the run stops with the path, the cause and the free space. The same command then
    resumes from that checkpoint, bit-exactly."""
    failure = record_failure(logger, tracker)
    hint = " (or set tracker: none)" if failure is not None and failure is tracker.failure else ""
    error = first_error(None if failure is None else
                        f"{failure}. The run stopped after step {step} with checkpoint {checkpoints.newest}; free "
                        f"space or fix the permissions{hint}, then re-run the same command to resume")
    if error:
        raise RecordWriteError(error)


@dataclasses.dataclass
class StepEnd:
    """What every rank does after each optimizer step, in this one order. Each part is a collective or holds one,
    so a rank that skipped a part (an `if rank == 0` around it) would leave the others waiting: they stay together
    here, and main calls them as one.

    1. poll: whether any rank got a stop signal (Preemption) or could not write the run's record;
    2. the log line: the window's finite check and averages (every logging_steps, at the last step, at a stop);
    3. the checkpoint, its weights checked finite first (every ckpt_saving_steps, at the last step, at a stop);
    4. the post-hoc EMA snapshot, when due;
    5. a record that could not be written stops every rank, with the checkpoint of 3;
    6. unless stopping: the grid and dump due at the step."""
    cfg: object
    preemption: Preemption
    window: LogWindow
    checkpoints: RunCheckpoints
    outputs: PeriodicOutputs
    posthoc: object                  # power_ema.PowerEMATracker, or None
    snapshot_dir: str
    record: tuple                    # (logger, tracker): the run's record, written by rank 0
    objective: object
    optimizer: object
    bar: object                      # the progress bar, whose postfix shows the loss
    log: object

    def __call__(self, step):
        """After the optimizer step that finished `step` steps: returns the signal that stops the run, or 0."""
        cfg, last = self.cfg, step == self.cfg.total_steps
        signum, record_failed = self.preemption.poll(record_failure(*self.record) is not None)
        stop = bool(signum or record_failed)
        if step % cfg.logging_steps == 0 or last or stop:
            self.checkpoints.check_finite(step)
            values = self.window.write(step, self.objective, self.optimizer)
            self.bar.set_postfix(loss=f"{values['Vel_MSE'] + values['Con_MSE']:.4f}")
        # The checkpoint first: a grid or dump that fails, or a stop, loses no training.
        if step % cfg.ckpt_saving_steps == 0 or last or stop:
            self.checkpoints.save(step)
        if self.posthoc is not None and self.posthoc.is_due(step, cfg.total_steps):
            write_posthoc_snapshot(self.posthoc, self.checkpoints, step, self.snapshot_dir, self.preemption.rank,
                                   self.log)
        if record_failed:
            stop_on_record_failure(*self.record, self.checkpoints, step)
        if signum and not last:
            return signum
        write_outputs(self.outputs, self.checkpoints, step, outputs_due(cfg, step), self.log)
        return 0


# ----------------------------------------------------------------------------------------------------
# Training


def main(argv=None, args=None, cfg=None):
    """Trains, or resumes, the run of a config; returns the exit status. `args` and `cfg`: already parsed and
    checked (the script checks the config before its imports)."""
    args = args or parse_args(argv)
    cfg = cfg or checked_config(args)
    torch.set_num_threads(intra_op_threads(args.threads, os.environ, len(os.sched_getaffinity(0)),
                                           int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    rank, world_size, device = setup_distributed()
    preemption = Preemption(world_size, rank)
    tracker = claim = None
    work = cfg.working_dir
    created = not os.path.isdir(work)
    try:
        configure_backends(device, cfg.tf32)
        # Nothing is written into working_dir (config.yaml, log.txt, ckpts/) before the lock and the checks.
        claim, note = claim_working_dir(work, rank)
        deferred = [note] if note else []  # messages for log.txt, which is opened once the checks have passed
        setup_logging("train", rank)

        plan = plan_resume(cfg, args.config, work, args.no_resume, note=deferred.append)
        if plan.finished:
            if rank == 0:
                print(f"already finished: {plan.finished_steps} of {cfg.total_steps} steps, checkpoint "
                      f"{plan.ckpt_path}")
            return 0
        dataset = build_dataset(cfg)  # fails early, with a clear message, when data are missing or mislabelled
        data_identity = dataset_identity(dataset)
        if plan.state is not None:
            check_same_data(plan.state, data_identity, cfg, plan.ckpt_path)
        # The SD-VAE is loaded (before step 1) only when something will be decoded.
        decode = build_decoder(cfg.vae, cfg.latent_scale, device) if plan.decoder else None
        model, ddp, ema, optimizer = build_training(cfg, device, rank)
        applied = (load_training_state(model, ema, optimizer, plan.state, cfg, plan.ckpt_path)
                   if plan.state is not None else [])
        try:
            posthoc = tracker_of_run(cfg, model, ema.model, plan.state, plan.ckpt_path)  # None unless configured
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

        logger, tracker = open_run_record(cfg, work, rank)  # the checks passed: the run's record starts now
        log = logger.info
        for message in deferred:
            logger.warning(message)
        if plan.state is not None:
            how = restore_random_state(plan.state, plan.changes, applied, cfg, rank, world_size, device)
            log_resume(log, plan.ckpt_path, plan.finished_steps, plan.changes, applied, how)
        else:
            log(f"starting a new run in {work} on {world_size} rank(s), device {device.type}")
        log_setup(log, cfg, model, dataset, device, tracker)
        if posthoc is not None:
            log(posthoc.describe())

        finished_steps = plan.finished_steps
        fid = training_fid(cfg, device, rank, os.path.join(work, "evals")) if cfg.fid_ref_batch and plan.dumps_ahead \
            else None
        outputs = PeriodicOutputs(cfg, device, rank, world_size, work, decode, fid, tracker)
        loader, steps_per_epoch = batch_loader(dataset, cfg.batch_size, rank, world_size, cfg.seed, finished_steps,
                                               cfg.total_steps, cfg.num_workers, pin_memory=device.type == "cuda",
                                               prefetch_factor=cfg.prefetch_factor)
        faults = FaultInjection.from_env(rank)  # test-only (SOFLOW_TEST_CRASH); None in a production run
        keeper = CheckpointKeeper(os.path.join(work, "ckpts"), rank, plan.ckpt_path, cfg.ckpt_keep_last,
                                  cfg.ckpt_keep_every, log, before_rename=faults.checkpoint_hook() if faults else None)
        window = LogWindow(cfg, device, world_size, tracker, log, weights=(model, ema.model))
        checkpoints = RunCheckpoints(keeper, window, model, ema, optimizer, steps_per_epoch, device, data_identity,
                                     cfg.to_dict(), posthoc)
        if plan.state is None:
            checkpoints.save(0)  # as the release: the initial weights, before the first step

        objective = cfg.objective()
        bar = tqdm(total=cfg.total_steps, initial=finished_steps, desc="train", disable=rank != 0,
                   dynamic_ncols=True)
        snapshot_dir = os.path.join(work, SNAPSHOT_DIR)
        # What a stopped run owes first: the grid and dump of its last step, its post-hoc EMA snapshot.
        write_outputs(outputs, checkpoints, finished_steps, plan.owed, log)
        if posthoc is not None and posthoc.is_due(finished_steps, cfg.total_steps):
            write_posthoc_snapshot(posthoc, checkpoints, finished_steps, snapshot_dir, rank, log, only_if_missing=True)
        end_of_step = StepEnd(cfg, preemption, window, checkpoints, outputs, posthoc, snapshot_dir, (logger, tracker),
                              objective, optimizer, bar, log)
        batches = faults.around_steps(loader, finished_steps) if faults else loader
        model.train()
        signum = 0
        for step, (x, labels) in enumerate(batches, start=finished_steps):
            loss, stats, grad_norm = train_step(ddp, model, optimizer, device_batch(x, labels, dataset, cfg, device),
                                                objective, step, cfg, device)
            window.add(step, loss, stats, grad_norm)
            ema.update(model, step)
            finished_steps = step + 1
            if posthoc is not None:
                posthoc.update(model, finished_steps)
            bar.update(1)
            signum = end_of_step(finished_steps)  # every rank, every step: collectives
            if signum:
                break
        bar.close()
        exit_code = 0
        if signum:
            exit_code = INTERRUPTED_EXIT_CODE if signum == signal.SIGINT else PREEMPTED_EXIT_CODE
            log(f"stopped by {signal.Signals(signum).name} after step {finished_steps}: checkpoint "
                f"{checkpoints.newest} written; re-run the same command to resume (exit status {exit_code})")
        else:
            log(f"finished {finished_steps} steps")
        tracker.close()  # before the last check: its final flush may fail too
        stop_on_record_failure(logger, tracker, checkpoints, finished_steps)
        return exit_code
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
        sys.exit(main(args=ARGS, cfg=CONFIG))
    except (NonFiniteLoss, OutputError) as e:  # CheckpointWriteError and RecordWriteError among them
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted: stopped at once; the checkpoints in working_dir/ckpts are intact (a half-written one "
              "is never taken for one): re-run the same command to resume from the newest", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
