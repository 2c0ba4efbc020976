"""One command that runs the CUDA tests and measures the GPU figures, into one Markdown report.

    python benchmarks/gpu_report.py [--out results/gpu_report.md] [--minutes 8]
    python benchmarks/gpu_report.py --smoke      # every part at toy size on the CPU (< 1 minute; tests run it)

Parts, each timed and reported on its own; a failing part is reported with its traceback and the next one runs:
  environment   GPU, driver, CUDA / cuDNN / torch / Python versions
  tests         the suite's CUDA cases (`-k "cuda and not cpu"`), pass / fail / skip counts and failures
  step cost     benchmarks/step_cost.py (one process per variant): DiT-B-4 and DiT-XL-2 at the release's per-GPU
                batch (32), flow matching / SoFlow's fused step / the release-style 6-call step / MeanFlow's JVP
                step, in the release's numerics (fp32 + TF32) and bf16 autocast; DiT-XL-2 with activation
                checkpointing (memory)
  unet step     train.train_step of the CIFAR recipe's U-Net at batch 128: fp32 + TF32 (the release's), bf16,
                channels_last, fused optimizer; images/s and peak memory
  precision     benchmarks/precision.py's Delta part on CUDA (real TF32 against float64)
  dump          1-NFE sampling throughput of DiT-XL-2 (random weights) decoded by a randomly initialised
                SD-VAE-sized AutoencoderKL (loaded through inference.build_decoder)
  evaluator     feature throughput of the evaluator's torch backend (synthetic Inception-shaped graph), and of
                TensorFlow's where it imports with a GPU
The wall-time budget (--minutes) is shared out over the parts; step_cost's own budget keeps its parts inside.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from bench_util import MemoryMeter, Timer, markdown_table  # noqa: E402

# Share of the --minutes budget per part (the rest is start-up and slack).
BUDGET = {"tests": 0.35, "step cost": 0.3, "unet step": 0.08, "precision": 0.1, "dump": 0.06, "evaluator": 0.06}


# ----------------------------------------------------------------------------------------------------
# Parts: each takes the run's settings and returns Markdown


def part_environment(run):
    rows = [("torch", torch.__version__), ("CUDA (torch build)", torch.version.cuda),
            ("cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
            ("Python", platform.python_version()), ("device", run.device)]
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        rows += [("GPU", f"{props.name}, sm{props.major}{props.minor}, {props.total_memory / 2 ** 30:.0f} GiB"),
                 ("bf16 supported", torch.cuda.is_bf16_supported())]
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        rows.append(("driver", smi.stdout.strip() or smi.stderr.strip()))
    return markdown_table(("", "value"), rows)


def part_tests(run):
    """The suite's CUDA cases (skipped with a reason on a machine without CUDA)."""
    selection = (["tests/test_unet.py", "-k", "time_embedding"] if run.smoke else ["tests", "-k", "cuda and not cpu"])
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *selection]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=run.seconds("tests"))
        status, output = f"exit {proc.returncode}", proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:  # report what ran
        status, output = f"stopped after {e.timeout:.0f} s", (e.stdout or b"").decode() + (e.stderr or b"").decode()
    return f"`{' '.join(cmd[1:])}` {status}\n\n```\n{output[-6000:].strip()}\n```"


def step_cost_smoke():
    """Each of step_cost's variants, one step in this process, on a tiny DiT (the subprocess driver of the full
    run starts one process per variant, minutes on a loaded CPU)."""
    import step_variants
    model = step_variants.build_model("DiT-B-4", data_size=8, dit_sizes=dict(hidden_size=32, depth=1, num_heads=2))
    optimizer = step_variants.make_optimizer(model, "default")
    x, labels = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))
    rows = [(variant, f"{step_variants.train_step(model, optimizer, variant, x, labels, 0).item():.4f}")
            for variant in step_variants.VARIANTS]
    return "tiny DiT, one step per variant\n\n" + markdown_table(("variant", "loss"), rows)


