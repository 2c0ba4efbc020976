"""train.py on a cluster: preemption signals, torchrun restarts, checkpoint retention and failed writes, a
changed world size, gradient accumulation, TensorBoard. 2-rank CPU runs (gloo) of the tiny CIFAR recipe."""
import os
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

import train
from checkpoints import list_checkpoints, load_checkpoint
from config import from_dict, load_config
from data import StepBatches, TensorDataset
from helpers import TINY_DIT, assert_same_final_state, randomise, release_config, torchrun, write_config


def steps_of(run):
    return [s for s, _ in list_checkpoints(run / "ckpts")]


def test_preemption_signal_to_one_rank_checkpoints_the_next_step_and_resumes_exactly(reference_run, cifar_root,
                                                                                       tmp_path):
    run = tmp_path / "run"
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run))
    # SIGTERM reaches rank 1 as its step 3 (0-based 2) starts: every rank finishes that step, step 3 is saved.
    proc = torchrun("train.py", ["--config", cfg], env={"SOFLOW_TEST_CRASH": "step:2@1=SIGTERM"}, check=False)
    assert proc.returncode != 0
    assert f"exitcode  : {train.PREEMPTED_EXIT_CODE}" in proc.stderr or str(train.PREEMPTED_EXIT_CODE) in proc.stderr
    log = (run / "log.txt").read_text()
    assert "stopped by SIGTERM after step 3" in log and "re-run the same command" in log
    assert steps_of(run) == [0, 2, 3]
    torchrun("train.py", ["--config", cfg])
    assert "resumed from" in (run / "log.txt").read_text() and "3.pt at step 3 (bit-exact" in (run / "log.txt").read_text()
    assert_same_final_state(reference_run, run)


