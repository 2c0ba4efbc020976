"""How fast the quick-start training runs on the machine it runs on, in each process layout, and what a full run costs.

    python benchmarks/quickstart_speed.py [--config configs/digits_demo.yaml] [--steps 300] [--repeats 2] [--busy]

A CPU machine can run the demo as 2 ranks of 1 thread each (`torchrun --nproc-per-node=2 train.py ...`: each
rank steps half of the global batch, then gloo all-reduces the gradients), as 1 process with every core as
an intra-op thread (`python train.py ... --threads N`, PyTorch's own default) or as 1 process of one thread
(`--threads 1`); each layout is given its --threads, so the figures do not depend on train.py's default;
`--busy` times them beside a one-core busy loop (another user's work). Both train on the same global batches of data (the batch order
depends on the seed and the step only); noise and times are drawn per rank, so the two are statistically, not
bitwise, the same run.

Each layout runs train.py on the config with `total_steps` set to `--steps` (no sample grid or dump, one
checkpoint at the end), in turn (A, B, A, B, ...) so that a change of machine load hits both alike. From
every run: the wall-clock time of the whole command, the steady cost of a step (the log windows after the
first, "Time" over steps) and the fixed cost (wall-clock minus the steps: start-up, data, checkpoints).
The last lines project the config's full run, fixed cost + total_steps x step cost, per layout (the final
1-NFE grid and sample dump of the demo add a few seconds), and the ratio of the two step costs.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench_util import log_windows  # noqa: E402

# name: (ranks, --threads per rank; None: every usable core)
LAYOUTS = {"2 ranks x 1 thread": (2, 1), "1 process x all cores": (1, None), "1 process x 1 thread": (1, 1)}


def step_cost(log_path):
    """Seconds per step over the log windows after the first (the first holds the warm-up), and the total
    seconds of all windows."""
    windows, previous = [], 0
    for window in log_windows(log_path):
        windows.append((window["step"] - previous, window["seconds"]))
        previous = window["step"]
    if len(windows) < 2:
        raise SystemExit(f"{log_path}: fewer than two logging windows; raise --steps or lower logging_steps")
    steady = windows[1:]
    return sum(s for _, s in steady) / sum(n for n, _ in steady), sum(s for _, s in windows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits_demo.yaml"))
    p.add_argument("--steps", type=int, default=300, help="training steps per timed run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per layout, interleaved")
    p.add_argument("--busy", action="store_true",
                   help="time the layouts beside another busy process (a one-core busy loop started here)")
    args = p.parse_args(argv)
    from config import load_config
    cfg = load_config(args.config)
    if args.steps < 2 * cfg.logging_steps:
        raise SystemExit(f"--steps must be at least twice logging_steps ({cfg.logging_steps})")
    cores = os.cpu_count()
    print(f"{args.config}: {cfg.total_steps} steps of batch {cfg.batch_size}; {cores} CPU cores; "
          f"{args.repeats} x {args.steps} steps per layout, interleaved", flush=True)
    results = {name: [] for name in LAYOUTS}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            time_layouts(args, results, tmp)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    report(cfg, results)


def time_layouts(args, results, tmp):
    """Runs every layout `args.repeats` times, interleaved, appending (s/step, fixed s) to `results[name]`."""
    from config import write_variant
    from digits_quality import train_command
    for r in range(args.repeats):
        for i, (name, (nproc, threads)) in enumerate(LAYOUTS.items()):
            work = os.path.join(tmp, f"run{r}_{i}")
            path = write_variant(args.config, work + ".yaml", working_dir=work, total_steps=args.steps,
                                 eval_demo_steps=10 ** 9, eval_steps=10 ** 9, ckpt_saving_steps=10 ** 9,
                                 tracker="none")
            env = dict(os.environ)
            env.pop("OMP_NUM_THREADS", None)
            threads = threads or len(os.sched_getaffinity(0))
            command = train_command(nproc, path) + ["--threads", str(threads)]
            start = time.time()
            subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            wall = time.time() - start
            per_step, in_windows = step_cost(os.path.join(work, "log.txt"))
            results[name].append((per_step, wall - in_windows))
            print(f"  {name}: {wall:.1f} s for {args.steps} steps; {per_step:.4f} s/step steady; "
                  f"fixed cost {wall - in_windows:.1f} s", flush=True)


def report(cfg, results):
    per_layout = {}
    for name, runs in results.items():
        per_step = statistics.median(r[0] for r in runs)
        fixed = statistics.median(r[1] for r in runs)
        per_layout[name] = per_step
        full = fixed + cfg.total_steps * per_step
        print(f"{name}: {per_step:.4f} s/step (runs: {', '.join(f'{r[0]:.4f}' for r in runs)}); projected "
              f"{cfg.total_steps} steps: {full:.0f} s ({full / 60:.1f} min)")
    two, one, one_thread = per_layout.values()
    print(f"ratio: 1-process / 2-rank step cost = {one / two:.2f}; 1 process x 1 thread / 2-rank = "
          f"{one_thread / two:.2f}")


if __name__ == "__main__":
    main()
