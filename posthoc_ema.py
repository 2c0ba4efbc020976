"""Choose the EMA after training: reconstruct, from a run's post-hoc EMA snapshots (train.py with
`posthoc_ema_sigma_rels`), the EMA of any relative width sigma_rel at any snapshot step, and sweep several.

    python posthoc_ema.py --config RUN/config.yaml --sigma-rel 0.07 [--step N]
    python posthoc_ema.py --config RUN/config.yaml --sweep 0.03 0.05 0.07 0.10 0.15 [--num-samples 2000]

Each reconstruction is written as a run folder OUT/sigma{S}_step{N}/ (default OUT: working_dir/posthoc_ema_out)
holding config.yaml (the run's config, working_dir set to that folder) and ckpts/{N}.pt, whose `ema_model` is the
reconstructed EMA: `inference.py --config OUT/sigma{S}_step{N}/config.yaml --ckpt-steps N` (this code's and the
release's), `inference.py --ckpt .../ckpts/N.pt` and `sample.py --ckpt .../ckpts/N.pt` read it unchanged. The
checkpoint also records how it was made (`posthoc_ema_reconstruction`: the snapshots, their weights, the profile
error).

A sigma_rel whose averaging profile the snapshots reconstruct only beyond `--max-error` (relative L2 error), or
a step without a usable snapshot, is refused with what can be reconstructed. A corrupt or missing snapshot is
named and left out. `--sweep` reconstructs every sigma_rel in one pass over the snapshots, scores each (and the
run's own `ema_model` of that step when ckpts/{N}.pt exists) with the in-training FID pipeline when the config
has `fid_ref_batch` (or `--fid-ref-batch`), else, for Digits / MNIST, with the class agreement and Frechet
distance of benchmarks/digits_quality.py, prints a table and writes OUT/sweep.md, OUT/sweep.json and the plot
OUT/sweep.png of the score against sigma_rel. The maths: power_ema.py and docs/posthoc_ema.md.
"""
import argparse
import json
import os
import re
import sys

import torch

from checkpoints import check_weights_fit, load_checkpoint, save_checkpoint
from config import ConfigError, load_config, save_config
from power_ema import (DEFAULT_MAX_ERROR, SNAPSHOT_DIR, SnapshotError, plan_reconstruction, reconstruct,
                       scan_snapshots)
from safe_io import OutputError, atomic_write, check_writable

