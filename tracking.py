"""Experiment tracking for train.py: TensorBoard event files in `working_dir/tb/` (the default when
`tensorboard` is importable) or Weights & Biases (`tracker: wandb`, when `wandb` is installed).

Only rank 0 writes. Scalars are the figures of the log line plus the l-ratio r(k, K), the learning rate and
the throughput; sample grids are logged as images.
"""
import os
import sys
import types

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
        self.path = None
        self._writer = self._run = None
        if self.kind == "tensorboard":
            # TensorBoard's writer would import TensorFlow when it is installed (for its file system layer): seconds
            # of start-up and a TensorFlow runtime inside every training process. Its `notf` marker module makes
            # it use its own stub instead (local paths only); the event files are the same.
            sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
            from torch.utils.tensorboard import SummaryWriter
            self.path = os.path.join(working_dir, "tb")
            self._writer = SummaryWriter(self.path)
        elif self.kind == "wandb":
            import wandb
            self._run = wandb.init(project=project, dir=working_dir, config=config,
                                   name=os.path.basename(os.path.abspath(working_dir)), resume="allow")

    def scalars(self, step, values):
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        elif self._run is not None:
            self._run.log(dict(values), step=step)

    def image(self, step, tag, image):
        """`image`: uint8 [H, W, 3]."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")
            self._writer.flush()
        elif self._run is not None:
            import wandb
            self._run.log({tag: wandb.Image(image)}, step=step)

    def close(self):
        if self._writer is not None:
            self._writer.close()
        elif self._run is not None:
            self._run.finish()
