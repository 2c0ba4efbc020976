"""train.py against careless or hostile use: two runs on one working_dir, changed configs on resume, failed
writes at any moment, non-finite weights. Tiny CIFAR recipe, on 2 CPU ranks (gloo) where ranks are involved."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import train
from checkpoints import list_checkpoints, load_checkpoint
from helpers import TORCHRUN_VARIABLES, make_cifar_folder, torchrun, write_config
from safe_io import OutputError


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """In-process runs as one single-threaded process (the 2-core machine is shared; torchrun's ranks get
    OMP_NUM_THREADS=1 from helpers.torchrun)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_torchrun_variables(monkeypatch):
    for key in TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)


def steps_of(run):
    return [s for s, _ in list_checkpoints(run / "ckpts")]


def resumable_copy(reference_run, run, step):
    """A run folder holding the reference run's config.yaml and its checkpoint of `step` (the reference run stays
    untouched)."""
    os.makedirs(run / "ckpts")
    for name in ("config.yaml", "config.soflow.yaml"):  # the run's record: the release's keys and this code's
        shutil.copy(reference_run / name, run / name)
    shutil.copy(reference_run / "ckpts" / f"{step}.pt", run / "ckpts" / f"{step}.pt")
    return run


def config(tmp_path, cifar_root, run, name="cfg.yaml", **changes):
    return write_config("tiny_cifar_cpu.yaml", tmp_path / name, dataset_path=cifar_root, working_dir=str(run),
                        **{"tracker": "none", **changes})


# ----------------------------------------------------------------------------------------------------
# One working_dir, one run


def test_a_second_run_on_a_working_dir_is_refused_on_every_rank(cifar_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = config(tmp_path, cifar_root, run, total_steps=2, eval_steps=100, eval_demo_steps=100)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # "the other run"
    try:
        (run / train.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                                       "since": "10:00", "command": "train.py --config a.yaml"}))
        began = time.time()
        proc = torchrun("train.py", ["--config", cfg], check=False)
        assert proc.returncode != 0 and time.time() - began < 120
        assert f"working_dir {run} is in use by another process: pid {other.pid} on this host" in proc.stderr
        assert os.listdir(run) == [train.LOCK_NAME]  # no log.txt, config.yaml or ckpts/ of the refused run
    finally:
        other.kill()
        other.wait()
    # the other run is gone (killed): its lock is stale, taken over and noted
    assert train.main(["--config", cfg]) == 0
    log = (run / "log.txt").read_text()
    assert f"took over the stale lock {run / train.LOCK_NAME} of pid {other.pid}" in log
    assert steps_of(run) == [0, 2] and not (run / train.LOCK_NAME).exists()  # released at the end


# ----------------------------------------------------------------------------------------------------
# config.yaml, the run's record, is written only after the checks


def test_refused_resumes_leave_the_runs_config_untouched(reference_run, cifar_root, tmp_path, monkeypatch):
    import sample
    run = resumable_copy(reference_run, tmp_path / "run", 2)
    record = (run / "config.yaml").read_bytes()
    wider = config(tmp_path, cifar_root, run, "wide.yaml", model_channels=32)
    with pytest.raises(SystemExit, match=r"model or data settings .*model_channels: 16 -> 32"):
        train.main(["--config", wider])
    with pytest.raises(SystemExit, match="--no-resume"):
        train.main(["--config", config(tmp_path, cifar_root, run), "--no-resume"])
    assert (run / "config.yaml").read_bytes() == record and not (run / "log.txt").exists()
    sample.main(["--ckpt", str(run / "ckpts" / "2.pt"), "--out", str(tmp_path / "grid.png")])  # still its model
    # without the run's record (a checkpoint copied in): the weights' shapes tell the sizes
    (run / "config.yaml").unlink()
    (run / "config.soflow.yaml").unlink()
    with pytest.raises(SystemExit, match=r"2\.pt does not fit the config: the config describes UNet with "
                                         r"model_channels 32, .*the checkpoint model_channels 16"):
        train.main(["--config", wider])
    assert sorted(os.listdir(run)) == ["ckpts"]
    # an empty config is no "all defaults" run in ./results/run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SystemExit, match="empty.yaml is empty"):
        train.main(["--config", str(tmp_path / "empty.yaml")])
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("key", ["noising_type", "seed", "dataset_path"])
def test_a_changed_model_or_data_key_refuses_to_resume(key, reference_run, cifar_root, tmp_path):
    run = resumable_copy(reference_run, tmp_path / "run", 4)
    new = {"noising_type": "Trig", "seed": 1, "dataset_path": make_cifar_folder(str(tmp_path / "other"), seed=1)}
    old = {"noising_type": "'Linear'", "seed": "0", "dataset_path": repr(cifar_root)}
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", **{"dataset_path": cifar_root,
                                                                        "working_dir": str(run), key: new[key]})
    with pytest.raises(SystemExit, match=rf"{key}: {old[key]} -> {new[key]!r}\. These cannot change on resume"):
        train.main(["--config", cfg])


