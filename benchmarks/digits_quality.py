"""One-step quality on the scikit-learn digits: SoFlow against a flow-matching model of the same budget.

    python benchmarks/digits_quality.py --train                      # trains both models, then evaluates
    python benchmarks/digits_quality.py --ckpt results/digits_demo/ckpts/3000.pt [--fm-ckpt PATH]

Models (both from `--config`, default configs/digits_demo.yaml):
  SoFlow  the config as it is; sampled with `inference.generate` (the shared `Soflow.sample`, EMA weights)
          at 1 and 2 NFE.
  FM      the same config with velocity_loss_ratio 1.0 (flow matching only; everything else identical,
          training-time CFG included, so guidance is baked into its velocity), same steps and batch;
          sampled with the Euler sampler below at 1, 2, 4 and 50 steps (EMA weights).
`--train` trains both with train.py, in this process (the default `--nproc 1`: one process, every core an
intra-op thread, as the quick start) or with `torchrun --nproc-per-node=NPROC`
into `--out`/soflow and `--out`/fm; a finished run there is reused (train.py resumes from its newest
checkpoint). `--ckpt` evaluates that SoFlow checkpoint and trains the FM baseline unless `--fm-ckpt` is given.

Samples: `--num-samples` (default 10,000) per row, class-balanced (sample i has label i % 10); sample i takes
its label and noise from `inference.sample_inputs` (generator keyed by (seed, i)), so every row starts from
the same noise. Why 10,000: with a few thousand samples the Frechet distance of one model moves between
sampling seeds by as much as the gaps being measured (the squared mean difference alone carries ~tr(cov) / N of
sampling noise); the figures are in docs/digits_demo.md.

Metrics. Every image, real or generated, goes through the uint8 conversion of the sample dumps
(clamp(x * 127.5 + 128, 0, 255) truncated, as the ADM sample files), is divided by 255 (pixels in [0, 1]), averaged
over channels, and area-averaged to 8 x 8 when data_size > 8. Real digits are those of data.load_digits
at the config's data_size and channels, so a perfect generator shares the real data's pipeline.
The real digits are split once (stratified, fixed seed) into halves A and B.
  (a) class agreement: fraction of samples that an RBF SVM trained on half A (64 pixels) assigns to the
      conditioning label. Real floor: its accuracy on half B.
  (b) Frechet distance of the 64 pixel values: Gaussian fit (mean, covariance) of the samples against that
      of all 1,797 real digits. Real floor: FD(half A, half B), two disjoint sets of real digits.
Results: a markdown table on stdout and in `--out`/results.md, everything in `--out`/results.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import Soflow, to_uint8  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "digits_demo.yaml")
SOFLOW_NFES = (1, 2)
EULER_STEPS = (1, 2, 4, 50)
SPLIT_SEED = 0
# Acceptance of the demo (issue): SoFlow 1-NFE agreement >= 0.97, FD <= 1.25 x FM 50-step, FD < FM 1-step / 3.
MIN_AGREEMENT, MAX_FD_VS_FM50, MAX_FD_VS_FM1 = 0.97, 1.25, 1 / 3


# ----------------------------------------------------------------------------------------------------
# Features and metrics


def pixel_features(images):
    """uint8 NHWC (any size, 1 or 3 channels) -> [N, 64] float64 in [0, 1] (channel mean, 8 x 8 area mean)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).double() / 255
    x = x.mean(1, keepdim=True)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return x.reshape(len(x), 64).numpy()


def real_digits(data_size, channels):
    """All real digits as uint8 NHWC at the model's resolution (the training pipeline), and their labels."""
    from data import load_digits
    images, labels = load_digits(data_size, channels)
    return to_uint8(images).numpy(), labels.numpy()


