"""distributed.py: ranks from SLURM under a plain srun, the fault-injection hook, the log file's failed writes,
random-state rewinding, one TF32 API through a whole process."""
import errno
import os
import sys

import numpy as np
import pytest
import torch

import distributed
from helpers import release_config
from safe_io import WriteError


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


def test_store_prefix_per_attempt_only_on_torchruns_shared_store(monkeypatch):
    def prefix(shared, restarts):
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", str(shared))
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restarts))
        return distributed._attempt_prefix()

    # one store across a group's restarts: each attempt under its own keys
    assert prefix(True, 0) != prefix(True, 1)
    # a fresh store each round, where a node started again (restart count 0) meets a survivor that restarted once
    assert prefix(False, 0) == prefix(False, 1)


def test_fault_injection_actions(monkeypatch):
    monkeypatch.setenv("SOFLOW_TEST_CRASH", "ckpt:4@1=ENOSPC")
    distributed.FaultInjection.from_env(rank=0).at("ckpt", 4)  # another rank: nothing
    distributed.FaultInjection.from_env(rank=1).at("step", 4)  # another point: nothing
    with pytest.raises(OSError) as info:
        distributed.FaultInjection.from_env(rank=1).at("ckpt", 4)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted torchrun group runs through
    assert distributed.FaultInjection.from_env(rank=1) is None


def test_fault_injection_exists_only_when_a_test_asks(monkeypatch):
    monkeypatch.delenv("SOFLOW_TEST_CRASH", raising=False)
    assert distributed.FaultInjection.from_env(rank=0) is None  # a production run calls nothing for it
    monkeypatch.setenv("SOFLOW_TEST_CRASH", "step:3=ERROR")
    faults = distributed.FaultInjection.from_env(rank=0)
    faults.at("step", 2)  # another count: nothing
    with pytest.raises(RuntimeError, match="PytorchStreamWriter failed writing file"):
        faults.at("step", 3)
    assert distributed.FaultInjection.from_env(rank=1) is not None  # present, acting on rank 0 only
    distributed.FaultInjection.from_env(rank=1).at("step", 3)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.FaultInjection.from_env(rank=0) is None


class FailingStream:
    """A log file's stream whose writes fail from the `after`-th on, with `error`."""

    def __init__(self, after, error):
        self.lines, self.after, self.error = [], after, error

    def write(self, text):
        if len(self.lines) >= self.after:
            raise self.error
        self.lines.append(text)

    def flush(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("disk gone")])
def test_a_failed_log_file_write_is_kept_said_once_and_never_raised(error, tmp_path, monkeypatch, capsys):
    import logging
    stream = FailingStream(after=2, error=error)
    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: stream)
    logger = distributed.setup_logging("test_log_file", 0, tmp_path / "log.txt")
    for i in range(4):
        logger.info(f"line {i}")  # raises nothing
    assert stream.lines == ["line 0\n", "line 1\n"]  # nothing written after the failure
    failure = distributed.log_file_failure(logger)
    assert isinstance(failure, WriteError)
    assert str(failure).startswith(f"could not write log file {tmp_path / 'log.txt'} ({type(error).__name__}: ")
    assert "GiB free on its file system" in str(failure)
    err = capsys.readouterr().err
    assert err.count("warning: could not write log file") == 1 and "Traceback" not in err
    assert distributed.log_file_failure(distributed.setup_logging("test_log_file", 0, tmp_path / "b.txt")) is None


def test_a_log_file_that_cannot_be_opened_names_the_path_and_free_space(tmp_path):
    (tmp_path / "log.txt").mkdir()  # cannot be opened for appending, whoever runs the test
    with pytest.raises(WriteError, match=r"could not write log file .*log\.txt \(IsADirectoryError.*"
                                                     r"GiB free"):
        distributed.setup_logging("test_log_file", 0, tmp_path / "log.txt")
    distributed.setup_logging("test_log_file", 0)  # other ranks and scripts without a file are unaffected


def test_shared_random_state_rewinds():
    with distributed.shared_random_state(torch.device("cpu")) as rewind:
        a = torch.rand(3)
        rewind()
        b = torch.rand(3)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# One TF32 API