def test_data_changed_in_place_refuse_to_resume(tmp_path):
    """The same dataset_path with other content (a folder re-extracted or replaced in place): the checkpoint's
    record of the data (dataset_identity) no longer matches, so the run refuses before writing anything."""
    data, run = make_cifar_folder(str(tmp_path / "data"), seed=0), tmp_path / "run"
    quiet = dict(eval_steps=100, eval_demo_steps=100, total_steps=2)
    assert train.main(["--config", config(tmp_path, data, run, **quiet)]) == 0
    assert load_checkpoint(run / "ckpts" / "2.pt")["dataset"]["samples"] > 0
    make_cifar_folder(data, seed=1)  # other images under the same path
    record = (run / "config.yaml").read_text(), (run / "log.txt").read_text()
    with pytest.raises(SystemExit, match=r"training data at .*data differ from those .*2\.pt was trained on .*"
                                         r"changed or re-extracted in place"):
        train.main(["--config", config(tmp_path, data, run, "more.yaml", **{**quiet, "total_steps": 4})])
    assert ((run / "config.yaml").read_text(), (run / "log.txt").read_text()) == record and steps_of(run) == [0, 2]


def test_changed_optimizer_settings_are_applied_and_logged(cifar_root, tmp_path):
    run = tmp_path / "run"
    quiet = dict(eval_steps=100, eval_demo_steps=100)
    assert train.main(["--config", config(tmp_path, cifar_root, run, total_steps=2, **quiet)]) == 0
    cfg = config(tmp_path, cifar_root, run, "more.yaml", total_steps=4, learning_rate=5e-5, logging_steps=1, **quiet)
    assert train.main(["--config", cfg]) == 0
    log = (run / "log.txt").read_text()
    assert "changed since the run's config.yaml: logging_steps: 2 -> 1" in log
    assert "changed since the run's config.yaml: total_steps: 2 -> 4" in log
    assert "applied to the optimizer: learning_rate 0.0001 -> 5e-05" in log
    assert "(continued with changed settings (total_steps, learning_rate), not a bit-exact continuation)" in log
    assert "(bit-exact continuation)" not in log
    state = load_checkpoint(run / "ckpts" / "4.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [5e-5]
    assert "learning_rate: 5.0e-05" in (run / "config.yaml").read_text()


# ----------------------------------------------------------------------------------------------------
# Nothing called good that is not


def test_non_finite_weights_are_never_checkpointed(cifar_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = config(tmp_path, cifar_root, run, ckpt_saving_steps=1, logging_steps=1, eval_demo_steps=100)
    step = torch.optim.RAdam.step

    def overflowing(self, *args, **kwargs):  # what learning_rate 1e38 does: finite loss, then inf weights
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][3].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.RAdam, "step", overflowing)
    with pytest.raises(train.NonFiniteLoss, match=r"non-finite weights after step 1 .*Last good checkpoint: .*0\.pt"):
        train.main(["--config", cfg])
    assert steps_of(run) == [0]


# ----------------------------------------------------------------------------------------------------
# Failed writes: reported with the path and free space, nothing lost, the owed outputs redone


def test_failed_checkpoint_write_of_any_type_stops_both_ranks_at_once(cifar_root, tmp_path):
    run = tmp_path / "run"
    cfg = config(tmp_path, cifar_root, run, eval_steps=100, eval_demo_steps=100)
    began = time.time()
    proc = torchrun("train.py", ["--config", cfg], env={"SOFLOW_TEST_CRASH": "ckpt:4=ERROR"}, check=False)
    assert proc.returncode != 0 and time.time() - began < 180  # not the process group's 60-minute timeout
    assert proc.stderr.count("error: could not write checkpoint") == 2  # both ranks say why
    assert "4.pt (RuntimeError: " in proc.stderr and "GiB free on its file system" in proc.stderr
    assert steps_of(run) == [0, 2] and sorted(os.listdir(run / "ckpts")) == ["0.pt", "2.pt"]


