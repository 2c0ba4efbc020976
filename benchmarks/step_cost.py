"""Cost of one SoFlow training step against flow matching, a reference-style SoFlow step and MeanFlow.

    python benchmarks/step_cost.py [--model-type DiT-B-4] [--batch-size 8] [--dtype float32|bfloat16]
                                   [--compile] [--steps 10] [--warmup 2] [--data-size 32]
                                   [--malloc system|retain] [--sequential] [--max-minutes 8.5]
                                   [--grad-checkpointing] [--config X.yaml]

The variants (fm, soflow, reference, meanflow) and their losses are those of step_variants.py: the same
class-conditional DiT on the same random latents and labels, or with `--config` that config's model on random
data of its shape with its objective (e.g. benchmarks/paper_table.py's MNIST DiT). One timed step is
zero_grad + loss + backward + AdamW step. `--grad-checkpointing` adds `<variant>+gc` for fm, soflow and
reference, stepped in turn with the others, and a `gc:` line per pair with the time and memory ratios.

Each variant runs in its own process (weights, optimizer and allocator state never shared). By default the
processes are stepped in turn, one step at a time, so that a change of machine load hits every variant
alike; `--sequential` runs them one after the other instead (one model in memory at a time).

Memory: on CUDA, torch.cuda.max_memory_allocated of the variant's process. On CPU, the peak resident set
(VmHWM, reset through /proc/self/clear_refs after set-up) of the variant's process. "step MiB" is that
peak minus what the process holds between steps (weights, gradients kept allocated, AdamW moments, data):
the activations and temporaries of the step, the part that depends on the objective; the memory ratios use
"step MiB". "sys ms" and "faults k" (kernel time and minor page faults per step) show what the CPU allocator
costs when it hands freed memory back to the kernel between steps; `--malloc retain` turns that off.

The last line reads `ratios: soflow/fm=.. soflow/reference=.. soflow_mem/fm_mem=.. meanflow/fm=..` (medians);
with --grad-checkpointing the lines before it read `gc: time .., step memory .., peak memory .. (soflow+gc / soflow)`.
"""
import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from bench_util import WorkerProcess, default_threads, interleaved_rounds, step_bytes  # noqa: E402
from step_variants import (CFG_DROP_RATE, DATA_CHANNELS, GC_SUFFIX, GC_VARIANTS, NUM_CLASSES, VARIANTS,  # noqa: E402
                           serve_variant, split_variant)

WORKER_VARIANTS = VARIANTS + tuple(v + GC_SUFFIX for v in GC_VARIANTS)
# `--malloc retain`: glibc keeps freed memory (fixed 32 MiB mmap threshold, no heap trimming), the way a
# caching allocator does, so that steps stop paying page faults for memory handed back to the kernel.
RETAIN_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**44)}


# ------------------------------------------------------------------------------------------------------
# Worker processes: one variant each (step_variants.serve_variant), stepped on command
def start_worker(variant, args):
    """The process of one variant (this script with --worker), its allocator as --malloc says."""
    env = dict(os.environ, **(RETAIN_MALLOC_ENV if args.malloc == "retain" else {}))
    return WorkerProcess(variant, [os.path.abspath(__file__), "--worker", variant] + _forward_args(args), env)


def step_worker(worker):
    """One training step of the worker's variant: {'seconds', 'loss', 'sys', 'faults'}."""
    message = worker.request("step")
    if not math.isfinite(message["loss"]):
        raise RuntimeError(f"variant '{worker.name}' produced a non-finite loss {message['loss']}")
    return message


def _forward_args(args):
    out = ["--model-type", args.model_type, "--batch-size", str(args.batch_size), "--dtype", args.dtype,
           "--data-size", str(args.data_size), "--threads", str(args.threads), "--seed", str(args.seed),
           "--adamw", args.adamw] + (["--config", args.config] if args.config else [])
    return out + (["--compile"] if args.compile else [])


