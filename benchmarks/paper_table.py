"""Does SoFlow beat MeanFlow? The paper's comparison as learning curves, each method with its authors' recipe.

    python benchmarks/paper_table.py                                  # the CPU study (docs/paper_table.md)
    python benchmarks/paper_table.py --report-only                    # tables and figures again from the CSV
    python benchmarks/paper_table.py --seeds 3 4 5 --classifier-seed 1 --out results/check   # a recheck
    python benchmarks/paper_table.py --preset mnist-cuda --device cuda --out results/gpu      # larger, untested

Runs. One network, data, batch, optimizer, EMA and set of training seeds (the preset's config), trained with
each method's own objective (RUNS; scaled only in steps: the l-schedule spans the run's total_steps):
  soflow-imagenet  the release's configs/imagenet.yaml objective (guided in training)
  soflow-cifar     the release's configs/cifar.yaml objective (unguided)
  meanflow-guided / meanflow-unguided   MeanFlow's ImageNet recipe, with (omega 3, kappa 0: its B/4 setting)
                   and without training-time guidance
  fm               flow matching (velocity_loss_ratio 1, unguided), the ceiling: Euler at 1, 2, 4, 50 steps
and the ablations of soflow-imagenet, each changing one key (ABLATIONS), against soflow-imagenet itself run
again at their steps and seeds (`--ablation-steps`, `--ablation-seeds`). Every run is one
train.py process (`--jobs` at a time, `--threads` threads each) that saves a checkpoint `--points` times; then
every checkpoint's EMA weights are scored at 1 and 2 NFE (SoFlow's re-noising sampler, MeanFlow's rule, Euler
for FM; soflow-imagenet also with `sampler="meanflow"`, the sampler ablation), from the same noise and labels
at every point (sample i: label i % 10, noise of `inference.sample_inputs` under `--sample-seed`).

Metrics. The real digits are split once (stratified, fixed seed) into halves A and B.
  class agreement: the share of samples that a classifier (scikit-learn's MLPClassifier, one hidden layer of
      128, seeded by `--classifier-seed`) trained on A's pixels assigns to their conditioning label; its
      accuracy on B is the real-data row.
  Frechet distance: Gaussian fits of the 64 pixel values (8 x 8 area means; digits_quality.pixel_features) of
      `--num-samples` samples against B; the real-data floor is A against B (the same sizes, so the same
      finite-sample bias).
  train_seconds: the summed `Time` of train.py's log windows up to the checkpoint (training only).
Every image goes through the uint8 conversion of the sample dumps before scoring.

Output: `--csv` (default docs/paper_table.csv), one row per scoring and the `real` rows; Markdown tables on
stdout and in --out/results.md; the learning-curve PNGs in `--figures`. A finished run (its scores.csv, made
with the same scoring settings) is reused, an interrupted one resumes from its newest checkpoint, so the same
command resumes a stopped study; `--finished-only` reports a stopped study's finished runs without training.
`--quick` runs the whole pipeline at toy size (the suite's test).
"""
import argparse
import concurrent.futures
import csv
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import digits_quality  # noqa: E402
from bench_util import log_windows  # noqa: E402
from models import to_uint8  # noqa: E402

SPLIT_SEED = 0
COLUMNS = ("method", "recipe", "variant", "guided", "seed", "step", "train_seconds", "nfe", "sampler", "fd",
           "agreement", "num_samples", "classifier_seed", "sample_seed")
SCORING_KEYS = ("num_samples", "classifier_seed", "sample_seed")  # a run's scores.csv is reused only if they match

# The objectives (config keys set on top of the preset's config).
SOFLOW_IMAGENET = dict(method="soflow", velocity_loss_ratio=0.75, p=1.0, eps=0.01, time_mean=[-0.2, -1.0, 0.2],
                       time_std=[1.0, 0.8, 0.8], l_schedule="Exponent", l_init_ratio=0.1, l_end_ratio=0.002,
                       cfg_scale=3.0, mix_ratio=0.25, cfg_drop_rate=0.1, cfg_decay_time=0.8)
