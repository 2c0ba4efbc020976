"""Part 2 of benchmarks/precision.py: the digits demo trained under each `precision`, and its 1-NFE quality.

configs/digits_demo.yaml is trained with `precision: fp32`, `bf16` and `bf16-guidance` (variants written with
`config.write_variant` into `--out`/digits/MODE, trained by digits_quality's `run_training` on `--nproc`
ranks; a run that has its final checkpoint is reused). Each EMA checkpoint is scored at 1 NFE with
digits_quality's class agreement and Frechet distance on `--num-samples` class-balanced samples, sampled in
float32 (the bf16 run also in bf16, as its own grids and dumps are). Reported per mode: the training wall
time (noisy on a shared machine) and the median time of one training step with the modes stepped in turn in
one process (`digits_step_cost`, robust to load changes). `--control-seeds 43,...` adds fp32 runs with other
training seeds: the run-to-run spread that the modes' differences are to be compared with.
"""
import json
import os
import statistics
import time

import torch

import digits_quality as dq
from bench_util import ROOT, Timer, interleaved_rounds, log_windows, markdown_table, num_threads
from checkpoints import list_checkpoints
from config import load_config, write_variant
from data import load_digits
from distributed import guidance_dtype, precision_context
from inference import generate, load_sampling_model
from train import build_optimizer

DIGITS_CONFIG = os.path.join(ROOT, "configs", "digits_demo.yaml")
DIGITS_MODES = ("fp32", "bf16", "bf16-guidance")


def _digits_stepper(cfg, mode, images, labels, batches, objective, seed):
    """A fresh digits model and optimizer, and the function that times training step `step` of `mode` on it."""
    torch.manual_seed(seed)
    model = cfg.build_model().train()
    optimizer = build_optimizer(cfg, model)
    device = torch.device("cpu")

    def step(index):
        idx = batches[index]
        with Timer() as timer:
            with precision_context(device, mode):
                loss, _ = model(images[idx], labels[idx], objective=objective, finished_steps=index,
                                guidance_dtype=guidance_dtype(mode))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return timer.seconds
    return step


def digits_step_cost(cfg, modes, steps=40, warmup=3, threads=1, seed=0):
    """Median seconds of one training step (loss + backward + optimizer step) per precision, on the digits
    model at the per-rank batch of a 2-rank run, the modes stepped in turn (one step each, round robin) so
    that a change of machine load hits every mode alike. Single process, `threads` threads (torchrun's ranks
    run with OMP_NUM_THREADS=1)."""
    with num_threads(threads):
        images, labels = load_digits(cfg.data_size, cfg.data_channels)
        batch = cfg.batch_size // 2
        g = torch.Generator().manual_seed(seed)
        batches = [torch.randint(0, len(images), (batch,), generator=g) for _ in range(warmup + steps)]
        objective = cfg.objective()
        steppers = [_digits_stepper(cfg, mode, images, labels, batches, objective, seed) for mode in modes]
        times = interleaved_rounds(steppers, warmup, steps)
    return {mode: dict(median_s=statistics.median(t), steps=steps, batch=batch, threads=threads)
            for mode, t in zip(modes, times)}


def _trained_run(cfg, config_path, nproc, name, log):
    """(final checkpoint, training seconds, how they were timed) of the digits run of `cfg`: trained now on
    `nproc` ranks, or reused when its final checkpoint exists."""
    timing_file = os.path.join(cfg.working_dir, "training_seconds.json")
    found = list_checkpoints(os.path.join(cfg.working_dir, "ckpts"))
    if found and found[-1][0] == cfg.total_steps:
        log(f"digits {name}: reusing {found[-1][1]}")
        if os.path.isfile(timing_file):
            with open(timing_file) as f:
                return found[-1][1], json.load(f)["seconds"], "wall (earlier run)"
        # a lower bound: start-up, checkpoints and grids are outside the logged windows
        seconds = sum(w["seconds"] for w in log_windows(os.path.join(cfg.working_dir, "log.txt")))
        return found[-1][1], seconds, "sum of logged windows"
    log(f"digits {name}: training {config_path}")
    ckpt, seconds = dq.run_training(config_path, nproc, log)
    with open(timing_file, "w") as f:
        json.dump(dict(seconds=seconds, nproc=nproc), f)
    return ckpt, seconds, "wall"