def test_a_failed_grid_keeps_its_step_and_is_drawn_on_resume(cifar_root, tmp_path, monkeypatch):
    """A grid (figs/ read-only) fails at step 2, where no checkpoint is due: the step is checkpointed before the
    run stops, and the resumed run draws the grid it owes first."""
    from PIL import Image
    run = tmp_path / "run"
    cfg = config(tmp_path, cifar_root, run, total_steps=4, eval_demo_steps=2, ckpt_saving_steps=100, eval_steps=100)
    save = Image.Image.save

    def read_only(self, fp, *args, **kwargs):
        if "2.png" in str(fp):
            raise OSError(30, "Read-only file system")
        return save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", read_only)
    with pytest.raises(OutputError, match=r"could not write sample grid .*2\.png \(OSError: .*Read-only.*GiB free.*"
                                          r"Checkpoint .*2\.pt holds step 2"):
        train.main(["--config", cfg])
    assert steps_of(run) == [0, 2] and os.listdir(run / "figs") == []  # step 2 not lost
    monkeypatch.setattr(Image.Image, "save", save)
    assert train.main(["--config", cfg]) == 0
    assert sorted(os.listdir(run / "figs")) == ["2.png", "4.png"]


def test_a_failed_last_dump_is_redone_on_rerun(cifar_root, tmp_path, monkeypatch):
    import inference
    run = tmp_path / "run"
    cfg = config(tmp_path, cifar_root, run, total_steps=2, eval_steps=2, eval_demo_steps=100, num_eval_samples=4)
    write = inference._write_npz_streaming

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(inference, "_write_npz_streaming", full_disk)
    with pytest.raises(OutputError, match=r"sample dump .*2\.npz not written: rank 0: could not write sample dump "
                                          r".*No space left.*GiB free"):
        train.main(["--config", cfg])
    assert steps_of(run) == [0, 2] and os.listdir(run / "evals") == []  # no part, lock or temporary left
    monkeypatch.setattr(inference, "_write_npz_streaming", write)
    assert train.main(["--config", cfg]) == 0
    log = (run / "log.txt").read_text()
    assert log.rindex("wrote 4 EMA samples") > log.rindex("resumed from") and os.listdir(run / "evals") == ["2.npz"]



def test_a_log_file_on_a_full_disk_stops_the_run_at_a_checkpoint_and_resumes(cifar_root, tmp_path):
    """log.txt on a full disk (/dev/full: every write fails with ENOSPC): no traceback, the running step is
    checkpointed, the run stops naming log.txt and the free space; the same command resumes bit-exactly."""
    run = tmp_path / "run"
    cfg = config(tmp_path, cifar_root, run, total_steps=2, eval_steps=100, eval_demo_steps=100)
    run.mkdir()
    os.symlink("/dev/full", run / "log.txt")
    with pytest.raises(train.RecordWriteError, match=r"could not write log file .*log\.txt \(OSError: \[Errno 28\] "
                                                     r".*GiB free.*stopped after step 1 with checkpoint .*1\.pt"):
        train.main(["--config", cfg])
    assert steps_of(run) == [0, 1]
    (run / "log.txt").unlink()
    assert train.main(["--config", cfg]) == 0
    log = (run / "log.txt").read_text()
    assert "1.pt at step 1 (bit-exact continuation)" in log and "finished 2 steps" in log


def test_a_failed_tensorboard_write_of_any_type_stops_the_run_at_a_checkpoint(cifar_root, tmp_path, monkeypatch,
                                                                             capsys):
    """The TensorBoard writer raises RuntimeError at the step-2 scalars: the run finishes step 3, writes its
    checkpoint and stops naming tb/ and the free space; without the fault the same command resumes there."""
    from torch.utils.tensorboard import SummaryWriter
    run = tmp_path / "run"
    cfg = config(tmp_path, cifar_root, run, total_steps=4, eval_steps=100, eval_demo_steps=100, tracker="tensorboard")
    add_scalar = SummaryWriter.add_scalar

    def failing(self, tag, value, step, *args, **kwargs):
        if step == 2:
            raise RuntimeError("event writer died (test)")
        return add_scalar(self, tag, value, step, *args, **kwargs)
    monkeypatch.setattr(SummaryWriter, "add_scalar", failing)
    with pytest.raises(train.RecordWriteError, match=r"could not write tensorboard log folder .*tb \(RuntimeError: "
                                                     r"event writer died.*GiB free.*stopped after step 3 with "
                                                     r"checkpoint .*3\.pt"):
        train.main(["--config", cfg])
    assert steps_of(run) == [0, 2, 3] and "Traceback" not in capsys.readouterr().err
    assert "Step 3 | " in (run / "log.txt").read_text()  # log.txt kept the whole record
    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    assert train.main(["--config", cfg]) == 0
    log = (run / "log.txt").read_text()
    assert "3.pt at step 3 (bit-exact continuation)" in log and "finished 4 steps" in log