SOFLOW_CIFAR = dict(method="soflow", velocity_loss_ratio=0.0, p=0.75, eps=0.001, time_mean=[-0.9, -4.0, -0.9],
                    time_std=[1.6, 1.6, 1.6], l_schedule="Exponent", l_init_ratio=1.0, l_end_ratio=0.0003125,
                    cfg_scale=1.0, mix_ratio=1.0, cfg_drop_rate=0.0, cfg_decay_time=1.0)
MEANFLOW = dict(method="meanflow", meanflow_ratio=0.25, meanflow_time_mean=-0.4, meanflow_time_std=1.0,
                meanflow_p=1.0, meanflow_eps=1e-3, cfg_scale=1.0, cfg_drop_rate=0.1)
FLOW_MATCHING = dict(SOFLOW_IMAGENET, velocity_loss_ratio=1.0, cfg_scale=1.0, cfg_drop_rate=0.0)


class Run:
    """One training recipe: its CSV labels, config changes, samplers {sampler: NFEs} and group."""

    def __init__(self, variant, method, recipe, guided, changes, samplers, group):
        self.variant, self.method, self.recipe, self.guided = variant, method, recipe, guided
        self.changes, self.samplers, self.group = changes, samplers, group


SOFLOW_SAMPLERS = {"soflow": (1, 2)}
RUNS = [
    Run("soflow-imagenet", "soflow", "imagenet", True, SOFLOW_IMAGENET, {"soflow": (1, 2), "meanflow": (2,)},
        "headline"),
    Run("soflow-cifar", "soflow", "cifar", False, SOFLOW_CIFAR, SOFLOW_SAMPLERS, "headline"),
    Run("meanflow-guided", "meanflow", "meanflow-b4", True,
        dict(MEANFLOW, meanflow_cfg_scale=3.0, meanflow_cfg_kappa=0.0), {"meanflow": (1, 2)}, "headline"),
    Run("meanflow-unguided", "meanflow", "meanflow-b4", False,
        dict(MEANFLOW, meanflow_cfg_scale=1.0, meanflow_cfg_kappa=0.0), {"meanflow": (1, 2)}, "headline"),
    Run("fm", "fm", "fm", False, FLOW_MATCHING, {"euler": (1, 2, 4, 50)}, "headline"),
]
ABLATIONS = {  # each changes one thing from soflow-imagenet
    "velocity_loss_ratio=0.25": dict(velocity_loss_ratio=0.25),
    "l_end_ratio=0.01": dict(l_end_ratio=0.01),
    "l_schedule=Const": dict(l_schedule="Const"),
    "p=0.5": dict(p=0.5),
    "unguided": dict(cfg_scale=1.0, cfg_drop_rate=0.0),  # the release refuses label drop without guidance
}
ABLATION_BASE = "ablation:base"  # soflow-imagenet itself at the ablations' steps and seeds, their reference
RUNS += [Run(f"ablation:{name}", "soflow", "imagenet", name != "unguided", dict(SOFLOW_IMAGENET, **change),
             SOFLOW_SAMPLERS, "ablation") for name, change in dict(base={}, **ABLATIONS).items()]
RUN_BY_VARIANT = {run.variant: run for run in RUNS}

