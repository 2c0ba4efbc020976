"""The one checkpoint reader/writer.

A checkpoint is `ckpts/{step}.pt`, a dict with `model`, `ema_model`, `optimizer`, `finished_steps`,
`finished_epochs` (the reference layout) and, from this implementation, `rng_states` (one per rank) so
that a resumed run continues bit-exactly. Files are written atomically (temporary file, fsync, rename)
and read with `torch.load(weights_only=True)`.
"""
import os
import re
import warnings

import torch

_NAME = re.compile(r"^(\d+)\.pt$")


def save_checkpoint(state, path, before_rename=None):
    """Atomic write: a crash leaves either the previous file or the complete new one under `path`.
    `before_rename(tmp_path)` is a hook for crash tests."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """Reads a checkpoint (this code's or the reference release's); raises ValueError naming the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, pickle error, ...
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated") from e
    if not isinstance(state, dict) or "ema_model" not in state and "model" not in state:
        raise ValueError(f"checkpoint {path} has no 'model' or 'ema_model' entry; is it a SoFlow checkpoint?")
    return state


def list_checkpoints(directory):
    """[(step, path)] sorted by step, newest last; names are parsed as integers, other files ignored."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory, log=print):
    """The newest checkpoint that loads, as (path, state), or (None, None). Unreadable ones are skipped
    with a warning."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"skipping {e}")
            log(f"warning: skipping {path}: it cannot be read (truncated or corrupt)")
    return None, None


def model_state(state, use_ema=True):
    """The weights to sample with: the EMA weights when present."""
    key = "ema_model" if use_ema and "ema_model" in state else "model"
    return state[key]