# ----------------------------------------------------------------------------------------------------
# Stopping and restarting as people do


def test_a_resume_from_step_0_draws_and_dumps_nothing_there(reference_run, cifar_root, tmp_path):
    """Step 0 is never due for a grid or a dump (the release's rule): a run resumed from 0.pt (e.g. after a Ctrl-C
    during the first step) trains on without drawing or dumping the untrained model."""
    run = resumable_copy(reference_run, tmp_path / "run", 0)
    cfg = config(tmp_path, cifar_root, run, total_steps=1, eval_demo_steps=1000, eval_steps=1000)
    assert train.main(["--config", cfg]) == 0
    assert steps_of(run) == [0, 1] and os.listdir(run / "figs") == [] and os.listdir(run / "evals") == []
    assert [train.is_due(0, period, 10) for period in (1, 5, 10)] == [False] * 3


def test_a_finished_run_rerun_says_so_in_one_line(reference_run, cifar_root, tmp_path, monkeypatch, capsys):
    """Re-running a finished run: one line, exit 0, no data loaded, no model built, nothing written."""
    run = resumable_copy(reference_run, tmp_path / "run", 6)
    for outputs in ("figs", "evals"):  # the last step's grid and dump: nothing owed
        shutil.copytree(reference_run / outputs, run / outputs)
    cfg = config(tmp_path, cifar_root, run)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run loads no data and builds no model")
    monkeypatch.setattr(train, "build_dataset", refuse)
    monkeypatch.setattr(train, "build_training", refuse)
    before = sorted(os.listdir(run))
    assert train.main(["--config", cfg]) == 0
    assert capsys.readouterr().out.strip() == f"already finished: 6 of 6 steps, checkpoint {run / 'ckpts' / '6.pt'}"
    assert sorted(os.listdir(run)) == before and steps_of(run) == [6]