# Presets: the config, the study's size, and the scoring settings.
PRESETS = {
    "digits": dict(config="configs/paper_table_digits.yaml", total_steps=2000, ablation_steps=2000, points=10,
                   num_samples=890,
                   seeds=[0, 1, 2], ablation_seeds=[0, 1], device="cpu", jobs=2, threads=1, classifier_iter=500),
    # Not yet run: a GPU rerun at a larger scale (docs/gpu_path.md); MNIST 28 x 28 with a 33M-parameter DiT.
    "mnist-cuda": dict(config="configs/paper_table_mnist_cuda.yaml", total_steps=40000, ablation_steps=40000, points=20,
                       num_samples=2500, seeds=[0, 1, 2], ablation_seeds=[0, 1], device="cuda", jobs=1,
                       threads=4, classifier_iter=500),
    "quick": dict(config="configs/paper_table_digits.yaml", total_steps=4, ablation_steps=4, points=2, num_samples=100, seeds=[0],
                  ablation_seeds=[0], device="cpu", jobs=1, threads=1, classifier_iter=30,
                  changes=dict(hidden_size=16, depth=1, num_heads=2, batch_size=16, logging_steps=1)),
}


# ----------------------------------------------------------------------------------------------------
# Real data, classifier, metrics


def real_images(cfg):
    """The real images of the config's dataset (Digits or MNIST) as uint8 NHWC at its resolution, and labels."""
    from data import load_digits, load_mnist
    loaders = dict(Digits=load_digits, MNIST=load_mnist)
    if cfg.dataset_type not in loaders:
        raise SystemExit(f"the study scores Digits or MNIST configs, got dataset_type {cfg.dataset_type}")
    images, labels = loaders[cfg.dataset_type](cfg.data_size, cfg.data_channels)
    return to_uint8(images).numpy(), labels.numpy()


class RealReference:
    """The A / B split of the real images (pixel features), the classifier trained on A and the real rows."""

    def __init__(self, cfg, classifier_seed, max_iter=500):
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
        images, labels = real_images(cfg)
        a, b, ya, yb = train_test_split(digits_quality.pixel_features(images), labels, test_size=0.5,
                                        stratify=labels, random_state=SPLIT_SEED)
        self.classifier = MLPClassifier((128,), max_iter=max_iter, random_state=classifier_seed).fit(a, ya)
        self.reference, self.n_heldout = b, len(b)
        self.accuracy = float((self.classifier.predict(b) == yb).mean())
        self.floor = digits_quality.frechet_distance(a, b)

    def score(self, images, labels):
        feats = digits_quality.pixel_features(images)
        return dict(fd=digits_quality.frechet_distance(feats, self.reference),
                    agreement=float((self.classifier.predict(feats) == np.asarray(labels)).mean()))


def check_num_samples(num_samples, n_heldout, num_classes):
    if num_samples % num_classes or num_samples > n_heldout:
        raise SystemExit(f"--num-samples {num_samples} must be a multiple of {num_classes} (class-balanced) and "
                         f"at most the {n_heldout} held-out real images (the floor's size)")


def real_rows(reference, args):
    """The `real` rows of the CSV: the floor of the Frechet distance and the classifier's held-out accuracy."""
    return [dict(method="real", recipe="heldout", variant="real", guided="", seed="", step="", train_seconds="",
                 nfe="", sampler="", fd=reference.floor, agreement=reference.accuracy,
                 num_samples=reference.n_heldout, classifier_seed=args.classifier_seed,
                 sample_seed=args.sample_seed)]


# ----------------------------------------------------------------------------------------------------
# Runs: configs, training, scoring


def run_dir(out, run, seed):
    return os.path.join(out, "runs", run.variant.replace(":", "-").replace("=", "_"), f"seed{seed}")