# ------------------------------------------------------------------------------------------------------
# Driver
def measure_group(group, args, end, groups_left, log):
    """The variants of `group`, one process each, stepped in turn (interleaved_rounds) within this group's share
    of the time left until `end` (--max-minutes cuts the warm-up to >= 1 round and the timed rounds to >= 2):
    {variant: result}."""
    workers = [start_worker(v, args) for v in group]
    try:
        infos = [w.receive() for w in workers]  # each worker's 'ready' message, sent after its set-up
        now = time.perf_counter()
        steppers = [lambda _round, w=w: step_worker(w) for w in workers]
        records = interleaved_rounds(steppers, args.warmup, args.steps, now + (end - now) / groups_left,
                                     f"--max-minutes {args.max_minutes}", log)
        return {w.name: dict(info, times=[m["seconds"] for m in steps], sys=[m["sys"] for m in steps],
                             faults=[m["faults"] for m in steps], memory=w.request("report"))
                for w, info, steps in zip(workers, infos, records)}
    finally:
        for w in workers:
            w.close()


def run_benchmark(args, log=print):
    variants = list(args.variants)
    if "fm" not in variants:
        variants.insert(0, "fm")
    if getattr(args, "grad_checkpointing", False):
        variants += [v + GC_SUFFIX for v in args.variants if v in GC_VARIANTS]
    end = time.perf_counter() + args.max_minutes * 60
    groups = [variants] if not args.sequential else [[v] for v in variants]
    results = {}
    for k, group in enumerate(groups):
        results.update(measure_group(group, args, end, len(groups) - k, log))
    return results


NOTES = {"fm": "velocity loss, cfg_scale 1",
         "soflow": "fused 3-call step",
         "reference": "6 calls, fp32, math SDPA",
         "meanflow": "torch.func.jvp, math SDPA"}


def _note(name):
    base, gc = split_variant(name)
    return NOTES[base] + (", grad checkpointing" if gc else "")


def _table_order(results):
    """The variants in VARIANTS order, each followed by its checkpointed twin."""
    return [name for v in VARIANTS for name in (v, v + GC_SUFFIX) if name in results]


def format_table(results, args=None):
    """The printed table and the final `ratios:` line (medians of the same run; memory = step MiB)."""
    med = {v: statistics.median(r["times"]) for v, r in results.items()}
    mem = {v: step_bytes(r["memory"]) for v, r in results.items()}
    fm_t, fm_m = med["fm"], mem["fm"]
    name_width = max([10] + [len(v) for v in results])  # 12 with 'reference+gc'
    columns = [("variant", f"<{name_width}"), ("median ms", ">9"), ("min ms", ">8"), ("x fm", ">6"), ("sys ms", ">7"),
               ("faults k", ">8"), ("peak MiB", ">8"), ("step MiB", ">8"), ("x fm", ">6"), ("calls", ">5"),
               ("rows/B", ">6"), ("grad", ">4"), ("jvp", ">4"), ("notes", "")]
    lines = [" ".join(f"{name:{fmt}}" for name, fmt in columns)]
    lines.append("-" * (len(lines[0]) + 24))
    for v in _table_order(results):
        r, p = results[v], results[v]["passes"]
        cells = [v, f"{med[v] * 1e3:.1f}", f"{min(r['times']) * 1e3:.1f}", f"{med[v] / fm_t:.3f}",
                 f"{statistics.median(r.get('sys') or [0]) * 1e3:.0f}",
                 f"{statistics.median(r.get('faults') or [0]) / 1e3:.1f}",
                 f"{r['memory']['peak'] / 2**20:.1f}", f"{mem[v] / 2**20:.1f}",
                 f"{mem[v] / fm_m:.3f}" if fm_m > 0 else "nan", str(p["calls"]),
                 f"{p['grad'] + p['nograd'] + p['jvp']:.2f}", f"{p['grad']:.2f}", f"{p['jvp']:.2f}", _note(v)]
        lines.append(" ".join(f"{c:{fmt}}" for c, (_, fmt) in zip(cells, columns)))
    ratio = []
    if "soflow" in results:
        ratio.append(f"soflow/fm={med['soflow'] / fm_t:.3f}")
        if "reference" in results:
            ratio.append(f"soflow/reference={med['soflow'] / med['reference']:.3f}")
        ratio.append(f"soflow_mem/fm_mem={mem['soflow'] / fm_m:.3f}")
    if "meanflow" in results:
        ratio.append(f"meanflow/fm={med['meanflow'] / fm_t:.3f}")
    return "\n".join(lines), "ratios: " + " ".join(ratio)


