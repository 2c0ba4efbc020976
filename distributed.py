"""Process start-up and run-time contexts shared by train.py, inference.py, sample.py and latent_dataset.py.

Distributed set-up (NCCL + cuda:LOCAL_RANK where CUDA exists, gloo + CPU otherwise), the scripts' logging,
random-state capture and restore (checkpoints and the shared dropout masks of the consistency loss), and the
numerics contexts: TF32, autocast precision and the SDPA attention kernel.
"""
import contextlib
import errno
import logging
import os
import signal
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from safe_io import OutputError, WriteError


# ----------------------------------------------------------------------------------------------------
# Processes


def _ranks_from_slurm():
    """Under `srun python train.py ...` (one task per GPU, no torchrun), SLURM's task ids are the ranks; the job
    script exports MASTER_ADDR (and MASTER_PORT, default 29500)."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", 1)) < 2 or "SLURM_PROCID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in env:
        raise RuntimeError("srun without torchrun: export MASTER_ADDR (the first node of the job) in the job script")


def _attempt_prefix():
    """The store prefix of this attempt's process group. With torchrun's default shared store
    (TORCHELASTIC_USE_AGENT_STORE=True), one store outlives the restarts of a group (--max-restarts): without a
    prefix per attempt, a restarted rank can read a previous attempt's addresses and fail to connect (seen with gloo
    here). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (multi-node, docs/cluster.md), rank 0 hosts a fresh store on a
    fresh port each round, and the restart count is no common name: a node started again counts from 0 while the
    others count their restarts, so their ranks would wait under different prefixes."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return "soflow"
    return f"soflow/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def setup_distributed(timeout_minutes=60):
    """(rank, world_size, device) from torchrun's environment, or SLURM's under a plain srun (a single process
    without either, and then no process group)."""
    _ranks_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               f"start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Under torchrun a process group exists even for one process (as in the release, whose train.py always wraps
    # the model in DDP): a 1-GPU torchrun run then goes through NCCL and DDP like a multi-GPU one.
    launched = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        from torch.distributed.rendezvous import rendezvous
        timeout = timedelta(minutes=timeout_minutes)
        store, rank, world_size = next(rendezvous("env://", timeout=timeout))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                store=dist.PrefixStore(_attempt_prefix(), store), rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def process_group_backend():
    """'nccl' or 'gloo' when a process group exists, else None."""
    return dist.get_backend() if dist.is_initialized() else None


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_error(error):
    """The first rank's error text when any rank has one (else None): a collective that every rank calls at the
    same point after work that may fail on some ranks only, so that all of them stop together instead of the
    others waiting in the next collective until the process group's timeout."""
    errors = [e for e in all_gather_objects(error) if e]
    return errors[0] if errors else None


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (the others' argument is ignored; `obj` itself in a single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def claim_on_rank_zero(claim, rank, before=None):
    """Rank 0 acquires `claim` (a safe_io.Claim on an output every rank writes to), after `before()` (e.g. a write
    check) when given; every rank learns the outcome (first_error). Returns (the note of a stale lock taken over, on
    rank 0, else None; the refusal's or failure's text, the same on every rank, else None)."""
    note = error = None
    if rank == 0:
        try:
            if before is not None:
                before()
            note = claim.acquire()
        except (OutputError, OSError) as e:
            error = str(e)
    return note, first_error(error)


def rank_bounds(n, rank, world_size):
    """[start, stop) of this rank's contiguous, near-equal share of n items (rank r of R: n r // R to
    n (r + 1) // R). The one split of work over ranks: sample dumps, latent extraction, precision/recall rows."""
    return n * rank // world_size, n * (rank + 1) // world_size


class RowShare:
    """This rank's part of work split by rows over the process group: the `share` of evaluator's
    precision/recall. Rank r of R computes rows [n r / R, n (r + 1) / R) of n."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def bounds(self, n):
        return rank_bounds(n, self.rank, self.world_size)

    def gather(self, array):
        """Every rank's rows, concatenated in rank order."""
        return np.concatenate(all_gather_objects(array))

    def any(self, array):
        """Element-wise OR of every rank's boolean array."""
        return np.logical_or.reduce(all_gather_objects(array))


class _TqdmHandler(logging.Handler):
    """Console lines through tqdm.write, so that progress bars stay intact."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def setup_logging(name, rank=0, path=None, prefix="", all_ranks=False):
    """The logger of a script: console lines (INFO on rank 0, or on every rank with `all_ranks`; warnings from
    every rank) prefixed by `prefix` (a logging format, e.g. "%(asctime)s "), and on rank 0 the plain messages
    appended to `path`. Calling it again replaces the handlers (a test may run several scripts in one process)."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    console = _TqdmHandler(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    console.setFormatter(logging.Formatter(prefix + "%(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(console)
    if path is not None and rank == 0:
        file_handler = LogFile(path)
        file_handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(file_handler)
    return logger


class LogFile(logging.FileHandler):
    """The log file of a script (e.g. train.py's log.txt), appended to and flushed line by line. A file that cannot
    be opened raises safe_io.WriteError naming it and the free space. A failed write (of any exception type) does
    not raise where it happened (logging never raises into the code that logs) and prints no traceback: the first
    one is kept in `failure` (a WriteError), said once on the console, and nothing more is written to the file, so
    that it ends where the record stopped being complete; the script decides what to do (log_file_failure)."""

    def __init__(self, path):
        self.failure = None
        try:
            super().__init__(path)
        except Exception as e:
            raise WriteError(path, e, "log file") from e

    def emit(self, record):
        if self.failure is None:
            super().emit(record)  # a failed write or flush comes back through handleError

    def flush(self):
        try:
            super().flush()
        except Exception as e:
            self._fail(e)

    def close(self):
        try:
            super().close()  # flushes what is buffered
        except Exception as e:
            self._fail(e)

    def handleError(self, record):
        self._fail(sys.exc_info()[1])

    def _fail(self, error):
        if self.failure is not None or error is None:
            return
        self.failure = WriteError(self.baseFilename, error, "log file")
        try:
            tqdm.write(f"warning: {self.failure}; nothing more is written to it", file=sys.stderr)
        except Exception:  # noqa: BLE001 (the console may be gone too)
            pass


def log_file_failure(logger):
    """The first failed write of the log file of `logger` (a safe_io.WriteError naming the file, the cause and the
    free space), or None."""
    failures = [h.failure for h in logger.handlers if isinstance(h, LogFile) and h.failure is not None]
    return failures[0] if failures else None


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's status for Ctrl-C


@contextlib.contextmanager
def interruptible(kept, rank=0):
    """Ctrl-C (SIGINT) or SIGTERM (what torchrun forwards to its workers when it is interrupted or stopped) inside
    the block ends the process with INTERRUPTED_EXIT_CODE, rank 0 printing `interrupted: {kept()}` (what was kept
    and how to resume), after the block's own clean-up (finally clauses) has run."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: {kept()}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


class FaultInjection:
    """Test-only fault injection, which exists only when the environment asks for it: `from_env(rank)` is None
    unless SOFLOW_TEST_CRASH="POINT:N[@RANK][=ACTION]" is set (rank 0 by default), so that a production run
    calls nothing for it (train.py wraps its loader in `around_steps` and gives `checkpoint_hook` to its checkpoint
    writer only then). `at(point, count)` acts when this process
    reaches `point` N: train.py's "step" (the start of step N), "ckpt" (the middle of writing checkpoint N),
    latent_dataset.py's "chunk" (after flushing its N-th chunk). ACTION: SIGKILL (default), SIGTERM, SIGUSR1 or
    SIGINT (sent to this process), CTRL_C (SIGINT to the parent torchrun, which a terminal's Ctrl-C reaches alone:
    torchrun starts its workers in sessions of their own and forwards the signal to them), ENOSPC or EACCES (an OSError raised there, as a full or read-only disk would), ERROR
    (a RuntimeError, the type torch.save raises when its write fails). Only the first incarnation of a torchrun
    group acts, so that a restarted group can run through."""

    def __init__(self, spec, rank):
        self.spec, self.rank = spec, rank
        where, _, action = spec.partition("=")
        where, _, at_rank = where.partition("@")
        self.point, _, n = where.partition(":")
        self.count, self.at_rank, self.action = int(n), int(at_rank or 0), action or "SIGKILL"

    @classmethod
    def from_env(cls, rank):
        spec = os.environ.get("SOFLOW_TEST_CRASH")
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return None
        return cls(spec, rank)

    def around_steps(self, batches, first_step):
        """`batches` (train.py's loader), reaching point "step" N as batch N is handed over: the hook stays out of
        the training loop's body."""
        for step, batch in enumerate(batches, start=first_step):
            self.at("step", step)
            yield batch

    def checkpoint_hook(self):
        """The hook checkpoints.CheckpointKeeper calls in the middle of writing checkpoint N: point "ckpt" N."""
        return lambda step: self.at("ckpt", step)

    def at(self, point, count):
        if point != self.point or count != self.count or self.rank != self.at_rank:
            return
        print(f"SOFLOW_TEST_CRASH={self.spec}: {self.action} on rank {self.rank} at {point} {count}", file=sys.stderr,
              flush=True)
        if self.action == "ERROR":
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file (test)")
        if self.action in ("ENOSPC", "EACCES"):
            code = getattr(errno, self.action)
            raise OSError(code, os.strerror(code))
        target = os.getppid() if self.action == "CTRL_C" else os.getpid()
        os.kill(target, signal.SIGINT if self.action == "CTRL_C" else getattr(signal, self.action))


# ----------------------------------------------------------------------------------------------------
# Random state


def get_rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        state[device.type] = torch.get_device_module(device.type).get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type != "cpu" and device.type in state:
        torch.get_device_module(device.type).set_rng_state(state[device.type], device)


@contextlib.contextmanager
def shared_random_state(device):
    """Yields a function that rewinds the random state of `device` (and the CPU) to where it stood on entry,
    so that a second network call draws the same dropout masks as the first."""
    device = torch.device(device)
    state = get_rng_state(device)
    yield lambda: set_rng_state(state, device)


# ----------------------------------------------------------------------------------------------------
# Numerics


# TF32 is set only through PyTorch's per-backend `fp32_precision` ("tf32" or "ieee"), never through the legacy
# `allow_tf32` flags: once both APIs have written, reading a legacy flag raises ("you have used mix of the legacy
# and new APIs"), and torch.compile and libraries read them. Under the new API alone PyTorch reads consistently.
# The flags steer only CUDA kernels (cuBLAS matmuls, cuDNN convolutions); they are written on every device, so
# that a CPU process runs the same writes and restores (tests/test_distributed.py).


def tf32_settings():
    """(cuBLAS matmul, cuDNN convolution) fp32_precision: what set_tf32 returns and restores."""
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def set_tf32(enabled):
    """TF32 (True), IEEE float32 (False) or a tf32_settings() pair for CUDA float32 matmuls and convolutions;
    returns the previous tf32_settings()."""
    previous = tf32_settings()
    matmul, conv = enabled if isinstance(enabled, tuple) else ("tf32" if enabled else "ieee",) * 2
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.backends.cudnn.conv.fp32_precision = conv
    return previous


@contextlib.contextmanager
def tf32_mode(enabled):
    """set_tf32(enabled) inside the block, the previous settings restored after it."""
    previous = set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(previous)


def configure_backends(device, tf32=True):
    """The release's numerics: TF32 matmuls and convolutions on CUDA (float32 storage) with `tf32`."""
    set_tf32(tf32)


def autocast(device, dtype):
    """torch.autocast on `device`'s type in `dtype`; no autocast (a null context) when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def precision_context(device, precision):
    """bf16 autocast for `precision: bf16`; float32 (no autocast) otherwise, as the release."""
    return autocast(device, torch.bfloat16 if precision == "bf16" else None)


def guidance_dtype(precision):
    """The autocast dtype of the loss's no-grad guidance call (`precision: bf16-guidance`), else None."""
    return torch.bfloat16 if precision == "bf16-guidance" else None


def attention_kernel(attention, device):
    """The SDPA kernel that `attention` pins on `device` (None: PyTorch's choice). `auto` is the release's
    memory-efficient kernel on CUDA and PyTorch's choice on the CPU (which has no memory-efficient kernel)."""
    from torch.nn.attention import SDPBackend
    kernels = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "math": SDPBackend.MATH}
    if attention == "auto":
        attention = "efficient" if device.type == "cuda" else None
    return kernels[attention] if attention else None


def attention_context(attention, device):
    """The SDPA kernel of `attention` on `device` (attention_kernel): `efficient`, `flash` and `math` pin one
    kernel. CUDA's fused kernels take only 4-D inputs with a unit-stride last dimension, flash only float16 /
    bfloat16 (config.attention_precision_error); tests/helpers.CudaSDPARules checks those rules on any device."""
    from torch.nn.attention import sdpa_kernel
    kernel = attention_kernel(attention, device)
    return sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext()
