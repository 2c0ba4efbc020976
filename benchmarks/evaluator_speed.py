"""Images per second of the evaluator's two Inception backends, side by side on the same images and machine.

    python benchmarks/evaluator_speed.py [--inception-graph classify_image_graph_def.pb] [--num-images 500]
                                         [--image-size 256] [--batch-size 64] [--device cpu|cuda] [--repeats 2]

Both backends (`evaluator.make_feature_extractor('tf' | 'torch')`) compute the pool_3, mixed_6/conv and
softmax features of the same uint8 images (random, `--image-size` square, resized to 299 inside the graph).
Without `--inception-graph` (no download here) the graph is a synthetic one with the real graph's op types,
names, shapes and channel counts (all eleven mixed blocks at full width, random weights: the test suite's
builder, tests/test_inception_torch.py), so the arithmetic is that of the real network. The first batch of
each backend is a warm-up; the torch backend runs without its TensorFlow self-check. Prints a table and, per
backend, the relative difference of its features to the TensorFlow ones.
"""
import argparse
import os
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
    from test_inception_torch import write_inception_like
    return write_inception_like(path, seed=0, writer="plain", width=1.0, blocks="full")


def time_backend(backend, graph, images, batch_size, device, repeats):
    extractor = evaluator.make_feature_extractor(backend, graph, device=device, tf_check=False)
    try:
        extractor.compute(images[:batch_size], batch_size=batch_size)  # warm-up
        best, out = None, None
        for _ in range(repeats):
            start = time.perf_counter()
            out = extractor.compute(images, batch_size=batch_size)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
        return len(images) / best, out
    finally:
        extractor.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inception-graph", default=None, help="the real classify_image_graph_def.pb (else synthetic)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="torch backend device (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per backend (the fastest is kept)")
    p.add_argument("--backends", nargs="+", default=["tf", "torch"], choices=["tf", "torch"])
    args = p.parse_args(argv)
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        graph = args.inception_graph or str(synthetic_graph(os.path.join(tmp, "inception_like.pb")))
        kind = "real" if args.inception_graph else "synthetic (real shapes and channel counts, random weights)"
        print(f"graph: {kind}; {args.num_images} images {args.image_size}x{args.image_size}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPU(s)", flush=True)
        rows = {}
        for backend in args.backends:
            rows[backend] = time_backend(backend, graph, images, args.batch_size, args.device, args.repeats)
    print(f"{'backend':<8} {'images/s':>10} {'x tf':>6}  max rel. diff to tf (pool, spatial, probs)")
    for backend, (speed, out) in rows.items():
        ratio = f"{speed / rows['tf'][0]:.2f}" if "tf" in rows else "-"
        diff = ", ".join(f"{evaluator.relative_difference(a, b):.1e}" for a, b in zip(out, rows["tf"][1])) \
            if "tf" in rows else "-"
        print(f"{backend:<8} {speed:>10.1f} {ratio:>6}  {diff}")


if __name__ == "__main__":
    main()
