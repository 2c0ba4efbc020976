"""What post-hoc EMA tracking (power_ema.py, `posthoc_ema_sigma_rels`) costs: disk per snapshot and memory per
model size, and the time of its update against the release's EMA update and a training step.

    python benchmarks/posthoc_ema_cost.py [--config configs/digits_demo.yaml] [--repeats 30]

Sizes: each DiT size of dit.DIT_SIZES as the ImageNet recipe builds it (32 x 32 x 4 latents, 1,000 classes) and
the CIFAR U-Net, built on the meta device (no memory): a snapshot holds two EMAs, 4 bytes a value (2 with
`posthoc_ema_float16`); the trackers hold two more float32 copies of the weights on the training device, and
every checkpoint carries them too. Time: the median over `--repeats` of one tracker update (two EMAs), one
release EMA update (train.EMA) and one training step (train.train_step) of `--config`'s model and batch on
random data, in this process, on the CPU.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from bench_util import markdown_table  # noqa: E402
from config import load_config  # noqa: E402
from dit import DIT_SIZES  # noqa: E402
from models import Soflow  # noqa: E402

SIGMA_RELS = (0.05, 0.10)


def parameter_count(model_type):
    """Values in the state dict of the release's model of `model_type`, built on the meta device."""
    with torch.device("meta"):
        if model_type == "UNet":
            model = Soflow(3, 32, None, 0.0, "Linear", "Euler", "UNet")
        else:
            model = Soflow(4, 32, 1000, 0.1, "Linear", "Euler", model_type)
    return sum(t.numel() for t in model.state_dict().values())


def size_rows():
    rows = []
    for model_type in (*DIT_SIZES, "UNet"):
        n = parameter_count(model_type)
        rows.append([model_type, f"{n / 1e6:.1f}M", f"{2 * 4 * n / 2 ** 20:,.0f}", f"{2 * 2 * n / 2 ** 20:,.0f}",
                     f"{2 * 4 * n / 2 ** 20:,.0f}"])
    return rows


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def timing_rows(cfg, repeats):
    import train
    from power_ema import PowerEMATracker
    torch.manual_seed(0)
    model = cfg.build_model()
    ema = train.EMA(model, cfg.ema_decay_rate, 1)
    tracker = PowerEMATracker(model, list(SIGMA_RELS), 10 ** 9, copy_of=ema.model)
    optimizer = train.build_optimizer(cfg, model)
    objective = cfg.objective()
    x = torch.randn(cfg.batch_size, cfg.data_channels, cfg.data_size, cfg.data_size)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,)) if cfg.conditional else None
    cpu = torch.device("cpu")
    step = median_ms(lambda: train.train_step(model, model, optimizer, (x, labels, None), objective, 100, cfg, cpu),
                     repeats)
    counter = iter(range(1, 10 ** 9))
    update = median_ms(lambda: tracker.update(model, next(counter)), repeats)
    release = median_ms(lambda: ema.update(model, 0), repeats)
    return [["training step", f"{step:.2f}", "1.00"], ["release EMA update", f"{release:.3f}", f"{release / step:.3f}"],
            [f"post-hoc EMA update ({len(SIGMA_RELS)} EMAs)", f"{update:.3f}", f"{update / step:.3f}"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits_demo.yaml"))
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    print(markdown_table(["model", "values", "snapshot MiB (float32)", "snapshot MiB (float16)",
                          "extra memory and checkpoint MiB"], size_rows(), "lrrrr"))
    cfg = load_config(args.config)
    print(f"\n{cfg.model_type} of {args.config} (batch {cfg.batch_size}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}:\n")
    print(markdown_table(["work", "ms", "/ step"], timing_rows(cfg, args.repeats), "lrr"))


if __name__ == "__main__":
    main()