def test_threads_never_oversubscribe_by_default_and_can_be_set(cifar_root, tmp_path):
    assert train.intra_op_threads(None, {}, 2, 1) == 1  # one process on 2 cores: one core left to the machine
    assert train.intra_op_threads(None, {}, 16, 1) == 15
    assert train.intra_op_threads(None, {}, 2, 2) == 1  # ranks filling the cores: one thread each
    assert train.intra_op_threads(None, {}, 2, 4) == 1
    assert train.intra_op_threads(None, {}, 16, 4) == 3
    assert train.intra_op_threads(None, {}, 1, 1) == 1
    assert train.intra_op_threads(None, {"OMP_NUM_THREADS": "3"}, 2, 1) == 3  # the variable, when set
    assert train.intra_op_threads(1, {"OMP_NUM_THREADS": "3"}, 2, 1) == 1  # the option first
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        train.intra_op_threads(0, {}, 2, 1)
    run = tmp_path / "run"
    torch.set_num_threads(2)
    assert train.main(["--config", config(tmp_path, cifar_root, run, total_steps=1), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1 and "CPU threads: 1 per rank" in (run / "log.txt").read_text()


def test_a_multinode_job_on_torchruns_shared_store_is_warned():
    """A lost node cannot rejoin a multi-node job on torchrun's shared store (docs/cluster.md): the log says so."""
    shared = {"GROUP_WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in train.multinode_store_warning(shared)
    assert train.multinode_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert train.multinode_store_warning({**shared, "GROUP_WORLD_SIZE": "1"}) is None  # one node: restarts work
    assert train.multinode_store_warning({}) is None


def test_a_config_error_comes_once_and_before_the_training_imports(tmp_path, monkeypatch, capsys):
    """A misspelled key: `python train.py` reports it having imported only what the config check needs (not the
    training's imports: timm, the sampler, TensorBoard, torchvision, PIL); under torchrun only rank 0 prints it, every rank
    exits with status 1."""
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", working_dir=str(tmp_path / "r"))
    with open(cfg, "a") as f:
        f.write("batch_sizee: 8\n")
    probe = ("import runpy, sys\nsys.argv = ['train.py', '--config', sys.argv[1]]\ntry:\n"
             "    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n"
             "    print('exit', e.code, sorted(m for m in ('timm', 'inference', 'tensorboard', 'torchvision', 'PIL.Image')"
             " if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe, cfg], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().endswith("exit config error: " + f"{cfg}: unknown key 'batch_sizee' (did you mean "
                                        "'batch_size'?); remove it or fix the spelling []"), proc.stdout + proc.stderr
    for rank, printed in (("1", ""), ("0", "unknown key 'batch_sizee'")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            train.main(["--config", cfg])
        assert (stop.value.code == 1) if rank == "1" else printed in stop.value.code
    assert not (tmp_path / "r").exists()


def test_the_script_reads_its_config_once(cifar_root, tmp_path):
    """`python train.py` checks the config before the training's imports and trains on that same Config: the YAML
    is read once."""
    cfg = config(tmp_path, cifar_root, tmp_path / "run", total_steps=1)
    probe = ("import runpy, sys, config\nreads = []\nload = config.load_config\n"
             "config.load_config = lambda path: reads.append(path) or load(path)\n"
             "sys.argv = ['train.py', '--config', sys.argv[1], '--threads', '1']\ntry:\n"
             "    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n"
             "    print('exit', e.code, 'reads', len(reads))\n")
    proc = subprocess.run([sys.executable, "-c", probe, cfg], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().endswith("exit 0 reads 1"), proc.stdout + proc.stderr
    assert steps_of(tmp_path / "run") == [0, 1]


def test_the_resume_plan_says_what_is_owed_and_needed(reference_run, cifar_root, tmp_path):
    """train.plan_resume decides, before any data or model: the step, what the stopped step owes (its grid and
    dump, when missing), whether anything is left, whether dumps (and for ImageNet the decoder) lie ahead."""
    from types import SimpleNamespace

    from config import load_config
    notes = []

    def plan(run, **changes):
        return train.plan_resume(load_config(config(tmp_path, cifar_root, run, **changes)), "cfg.yaml", str(run),
                                 False, notes.append)
    new = plan(tmp_path / "new")  # the reference's periods: grids every 3 steps, a dump at step 6 of 6
    assert (new.state, new.finished_steps, new.owed, new.finished, new.decoder, new.dumps_ahead) == \
        (None, 0, (False, False), False, False, True)
    assert not plan(tmp_path / "new", eval_steps=100).dumps_ahead  # a dump period longer than the run
    last = plan(resumable_copy(reference_run, tmp_path / "at6", 6))  # stopped after step 6's checkpoint
    assert (last.finished_steps, last.owed, last.finished, last.dumps_ahead) == (6, (True, True), False, True)
    shutil.copytree(reference_run / "figs", tmp_path / "at6" / "figs")
    assert plan(tmp_path / "at6").owed == (False, True)  # the grid is on disk, the dump is not
    shutil.copytree(reference_run / "evals", tmp_path / "at6" / "evals")
    assert plan(tmp_path / "at6").finished
    middle = plan(resumable_copy(reference_run, tmp_path / "at4", 4))
    assert (middle.finished_steps, middle.owed, middle.finished) == (4, (False, False), False)
    changed = {key: (old, new) for key, old, new in plan(tmp_path / "at4", logging_steps=3).changes}
    assert changed["logging_steps"] == (2, 3) and "logging_steps" not in {key for key, _, _ in middle.changes}
    with pytest.raises(SystemExit, match="holds checkpoints and --no-resume was given"):
        train.plan_resume(load_config(config(tmp_path, cifar_root, tmp_path / "at4")), "cfg.yaml",
                          str(tmp_path / "at4"), True, notes.append)
    imagenet = SimpleNamespace(dataset_type="Imagenet", total_steps=10, eval_demo_steps=20, eval_steps=20)
    assert not train.decodes(imagenet, 0, (False, False))  # both periods longer than the run: nothing to decode
    assert train.decodes(imagenet, 10, (False, True))  # a dump owed
    assert train.decodes(SimpleNamespace(**{**vars(imagenet), "eval_steps": 10}), 9, (False, False))
    assert not train.decodes(SimpleNamespace(**{**vars(imagenet), "eval_steps": 10}), 10, (False, False))
