"""tracking.Tracker: TensorBoard event files, and failed writes kept (never raised) so that train.py can stop the
run at a checkpoint."""
import errno
import os

import pytest

from safe_io import WriteError
from tracking import Tracker

pytest.importorskip("tensorboard")


def test_tensorboard_scalars_and_images_land_in_tb(tmp_path):
    import numpy as np
    tracker = Tracker("tensorboard", str(tmp_path), rank=0)
    tracker.scalars(1, {"train/loss": 0.5})
    tracker.image(1, "samples/ema_grid", np.zeros((4, 4, 3), np.uint8))
    tracker.close()
    assert tracker.path == str(tmp_path / "tb") and tracker.failure is None
    assert [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert Tracker("tensorboard", str(tmp_path / "other"), rank=1).path is None  # only rank 0 writes


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("writer died")])
def test_a_failed_tensorboard_write_is_kept_and_writes_stop(error, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter
    tracker = Tracker("tensorboard", str(tmp_path), rank=0)
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(args)
        raise error
    monkeypatch.setattr(SummaryWriter, "add_scalar", failing)
    tracker.scalars(2, {"train/loss": 0.5, "train/lr": 1e-4})  # raises nothing
    tracker.scalars(3, {"train/loss": 0.4})
    tracker.close()
    assert len(calls) == 1  # nothing more is tried after the failure
    assert isinstance(tracker.failure, WriteError)
    assert str(tracker.failure).startswith(f"could not write tensorboard log folder {tmp_path / 'tb'} "
                                           f"({type(error).__name__}: ")
    assert "GiB free on its file system" in str(tracker.failure)


def test_a_tensorboard_folder_that_cannot_be_opened_is_a_write_error(tmp_path):
    (tmp_path / "tb").write_text("a file where the folder should be")
    with pytest.raises(WriteError, match=r"could not write tensorboard log folder .*tb \(.*GiB free"):
        Tracker("tensorboard", str(tmp_path), rank=0)
