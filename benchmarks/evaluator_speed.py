"""Images per second of the evaluator's Inception backends, side by side on the same images and machine, and the
time of the five metrics.

    python benchmarks/evaluator_speed.py [--inception-graph classify_image_graph_def.pb] [--num-images 64]
                                         [--image-size 256] [--batch-size 32] [--device cpu|cuda] [--rounds 3]
                                         [--backends tf torch [torch-unfolded]] [--metrics-features 10000]

The backends (`evaluator.make_feature_extractor('tf' | 'torch')`; `torch-unfolded` is the torch backend with
fold=False, every node run as the graph has it) compute the pool_3, mixed_6/conv and softmax features of the same
uint8 images (random, `--image-size` square, resized to 299 inside the graph). Without `--inception-graph` (the
benchmark downloads nothing) the graph is a synthetic one with the real graph's op types, names, shapes and channel
counts (all eleven mixed blocks at full width, random weights: the test suite's builder,
tests/inception_graphs.py), so the arithmetic is that of the real network. Each backend first computes one batch
(warm-up); the torch backend runs without its TensorFlow self-check. Then each round times one pass of every
backend over the images, in alternating order (reversed every other round), so that a change of the machine's load
falls on both: the table gives each backend's median images/s and, as `x tf`, the median of its per-round ratios to
TensorFlow, with the relative difference of its features to TensorFlow's. Threads: torch's intra-op threads as
printed; TensorFlow's session uses its defaults (intra- and inter-op pools sized by TensorFlow to the machine's
cores).

Metrics: `evaluator.compute_metrics` (IS, FID, sFID, precision, recall) for `--metrics-features` reference and as
many sample features of the real dimensions (pool 2048, spatial 2023, probabilities 1008; synthetic values), on
the metrics device (evaluator.metrics_device: CUDA when present): the first sample file of a run, which also
computes the reference radii, and a second one, which reuses them. The last line is
`speedup: torch/tf=X.XX metrics_s=Y.Y` (metrics_s: the first file's time).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402

import evaluator  # noqa: E402


def synthetic_graph(path):
    from inception_graphs import write_inception_like
    return write_inception_like(path, seed=0, writer="plain", width=1.0, blocks="full")


def make_extractor(backend, graph, device):
    return evaluator.make_feature_extractor(backend.split("-")[0], graph, device=device, tf_check=False,
                                            fold=backend != "torch-unfolded")


def time_backends(backends, graph, images, batch_size, device, rounds):
    """{backend: (images/s of each round, features)}, the rounds interleaved as the module docstring says."""
    extractors = {backend: make_extractor(backend, graph, device) for backend in backends}
    try:
        for extractor in extractors.values():
            extractor.compute(images[:batch_size], batch_size=batch_size)  # warm-up
        speeds, outputs = {backend: [] for backend in backends}, {}
        for r in range(rounds):
            for backend in (backends if r % 2 == 0 else backends[::-1]):
                start = time.perf_counter()
                outputs[backend] = extractors[backend].compute(images, batch_size=batch_size)
                speeds[backend].append(len(images) / (time.perf_counter() - start))
        return {backend: (speeds[backend], outputs[backend]) for backend in backends}
    finally:
        for extractor in extractors.values():
            extractor.close()


def synthetic_features(rng, n, shift):
    """Pool features of pool_3's kind (non-negative), spatial features and class probabilities, float32."""
    pool = (np.abs(rng.normal(size=(n, 2048))) * 0.3 + shift).astype(np.float32)
    spatial = rng.normal(size=(n, 17 * 17 * 7)).astype(np.float32)
    logits = rng.normal(size=(n, 1008)) * 3
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return pool, spatial, (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def time_metrics(n, device):
    """Seconds of compute_metrics for the first sample file (reference radii included) and a second one."""
    rng = np.random.default_rng(0)
    ref_pool, ref_spatial, _ = synthetic_features(rng, n, 0.0)
    reference = evaluator.Reference(None, ref_pool, ref_spatial, *evaluator.feature_statistics(ref_pool),
                                    *evaluator.feature_statistics(ref_spatial))
    times = []
    for shift in (0.01, 0.02):
        features = synthetic_features(rng, n, shift)
        start = time.perf_counter()
        evaluator.compute_metrics(reference, *features, device=device)
        times.append(time.perf_counter() - start)
    return times


def thread_note(backends):
    import torch
    notes = [f"torch intra-op threads {torch.get_num_threads()}"] if any("torch" in b for b in backends) else []
    if "tf" in backends:
        notes.append("tensorflow session threads: TensorFlow's defaults")
    return "; ".join(notes)


def print_table(rows):
    print(f"{'backend':<15} {'images/s':>9} {'x tf':>6}  {'per round (images/s)':<22} "
          f"max rel. diff to tf (pool, spatial, probs)")
    for backend, (speeds, out) in rows.items():
        ratio, diff = "-", "-"
        if "tf" in rows:
            ratio = f"{statistics.median(s / t for s, t in zip(speeds, rows['tf'][0])):.2f}"
            diff = ", ".join(f"{evaluator.relative_difference(a, b):.1e}" for a, b in zip(out, rows["tf"][1]))
        rounds = " ".join(f"{s:.2f}" for s in speeds)
        print(f"{backend:<15} {statistics.median(speeds):>9.2f} {ratio:>6}  {rounds:<22} {diff}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inception-graph", default=None, help="the real classify_image_graph_def.pb (else synthetic)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed passes per backend (medians reported)")
    p.add_argument("--backends", nargs="+", default=["tf", "torch"], choices=["tf", "torch", "torch-unfolded"])
    p.add_argument("--metrics-features", type=int, default=10000, help="reference and sample features (0: skip)")
    args = p.parse_args(argv)
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        graph = args.inception_graph or str(synthetic_graph(os.path.join(tmp, "inception_like.pb")))
        kind = "real" if args.inception_graph else "synthetic (real shapes and channel counts, random weights)"
        print(f"graph: {kind}; {args.num_images} images {args.image_size}x{args.image_size}, batch {args.batch_size}, "
              f"{args.rounds} rounds, {os.cpu_count()} CPU(s), load average {load:.1f}; {thread_note(args.backends)}",
              flush=True)
        rows = time_backends(args.backends, graph, images, args.batch_size, args.device, args.rounds)
    print_table(rows)
    metrics_s = float("nan")
    if args.metrics_features:
        first, second = time_metrics(args.metrics_features, args.device)
        metrics_s = first
        print(f"metrics (IS, FID, sFID, precision, recall) of {args.metrics_features} x {args.metrics_features} "
              f"features on {evaluator.metrics_device(args.device)}: {first:.1f} s for the first sample file "
              f"(reference radii included), {second:.1f} s with them known; load average {os.getloadavg()[0]:.1f}")
    speedup = "-"
    if "tf" in rows and "torch" in rows:
        speedup = f"{statistics.median(s / t for s, t in zip(rows['torch'][0], rows['tf'][0])):.2f}"
    print(f"speedup: torch/tf={speedup} metrics_s={metrics_s:.1f}")


if __name__ == "__main__":
    main()