ROOT = os.path.dirname(os.path.abspath(__file__))
DIGITS_DATASETS = ("Digits", "MNIST")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's config (working_dir/config.yaml)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma-rel", type=float, nargs="+", help="reconstruct the EMA of these relative widths")
    what.add_argument("--sweep", type=float, nargs="+", metavar="SIGMA_REL",
                      help="reconstruct these sigma_rels, score each, print a table and plot the score")
    p.add_argument("--step", type=int, default=None, help="the training step (default: the newest snapshot's)")
    p.add_argument("--out", default=None, help="output folder (default: working_dir/posthoc_ema_out)")
    p.add_argument("--max-error", type=float, default=DEFAULT_MAX_ERROR,
                   help="largest relative L2 error of a reconstructed averaging profile (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=2000, help="--sweep: samples per model (default %(default)s)")
    p.add_argument("--nfe", type=int, default=1, help="--sweep: network calls per sample (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="--sweep: sampling seed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=500, help="--sweep: samples per forward pass")
    p.add_argument("--fid-ref-batch", default=None, help="--sweep: ADM reference batch (default: the config's)")
    p.add_argument("--device", default=None, help="--sweep: cpu, cuda, ... (default: cuda when available)")
    return p.parse_args(argv)


def run_folder(out, sigma_rel, step):
    return os.path.join(out, f"sigma{sigma_rel:.3f}_step{step}")


def write_reconstruction(cfg, plan, weights, out, log=print):
    """OUT/sigma{S}_step{N}/ckpts/{N}.pt (`ema_model`: the reconstruction, checked against the config's model) and
    its config.yaml; returns the checkpoint's path."""
    folder = run_folder(out, plan.sigma_rel, plan.step)
    model = cfg.build_model()
    check_weights_fit(model, weights, cfg.model_type, f"the snapshots of {cfg.working_dir}")
    model.load_state_dict(weights, strict=True)
    path = os.path.join(folder, "ckpts", f"{plan.step}.pt")
    save_checkpoint({"ema_model": weights, "finished_steps": plan.step,
                     "posthoc_ema_reconstruction": plan.summary()}, path)
    cfg.working_dir = folder
    save_config(cfg, os.path.join(folder, "config.yaml"))
    log(f"sigma_rel {plan.sigma_rel:g} at step {plan.step}: {len(plan.weights)} snapshot EMAs, weights summing to "
        f"{sum(plan.weights):.6f}, profile error {plan.error:.2e} -> {path}")
    return path


def plan_all(cfg, sigma_rels, step, max_error, log=print):
    """(snapshots, plans): every sigma_rel planned before any weight is read; SystemExit naming what can be
    reconstructed when one cannot."""
    folder = os.path.join(cfg.working_dir, SNAPSHOT_DIR)
    try:
        snapshots, _ = scan_snapshots(folder, warn=log)
        return snapshots, [plan_reconstruction(snapshots, s, step, max_error) for s in sigma_rels]
    except SnapshotError as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Sweep: scoring


class DigitsScore:
    """benchmarks/digits_quality.py's class agreement and Frechet distance (64 pixels), class-balanced samples."""

    name, metric, lower_is_better = "Frechet distance (64 px, digits)", "frechet", True

    def __init__(self, cfg, args, device):
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import digits_quality
        self.quality, self.args, self.device = digits_quality, args, device
        self.reference = digits_quality.RealReference(cfg.data_size, cfg.data_channels)

    def __call__(self, model, name):
        from inference import generate
        a = self.args
        images, labels = self.quality.batched_samples(
            lambda idx: generate(model, idx, a.nfe, a.seed, self.device, class_balanced=True), a.num_samples,
            a.batch_size)
        return self.reference.score(images, labels)


class FIDScore:
    """The in-training FID pipeline (training_fid.TrainingFID: the evaluator's PyTorch Inception backend), its
    line appended to OUT/eval_results.txt."""

    name, metric, lower_is_better = "FID (in-training pipeline)", "fid", True

    def __init__(self, cfg, args, device, out):
        from training_fid import TrainingFID
        self.cfg, self.args, self.device, self.out = cfg, args, device, out
        self.fid = TrainingFID(cfg, device, 0, out)
        self.decode = None
        if cfg.dataset_type == "Imagenet":
            from inference import build_decoder
            self.decode = build_decoder(cfg.vae, cfg.latent_scale, device)

    def __call__(self, model, name):
        from inference import dump_samples
        a = self.args
        self.fid.start()
        dump_samples(model, os.path.join(self.out, f"{name}.npz"), a.num_samples, a.nfe, a.seed, a.batch_size,
                     self.device, decode=self.decode, precision=self.cfg.precision, on_batch=self.fid.add,
                     write=False)
        line = self.fid.finish(f"{name}.npz", 1)
        return {k.lower(): float(v) for k, v in re.findall(r"(\w+): (-?[\d.]+)", line.split(" # ", 1)[1])}


def make_scorer(cfg, args, device, out):
    """The sweep's scorer, chosen (and its reference prepared) before anything is reconstructed."""
    if args.fid_ref_batch:
        cfg.fid_ref_batch = args.fid_ref_batch
    if cfg.fid_ref_batch:
        return FIDScore(cfg, args, device, out)
    if cfg.dataset_type in DIGITS_DATASETS:
        return DigitsScore(cfg, args, device)
    raise SystemExit(f"error: --sweep scores with the in-training FID pipeline (give --fid-ref-batch or the "
                     f"config's fid_ref_batch) or, for {'/'.join(DIGITS_DATASETS)}, with the CPU demo's metrics; "
                     f"this run's dataset_type is {cfg.dataset_type} and no reference batch is given")


def load_model(cfg, weights, device):
    model = cfg.build_model()
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()


def release_ema_row(cfg, step, scorer, device, log):
    """The score of the run's own ema_model at `step` (ckpts/{step}.pt), or None when that checkpoint is absent."""
    path = os.path.join(cfg.working_dir, "ckpts", f"{step}.pt")
    if not os.path.isfile(path):
        log(f"no {path}: the sweep has no row for the run's own EMA")
        return None
    score = scorer(load_model(cfg, load_checkpoint(path)["ema_model"], device), f"ema_model_step{step}")
    return {"model": f"ema_model (ema_decay_rate {cfg.ema_decay_rate})", "sigma_rel": None, **score}


# ----------------------------------------------------------------------------------------------------
# Sweep: table and plot


def sweep_table(rows, scorer):
    keys = [k for k in rows[0] if k not in ("model", "sigma_rel", "n")]
    lines = ["| model | sigma_rel | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for row in rows:
        sigma = "" if row["sigma_rel"] is None else f"{row['sigma_rel']:g}"
        lines.append(f"| {row['model']} | {sigma} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def sweep_plot(rows, scorer, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = [(r["sigma_rel"], r[scorer.metric]) for r in rows if r["sigma_rel"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(*zip(*points), "o-", label="post-hoc reconstruction")
    for row in rows:
        if row["sigma_rel"] is None:
            ax.axhline(row[scorer.metric], color="tab:red", ls="--", label=row["model"])
    ax.set_xlabel("sigma_rel")
    ax.set_ylabel(scorer.name + (" (lower: better)" if scorer.lower_is_better else ""), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write, "sweep result")


def run_sweep(cfg, args, plans, snapshots, out, log):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorer = make_scorer(cfg, args, device, out)  # its reference first: a missing one fails before the work
    run_cfg = load_config(args.config)
    weights = reconstruct(snapshots, plans)
    rows = []
    for plan, w in zip(plans, weights):
        write_reconstruction(load_config(args.config), plan, w, out, log)
        score = scorer(load_model(run_cfg, w, device), f"sigma{plan.sigma_rel:.3f}_step{plan.step}")
        rows.append({"model": "post-hoc EMA", "sigma_rel": plan.sigma_rel, **score})
        log(f"sigma_rel {plan.sigma_rel:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in score.items() if k != "n"))
    own = release_ema_row(run_cfg, plans[0].step, scorer, device, log)
    rows += [own] if own else []
    table = sweep_table(rows, scorer)
    print(table)
    title = (f"{os.path.basename(os.path.abspath(cfg.working_dir))}, step {plans[0].step}, {args.num_samples} "
             f"samples, {args.nfe} NFE, seed {args.seed}")
    write_text(os.path.join(out, "sweep.md"), f"{title}\n\n{table}\n")
    write_text(os.path.join(out, "sweep.json"),
               json.dumps({"title": title, "rows": rows, "plans": [p.summary() for p in plans]}, indent=1))
    sweep_plot(rows, scorer, os.path.join(out, "sweep.png"), title)
    log(f"wrote {os.path.join(out, 'sweep.md')}, sweep.json and sweep.png")
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    if args.num_samples < 1 or args.nfe < 1 or args.batch_size < 1 or args.max_error <= 0:
        raise SystemExit("--num-samples, --nfe and --batch-size must be >= 1 and --max-error > 0")
    out = args.out or os.path.join(cfg.working_dir, "posthoc_ema_out")
    try:
        check_writable(out, "output folder")
        sigma_rels = args.sweep or args.sigma_rel
        snapshots, plans = plan_all(cfg, sigma_rels, args.step, args.max_error)
        if args.sweep:
            return run_sweep(cfg, args, plans, snapshots, out, print)
        for plan, weights in zip(plans, reconstruct(snapshots, plans)):
            write_reconstruction(load_config(args.config), plan, weights, out)
    except (OutputError, SnapshotError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
