"""benchmarks/bench_util.py: interleaved rounds, the time budget, tables, threads and the worker process."""
import time

import pytest
import torch

import bench_util


def test_interleaved_rounds_step_in_turn_and_record_the_timed_rounds():
    calls = []
    steppers = [lambda i, name=name: calls.append((name, i)) or f"{name}{i}" for name in "ab"]
    records = bench_util.interleaved_rounds(steppers, warmup=2, steps=3)
    assert calls == [(name, i) for i in range(5) for name in "ab"]  # round by round, each variant once
    assert records == [["a2", "a3", "a4"], ["b2", "b3", "b4"]]  # warm-up rounds are not recorded


def test_deadline_cuts_warmup_to_one_and_timed_rounds_to_two():
    logged = []
    steppers = [lambda i: time.sleep(0.01) or i]
    records = bench_util.interleaved_rounds(steppers, warmup=3, steps=5, deadline=time.perf_counter(),
                                            budget="--max-minutes 0", log=logged.append)
    assert records == [[1, 2]]
    assert logged == ["# time budget (--max-minutes 0): warm-up cut to 1 step(s)",
                      "# time budget (--max-minutes 0): 2 timed steps per variant"]


def test_markdown_table():
    text = bench_util.markdown_table(("a", "b"), [(1, "x"), ("", 2.5)], "lr")
    assert text == "| a | b |\n|---|---:|\n| 1 | x |\n|  | 2.5 |"
    assert bench_util.markdown_table(("a",), []) == "| a |\n|---|"
    with pytest.raises(ValueError, match="align 'l' has 1 letters for 2 columns"):
        bench_util.markdown_table(("a", "b"), [], "l")


def test_num_threads_restores_and_timer_measures():
    before = torch.get_num_threads()
    with bench_util.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with bench_util.Timer("cpu") as timer:
        time.sleep(0.02)
    assert timer.seconds >= 0.02
    assert bench_util.step_bytes(dict(peak=10, baseline=4, method="m")) == 6


def test_worker_process_answers_and_a_dead_worker_raises_with_its_stderr():
    echo = "import json, sys\nfor line in sys.stdin:\n    print(json.dumps({'got': line.strip()}), flush=True)"
    worker = bench_util.WorkerProcess("echo", ["-c", echo])
    try:
        assert worker.request("step") == {"got": "step"}
    finally:
        worker.close()
    dead = bench_util.WorkerProcess("dead", ["-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    try:
        with pytest.raises(RuntimeError, match=r"worker 'dead' exited \(code 3\):\nboom"):
            dead.request("step")
    finally:
        dead.close()


def test_log_windows_reads_the_lines_train_writes(tmp_path):
    from types import SimpleNamespace

    from train import LOG_KEYS, LogWindow
    lines = []
    tracker = SimpleNamespace(scalars=lambda step, values: None)
    window = LogWindow(SimpleNamespace(batch_size=8), torch.device("cpu"), 1, tracker, lines.append, ())
    stats = {k: torch.tensor(0.5 + i) for i, k in enumerate(LOG_KEYS[:-1])}
    for step in range(4):
        window.add(step, torch.tensor(1.0), stats, torch.tensor(2.0))
    objective = SimpleNamespace(l_ratio=lambda step: 0.1)
    window.write(4, objective, SimpleNamespace(param_groups=[{"lr": 1e-4}]))
    log = tmp_path / "log.txt"
    log.write_text("starting a new run\n" + "\n".join(lines) + "\nsaved checkpoint ckpts/4.pt\n")
    (parsed,) = bench_util.log_windows(str(log))
    assert parsed["step"] == 4 and parsed["seconds"] >= 0
    assert parsed["values"] == {**{k: 0.5 + i for i, k in enumerate(LOG_KEYS[:-1])}, "Grad_Norm": 2.0}
