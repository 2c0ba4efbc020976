"""Experiment tracking for train.py: TensorBoard event files in `working_dir/tb/` (the default when
`tensorboard` is importable) or Weights & Biases (`tracker: wandb`, when `wandb` is installed).

Only rank 0 writes. Scalars are the figures of the log line plus the l-ratio r(k, K), the learning rate and
the throughput; sample grids are logged as images. A tracker that cannot be opened raises safe_io.WriteError (the
folder, the cause, the free space); a later failed write (any exception type) raises nothing: the first is kept
in `failure` (a WriteError) and the tracker writes nothing more, so that train.py can stop the run at a
checkpoint.
"""
import os
import sys
import types

from safe_io import WriteError

TRACKERS = ("auto", "tensorboard", "wandb", "none")


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


class Tracker:
    """`scalars(step, {name: value})`, `image(step, tag, uint8 HWC array)`, `close()`; a no-op when off."""

    def __init__(self, kind, working_dir, rank=0, config=None, project="soflow"):
        if kind not in TRACKERS:
            raise ValueError(f"tracker {kind!r}; accepted: {', '.join(TRACKERS)}")
        if kind == "auto":
            kind = "tensorboard" if _importable("tensorboard") else "none"
        if kind in ("tensorboard", "wandb") and not _importable(kind):
            raise RuntimeError(f"tracker: {kind} but the {kind!r} package is not installed; pip install {kind} "
                               f"or set tracker: none")
        self.kind = kind if rank == 0 else "none"
        self.path = None  # TensorBoard's folder
        self.failure = None
        self._writer = self._run = None
        if self.kind == "tensorboard":
            self.path = self._folder = os.path.join(working_dir, "tb")
            self._guarded(self._open_tensorboard, raise_error=True)
        elif self.kind == "wandb":
            self._folder = os.path.join(working_dir, "wandb")
            self._guarded(lambda: self._open_wandb(working_dir, config, project), raise_error=True)

    def _open_tensorboard(self):
        # TensorBoard's writer would import TensorFlow when it is installed (for its file system layer): seconds
        # of start-up and a TensorFlow runtime inside every training process. Its `notf` marker module makes
        # it use its own stub instead (local paths only); the event files are the same.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(self.path)

    def _open_wandb(self, working_dir, config, project):
        import wandb
        self._run = wandb.init(project=project, dir=working_dir, config=config,
                               name=os.path.basename(os.path.abspath(working_dir)), resume="allow")

    def _guarded(self, write, raise_error=False):
        """Runs `write` unless a write failed before; a failure becomes `failure` (raised with `raise_error`)."""
        if self.failure is not None:
            return
        try:
            write()
        except Exception as e:
            self.failure = WriteError(self._folder, e, f"{self.kind} log folder")
            writer, self._writer, self._run = self._writer or self._run, None, None
            try:  # let go of the open event file; a broken writer may fail again here
                getattr(writer, "close", getattr(writer, "finish", lambda: None))()
            except Exception:  # noqa: BLE001 (the first failure is the one reported)
                pass
            if raise_error:
                raise self.failure from e

    def scalars(self, step, values):
        if self._writer is not None:
            self._guarded(lambda: self._tensorboard_scalars(step, values))
        elif self._run is not None:
            self._guarded(lambda: self._run.log(dict(values), step=step))

    def _tensorboard_scalars(self, step, values):
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def image(self, step, tag, image):
        """`image`: uint8 [H, W, 3]."""
        if self._writer is not None:
            self._guarded(lambda: self._tensorboard_image(step, tag, image))
        elif self._run is not None:
            self._guarded(lambda: self._wandb_image(step, tag, image))

    def _tensorboard_image(self, step, tag, image):
        self._writer.add_image(tag, image, step, dataformats="HWC")
        self._writer.flush()

    def _wandb_image(self, step, tag, image):
        import wandb
        self._run.log({tag: wandb.Image(image)}, step=step)

    def close(self):
        """Flushes and closes (once; a later call does nothing)."""
        if self._writer is not None:
            self._guarded(self._writer.close)
        elif self._run is not None:
            self._guarded(self._run.finish)
        self._writer = self._run = None