def _psd_sqrt(m):
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a, b):
    """Frechet distance between Gaussian fits (mean, covariance) of two feature sets [N, D]:
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    tr((S1 S2)^1/2) is computed as tr((R S2 R)^1/2) with R = S1^1/2 (same eigenvalues, symmetric PSD), by
    symmetric eigendecompositions: exact and stable for the singular covariances of the digits, whose
    border pixels are almost always 0."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = _psd_sqrt(s1)
    cross = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


class RealReference:
    """The real digits, the A/B split, the classifier trained on A and the floors."""

    def __init__(self, data_size, channels):
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC
        images, labels = real_digits(data_size, channels)
        self.features, self.labels = pixel_features(images), labels
        a, b, ya, yb = train_test_split(self.features, labels, test_size=0.5, stratify=labels,
                                        random_state=SPLIT_SEED)
        self.classifier = SVC(C=10.0, gamma="scale").fit(a, ya)
        self.floor = dict(n=len(b), agreement=float((self.classifier.predict(b) == yb).mean()),
                          frechet=frechet_distance(a, b))
        self.n_train = len(a)

    def score(self, images, labels):
        feats = pixel_features(images)
        return dict(n=len(feats), agreement=float((self.classifier.predict(feats) == np.asarray(labels)).mean()),
                    frechet=frechet_distance(feats, self.features))


# ----------------------------------------------------------------------------------------------------
# Sampling


def euler_sample(model, noise, labels, steps):
    """Flow-matching baseline sampler: x <- x + (t_{i+1} - t_i) v(x, t_i), uniform steps from t = 1 to 0
    (`Soflow.sample` with sampler 'euler'; it needs only the model's predict_velocity)."""
    return Soflow.sample(model, noise, labels, nfe=steps, sampler="euler")


def batched_samples(draw, num_samples, batch_size):
    """Concatenates draw(indices) -> (uint8 images, labels) over batches of the sample indices."""
    images, labels = zip(*(draw(range(lo, min(lo + batch_size, num_samples)))
                           for lo in range(0, num_samples, batch_size)))
    return np.concatenate([x.numpy() for x in images]), np.concatenate([y.numpy() for y in labels])


def soflow_samples(model, num_samples, nfe, seed, batch_size):
    from inference import generate
    return batched_samples(lambda indices: generate(model, indices, nfe, seed, torch.device("cpu"),
                                                    class_balanced=True), num_samples, batch_size)


def euler_samples(model, num_samples, steps, seed, batch_size):
    from inference import sample_inputs
    shape = (model.data_channels, model.data_size, model.data_size)

    def draw(indices):
        labels, noise = sample_inputs(indices, model.num_classes, True, shape, 1, seed)
        return to_uint8(euler_sample(model, noise[0], labels, steps).float()), labels
    return batched_samples(draw, num_samples, batch_size)


# ----------------------------------------------------------------------------------------------------
# Training


def train_command(nproc, config_path):
    """The command line that trains `config_path`: `python train.py` for one process, torchrun otherwise."""
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), "--config", config_path]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            os.path.join(ROOT, "train.py"), "--config", config_path]


def run_training(config_path, nproc, log):
    """train.py on `config_path` (in this process for nproc 1); returns (newest checkpoint, wall-clock seconds)."""
    start = time.time()
    if nproc == 1:
        import train
        train.main(["--config", config_path])
    else:
        cmd = train_command(nproc, config_path)
        log(f"$ {' '.join(cmd)}")
        subprocess.run(cmd, cwd=ROOT, check=True, env={"OMP_NUM_THREADS": "1", **os.environ})
    seconds = time.time() - start
    return finished_checkpoint(config_path), seconds


def finished_checkpoint(config_path):
    """The checkpoint of the last step of the run of `config_path`; SystemExit when the run did not reach it."""
    from checkpoints import list_checkpoints
    from config import load_config
    cfg = load_config(config_path)
    found = list_checkpoints(os.path.join(cfg.working_dir, "ckpts"))
    if not found or found[-1][0] != cfg.total_steps:
        raise SystemExit(f"training {config_path} did not reach step {cfg.total_steps} (checkpoints: {found})")
    return found[-1][1]


# ----------------------------------------------------------------------------------------------------
# Report


