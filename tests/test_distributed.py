"""distributed.py: ranks from SLURM under a plain srun, the fault-injection hook, random-state rewinding."""
import errno
import os

import pytest
import torch

import distributed


def test_slurm_task_ids_become_ranks(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.setenv(key, "x")  # so that monkeypatch restores (removes) what the function sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        distributed._ranks_from_slurm()
    monkeypatch.setenv("MASTER_ADDR", "node001")
    distributed._ranks_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_PORT"]) == \
        ("5", "16", "1", "29500")
    # torchrun's variables win; a single SLURM task is a single process
    monkeypatch.setenv("RANK", "2")
    distributed._ranks_from_slurm()
    assert os.environ["RANK"] == "2"


def test_crash_hook_actions(monkeypatch):
    monkeypatch.setenv("SOFLOW_TEST_CRASH", "ckpt:4@1=ENOSPC")
    distributed.crash_hook("ckpt", 4, rank=0)  # another rank: nothing
    distributed.crash_hook("step", 4, rank=1)  # another point: nothing
    with pytest.raises(OSError) as info:
        distributed.crash_hook("ckpt", 4, rank=1)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted torchrun group runs through
    distributed.crash_hook("ckpt", 4, rank=1)


def test_shared_random_state_rewinds():
    with distributed.shared_random_state(torch.device("cpu")) as rewind:
        a = torch.rand(3)
        rewind()
        b = torch.rand(3)
    assert torch.equal(a, b)