def test_ctrl_c_under_torchrun_checkpoints_the_step_and_resumes_exactly(reference_run, cifar_root, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to torchrun, which forwards it to both workers) as step 3 (0-based 2)
    starts: every rank finishes that step, writes 3.pt and exits 130; the same command then resumes bit-exactly."""
    run = tmp_path / "run"
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run))
    proc = torchrun("train.py", ["--config", cfg], env={"SOFLOW_TEST_CRASH": "step:2=CTRL_C"}, check=False)
    assert proc.returncode != 0
    log = (run / "log.txt").read_text()
    assert "stopped by SIGINT after step 3" in log and "(exit status 130)" in log, proc.stderr[-3000:]
    assert "Ctrl-C again to stop at once" in proc.stderr
    assert steps_of(run) == [0, 2, 3]
    torchrun("train.py", ["--config", cfg])
    assert "3.pt at step 3 (bit-exact" in (run / "log.txt").read_text()
    assert_same_final_state(reference_run, run)


def test_a_second_ctrl_c_stops_at_once():
    p = train.Preemption(world_size=1)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert p.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        p.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_preemption_flag_in_process():
    p = train.Preemption(world_size=1)
    try:
        assert p.requested() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.requested() == signal.SIGUSR1
    finally:
        p.close()
    assert signal.getsignal(signal.SIGUSR1) is not p._handler


def test_torchrun_restart_after_kill_resumes_bit_identically(reference_run, cifar_root, tmp_path):
    run = tmp_path / "run"
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run))
    # kill -9 of rank 1 in step 4; torchrun restarts the group, which resumes from 2.pt.
    torchrun("train.py", ["--config", cfg], env={"SOFLOW_TEST_CRASH": "step:3@1"}, torchrun_args=["--max-restarts=1"])
    log = (run / "log.txt").read_text()
    assert "2.pt at step 2 (bit-exact continuation)" in log and "finished 6 steps" in log
    assert_same_final_state(reference_run, run)


def test_retention_keeps_newest_and_protected_steps(cifar_root, tmp_path):
    run = tmp_path / "run"
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run),
                       ckpt_saving_steps=1, ckpt_keep_last=2, ckpt_keep_every=4, eval_steps=100, eval_demo_steps=100)
    os.environ.pop("WORLD_SIZE", None)
    assert train.main(["--config", cfg]) == 0
    assert steps_of(run) == [0, 4, 5, 6]  # the newest two, and the steps divisible by 4
    assert "removed" in (run / "log.txt").read_text()


def test_failed_checkpoint_write_stops_with_path_and_free_space(cifar_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run),
                       eval_steps=100, eval_demo_steps=100)
    monkeypatch.setenv("SOFLOW_TEST_CRASH", "ckpt:4=ENOSPC")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(train.CheckpointWriteError, match=r"could not write checkpoint .*4\.pt .*GiB free.*2\.pt"):
        train.main(["--config", cfg])
    assert steps_of(run) == [0, 2] and sorted(os.listdir(run / "ckpts")) == ["0.pt", "2.pt"]
    assert load_checkpoint(run / "ckpts" / "2.pt")["finished_steps"] == 2


def test_world_size_change_continues_the_global_batch_sequence(reference_run, cifar_root, tmp_path):
    # The batches: for every step, the 2 ranks' shares together are the 1-rank batch.
    data = TensorDataset(torch.arange(40).float().view(40, 1), torch.zeros(40, dtype=torch.long))
    whole = StepBatches(data, 8, 0, 1, seed=5)
    halves = [StepBatches(data, 8, r, 2, seed=5) for r in range(2)]
    for step in range(12):
        assert torch.equal(torch.cat([h.indices(step) for h in halves]), whole.indices(step))
    # A 2-rank checkpoint resumed on 1 rank: logged as such, and it finishes.
    run = tmp_path / "run"
    os.makedirs(run / "ckpts")
    (run / "ckpts" / "2.pt").write_bytes((reference_run / "ckpts" / "2.pt").read_bytes())
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root, working_dir=str(run))
    torchrun("train.py", ["--config", cfg], nproc=1)
    log = (run / "log.txt").read_text()
    assert "world size 2 -> 1: the same global batches follow" in log and "finished 6 steps" in log
    assert "process group: gloo, the model in DDP" in log  # torchrun with one process: a group and DDP, as 2 ranks


def grads_of_one_step(accum, world_group=False):
    """Gradients of one train_step of a float64 tiny DiT with the ImageNet recipe (guided, mixed batch)."""
    cfg = from_dict({"dataset_type": "Imagenet", "num_classes": 10, "data_size": 8,
                     **release_config("imagenet", "cfg_scale", "cfg_drop_rate", "mix_ratio", "cfg_decay_time"),
                     "grad_accum_steps": accum, **TINY_DIT})
    torch.manual_seed(0)
    model = randomise(cfg.build_model()).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_group else model
    syncs = []
    if world_group:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            syncs.append(bucket.index())
            return allreduce_hook(state, bucket)
        ddp.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(12, 4, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (12,), generator=g), None)
    torch.manual_seed(2)
    loss, stats, norm = train.train_step(ddp, model, optimizer, batch, cfg.objective(), 7, cfg, torch.device("cpu"))
    return loss, stats, [p.grad.clone() for p in model.parameters() if p.grad is not None], syncs


def test_gradient_accumulation_equals_the_whole_batch():
    loss1, stats1, grads1, _ = grads_of_one_step(1)
    for accum in (2, 5):
        loss, stats, grads, _ = grads_of_one_step(accum)
        torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-14)
        for k in stats1:
            torch.testing.assert_close(stats[k], stats1[k], rtol=1e-12, atol=1e-14)
        assert len(grads) == len(grads1)
        for a, b in zip(grads, grads1):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_gradient_accumulation_syncs_ddp_once_per_step(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _, _, grads3, syncs3 = grads_of_one_step(3, world_group=True)
        _, _, grads1, syncs1 = grads_of_one_step(1, world_group=True)
    finally:
        dist.destroy_process_group()
    assert syncs3 and sorted(syncs3) == sorted(syncs1)  # every bucket all-reduced once, not once per micro-batch
    for a, b in zip(grads3, grads1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_tensorboard_events_and_throughput(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(reference_run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("train/Vel_MSE", "train/Con_MSE", "train/Con_Weight", "train/Grad_Norm", "train/Peak_Mem_GiB",
                 "train/l_ratio", "train/learning_rate", "speed/images_per_s", "speed/images_per_s_per_rank"):
        assert name in tags["scalars"], name
        assert [e.step for e in events.Scalars(name)] == [2, 4, 6]
    cfg = load_config(str(reference_run.parent / "cfg.yaml"))  # the config the run was started with
    for e in events.Scalars("train/l_ratio"):
        assert e.value == pytest.approx(cfg.objective().l_ratio(e.step), rel=1e-6)
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx([1e-4] * 3)
    assert [e.step for e in events.Images("samples/ema_grid")] == [3, 6]
    log_steps = [line for line in (reference_run / "log.txt").read_text().splitlines() if line.startswith("Step ")]
    for line, event in zip(log_steps, events.Scalars("train/Con_MSE")):
        fields = dict(f.split(" ", 1) for f in line.split(" | ")[1:])
        assert float(fields["Con_MSE"]) == pytest.approx(event.value, abs=1e-4)
        total, per_rank = fields["Img/s"].replace("(", "").replace("/rank)", "").split()
        # both figures are printed to one decimal: their rounding alone may move 2 x per-rank by up to 0.15
        assert float(total) == pytest.approx(2 * float(per_rank), rel=0.01, abs=0.15)
    assert np.isfinite([e.value for e in events.Scalars("speed/images_per_s")]).all()