def markdown_table(result):
    lines = ["| model | sampler | NFE | samples | class agreement | Frechet distance (64 px) | FD / FM 50-step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    fm50 = next((r["frechet"] for r in result["rows"] if r["model"] == "FM" and r["nfe"] == 50), None)
    for r in result["rows"]:
        ratio = f"{r['frechet'] / fm50:.2f}" if fm50 and r["model"] != "real" else ""
        nfe = r["nfe"] if r["nfe"] is not None else "-"
        lines.append(f"| {r['model']} | {r['sampler']} | {nfe} | {r['n']} | {r['agreement']:.3f} | "
                     f"{r['frechet']:.4f} | {ratio} |")
    return "\n".join(lines)


def acceptance(rows):
    get = {(r["model"], r["nfe"]): r for r in rows}
    one, fm50, fm1 = get.get(("SoFlow", 1)), get.get(("FM", 50)), get.get(("FM", 1))
    if one is None or fm50 is None or fm1 is None:
        return {}
    return {f"SoFlow 1-NFE class agreement >= {MIN_AGREEMENT}": one["agreement"] >= MIN_AGREEMENT,
            f"SoFlow 1-NFE FD <= {MAX_FD_VS_FM50} x FM 50-step FD": one["frechet"] <= MAX_FD_VS_FM50 * fm50["frechet"],
            "SoFlow 1-NFE FD < FM 1-step FD / 3": one["frechet"] < MAX_FD_VS_FM1 * fm1["frechet"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="SoFlow checkpoint to evaluate (EMA weights)")
    src.add_argument("--train", action="store_true", help="train the SoFlow and FM models first")
    p.add_argument("--fm-ckpt", help="flow-matching baseline checkpoint (default: train it)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="training config of the SoFlow model")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "digits_quality"),
                   help="folder for training runs (train mode), results.json and results.md")
    p.add_argument("--nproc", type=int, default=1,
                   help="training ranks: 1 trains in this process (as the quick start), more through torchrun")
    p.add_argument("--num-samples", type=int, default=10000, help="samples per row, a multiple of the 10 classes")
    p.add_argument("--batch-size", type=int, default=1000, help="samples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--check", action="store_true", help="exit with status 1 when an acceptance target is missed")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from config import load_config, write_variant
    from inference import check_class_balanced, load_sampling_model
    if args.fm_ckpt and args.train:
        raise SystemExit("--fm-ckpt goes with --ckpt; --train trains both models")
    if args.num_samples < 1 or args.batch_size < 1 or args.nproc < 1:
        raise SystemExit("--num-samples, --batch-size and --nproc must be >= 1")
    cfg = load_config(args.config)
    if cfg.dataset_type != "Digits" or cfg.num_classes != 10:
        raise SystemExit(f"{args.config}: this benchmark needs dataset_type Digits with num_classes 10")
    try:
        check_class_balanced(args.num_samples, cfg.num_classes)
    except ValueError as error:
        raise SystemExit(str(error))
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = dict(config=os.path.relpath(os.path.abspath(args.config), ROOT), num_samples=args.num_samples,
                  seed=args.seed, training_seconds={}, checkpoints={})
    soflow_ckpt, fm_ckpt = args.ckpt, args.fm_ckpt
    runs = os.path.abspath(args.out)
    if args.train:
        path = write_variant(args.config, os.path.join(runs, "soflow.yaml"), working_dir=os.path.join(runs, "soflow"))
        soflow_ckpt, result["training_seconds"]["SoFlow"] = run_training(path, args.nproc, log)
    if fm_ckpt is None:
        path = write_variant(args.config, os.path.join(runs, "fm.yaml"), working_dir=os.path.join(runs, "fm"),
                             velocity_loss_ratio=1.0)
        fm_ckpt, result["training_seconds"]["FM"] = run_training(path, args.nproc, log)
    for name, path in (("SoFlow", soflow_ckpt), ("FM", fm_ckpt)):
        if not os.path.isfile(path):
            raise SystemExit(f"{name} checkpoint {path} does not exist")
        result["checkpoints"][name] = path

    start = time.time()
    real = RealReference(cfg.data_size, cfg.data_channels)
    rows = [dict(model="real", sampler=f"held-out half B vs half A (classifier trained on A, n={real.n_train})",
                 nfe=None, **real.floor)]
    soflow = load_sampling_model(cfg, soflow_ckpt)
    for nfe in SOFLOW_NFES:
        images, labels = soflow_samples(soflow, args.num_samples, nfe, args.seed, args.batch_size)
        rows.append(dict(model="SoFlow", sampler="solution operator (`Soflow.sample`)", nfe=nfe,
                         **real.score(images, labels)))
        log(f"SoFlow {nfe} NFE: {rows[-1]}")
    fm = load_sampling_model(cfg, fm_ckpt)  # same architecture: only velocity_loss_ratio differs
    for steps in EULER_STEPS:
        images, labels = euler_samples(fm, args.num_samples, steps, args.seed, args.batch_size)
        rows.append(dict(model="FM", sampler="Euler", nfe=steps, **real.score(images, labels)))
        log(f"FM Euler {steps}: {rows[-1]}")
    result["rows"] = rows
    result["acceptance"] = acceptance(rows)
    result["evaluation_seconds"] = time.time() - start

    table = markdown_table(result)
    checks = "\n".join(f"- [{'x' if ok else ' '}] {name}" for name, ok in result["acceptance"].items())
    text = (f"{table}\n\nN = {args.num_samples} class-balanced samples per model row, real reference = all "
            f"{len(real.labels)} digits; real row = two disjoint halves of the real digits.\n\n{checks}\n")
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    if args.check and not all(result["acceptance"].values()):
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