def digits_part(args, log):
    runs = os.path.join(os.path.abspath(args.out), "digits")
    base = load_config(args.digits_config)
    real = dq.RealReference(base.data_size, base.data_channels)
    result = dict(config=os.path.relpath(os.path.abspath(args.digits_config), ROOT), num_samples=args.num_samples,
                  seed=args.sample_seed, nproc=args.nproc, real_floor=real.floor, rows=[])
    if args.step_cost_steps > 0:
        result["step_cost"] = digits_step_cost(base, args.digits_modes, steps=args.step_cost_steps)
        log("digits step cost (interleaved, 1 thread): " + ", ".join(
            f"{m} {v['median_s'] * 1e3:.1f} ms" for m, v in result["step_cost"].items()))
    plan = [(mode, mode, {}) for mode in args.digits_modes]
    # control runs: fp32 with other training seeds, the run-to-run spread the modes' differences compare with
    plan += [("fp32", f"fp32-seed{seed}", dict(seed=seed)) for seed in args.control_seeds]
    for mode, name, changes in plan:
        path = write_variant(args.digits_config, os.path.join(runs, f"{name}.yaml"),
                             working_dir=os.path.join(runs, name), precision=mode, **changes)
        cfg = load_config(path)
        ckpt, seconds, timing = _trained_run(cfg, path, args.nproc, name, log)
        model = load_sampling_model(cfg, ckpt)
        windows = log_windows(os.path.join(cfg.working_dir, "log.txt"))
        logged = windows[-1]["values"] if windows else {}
        sample_precisions = ["fp32"] + (["bf16"] if mode == "bf16" else [])
        for sp in sample_precisions:
            start = time.time()
            images, labels = dq.batched_samples(
                lambda idx: generate(model, idx, 1, args.sample_seed, torch.device("cpu"), class_balanced=True,
                                     precision=sp), args.num_samples, args.sample_batch_size)
            score = real.score(images, labels)
            result["rows"].append(dict(mode=name, precision=mode, training_seed=cfg.seed, sampled_in=sp,
                                       training_seconds=seconds, timing=timing,
                                       checkpoint=ckpt, final_window=logged, sampling_seconds=time.time() - start,
                                       **score))
            log(f"digits {name} (sampled {sp}): agreement {score['agreement']:.4f}, FD {score['frechet']:.4f}, "
                f"training {seconds:.0f}s ({timing})")
    return result


# ----------------------------------------------------------------------------------------------------
# Report


def digits_markdown(digits):
    rows = digits["rows"]
    fp32 = next((r["frechet"] for r in rows if r["mode"] == "fp32" and r["sampled_in"] == "fp32"), None)
    floor = digits["real_floor"]
    lines = [f"Digits demo ({digits['config']}), 1-NFE EMA samples, N = {digits['num_samples']} class-balanced, "
             f"training on {digits['nproc']} CPU ranks (shared machine: timings are noisy).", ""]
    table = [("real digits (half B vs A)", "-", f"{floor['agreement']:.3f}", f"{floor['frechet']:.4f}", "", "", "", "")]
    cost = digits.get("step_cost", {})
    for r in rows:
        ratio = f"{r['frechet'] / fp32:.2f}" if fp32 else ""
        con = r["final_window"].get("Con_MSE")
        step = f"{cost[r['mode']]['median_s'] * 1e3:.1f}" if r["mode"] in cost else ""  # not for control runs
        wall = f"{r['training_seconds']:.0f}{'' if r['timing'].startswith('wall') else '*'}"
        table.append((r["mode"], r["sampled_in"], f"{r['agreement']:.4f}", f"{r['frechet']:.4f}", ratio, wall, step,
                      "" if con is None else f"{con:.4f}"))
    lines.append(markdown_table(("run (training precision)", "sampled in", "1-NFE class agreement",
                                 "Frechet distance", "FD / fp32 FD", "training wall time (s)",
                                 "step, interleaved (ms)", "final-window Con_MSE"), table, "llrrrrrr"))
    if cost:
        c = next(iter(cost.values()))
        lines.append(f"\nStep, interleaved: median of {c['steps']} training steps (loss, backward, AdamW) per mode, "
                     f"batch {c['batch']} (one rank's share), {c['threads']} thread, the modes stepped in turn in "
                     f"one process so that load changes hit them alike.")
    if any(not r["timing"].startswith("wall") for r in rows):
        lines.append("\n*: sum of the logged step windows (no wall time recorded for a reused run).")
    return "\n".join(lines)

