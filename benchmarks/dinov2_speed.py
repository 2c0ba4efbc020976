"""Cost of FD-DINOv2 (dinov2_features.py): images per second of the DINOv2 ViT-L/14 features with EDM2's
preprocessing, extrapolated to 10,000 images, and the time of the statistics and the distance of 10,000 features.

    python benchmarks/dinov2_speed.py [--dinov2 PATH] [--num-images 200] [--batch-size 25] [--image-size 256]
                                      [--threads 1] [--device cpu|cuda]

Without --dinov2 the network is timm's vit_large_patch14_dinov2 with random weights (nothing is downloaded): the
arithmetic of the real network, not its features. The images are random uint8 squares of --image-size (256: an
ImageNet 256 dump), resized to 224 x 224 by the preprocessing. One batch is computed first (warm-up, not timed).
The `statistics` line: dinov2_features.Moments over 10,000 synthetic 1024-d features, then
evaluator.frechet_distance against a second such set (scipy's sqrtm of a 1024 x 1024 matrix).
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dinov2_features  # noqa: E402
import evaluator  # noqa: E402
from bench_util import Timer, num_threads  # noqa: E402


def time_features(features, images, batch_size):
    """Seconds for the features of `images` (after a warm-up batch)."""
    features.features_of(images[:batch_size])
    with Timer(features.device) as timer:
        for batch in dinov2_features.batches_of(images, batch_size):
            features.features_of(batch)
    return timer.seconds


def time_statistics(n=10_000, dim=1024, seed=0):
    """Seconds for the moments of two sets of n features and the Frechet distance between them."""
    rng = np.random.default_rng(seed)
    a, b = (rng.normal(size=(n, dim)).astype(np.float32) for _ in range(2))
    start = time.perf_counter()
    stats = [dinov2_features.Moments().add(x).statistics() for x in (a, b)]
    evaluator.frechet_distance(*stats[0], *stats[1])
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dinov2", default=None, help="weights file (default: random weights)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    features = dinov2_features.DINOv2Features(dinov2_features.build_network(args.dinov2), device=args.device)
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    with num_threads(args.threads):
        seconds = time_features(features, images, args.batch_size)
        stats_seconds = time_statistics()
    rate = args.num_images / seconds
    print(f"device {args.device}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{'weights ' + args.dinov2 if args.dinov2 else 'random weights'}; {args.num_images} images of "
          f"{args.image_size}x{args.image_size} in batches of {args.batch_size}")
    print(f"features: {seconds:.1f} s, {rate:.3f} images/s, {10_000 / rate / 3600:.2f} h per 10,000 images")
    print(f"statistics: {stats_seconds:.1f} s for the moments of 2 x 10,000 features and their Frechet distance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