def part_step_cost(run):
    import step_cost
    if run.smoke:
        return step_cost_smoke()
    cases = [("DiT-B-4", "float32", False), ("DiT-B-4", "bfloat16", False), ("DiT-XL-2", "float32", True),
             ("DiT-XL-2", "bfloat16", False)]
    minutes = run.seconds("step cost") / 60 / len(cases)
    out = []
    for model_type, dtype, checkpointing in cases:
        argv = ["--model-type", model_type, "--dtype", dtype, "--batch-size", "32", "--steps", "5", "--warmup", "2",
                "--max-minutes", f"{minutes:.2f}", "--variants", "soflow", "reference", "meanflow"]
        argv += ["--grad-checkpointing"] if checkpointing else []
        args = step_cost.parse_args(argv)
        results = step_cost.run_benchmark(args, log=lambda s: None)
        table, ratios = step_cost.format_table(results, args)
        gc = "\n".join(step_cost.format_gc_ratios(results)) if checkpointing else ""
        out.append(f"**{model_type}, {dtype}** (`python benchmarks/step_cost.py {' '.join(argv)}`)"
                   f"\n\n```\n{table}\n{gc}\n{ratios}\n```")
    return "\n\n".join(out)


def _unet_config(run, **changes):
    from config import from_dict, load_config
    cfg = load_config(os.path.join(ROOT, "configs", "cifar.yaml"))
    values = cfg.to_dict()
    if run.smoke:
        values.update(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])
    return from_dict({**values, **changes})


def unet_step_figures(run, cfg, batch_size, steps):
    """(images/s, peak GiB) of train.train_step on the U-Net of `cfg` (its precision, channels_last, optimizer)."""
    import train
    from distributed import configure_backends
    configure_backends(run.device, cfg.tf32)
    torch.manual_seed(0)
    model = cfg.build_model().to(run.device)
    if cfg.uses_channels_last(run.device):
        model.to(memory_format=torch.channels_last)
    optimizer = train.build_optimizer(cfg, model)
    x = torch.randn(batch_size, 3, 32, 32, device=run.device)
    if cfg.uses_channels_last(run.device):
        x = x.contiguous(memory_format=torch.channels_last)
    batch = (x, None, torch.zeros(batch_size, 6, device=run.device))
    objective = cfg.objective()
    train.train_step(model, model, optimizer, batch, objective, 0, cfg, run.device)  # warm-up
    meter = MemoryMeter(run.device)
    meter.start()
    with Timer(run.device) as timer:
        for step in range(steps):
            train.train_step(model, model, optimizer, batch, objective, step + 1, cfg, run.device)
    return batch_size * steps / timer.seconds, meter.peak() / 2 ** 30


def part_unet_step(run):
    batch, steps = (4, 1) if run.smoke else (128, 5)
    settings = [dict(), dict(precision="bf16"), dict(channels_last=True), dict(fused_optimizer=True),
                dict(precision="bf16", channels_last=True, fused_optimizer=True)]
    rows = []
    for changes in settings[:1] if run.smoke else settings:
        speed, peak = unet_step_figures(run, _unet_config(run, **changes), batch, steps)
        rows.append((", ".join(f"{k}={v}" for k, v in changes.items()) or "release (fp32 + TF32)",
                     f"{speed:.1f}", f"{peak:.2f}"))
    return f"batch {batch}, {steps} timed steps\n\n" + markdown_table(("setting", "images/s", "peak GiB"), rows)


def part_precision(run):
    import precision
    import precision_delta
    if run.smoke:
        return f"self-check (tiny DiT, every mode): max rel. diff {precision_delta.self_check():.2e}"
    args = precision.parse_args(["--device", "cuda", "--skip-digits", "--batch-size", "8"])
    return precision_delta.delta_markdown(precision_delta.delta_part(args, log=lambda s: None))


