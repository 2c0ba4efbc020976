"""Read speed of an `imagenet_latent.hdf5` file: naive per-sample h5py reads vs LatentDataset.

    python benchmarks/latent_read_speed.py        # synthetic 20,000 x 8 x 32 x 32 file in a temp dir
    python benchmarks/latent_read_speed.py --num-samples 50000 --keep --path /data/bench.hdf5
    python benchmarks/latent_read_speed.py --path data/imagenet_latent.hdf5   # existing file: read as is

Every method reads samples in a random order (what a shuffled training epoch does) and reports
samples/s, the best of --repeats runs. The synthetic file has just been written, so it sits in the
page cache: the figures are warm-cache figures; a file larger than RAM on a slow disk reads slower
for every method.
"""
import argparse
import os
import sys
import tempfile
import time

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from data import LatentDataset  # noqa: E402


def write_synthetic(path, num_samples, channels, latent_size, num_classes, seed):
    """A file with the extractor's layout, filled with random values in blocks (bounded memory)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, 'w') as f:
        latents = f.create_dataset('latents', (num_samples, channels, latent_size, latent_size), dtype=np.float32)
        for lo in range(0, num_samples, 2048):
            hi = min(lo + 2048, num_samples)
            latents[lo:hi] = rng.standard_normal((hi - lo, channels, latent_size, latent_size), dtype=np.float32)
        f.create_dataset('labels', data=np.sort(rng.integers(0, num_classes, num_samples)).astype(np.int64))
        f.create_dataset('amount', data=np.int64(num_samples))
        f.create_dataset('latent_size', data=np.int64(latent_size))
        f.create_dataset('class_names', data=[f'class{i:04d}' for i in range(num_classes)], dtype=h5py.string_dtype())


def consume(batches):
    """Run through an iterable, dropping each item as a training step would (keeping them all would
    time the allocation of fresh memory instead of the reads)."""
    for _ in batches:
        pass


def samples_per_second(count, fn, repeats):
    """Best samples/s over `repeats` calls of fn(), which reads `count` samples each time.

    The best run is the one least disturbed by other work on the machine."""
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--path', help='file to read; created (synthetic) if it does not exist. Default: a temp file')
    parser.add_argument('--keep', action='store_true', help='keep a file this script created')
    parser.add_argument('--num-samples', type=int, default=20000)
    parser.add_argument('--channels', type=int, default=8)
    parser.add_argument('--latent-size', type=int, default=32)
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--batches', type=int, default=100, help='random batches per batched method')
    parser.add_argument('--naive-samples', type=int, default=5000, help='samples for the one-by-one h5py read')
    parser.add_argument('--reopen-samples', type=int, default=1000, help='samples for the reopen-per-sample read')
    parser.add_argument('--repeats', type=int, default=3, help='runs per method; the best is reported')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    tmpdir = None
    path = args.path
    created = path is None or not os.path.exists(path)
    if path is None:
        tmpdir = tempfile.mkdtemp(prefix='latent_bench_')
        path = os.path.join(tmpdir, 'imagenet_latent.hdf5')
    if created:
        start = time.perf_counter()
        write_synthetic(path, args.num_samples, args.channels, args.latent_size, args.num_classes, args.seed)
        print(f'wrote synthetic {path} in {time.perf_counter() - start:.1f} s')
    try:
        run(path, args)
    finally:
        if created and not args.keep:
            os.remove(path)
            if tmpdir:
                os.rmdir(tmpdir)


def per_sample_reads(path, order, reopen_samples, report):
    """Cases 1 and 2: plain h5py reads of one sample at a time, in `order`."""
    # 1. Naive: one open file, f['latents'][i] and f['labels'][i] one sample at a time.
    with h5py.File(path, 'r') as f:
        latents, labels = f['latents'], f['labels']
        report('h5py per sample, file opened once', len(order),
               lambda: consume((latents[i], labels[i]) for i in order))

    # 2. Worse: open and close the file for every sample.
    def reopen():
        for i in order[:reopen_samples]:
            with h5py.File(path, 'r') as f:
                f['latents'][i], f['labels'][i]
    report('h5py per sample, file reopened each time', len(order[:reopen_samples]), reopen)


def run(path, args):
    rng = np.random.default_rng(args.seed)
    with h5py.File(path, 'r') as f:
        shape = f['latents'].shape
    n = shape[0]
    print(f'file: {path}  latents {shape} float32 ({os.path.getsize(path) / 2 ** 30:.2f} GiB), '
          f'batch size {args.batch_size}, torch threads {torch.get_num_threads()}')
    results = []

    def report(name, count, fn):
        rate = samples_per_second(count, fn, args.repeats)
        results.append((name, rate))
        print(f'  {name:<58s} {rate:>10,.0f} samples/s', flush=True)

    per_sample_reads(path, rng.permutation(n)[:args.naive_samples], args.reopen_samples, report)
    batches = [rng.choice(n, args.batch_size, replace=False) for _ in range(args.batches)]
    count = args.batch_size * args.batches

    def batched(name, dataset):
        dataset.get_batch(batches[0])  # opens the file: not part of the steady state
        report(name, count, lambda: consume(dataset.get_batch(b) for b in batches))

    # 3. LatentDataset, per-sample __getitem__ through a standard DataLoader (default collate).
    dataset = LatentDataset(path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    loader_batches = max(1, min(args.batches, n // args.batch_size) // 4)

    def through_loader():
        consume(batch for _, batch in zip(range(loader_batches), loader))
    report(f'LatentDataset[i] + DataLoader default collate ({dataset.read_mode})',
           loader_batches * args.batch_size, through_loader)

    # 4. LatentDataset.get_batch on random batches: h5py fancy read, memory map, and through workers.
    batched('LatentDataset.get_batch, h5py read (mmap=False)', LatentDataset(path, mmap=False))
    batched(f'LatentDataset.get_batch ({dataset.read_mode})', dataset)
    sampler = np.concatenate(batches).tolist()
    report(f'DataLoader of whole batches, 2 workers ({dataset.read_mode})', count,
           lambda: consume(torch.utils.data.DataLoader(
               dataset, sampler=torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=True),
               batch_size=None, num_workers=2)))

    # 5. Everything in memory.
    start = time.perf_counter()
    in_memory = LatentDataset(path, load_into_memory=True)
    batched(f'LatentDataset(load_into_memory=True).get_batch [load {time.perf_counter() - start:.1f} s]',
            in_memory)

    print_speedups(results)


def print_speedups(results):
    baseline = results[0][1]
    print('speed-up over the naive per-sample read:')
    for name, rate in results:
        print(f'  {name:<58s} {rate / baseline:>10.1f}x')


if __name__ == '__main__':
    main()