class TF32Watch(torch.overrides.TorchFunctionMode):
    """At every torch call: reads the TF32 settings through the per-backend API (`fp32_precision`) and files
    them under the code that made the call: the network (models / dit / unet), the Inception graph
    (inception_torch) or elsewhere."""

    def __init__(self):
        super().__init__()
        self.seen = {"network": set(), "inception": set(), "other": set()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        settings = distributed.tf32_settings()
        self.seen[self._caller()].add(settings)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _caller():
        frame = sys._getframe(2)
        while frame is not None:
            module = frame.f_globals.get("__name__")
            if module == "inception_torch":
                return "inception"
            if module in ("models", "dit", "unet"):
                return "network"
            frame = frame.f_back
        return "other"


@pytest.fixture
def legacy_tf32_writes(monkeypatch):
    """Records every write of the legacy flags torch.backends.cuda.matmul.allow_tf32 / cudnn.allow_tf32."""
    writes = []
    matmul_type = type(torch.backends.cuda.matmul)
    setattr_ = matmul_type.__setattr__

    def recording_setattr(self, name, value):
        if name == "allow_tf32":
            writes.append(("matmul.allow_tf32", value))
        return setattr_(self, name, value)
    monkeypatch.setattr(matmul_type, "__setattr__", recording_setattr)
    cudnn_flag = type(torch.backends.cudnn).__dict__["allow_tf32"]

    def recording_set(self, value):
        writes.append(("cudnn.allow_tf32", value))
        cudnn_flag.__set__(self, value)
    monkeypatch.setattr(type(torch.backends.cudnn), "allow_tf32",
                        property(lambda self: cudnn_flag.__get__(self), recording_set))
    return writes


def test_tf32_one_api_through_training_fid_and_evaluator(cifar_root, tmp_path, monkeypatch, legacy_tf32_writes):
    """A process that runs train.py's start-up and steps, an in-training FID and the evaluator's torch backend:
    TF32 is only ever written through `fp32_precision` (a legacy write followed by a new one makes the legacy
    flags unreadable), and at every torch call the settings read through it are the release's TF32 in the
    network and IEEE float32 inside the Inception graph."""
    import evaluator
    import train
    from helpers import write_config
    from inception_graphs import write_inception_like
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    graph = write_inception_like(tmp_path / "graph.pb", writer="plain")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    cfg = write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root,
                       working_dir=str(tmp_path / "run"), fid_ref_batch=str(ref), fid_inception_graph=str(graph),
                       eval_demo_steps=100, eval_save_samples=False, total_steps=2, eval_steps=2, ckpt_saving_steps=2,
                       num_eval_samples=8)
    monkeypatch.setenv("SOFLOW_CACHE_DIR", str(tmp_path / "cache"))
    # The TF32 settings matter where features are computed: skip the minutes of 2048 x 2048 matrix square roots
    # on 2 cores (tests/test_evaluator.py checks them) and the TensorFlow import of the self-check.
    monkeypatch.setattr(evaluator, "frechet_distance", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(evaluator, "tensorflow_available", lambda: False)
    watch = TF32Watch()
    with distributed.tf32_mode(distributed.tf32_settings()), watch:
        assert train.main(["--config", cfg]) == 0
        after_training = distributed.tf32_settings()
        folder = tmp_path / "dump"
        folder.mkdir()
        np.savez(folder / "2.npz", arr_0=np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
        assert evaluator.main(["--ref_batch", str(ref), "--sample_batch_dir", str(folder), "--inception-graph",
                               str(graph), "--batch-size", "8", "--backend", "torch", "--no-tf-check",
                               "--cache-dir", str(tmp_path / "cache")]) == 0
        assert distributed.tf32_settings() == after_training  # the evaluator restored what it found
    assert legacy_tf32_writes == []
    assert watch.seen["network"] == {("tf32", "tf32")}  # the release's numerics in every network call
    assert ("ieee", "ieee") in watch.seen["inception"]  # the graph ran without TF32 ...
    assert watch.seen["inception"] <= {("ieee", "ieee"), ("tf32", "tf32")}  # ... and nothing else was set
    assert after_training == ("tf32", "tf32")


# ----------------------------------------------------------------------------------------------------
# CUDA's attention kernel rules, on the CPU

# Every network at a tiny width that keeps what CUDA's kernels look at: the head dims of the release's sizes
# (DiT: hidden / heads; the CIFAR U-Net: 256 channels in one head at its attention resolution).
GUIDANCE = release_config("imagenet", "cfg_scale", "cfg_drop_rate", "mix_ratio")  # the release's: the DiTs run guided
NETWORKS = {
    **{name: dict(dataset_type="Imagenet", model_type=name, data_size=2 * patch, num_heads=2,
                  hidden_size=2 * (hidden // heads), depth=1, **GUIDANCE)
       for name, (patch, hidden, _, heads) in __import__("dit").DIT_SIZES.items()},
    "UNet": dict(dataset_type="Digits", model_type="UNet", num_classes=0, data_channels=3, data_size=8,
                 model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1),
    "UNet-256ch": dict(dataset_type="Digits", model_type="UNet", num_classes=0, data_channels=3, data_size=8,
                       model_channels=32, channel_mult=[1, 8], num_blocks=1, attn_resolutions=[4], dropout=0.1),
}


def cuda_attention_context(attention, device):
    """distributed.attention_context as it runs on CUDA, whatever the device."""
    return distributed.attention_context(attention, torch.device("cuda"))


# Every network under each attention x precision.
SETTINGS = [(attention, precision) for attention in ("auto", "efficient", "flash", "math")
            for precision in ("fp32", "bf16", "bf16-guidance")]
CASES = [(network, *setting) for network in NETWORKS for setting in SETTINGS]


@pytest.mark.parametrize("network, attention, precision", CASES)
def test_every_network_meets_cuda_attention_kernel_rules(network, attention, precision, device, monkeypatch):
    """train.py's step (forward and backward, activation checkpointing on the U-Nets) and the sampler, under
    each `attention` and `precision` the config accepts, with CUDA's kernel pinned as on CUDA: every SDPA call
    must be one that kernel takes (rank 4, dtype, head dim, no mask, unit-stride last dimension). On CUDA the
    real kernels run too."""
    import inference
    import train
    from config import ConfigError, from_dict
    from helpers import CudaSDPARules
    try:
        cfg = from_dict({**NETWORKS[network], "attention": attention, "precision": precision, "batch_size": 4,
                         "grad_checkpointing": network.startswith("UNet"), "num_workers": 0})
    except ConfigError as e:  # refused at load: never reaches a kernel
        assert attention == "flash" and "flash kernel takes only float16 / bfloat16" in str(e)
        return
    torch.manual_seed(0)
    model = cfg.build_model().to(device)
    optimizer = train.build_optimizer(cfg, model)
    B, C, S = 4, cfg.data_channels, cfg.data_size
    labels = torch.randint(0, cfg.num_classes, (B,), device=device) if cfg.conditional else None
    augment = torch.zeros(B, 6, device=device) if network.startswith("UNet") else None
    monkeypatch.setattr(train, "attention_context", cuda_attention_context)
    with CudaSDPARules() as rules:
        loss, _, grad_norm = train.train_step(model, model, optimizer, (torch.randn(B, C, S, S, device=device), labels,
                                                                       augment), cfg.objective(), 0, cfg, device)
        with cuda_attention_context(cfg.attention, None):
            inference.sample_images(model.eval(), torch.randn(1, 2, C, S, S), labels[:2] if labels is not None
                                    else None, device, precision=precision)
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
    kernel = distributed.attention_kernel(attention, torch.device("cuda"))
    assert rules.calls and {call[0] for call in rules.calls} == {kernel}
    guidance_in_bf16 = precision == "bf16-guidance" and cfg.guided  # the no-grad guidance call only
    expected = {torch.bfloat16} if precision == "bf16" else {torch.float32} | ({torch.bfloat16} if guidance_in_bf16
                                                                                else set())
    assert {call[2] for call in rules.calls} == expected
