"""Timing, memory and worker-process helpers shared by the benchmarks (step_cost.py, precision.py,
gpu_report.py, paper_table.py).

  Timer / sync          wall time of a block, with CUDA synchronised on entry and exit (CUDA calls are
                        asynchronous: a time is only meaningful once the device has finished)
  num_threads           torch's intra-op thread count for a block, restored on exit; default_threads
  interleaved_rounds    steps several variants in turn, one step each per round, so that a change of
                        machine load hits every variant alike; an optional deadline cuts the rounds
  MemoryMeter           peak memory from a point on: the CUDA allocator's peak, or the CPU resident-set peak
  WorkerProcess /       one variant per process (weights, optimizer and allocator state never shared): the
  WorkerChannel         parent writes one command a line to the worker's stdin, the worker answers each
                        with one JSON object a line on its stdout
  markdown_table        a Markdown table of cells
  log_windows           the "Step N | ... | Time Xs" windows of a train.py log.txt, parsed
"""
import contextlib
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


# ----------------------------------------------------------------------------------------------------
# Time and threads


def sync(device):
    """Waits for the work queued on a CUDA device; nothing on other devices (or None)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """`with Timer(device) as timer: ...` then `timer.seconds`: the block's wall time, the device
    synchronised before the clock starts and before it stops."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = None

    def __enter__(self):
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._start
        return False


def default_threads():
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@contextlib.contextmanager
def num_threads(threads):
    """torch.set_num_threads(threads) inside the block; the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def interleaved_rounds(steppers, warmup, steps, deadline=None, budget="", log=print):
    """Runs `warmup` untimed then `steps` timed rounds; a round calls every stepper once, in order, as
    `stepper(round_index)` (round_index counts the warm-up rounds too). Returns, per stepper, the list of
    what it returned in the timed rounds.

    With a `deadline` (a time.perf_counter() value), the warm-up is cut (to >= 1 round) and so are the timed
    rounds (to >= 2) when the next round, at the length of the last one, would end past it; each cut is
    logged as '# time budget ({budget}): ...'."""
    min_timed = min(2, steps)
    records = [[] for _ in steppers]
    state = dict(rounds=0, last=0.0)  # rounds run so far, seconds of the last one

    def past_deadline(rounds_ahead):
        return deadline is not None and time.perf_counter() + state["last"] * rounds_ahead > deadline

    def one_round(timed):
        start = time.perf_counter()
        for stepper, out in zip(steppers, records):
            value = stepper(state["rounds"])
            if timed:
                out.append(value)
        state["rounds"] += 1
        state["last"] = time.perf_counter() - start

    for i in range(warmup):
        if i > 0 and past_deadline(warmup - i + min_timed):
            log(f"# time budget ({budget}): warm-up cut to {i} step(s)")
            break
        one_round(timed=False)
    for done in range(steps):
        if done >= min_timed and past_deadline(1):
            log(f"# time budget ({budget}): {done} timed steps per variant")
            break
        one_round(timed=True)
    return records


# ----------------------------------------------------------------------------------------------------
# Memory


def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


class MemoryMeter:
    """Peak memory of this process from `start()` on: CUDA allocator peak, or the CPU resident-set peak."""

    def __init__(self, device):
        self.device = device
        self.method = None

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed set-up memory back before the baseline
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.method = "VmHWM_after_clear_refs"
        except OSError:
            self.method = "ru_maxrss_(not_reset:_includes_setup)"
        self.baseline = _proc_status_kib("VmRSS") * 1024

    def peak(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_kib("VmHWM") * 1024

    def report(self):
        """{'peak', 'baseline', 'method'}: bytes at the peak and at start(), and how they were read."""
        return dict(peak=self.peak(), baseline=self.baseline, method=self.method)


def step_bytes(report):
    """The memory a step adds on top of what lives between steps: peak minus baseline of a MemoryMeter report."""
    return report["peak"] - report["baseline"]


# ----------------------------------------------------------------------------------------------------
# One variant per process


class WorkerChannel:
    """The worker's side. From construction on, stdout carries the protocol only (one JSON object a line);
    anything else the process prints goes to stderr."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, **message):
        self._out.write(json.dumps(message) + "\n")

    def serve(self, handlers):
        """Answers every command line read from stdin with `handlers[command]()` (a dict, sent as the reply)
        until 'quit' or the end of stdin; unknown commands get no reply."""
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command in handlers:
                self.send(**handlers[command]())
        self._out.close()


class WorkerProcess:
    """The parent's side: `python argv...` started as a worker (a WorkerChannel), commands written one a line
    to its stdin, each reply read as one JSON line. A worker that dies raises RuntimeError with the end of its
    stderr."""

    def __init__(self, name, argv, env=None):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1, env=env)

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read()[-4000:]
            raise RuntimeError(f"worker '{self.name}' exited (code {self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def request(self, command):
        try:
            self.proc.stdin.write(command + "\n")
        except BrokenPipeError:
            self.receive()  # raises with the worker's error output
            raise
        return self.receive()

    def close(self):
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()  # and end of input, for a worker that reads to the end
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


# ----------------------------------------------------------------------------------------------------
# Report


_LOG_WINDOW = re.compile(r"^Step (\d+) \|(.*)\| Time ([0-9.]+)s$")


def log_windows(path):
    """The logging windows of a train.py log.txt, in order: dicts of the step that ends the window, its
    seconds, and its numeric fields ({'Vel_MSE': .., 'Con_MSE': .., 'Grad_Norm': .., ...}; fields with units,
    Peak_Mem and Img/s, are left out)."""
    windows = []
    with open(path) as f:
        for line in f:
            m = _LOG_WINDOW.match(line.strip())
            if not m:
                continue
            values = {}
            for field in m.group(2).split("|"):
                name, _, value = field.strip().partition(" ")
                try:
                    values[name] = float(value)
                except ValueError:
                    pass
            windows.append(dict(step=int(m.group(1)), seconds=float(m.group(3)), values=values))
    return windows


def markdown_table(header, rows, align=None):
    """A Markdown table: the `header` cells, then one line per row (str of each cell). `align`: one letter per
    column, 'l' (`---`) or 'r' (`---:`); default every column 'l'."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    lines = ["| " + " | ".join(header) + " |", rule]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])