def write_run_config(args, run, seed):
    """The run's config file (the preset's config with the recipe, seed, steps and checkpoint cadence)."""
    from config import write_variant
    folder = run_dir(args.out, run, seed)
    preset = PRESETS[args.preset]
    steps = args.total_steps if run.group == "headline" else args.ablation_steps
    every = max(steps // args.points, 1)
    changes = dict(preset.get("changes", {}), **run.changes, seed=seed, total_steps=steps, working_dir=folder,
                   ckpt_saving_steps=every, ckpt_keep_last=None, tracker="none")
    changes.setdefault("logging_steps", every)  # a log window ends at every checkpoint: its train_seconds
    return write_variant(os.path.join(ROOT, args.config), os.path.join(folder, "config.study.yaml"), **changes)


def train_seconds_by_step(log_path):
    """{step: training seconds up to it} from the `Time` of train.py's log windows (a resumed run's repeated
    windows: the last one counts)."""
    seconds = {w["step"]: w["seconds"] for w in log_windows(log_path)}
    total, out = 0.0, {}
    for step in sorted(seconds):
        total += seconds[step]
        out[step] = total
    return out


def run_samples(model, sampler, nfe, args, device):
    """uint8 samples and labels of `Soflow.sample` from the fixed noise and labels (sample i: label i % 10)."""
    from inference import sample_inputs
    shape = (model.data_channels, model.data_size, model.data_size)
    draws = nfe if sampler == "soflow" else 1  # only the soflow sampler re-noises

    def draw(indices):
        labels, noise = sample_inputs(indices, model.num_classes, True, shape, draws, args.sample_seed)
        noise, labels = noise.to(device), labels.to(device)
        with torch.no_grad():
            x = model.sample(noise[0], labels, nfe=nfe, renoise=noise[1:] if draws > 1 else None, sampler=sampler)
        return to_uint8(x.float().cpu()), labels.cpu()
    return digits_quality.batched_samples(draw, args.num_samples, args.sample_batch)


def score_run(config_path, run, seed, reference, args):
    """Every checkpoint (step > 0) of the run scored at each of its samplers' NFEs: the CSV rows."""
    from checkpoints import list_checkpoints
    from config import load_config
    from inference import load_sampling_model
    cfg = load_config(config_path)
    seconds = train_seconds_by_step(os.path.join(cfg.working_dir, "log.txt"))
    rows = []
    for step, ckpt in list_checkpoints(os.path.join(cfg.working_dir, "ckpts")):
        if step == 0 or (step % cfg.ckpt_saving_steps and step != cfg.total_steps):
            continue  # step 0, and the checkpoint an interrupted run writes where it stopped
        model = load_sampling_model(cfg, ckpt, args.device)
        for sampler, nfes in run.samplers.items():
            for nfe in nfes:
                images, labels = run_samples(model, sampler, nfe, args, args.device)
                rows.append(dict(method=run.method, recipe=run.recipe, variant=run.variant, guided=run.guided,
                                 seed=seed, step=step, train_seconds=seconds.get(step, float("nan")), nfe=nfe,
                                 sampler=sampler, **reference.score(images, labels), num_samples=len(labels),
                                 classifier_seed=args.classifier_seed, sample_seed=args.sample_seed))
    return rows


def write_csv(path, rows):
    from safe_io import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write, what="scores")


def read_csv(path):
    """The rows of a study CSV, numbers as floats or ints ('' stays '')."""
    def value(key, text):
        if text == "" or key in ("method", "recipe", "variant", "sampler"):
            return text
        if key == "guided":
            return text == "True"
        number = float(text)
        return int(number) if key in ("seed", "step", "nfe", "num_samples", "classifier_seed",
                                      "sample_seed") else number
    with open(path, newline="") as f:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def finished_scores(folder, args):
    """The run's scores.csv rows when they exist and were made with the current scoring settings, else None."""
    path = os.path.join(folder, "scores.csv")
    if not os.path.exists(path):
        return None
    rows = read_csv(path)
    if rows and all(row[k] == getattr(args, k) for row in rows for k in SCORING_KEYS):
        return rows
    return None


def subprocess_env(args):
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # train.py takes a GPU whenever it sees one
    return env


def score_command(config_path, run, seed, args):
    return [sys.executable, os.path.abspath(__file__), "--score-run", config_path, "--variant", run.variant,
            "--seed-of-run", str(seed), "--preset", args.preset, "--config", args.config,
            "--num-samples", str(args.num_samples), "--classifier-seed", str(args.classifier_seed),
            "--sample-seed", str(args.sample_seed), "--device", args.device, "--threads", str(args.threads),
            "--sample-batch", str(args.sample_batch), "--out", args.out]


