import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The root's flat modules and the benchmark scripts import as plain modules in the tests.
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)


import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import DEVICES  # noqa: E402


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A generated CIFAR-10 folder (40 random images)."""
    from helpers import make_cifar_folder
    return make_cifar_folder(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="session")
def reference_run(cifar_root, tmp_path_factory):
    """An uninterrupted 6-step 2-rank run of the tiny CIFAR config (checkpoints every 2 steps), read by the
    resume, preemption and restart tests; never modified."""
    from helpers import torchrun, write_config
    work = tmp_path_factory.mktemp("ref")
    cfg = write_config("tiny_cifar_cpu.yaml", work / "cfg.yaml", dataset_path=cifar_root, working_dir=str(work / "run"))
    torchrun("train.py", ["--config", cfg])
    return work / "run"


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device present: the CPU, and CUDA where it exists (skipped with the reason elsewhere). On CUDA the test
    runs with TF32 off (IEEE float32 matmuls and convolutions, as the CPU computes them; cuDNN convolutions default to
    TF32), so that the float32 tolerances written for the CPU hold; a code path that calls
    distributed.configure_backends sets its own TF32 mode, and the previous settings come back after the test."""
    if request.param != "cuda":
        yield torch.device(request.param)
        return
    from distributed import tf32_mode
    with tf32_mode(False):
        yield torch.device(request.param)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """The evaluator with no network, no writes to the real cache folder, and a fresh in-process reference memo
    (the evaluator's test modules use it for every test: `pytestmark = pytest.mark.usefixtures("isolated")`)."""
    import evaluator

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")
    monkeypatch.setattr(evaluator, "urlopen", refuse)
    monkeypatch.setenv("SOFLOW_CACHE_DIR", str(tmp_path / "default_cache"))
    evaluator._REFERENCE_MEMO.clear()
    yield
    evaluator._REFERENCE_MEMO.clear()


@pytest.fixture(scope="module")
def tf():
    """The TensorFlow module; the test is skipped where it cannot be imported."""
    from helpers import import_tf_or_skip
    return import_tf_or_skip()


@pytest.fixture(scope="module")
def single_process():
    """The scripts run in-process as one process, whatever torchrun / SLURM variables an earlier test left in
    os.environ (tests/test_distributed.py's SLURM test sets RANK and WORLD_SIZE directly); the modules of the
    sampling scripts use it for all their tests (`pytestmark = pytest.mark.usefixtures("single_process")`)."""
    from helpers import TORCHRUN_VARIABLES
    with pytest.MonkeyPatch.context() as mp:
        for key in TORCHRUN_VARIABLES:
            mp.delenv(key, raising=False)
        yield