def _random_sd_vae(folder, smoke):
    """A randomly initialised AutoencoderKL with the SD-VAE's shape (or a toy one), saved for build_decoder."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    widths = (8, 16) if smoke else (128, 256, 512, 512)
    vae = AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                        up_block_types=("UpDecoderBlock2D",) * len(widths), latent_channels=4,
                        norm_num_groups=4 if smoke else 32, layers_per_block=1 if smoke else 2)
    vae.save_pretrained(folder)
    return folder


def part_dump(run):
    from config import from_dict
    from inference import build_decoder, sample_images
    sizes = dict(hidden_size=32, depth=1, num_heads=2, data_size=8) if run.smoke else {}
    cfg = from_dict({"dataset_type": "Imagenet", "model_type": "DiT-XL-2", **sizes})
    torch.manual_seed(0)
    model = cfg.build_model().to(run.device).eval()
    n, batches = (4, 1) if run.smoke else (125, 3)  # the release's eval_batch_size
    with tempfile.TemporaryDirectory() as tmp:
        decode = build_decoder(_random_sd_vae(tmp, run.smoke), cfg.latent_scale, run.device)
        shape = (1, n, 4, cfg.data_size, cfg.data_size)
        labels = torch.arange(n) % cfg.num_classes
        rows = []
        for precision in ("fp32",) if run.smoke else ("fp32", "bf16"):
            sample_images(model, torch.randn(shape), labels, run.device, decode, precision)  # warm-up
            with Timer(run.device) as timer:
                for _ in range(batches):
                    sample_images(model, torch.randn(shape), labels, run.device, decode, precision)
            rows.append((precision, f"{n * batches / timer.seconds:.1f}"))
    return (f"{cfg.model_type} (random weights), 1 NFE, batches of {n}, decoded by a random SD-VAE-sized "
            f"AutoencoderKL\n\n" + markdown_table(("precision", "images/s"), rows))


def part_evaluator(run):
    import numpy as np

    import evaluator
    import evaluator_speed
    n, size, batch = (4, 32, 4) if run.smoke else (512, 256, 128)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if run.smoke:  # the tests' small Inception-like graph
            from inception_graphs import write_inception_like
            graph = str(write_inception_like(os.path.join(tmp, "small.pb"), writer="plain"))
        else:
            graph = str(evaluator_speed.synthetic_graph(os.path.join(tmp, "inception_like.pb")))
        tf_gpu = (not run.smoke and evaluator.tensorflow_available()
                  and evaluator._import_tensorflow().config.list_physical_devices("GPU"))
        backends = ["torch", "tf"] if tf_gpu else ["torch"]
        timed = evaluator_speed.time_backends(backends, graph, images, batch, str(run.device), 1 if run.smoke else 2)
        for backend in backends:
            device = run.device if backend == "torch" else "GPU"
            rows.append((backend, device, f"{statistics.median(timed[backend][0]):.1f}"))
        if not tf_gpu and not run.smoke:
            rows.append(("tf", "-", "no GPU build of TensorFlow importable"))
    return f"{n} images {size}x{size}, batch {batch}\n\n" + markdown_table(("backend", "device", "images/s"), rows)


PARTS = [("environment", part_environment), ("tests", part_tests), ("step cost", part_step_cost),
         ("unet step", part_unet_step), ("precision", part_precision), ("dump", part_dump),
         ("evaluator", part_evaluator)]


# ----------------------------------------------------------------------------------------------------
# Driver


class Run:
    def __init__(self, args):
        self.smoke, self.minutes = args.smoke, args.minutes
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")

    def seconds(self, part):
        return max(30.0, BUDGET.get(part, 0.05) * self.minutes * 60)


def run_parts(run, parts, write):
    """Runs each part, writing the report after each; returns the names of the parts that failed."""
    sections, failed = [], []
    for name, part in parts:
        start = time.perf_counter()
        try:
            body = part(run)
            status = "ok"
        except Exception:  # noqa: BLE001 (a failing part is reported, and the next one runs)
            body, status = f"```\n{traceback.format_exc()}```", "FAILED"
            failed.append(name)
        sections.append(f"## {name} ({status}, {time.perf_counter() - start:.0f} s)\n\n{body}")
        write(sections, failed)
    return failed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_report.md"))
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget shared out over the parts")
    p.add_argument("--smoke", action="store_true", help="every part at toy size on the CPU")
    p.add_argument("--parts", nargs="+", choices=[name for name, _ in PARTS], default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = Run(args)
    parts = [(n, f) for n, f in PARTS if args.parts is None or n in args.parts]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    title = (f"# GPU report{' (smoke: toy sizes on the CPU)' if run.smoke else ''}\n\n"
             f"`python benchmarks/gpu_report.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")

    def write(sections, failed):
        summary = f"Failed parts: {', '.join(failed)}" if failed else "No part failed."
        with open(args.out, "w") as f:
            f.write("\n\n".join([title, summary, *sections]) + "\n")
    failed = run_parts(run, parts, write)
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