def run_child(cmd, out, env):
    """Runs `cmd` in its own session, with its output to the file `out`. Its own session because Linux's autogroup
    scheduler shares the CPU between sessions: children in this one would split one share between them. A signal
    to the terminal's process group no longer reaches the child, so any exception here (Ctrl-C included) passes
    it SIGTERM first, on which train.py writes a checkpoint where it stands and exits."""
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = child.wait()
    except BaseException:
        child.terminate()
        child.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def train_and_score(run, seed, args, reference, log):
    """Trains the run (train.py resumes an interrupted one; a finished one only reloads) and scores it, unless
    its scores.csv is already there: in this process with --jobs 1, otherwise in child processes."""
    folder = run_dir(args.out, run, seed)
    rows = finished_scores(folder, args)
    if rows is not None:
        log(f"{run.variant} seed {seed}: finished, reused")
        return rows
    if args.finished_only:
        log(f"{run.variant} seed {seed}: not finished, left out (--finished-only)")
        return []
    config_path = write_run_config(args, run, seed)
    start = time.time()
    if args.jobs == 1:
        import train
        train.main(["--config", config_path])
        write_csv(os.path.join(folder, "scores.csv"), score_run(config_path, run, seed, reference, args))
    else:
        with open(os.path.join(folder, "train.out"), "a") as f:
            for cmd in (digits_quality.train_command(1, config_path), score_command(config_path, run, seed, args)):
                run_child(cmd, f, subprocess_env(args))
    log(f"{run.variant} seed {seed}: trained and scored in {time.time() - start:.0f} s")
    return read_csv(os.path.join(folder, "scores.csv"))


def study_jobs(args):
    """(run, seed) pairs in the order that leaves the most complete study when it is stopped early (then
    --finished-only reports the finished runs): every headline run of one seed after the other, MeanFlow's (the
    longest) first within a seed; then each ablation with all its seeds."""
    headline = [run for run in RUNS if run.group == "headline"]
    headline.sort(key=lambda run: run.method != "meanflow")
    jobs = [(run, seed) for seed in args.seeds for run in headline]
    same_steps = args.ablation_steps == args.total_steps  # then soflow-imagenet itself is the ablations' reference
    return jobs + [(run, seed) for run in RUNS if run.group == "ablation" for seed in args.ablation_seeds
                   if not (same_steps and run.variant == ABLATION_BASE and seed in args.seeds)]


