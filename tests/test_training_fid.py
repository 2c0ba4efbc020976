"""training_fid.TrainingFID inside train.py: the evaluator's results line, written through the evaluator's writer
while holding its lock, and a failed append that loses nothing (the step is checkpointed, the resumed run scores
its dump first). In-process runs of the tiny CIFAR recipe with a small Inception-like graph; the Frechet distance
of its 2048-d features (minutes of 2048 x 2048 matrix square roots on 2 cores; tests/test_evaluator.py checks it)
is stubbed, that of a tiny DINOv2's features is not."""
import os

import numpy as np
import pytest

import evaluator
import train
from helpers import write_config
from safe_io import OutputError
from inception_graphs import write_inception_like


@pytest.fixture
def fid_config(cifar_root, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SOFLOW_CACHE_DIR", str(tmp_path / "cache"))
    frechet = evaluator.frechet_distance
    monkeypatch.setattr(evaluator, "frechet_distance",
                        lambda mu1, *args, **kwargs: frechet(mu1, *args, **kwargs) if len(mu1) <= 64 else 0.0)
    monkeypatch.setattr(evaluator, "tensorflow_available", lambda: False)
    graph = write_inception_like(tmp_path / "graph.pb", writer="plain")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    return write_config("tiny_cifar_cpu.yaml", tmp_path / "cfg.yaml", dataset_path=cifar_root,
                        working_dir=str(tmp_path / "run"), fid_ref_batch=str(ref), fid_inception_graph=str(graph),
                        eval_demo_steps=100, eval_save_samples=False, total_steps=2, eval_steps=2,
                        ckpt_saving_steps=2, num_eval_samples=8, tracker="none")


def test_a_failed_fid_line_keeps_its_step_and_is_scored_on_resume_under_the_evaluators_lock(fid_config, tmp_path,
                                                                                           monkeypatch):
    run = tmp_path / "run"
    results = run / "evals" / evaluator.RESULTS_FILENAME
    results.mkdir(parents=True)  # eval_results.txt cannot be appended to, whoever runs the test
    with pytest.raises(OutputError, match=r"FID of 2\.npz not recorded: could not write results file "
                                          r".*eval_results\.txt \(IsADirectoryError: .*GiB free.*Checkpoint .*2\.pt "
                                          r"holds step 2"):
        train.main(["--config", fid_config])
    assert sorted(os.listdir(run / "ckpts")) == ["0.pt", "2.pt"]
    assert os.listdir(run / "evals") == [evaluator.RESULTS_FILENAME]  # no features, lock or temporary left
    results.rmdir()
    append, locked = evaluator.append_result, []

    def append_checking_the_lock(path, line):
        locked.append(os.path.isfile(f"{path}.lock"))
        append(path, line)
    monkeypatch.setattr(evaluator, "append_result", append_checking_the_lock)
    assert train.main(["--config", fid_config]) == 0
    line = results.read_text().strip()
    assert line.startswith("2.npz # IS: ") and locked == [True]
    log = (run / "log.txt").read_text()
    assert log.index("resumed from") < log.index(line) < log.index("finished 2 steps")
    assert os.listdir(run / "evals") == [evaluator.RESULTS_FILENAME]  # the lock released


def test_fd_dinov2_inside_training_is_on_the_line_and_in_tensorboard(fid_config, tmp_path, monkeypatch):
    """fid_dinov2: the dump's line gains FD_DINOv2, equal to the distance computed here from the written dump and
    the reference images (the tiny DINOv2's features, NumPy statistics, scipy's sqrtm); TensorBoard gets every
    metric of the line under eval/."""
    import scipy.linalg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from config import write_variant
    from helpers import tiny_dinov2_features, write_tiny_dinov2
    weights = write_tiny_dinov2(tmp_path / "tiny.safetensors")
    monkeypatch.setattr(evaluator, "make_dinov2_features", lambda path, device: tiny_dinov2_features(path, device))
    config = write_variant(fid_config, tmp_path / "dinov2.yaml", fid_dinov2=True, fid_dinov2_weights=str(weights),
                           eval_save_samples=True, tracker="tensorboard")
    assert train.main(["--config", config]) == 0

    run = tmp_path / "run"
    line = (run / "evals" / evaluator.RESULTS_FILENAME).read_text().strip()
    value = float(line.split(", FD_DINOv2: ")[1])
    network = tiny_dinov2_features(weights)
    ref = network.features_of(np.load(tmp_path / "ref.npz")["arr_0"]).astype(np.float64)
    dump = network.features_of(np.load(run / "evals" / "2.npz")["arr_0"]).astype(np.float64)
    s1, s2 = np.cov(ref, rowvar=False), np.cov(dump, rowvar=False)
    want = (((ref.mean(0) - dump.mean(0)) ** 2).sum() + np.trace(s1 + s2)
            - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    assert value == pytest.approx(want, abs=2e-4) and want > 0.01

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"] if tag.startswith("eval/")}
    assert sorted(scalars) == ["eval/FD_DINOv2", "eval/FID", "eval/IS", "eval/precision", "eval/recall",
                               "eval/sFID"]
    (event,) = scalars["eval/FD_DINOv2"]
    assert event.step == 2 and event.value == pytest.approx(value, abs=1e-4)
