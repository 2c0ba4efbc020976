"""Numerical precision of the consistency loss: which `precision` setting is safe for SoFlow training.

    python benchmarks/precision.py [--out results/precision] [--device cpu|cuda] [--batch-size 8]
                                   [--skip-digits | --only-digits] [--num-samples 10000]

Part 1 (precision_delta.py): the relative error, against float64, of the consistency loss's
Delta = (f(x_t, t, s) - f(x_l, l, s)) / (t - l) for the ImageNet DiT-B-4 and the CIFAR U-Net recipes at the
first and the last gap t - l, in each mode: fp32, fp32 with TF32 (real on CUDA, emulated by
tf32_emulation.py elsewhere), bf16, bf16-guidance. Part 2 (precision_digits.py): the digits demo trained
under `precision: fp32`, `bf16` and `bf16-guidance`, scored at 1 NFE, with the cost of a training step in
each. `--skip-digits` / `--only-digits` run one part; the other part's results already in
`--out`/precision.json are kept.

Output: Markdown tables on stdout and in `--out`/precision.md, everything in `--out`/precision.json.
docs/precision.md holds the figures and what they mean for the `precision` setting.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import precision_delta  # noqa: E402
import precision_digits  # noqa: E402
from config import load_config  # noqa: E402
from inference import check_class_balanced  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "precision"), help="results folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (real TF32 rows on CUDA)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per Delta measurement")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs of part 1")
    p.add_argument("--recipes", default="imagenet,cifar", help="comma-separated: imagenet, cifar")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--skip-digits", action="store_true", help="part 1 only")
    part.add_argument("--only-digits", action="store_true", help="part 2 only")
    p.add_argument("--digits-config", default=precision_digits.DIGITS_CONFIG)
    p.add_argument("--digits-modes", default=",".join(precision_digits.DIGITS_MODES), help="comma-separated precisions")
    p.add_argument("--nproc", type=int, default=2, help="training ranks for the digits runs")
    p.add_argument("--num-samples", type=int, default=10000, help="1-NFE samples per digits model (a multiple of the classes, 10)")
    p.add_argument("--sample-batch-size", type=int, default=1000, help="digits samples per forward pass")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--control-seeds", default="",
                   help="comma-separated training seeds of extra fp32 digits runs (run-to-run spread), e.g. 43")
    p.add_argument("--step-cost-steps", type=int, default=40,
                   help="interleaved training steps per mode for the digits step cost (0: skip)")
    args = p.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.digits_modes = [m for m in args.digits_modes.split(",") if m]
    args.control_seeds = [int(v) for v in args.control_seeds.split(",") if v]
    unknown = [r for r in args.recipes if r not in precision_delta.RECIPES]
    unknown += [m for m in args.digits_modes if m not in precision_digits.DIGITS_MODES]
    if unknown:
        p.error(f"unknown recipe(s) / mode(s): {unknown}")
    if args.num_samples < 1:
        p.error("--num-samples must be >= 1")
    if not args.skip_digits:  # checked before part 1's minutes of work
        try:
            check_class_balanced(args.num_samples, load_config(args.digits_config).num_classes)
        except ValueError as error:
            p.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "precision.json"), os.path.join(args.out, "precision.md")
    result = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            result = json.load(f)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if not args.only_digits:
        result["delta"] = precision_delta.delta_part(args, log)
        _save(result, json_path, md_path)
    if not args.skip_digits:
        result["digits"] = precision_digits.digits_part(args, log)
        _save(result, json_path, md_path)
    print(_markdown(result))
    return result


def _markdown(result):
    parts = []
    if "delta" in result:
        parts.append(precision_delta.delta_markdown(result["delta"]))
    if "digits" in result:
        parts.append(precision_digits.digits_markdown(result["digits"]))
    return "\n\n".join(parts) + "\n"


def _save(result, json_path, md_path):
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    with open(md_path, "w") as f:
        f.write(_markdown(result))


if __name__ == "__main__":
    main()