def run_study(args, reference, log):
    """Every (run, seed) trained and scored, `--jobs` at a time; all rows."""
    from tqdm import tqdm
    jobs = study_jobs(args)
    rows = []
    with tqdm(total=len(jobs), desc="runs", file=sys.stderr) as bar:
        if args.jobs == 1:
            for run, seed in jobs:
                rows += train_and_score(run, seed, args, reference, log)
                bar.update()
        else:
            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                futures = [pool.submit(train_and_score, run, seed, args, reference, log) for run, seed in jobs]
                for future in concurrent.futures.as_completed(futures):
                    rows += future.result()
                    bar.update()
    order = {run.variant: i for i, run in enumerate(RUNS)}
    samplers = {run.variant: list(run.samplers) for run in RUNS}
    return sorted(rows, key=lambda r: (order[r["variant"]], samplers[r["variant"]].index(r["sampler"]), r["nfe"],
                                       r["seed"], r["step"]))


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="digits",
                   help="the study's config and size (mnist-cuda: larger, for a GPU, not yet run)")
    p.add_argument("--quick", action="store_true", help="--preset quick: the whole pipeline at toy size (a test)")
    p.add_argument("--config", default=None, help="the network/data/optimizer config (default: the preset's)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "paper_table"), help="runs and results.md")
    p.add_argument("--csv", default=None, help="the scores (default docs/paper_table.csv; --quick: --out)")
    p.add_argument("--figures", default=None, help="folder of the PNGs (default docs; --quick: --out)")
    p.add_argument("--report-only", action="store_true", help="tables and figures from --csv, no training")
    p.add_argument("--finished-only", action="store_true",
                   help="the CSV, tables and figures from the runs already finished (an interrupted study), no training")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds of the headline runs")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None, help="training seeds of the ablations")
    p.add_argument("--classifier-seed", type=int, default=0, help="seed of the classifier behind the agreement")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the fixed sampling noise and labels")
    p.add_argument("--total-steps", type=int, default=None, help="training steps of every run")
    p.add_argument("--ablation-steps", type=int, default=None, help="training steps of every ablation run")
    p.add_argument("--points", type=int, default=None, help="checkpoints scored along each run")
    p.add_argument("--num-samples", type=int, default=None, help="samples per scoring (<= held-out real images)")
    p.add_argument("--sample-batch", type=int, default=1000, help="samples per sampling forward pass")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (1: in this process)")
    p.add_argument("--threads", type=int, default=None, help="threads of each run's process")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--score-run", default=None, help=argparse.SUPPRESS)  # a child: scores one run's config
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed-of-run", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    preset = PRESETS[args.preset]
    for key in ("config", "total_steps", "ablation_steps", "points", "num_samples", "seeds", "ablation_seeds", "jobs", "threads",
                "device"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    default_folder = args.out if args.preset == "quick" else os.path.join(ROOT, "docs")
    args.csv = args.csv or os.path.join(default_folder, "paper_table.csv")
    args.figures = args.figures or default_folder
    args.out = os.path.abspath(args.out)
    if min(args.jobs, args.threads, args.points, args.total_steps, args.ablation_steps, args.sample_batch) < 1:
        p.error("--jobs, --threads, --points, --total-steps, --ablation-steps and --sample-batch must be >= 1")
    if args.points > min(args.total_steps, args.ablation_steps):
        p.error(f"--points {args.points} exceeds --total-steps {args.total_steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    return args


def report(rows, args, wall=None):
    import paper_table_report
    tables = paper_table_report.report_tables(rows)
    figures = paper_table_report.report_figures(rows, args.figures)
    text = tables + "\n\n" + "".join(f"![]({os.path.basename(f)})\n" for f in figures)
    if wall is not None:
        text += f"\nWall time {wall / 60:.1f} min (--jobs {args.jobs}, --threads {args.threads}).\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    args = parse_args(argv)
    wall = time.time()
    torch.set_num_threads(args.threads)
    if args.report_only:
        if not os.path.exists(args.csv):
            raise SystemExit(f"--report-only: {args.csv} does not exist; run the study first")
        return report(read_csv(args.csv), args)
    from config import load_config
    cfg = load_config(os.path.join(ROOT, args.config))
    reference = RealReference(cfg, args.classifier_seed, PRESETS[args.preset]["classifier_iter"])
    check_num_samples(args.num_samples, reference.n_heldout, cfg.num_classes)
    if args.score_run:  # a child process of the study
        run = RUN_BY_VARIANT[args.variant]
        rows = score_run(args.score_run, run, args.seed_of_run, reference, args)
        return write_csv(os.path.join(run_dir(args.out, run, args.seed_of_run), "scores.csv"), rows)
    import matplotlib  # noqa: F401  (the figures need it: fail before hours of training, not after)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    log(f"classifier held-out accuracy {reference.accuracy:.4f}, Frechet floor {reference.floor:.4f} "
        f"({reference.n_heldout} held-out images)")
    rows = real_rows(reference, args) + run_study(args, reference, log)
    write_csv(args.csv, rows)
    return report(read_csv(args.csv), args, time.time() - wall)


if __name__ == "__main__":
    main()