def format_gc_ratios(results):
    """One `gc:` line per variant measured with and without checkpointing: the ratios (with / without) of the
    median step time, of the step memory (activations and temporaries) and of the process peak."""
    lines = []
    for v in VARIANTS:
        if v not in results or v + GC_SUFFIX not in results:
            continue
        off, on = results[v], results[v + GC_SUFFIX]
        time_ratio = statistics.median(on["times"]) / statistics.median(off["times"])
        step = {k: step_bytes(r["memory"]) for k, r in (("off", off), ("on", on))}
        step_ratio = step["on"] / step["off"] if step["off"] > 0 else float("nan")
        peak_ratio = on["memory"]["peak"] / off["memory"]["peak"]
        lines.append(f"gc: time {time_ratio:.2f}, step memory {step_ratio:.2f}, peak memory {peak_ratio:.2f} "
                     f"({v}{GC_SUFFIX} / {v})")
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="DiT-B-4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="autocast dtype of the forward passes (weights stay fp32); default float32, the "
                         "release's numerics; the reference variant always runs fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (the MeanFlow JVP "
                                                           "runs on the eager module)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, 4 with --compile)")
    ap.add_argument("--data-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every variant "
                                                              "(default: the CPUs this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adamw", choices=("fused", "default"), default="fused",
                    help="AdamW implementation (fused: one kernel; default: what torch picks, the release's)")
    ap.add_argument("--malloc", choices=("system", "retain"), default="system",
                    help="CPU allocator of the variant processes: glibc as configured, or glibc told to keep "
                         "freed memory (no page faults from trimming; what a caching allocator does)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--sequential", action="store_true",
                    help="run the variants one after another instead of stepping them in turn")
    ap.add_argument("--max-minutes", type=float, default=8.5,
                    help="wall-time budget: fewer warm-up (>= 1) and timed (>= 2) steps when the next round "
                         "would end past it")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="also run every named variant where it applies (fm, soflow, reference) with activation "
                         "checkpointing of the DiT blocks, as '<variant>+gc', and print the time and memory ratios")
    ap.add_argument("--config", help="time the model, data shape and objective of this training config instead "
                                     "of the latent DiT (--model-type and --data-size are then unused)")
    ap.add_argument("--worker", choices=WORKER_VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 4 if args.compile else 2
    if args.threads is None:
        args.threads = default_threads()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 4:
        ap.error("--steps >= 1, --warmup >= 0 and --batch-size >= 4 (so that every part of the SoFlow "
                 "batch is non-empty) are required")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return serve_variant(args)
    wall = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# step_cost: {args.model_type}, batch {args.batch_size}, latents {DATA_CHANNELS}x{args.data_size}x"
          f"{args.data_size}, {NUM_CLASSES} classes, cfg_drop_rate {CFG_DROP_RATE}; device {device}, "
          f"torch {torch.__version__}, {args.threads} threads, autocast {args.dtype}, "
          f"compile {args.compile}, AdamW {args.adamw}, malloc {args.malloc}, "
          f"grad checkpointing {args.grad_checkpointing}", flush=True)
    print(f"# {args.warmup} warm-up + {args.steps} timed steps per variant, one process per variant, "
          f"{'sequential' if args.sequential else 'stepped in turn'}; seed {args.seed}", flush=True)
    results = run_benchmark(args, log=lambda s: print(s, flush=True))
    first = next(iter(results.values()))
    method = first["memory"]["method"]
    print(f"# device: {first['device_name']}; model parameters {first['params']:,}; memory: {method}")
    print("# peak MiB: process peak (CUDA: max allocated; CPU: peak resident set). step MiB: peak minus the "
          "between-steps memory (weights, grads, AdamW moments, data) = activations and temporaries")
    print("# rows/B: network rows per step / batch size (forward passes of the whole batch); grad / jvp: "
          "of which with gradient / forward-mode JVP; the rest no-grad")
    print("# sys ms, faults k: median kernel CPU time and minor page faults (thousands) per step, the cost of "
          "the allocator handing memory back and touching it anew")
    table, ratios = format_table(results, args)
    print(table)
    counts = ", ".join(f"{v}={len(r['times'])}" for v, r in results.items())
    print(f"# timed steps per variant: {counts}; total wall time {time.perf_counter() - wall:.0f} s")
    if args.grad_checkpointing:
        if "meanflow" in args.variants:
            print("# meanflow: no '+gc' run (torch.func.jvp runs the blocks without checkpointing)")
        for line in format_gc_ratios(results):
            print(line)
    print(ratios)


if __name__ == "__main__":
    main()
