"""ImageNet latents for SoFlow: a resumable multi-process pre-extractor.

As a script it turns an ImageFolder tree into `imagenet_latent.hdf5`:

    torchrun --nproc-per-node=8 latent_dataset.py --data-path /data/imagenet/train --save-path data/ \
        --image-size 256 --device-batch-size 64 --num-workers 8 --seed 0

(`python latent_dataset.py ...` runs it as a single process.) Each image gets the ADM centre crop, is
mapped to [-1, 1] and encoded by the SD-VAE; the posterior mean and std are stored side by side, so a
sample has 2 x latent_channels channels (8 for the SD-VAE) at image_size / 8 resolution. No latent
scaling is applied here: `sample_latents` draws mean + std * noise and scales it at training time.

Output layout (HDF5): `latents` [N, 8, L, L] float32, `labels` [N] int64, scalars `amount` (= N) and
`latent_size` (= L), `class_names` [num_classes] strings (label i is the i-th sorted class folder) and
`source_indices` [N] int64 (position of each sample in the ImageFolder list, which only differs from
0..N-1 when bad images were skipped). Samples are in ImageFolder order whatever the world size.

Work is split into one contiguous shard of the image list per rank. A rank writes its shard into
`<save-path>/parts/part_RRRRR_of_WWWWW.hdf5` one batch ("chunk") at a time and flushes after each, with
the attribute `num_done` counting the shard items finished so far and `complete` set only once the
whole shard is written. Re-running the same command therefore skips complete parts and *continues* an
interrupted part from its last flushed chunk (a part that cannot be opened or that was made with other
images or settings is started afresh; parts of a run with another world size are ignored; a complete
part that skipped bad images is redone when --skip-bad-images is not given). After a barrier rank 0
merges the parts into `imagenet_latent.hdf5.tmp`, verifies it and atomically renames it to
`imagenet_latent.hdf5`; the parts are then deleted unless `--keep-parts` is given. Ctrl-C or SIGTERM (torchrun
forwards either to every rank) stops with status 130, saying so; kill -9 keeps the same (every flushed chunk).

Numerics: PyTorch's defaults, as the release (on CUDA, cuDNN runs float32 convolutions in TF32);
--exact-fp32 turns TF32 off for convolutions and matmuls (`tf32: false` in training does the same).
--dtype float16 is faster on GPUs.

Test-only hook: SOFLOW_TEST_CRASH="chunk:N@RANK" kills rank RANK (SIGKILL) right after it flushed its N-th
chunk (`distributed.FaultInjection`, the fault injection train.py uses too).

The reader training uses (`LatentDataset`, `sample_latents`) lives in data.py with the other datasets;
`ImagenetDataset` here is the release's name for it (`from latent_dataset import ImagenetDataset`).
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import time

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import LATENT_FILE, LatentDataset, latent_file, validate_latent_file
from distributed import (FaultInjection, all_gather_objects, claim_on_rank_zero, cleanup_distributed,
                         configure_backends, first_error, interruptible, rank_bounds, setup_distributed, setup_logging)
from safe_io import Claim, OutputError, WriteError, atomic_write, check_writable

OUTPUT_NAME = LATENT_FILE
# Same extensions as torchvision.datasets.ImageFolder, matched case-insensitively.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
# Rows copied per read/write while merging parts (8 x 32 x 32 float32 rows: 32 MiB per block).
MERGE_BLOCK_ROWS = 1024

log = logging.getLogger('latent_dataset')


class ExtractionError(RuntimeError):
    """A problem the user has to fix (bad arguments, unreadable image, ...); printed without traceback."""


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------

def scan_image_folder(root):
    """List (relative path, label) pairs and class names in torchvision ImageFolder order.

    Classes are the sorted sub-folder names; within a class, folders are walked recursively in sorted
    order and files sorted by name, keeping files with a known image extension.
    """
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples, skipped = [], []
    class_dirs = [os.path.realpath(os.path.join(root, name)) for name in classes]
    for label, name in enumerate(classes):
        for dirpath, _, filenames in _walk_class(root, name, class_dirs[label], class_dirs, skipped):
            reldir = os.path.relpath(dirpath, root)  # once per folder: 1.28M relpath calls take seconds
            samples.extend((os.path.join(reldir, filename), label) for filename in sorted(filenames)
                           if filename.lower().endswith(IMG_EXTENSIONS))
    if skipped:
        log.warning('skipped %d linked folder(s) that would repeat images or give them another class\'s label '
                    '(a symlink loop, a link to a folder already walked, to the data root or into another class): '
                    '%s', len(skipped), ', '.join(skipped[:10]) + (' ...' if len(skipped) > 10 else ''))
    return samples, classes


def _walk_class(root, name, own, class_dirs, skipped):
    """os.walk of one class folder in sorted order, following symlinks (as ImageFolder) but never into a folder
    already walked (a loop), the data root or a folder above it, or another class folder; each such folder is
    appended to `skipped`, relative to the root."""
    root_real = os.path.realpath(root)
    others = [d for d in class_dirs if d != own]
    visited = set()
    walk = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
        visited.add(os.path.realpath(dirpath))
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            inside_other = any(real == o or real.startswith(o + os.sep) for o in others)
            if real in visited or root_real == real or root_real.startswith(real + os.sep) or inside_other:
                skipped.append(os.path.relpath(os.path.join(dirpath, d), root))
            else:
                keep.append(d)
                visited.add(real)
        dirnames[:] = keep
        walk.append((dirpath, dirnames, filenames))
    return sorted(walk)


def center_crop_arr(pil_image, image_size):
    """ADM centre crop: BOX-halve while the short side >= 2 * size, BICUBIC to short side = size, crop.

    Returns an [image_size, image_size, 3] uint8 array. The halving steps keep the final bicubic
    resize from aliasing on large images.
    """
    pil_image = pil_image.convert('RGB')
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    array = np.asarray(pil_image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def load_image(path, image_size):
    """Read an image file and return its [3, S, S] float32 tensor in [-1, 1]."""
    with Image.open(path) as image:
        image.load()  # decode now, so truncated files fail here with their own error
        array = center_crop_arr(image, image_size)
    tensor = torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255.0  # copy: PIL's buffer is read-only
    return tensor * 2 - 1


class ImageShard(Dataset):
    """Images of one rank's shard. A failure to read is returned as data rather than raised, so the
    main process can report it with the file's path (a raise inside a worker surfaces as an opaque
    worker error) or skip it."""

    def __init__(self, entries, root, image_size):
        self.entries = entries  # list of (global index, relative path, label)
        self.root = root
        self.image_size = image_size

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        index, relpath, label = self.entries[i]
        path = os.path.join(self.root, relpath)
        try:
            return index, label, load_image(path, self.image_size), path, None
        except Exception as exc:  # any decoder error: report it with the path
            return index, label, None, path, f'{type(exc).__name__}: {exc}'


def collate_with_failures(batch):
    """Stack the images that loaded; keep (index, path, reason) of those that did not."""
    ok = [item for item in batch if item[2] is not None]
    return {
        'indices': torch.tensor([item[0] for item in batch], dtype=torch.int64),  # all, in order
        'ok_indices': torch.tensor([item[0] for item in ok], dtype=torch.int64),
        'labels': torch.tensor([item[1] for item in batch], dtype=torch.int64),
        'images': torch.stack([item[2] for item in ok]) if ok else None,
        'failures': [(item[0], item[3], item[4]) for item in batch if item[2] is None],
    }


# ----------------------------------------------------------------------------------------------------
# The release's reader
# ----------------------------------------------------------------------------------------------------

class ImagenetDataset(LatentDataset):
    """The release's dataset class: `ImagenetDataset(dataset_path)` reads `dataset_path/imagenet_latent.hdf5`
    (or the file itself), with `amount`, `latent_size` and items (posterior mean | std [8, L, L] float32,
    label int64). The file is opened lazily in each process that reads, DataLoader workers included (data.py's
    LatentDataset). The caller draws the training latent (mean + std N(0, 1)) * 0.18215 (`data.sample_latents`)."""

    def __init__(self, dataset_path):
        super().__init__(latent_file(dataset_path))


# ----------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------

def load_vae(name_or_path, device, dtype):
    """Load a diffusers AutoencoderKL (Hugging Face id or local save_pretrained folder) for inference."""
    from diffusers import AutoencoderKL  # imported here so training can import this module cheaply

    try:
        # Concurrent ranks may download the same id: huggingface_hub serialises that with file locks.
        vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as exc:
        raise ExtractionError(
            f'could not load the VAE from {name_or_path!r}: {type(exc).__name__}: {exc}\n'
            'Pass --vae a Hugging Face id (needs network access, or a filled HF cache with HF_HUB_OFFLINE=1) '
            'or a local folder written by AutoencoderKL.save_pretrained.') from exc
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def encode_images(vae, images):
    """Posterior mean and std of images in [-1, 1], concatenated along channels, as float32."""
    posterior = vae.encode(images.to(dtype=vae.dtype)).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float()


def probe_latent_shape(vae, image_size, device):
    """Per-sample shape of what `encode_images` stores, found by encoding one blank image."""
    shape = tuple(encode_images(vae, torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])
    _, height, width = shape
    if height != width or image_size % height:
        raise ExtractionError(f'the VAE maps {image_size}x{image_size} images to {height}x{width} latents; '
                              '--image-size must be a multiple of its downsampling factor')
    return shape


# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data-path', required=True, help='ImageFolder root: DIR/<class>/<image>')
    parser.add_argument('--save-path', required=True, help=f'output folder for {OUTPUT_NAME}')
    parser.add_argument('--image-size', type=int, default=256)
    parser.add_argument('--device-batch-size', type=int, default=64,
                        help='images per encode call and per flushed chunk')
    parser.add_argument('--num-workers', type=int, default=4, help='DataLoader workers decoding images, per rank')
    parser.add_argument('--seed', type=int, default=0, help='seeds the RNGs; extraction itself is deterministic')
    parser.add_argument('--vae', default='stabilityai/sd-vae-ft-mse', help='Hugging Face id or local folder')
    parser.add_argument('--dtype', choices=('float32', 'float16'), default='float32',
                        help='VAE compute dtype (latents are stored as float32 either way)')
    parser.add_argument('--exact-fp32', action='store_true',
                        help="no TF32 on CUDA (default: PyTorch's defaults, as the release: TF32 convolutions)")
    parser.add_argument('--skip-bad-images', action='store_true',
                        help='log and leave out unreadable images instead of stopping')
    parser.add_argument('--keep-parts', action='store_true', help='keep the per-rank part files after merging')
    parser.add_argument('--dist-timeout-min', type=float, default=120.0,
                        help='how long ranks wait for each other at the barrier (minutes)')
    return parser.parse_args(argv)


def check_args(args):
    """Reject bad arguments before any heavy work, saying how to fix them."""
    if args.image_size <= 0 or args.image_size % 8:
        raise ExtractionError(f'--image-size {args.image_size} must be a positive multiple of 8 (e.g. 256)')
    if args.device_batch_size < 1:
        raise ExtractionError('--device-batch-size must be at least 1')
    if args.num_workers < 0:
        raise ExtractionError('--num-workers must be 0 or more')
    if not os.path.isdir(args.data_path):
        raise ExtractionError(f'--data-path {args.data_path} is not an existing folder; point it at the '
                              'ImageFolder root (e.g. imagenet/train holding n01440764/ ...)')
    if os.path.exists(args.save_path) and not os.path.isdir(args.save_path):
        raise ExtractionError(f'--save-path {args.save_path} exists and is not a folder; choose a folder')


def scan_and_check(data_path, verbose=True):
    samples, classes = scan_image_folder(data_path)
    if not classes:
        raise ExtractionError(f'{data_path} has no class sub-folders; expected the ImageFolder layout '
                              f'{data_path}/<class name>/<image files>')
    if not samples:
        raise ExtractionError(f'no images with extensions {IMG_EXTENSIONS} (any case) found under the '
                              f'{len(classes)} class folders of {data_path}')
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty and verbose:
        log.warning('%d class folder(s) hold no images (their labels stay reserved): %s',
                    len(empty), ', '.join(empty[:10]) + (' ...' if len(empty) > 10 else ''))
    return samples, classes


def settings_fingerprint(samples, classes, args):
    """Hash of everything that decides the stored values; parts and outputs made otherwise are not reused."""
    vae = os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae
    digest = hashlib.sha256(json.dumps(
        {'image_size': args.image_size, 'vae': vae, 'dtype': args.dtype, 'exact_fp32': args.exact_fp32,
         'classes': classes}).encode())
    for relpath, label in samples:
        digest.update(f'{relpath}\t{label}\n'.encode())
    return digest.hexdigest()


def part_path(save_path, rank, world):
    return os.path.join(save_path, 'parts', f'part_{rank:05d}_of_{world:05d}.hdf5')


def inspect_part(path, fingerprint, start, stop):
    """State of an existing part file: None if it is absent or unusable, else a dict with
    `complete`, `num_done`, `latent_shape` and `num_failures`."""
    if not os.path.exists(path):
        return None
    try:
        with h5py.File(path, 'r') as f:
            attrs = f.attrs
            if attrs.get('fingerprint') != fingerprint or (attrs.get('start'), attrs.get('stop')) != (start, stop):
                log.info('part %s was made with other settings or another split; redoing it', path)
                return None
            num_done = int(attrs['num_done'])
            if not 0 <= num_done <= stop - start:
                raise ValueError(f'num_done={num_done} out of range')
            return {'complete': bool(attrs.get('complete', False)), 'num_done': num_done,
                    'latent_shape': tuple(f['latents'].shape[1:]),
                    'num_failures': int((f['indices'][:num_done] < 0).sum())}
    except Exception as exc:  # a part cut off mid-write may not even open: start it afresh
        log.warning('part %s is unreadable (%s: %s); redoing it', path, type(exc).__name__, exc)
        return None


def create_part(path, fingerprint, start, stop, latent_shape):
    """Fresh part file with rows preallocated for the whole shard.

    Row k holds global index start + k; `indices` is -1 for rows not written yet or skipped.
    """
    n = stop - start
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with h5py.File(path, 'w') as f:
            f.create_dataset('latents', (n, *latent_shape), dtype=np.float32)
            f.create_dataset('labels', (n,), dtype=np.int64, fillvalue=-1)
            f.create_dataset('indices', (n,), dtype=np.int64, fillvalue=-1)
            f.create_dataset('failures', (0,), maxshape=(None,), dtype=h5py.string_dtype())
            f.attrs.update(fingerprint=fingerprint, start=start, stop=stop, num_done=0, complete=False)
    except Exception as e:
        raise WriteError(path, e, 'latent part') from e


def read_failures(f, below=None):
    """Failure records [(index, path, reason)] of a part, optionally only those with index < below."""
    records = [json.loads(item) for item in f['failures'].asstr()[()]]
    return [tuple(r) for r in records if below is None or r[0] < below]


def set_numerics(device, exact_fp32):
    """PyTorch's defaults, the release's numerics (on CUDA: cuDNN convolutions in TF32, matmuls in float32), are
    left as they are unless `exact_fp32`, which turns TF32 off on CUDA for both."""
    if device.type == 'cuda' and exact_fp32:
        configure_backends(device, tf32=False)


def extract_part(args, samples, start, stop, path, fingerprint, device, rank, world):
    """Encode this rank's shard into its part file, continuing a partial part where possible."""
    state = inspect_part(path, fingerprint, start, stop)
    if state is not None and state['complete'] and (state['num_failures'] == 0 or args.skip_bad_images):
        log.info('rank %d: part %s is complete (%d images); not recomputing it', rank, path, stop - start)
        return
    if state is not None and state['complete']:
        # Made with --skip-bad-images earlier; without it now, the bad files must be looked at again.
        log.info('rank %d: part %s skipped %d bad image(s) and --skip-bad-images is off; redoing it',
                 rank, path, state['num_failures'])
        state = None

    dtype = getattr(torch, args.dtype)
    vae = load_vae(args.vae, device, dtype)
    latent_shape = probe_latent_shape(vae, args.image_size, device)
    if state is not None and state['latent_shape'] != latent_shape:
        log.info('rank %d: part %s has latent shape %s, expected %s; redoing it',
                 rank, path, state['latent_shape'], latent_shape)
        state = None
    if state is None:
        create_part(path, fingerprint, start, stop, latent_shape)
        num_done = 0
    else:
        num_done = state['num_done']
        log.info('rank %d: continuing part %s after its last flushed chunk: %d of %d images already done',
                 rank, path, num_done, stop - start)
    if rank == 0:
        log.info('VAE %s (%s on %s): storing mean+std latents of shape %s per image',
                 args.vae, args.dtype, device, latent_shape)

    entries = [(i, samples[i][0], samples[i][1]) for i in range(start + num_done, stop)]
    loader = DataLoader(ImageShard(entries, args.data_path, args.image_size), batch_size=args.device_batch_size,
                        shuffle=False, num_workers=args.num_workers, collate_fn=collate_with_failures,
                        pin_memory=device.type == 'cuda')
    with h5py.File(path, 'a') as f:
        # Drop failure records of a chunk that was cut off before its num_done update.
        kept = read_failures(f, below=start + num_done)
        if len(kept) != f['failures'].shape[0]:
            f['failures'].resize((len(kept),))
            if kept:
                f['failures'][:] = [json.dumps(r) for r in kept]
        with tqdm(total=stop - start, initial=num_done, unit='img', disable=rank != 0, desc=f'rank 0 of {world}',
                  dynamic_ncols=True, mininterval=1.0) as progress:
            skipped = write_chunks(args, loader, vae, device, f, start, latent_shape, len(kept), progress, rank)
        f.attrs['complete'] = True
    log.info('rank %d: part %s complete (%d images, %d skipped)', rank, path, stop - start, skipped)


def write_chunks(args, loader, vae, device, f, start, latent_shape, skipped, progress, rank):
    """Encode each batch of the loader and write it to its rows of the part file `f`, one flushed
    chunk at a time. `skipped` is the number of failure records already in the part; returns the
    number after this pass."""
    chunks, test_faults = 0, FaultInjection.from_env(rank)
    for batch in loader:
        for _, bad_path, reason in batch['failures']:
            if not args.skip_bad_images:
                raise ExtractionError(
                    f'cannot read image {bad_path} ({reason}).\nRepair or remove this file, or re-run '
                    'with --skip-bad-images to leave it out (work done so far is kept).')
            log.warning('rank %d: skipping bad image %s (%s)', rank, bad_path, reason)
        n = len(batch['indices'])
        lo = int(batch['indices'][0]) - start  # rows of this chunk in the part: lo .. lo + n
        block = np.zeros((n, *latent_shape), dtype=np.float32)
        row_indices = np.full(n, -1, dtype=np.int64)
        if batch['images'] is not None:
            rows = (batch['ok_indices'] - start - lo).numpy()
            encoded = encode_images(vae, batch['images'].to(device, non_blocking=True))
            block[rows] = encoded.cpu().numpy()
            row_indices[rows] = batch['ok_indices'].numpy()
        skipped = store_chunk(f, lo, block, batch['labels'].numpy(), row_indices, batch['failures'], skipped)
        chunks += 1
        progress.update(n)
        progress.set_postfix(skipped=skipped, refresh=False)
        if test_faults:
            test_faults.at('chunk', chunks)
    return skipped


def store_chunk(f, lo, latents, labels, row_indices, failures, skipped):
    """Writes one chunk to rows lo .. lo + n of the part `f` and flushes it; returns the number of failure records
    now in the part. Any failure of the write raises safe_io.WriteError naming the part and the free space (the
    chunks flushed before stay valid: num_done is updated last)."""
    n = len(latents)
    try:
        f['latents'][lo:lo + n] = latents
        f['labels'][lo:lo + n] = labels
        f['indices'][lo:lo + n] = row_indices
        if failures:
            f['failures'].resize((skipped + len(failures),))
            f['failures'][skipped:] = [json.dumps(r) for r in failures]
        # num_done is updated last, then flushed: it only ever counts rows that are on disk.
        f.attrs['num_done'] = lo + n
        f.flush()
    except Exception as e:
        raise WriteError(f.filename, e, 'latent part') from e
    return skipped + len(failures)


def copy_valid_rows(paths, parts, valid, latents_out, labels_out, indices_out):
    """Copies the rows of the parts whose image was read (`valid` masks), in blocks; returns their source
    indices. Non-finite latents stop the merge."""
    all_indices, pos = [np.zeros(0, dtype=np.int64)], 0
    for p, f, mask in zip(paths, parts, valid):
        for lo in range(0, len(mask), MERGE_BLOCK_ROWS):
            keep = mask[lo:lo + MERGE_BLOCK_ROWS]
            block = f['latents'][lo:lo + len(keep)][keep]
            labels = f['labels'][lo:lo + len(keep)][keep]
            indices = f['indices'][lo:lo + len(keep)][keep]
            if not np.isfinite(block).all():
                raise ExtractionError(f'non-finite latents in {p} around source index {indices[0]}; '
                                      f'delete that part and re-run (try --dtype float32)')
            latents_out[pos:pos + len(block)] = block
            labels_out[pos:pos + len(block)] = labels
            indices_out[pos:pos + len(block)] = indices
            all_indices.append(indices)
            pos += len(block)
    return np.concatenate(all_indices)


def verify_merged(tmp, paths, samples, classes, failures, indices, labels):
    """Each source index exactly once, in ImageFolder order, with its folder's label; raises ExtractionError."""
    expected_labels = np.array([label for _, label in samples], dtype=np.int64)
    failed = np.array([r[0] for r in failures], dtype=np.int64)
    counts = np.bincount(indices, minlength=len(samples))
    problems = []
    if len(indices) != len(samples) - len(failures):
        problems.append(f'{len(indices)} samples written, expected {len(samples)} - {len(failures)} skipped')
    if np.any(np.diff(indices) <= 0):
        problems.append('source indices are not strictly increasing')
    if len(counts) != len(samples) or np.any(counts[failed] != 0) or \
            np.count_nonzero(counts == 1) != len(samples) - len(failed):
        problems.append('not every non-skipped image appears exactly once')
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        problems.append(f'labels outside [0, {len(classes)})')
    if not problems and not np.array_equal(labels, expected_labels[indices]):
        problems.append('labels do not match the class folders')
    if problems:
        raise ExtractionError(f'verification of {tmp} failed: ' + '; '.join(problems) +
                              f'. Delete {os.path.dirname(paths[0])} and re-run.')


def check_parts(args, samples, paths, parts, fingerprint):
    """The parts are complete and usable; returns (failure records, valid-row masks, total valid rows)."""
    for p, f in zip(paths, parts):
        if f.attrs.get('fingerprint') != fingerprint or not f.attrs.get('complete'):
            raise ExtractionError(f'part {p} is not complete; re-run the same command to finish it')
    failures = [r for f in parts for r in read_failures(f)]
    if failures and not args.skip_bad_images:
        listed = '\n'.join(f'  {path}: {reason}' for _, path, reason in failures)
        raise ExtractionError(f'{len(failures)} unreadable image(s):\n{listed}\n'
                              'Repair or remove them, or re-run with --skip-bad-images.')
    valid = [f['indices'][()] >= 0 for f in parts]
    total = int(sum(v.sum() for v in valid))
    if total == 0:
        raise ExtractionError(f'none of the {len(samples)} images could be read; see the log above')
    return failures, valid, total


def merge_parts(args, samples, classes, world, fingerprint):
    """Rank 0: joins the parts into a temporary file, verifies it and renames it to OUTPUT_NAME
    (safe_io.atomic_write: a failed write raises WriteError with the path and the free space)."""
    final = os.path.join(args.save_path, OUTPUT_NAME)
    paths = [part_path(args.save_path, rank, world) for rank in range(world)]
    parts = [h5py.File(p, 'r') for p in paths]

    def write_merged(tmp):
        with h5py.File(tmp, 'w') as out:
            # Contiguous, uncompressed layout: LatentDataset memory-maps it for fast random access.
            latents_out = out.create_dataset('latents', (total, *latent_shape), dtype=np.float32)
            labels_out = out.create_dataset('labels', (total,), dtype=np.int64)
            indices_out = out.create_dataset('source_indices', (total,), dtype=np.int64)
            indices = copy_valid_rows(paths, parts, valid, latents_out, labels_out, indices_out)
            verify_merged(tmp, paths, samples, classes, failures, indices, labels_out[()])
            out.create_dataset('amount', data=np.int64(len(indices)))
            out.create_dataset('latent_size', data=np.int64(latent_shape[-1]))
            out.create_dataset('class_names', data=classes, dtype=h5py.string_dtype())
            out.attrs.update(fingerprint=fingerprint, image_size=args.image_size, vae=args.vae, dtype=args.dtype,
                             exact_fp32=args.exact_fp32, data_path=os.path.abspath(args.data_path),
                             num_images=len(samples), num_skipped=len(failures))
        validate_latent_file(tmp)  # the layout training will check, before the file gets its final name

    try:
        failures, valid, total = check_parts(args, samples, paths, parts, fingerprint)
        latent_shape = tuple(parts[0]['latents'].shape[1:])
        log.info('merging %d part(s) into %s: %d latents of shape %s', world, final, total, latent_shape)
        atomic_write(final, write_merged, 'latent file', content_errors=(ExtractionError, ValueError))
    finally:
        for f in parts:
            f.close()
    if failures:
        log.warning('left out %d bad image(s):\n%s', len(failures),
                    '\n'.join(f'  {path}: {reason}' for _, path, reason in failures))
    log.info('wrote %s: %d latents %s, %d classes, %d bad image(s) skipped',
             final, total, latent_shape, len(classes), len(failures))
    if not args.keep_parts:
        for p in paths:
            os.remove(p)
        parts_dir = os.path.dirname(paths[0])
        if not os.listdir(parts_dir):
            os.rmdir(parts_dir)
        log.info('removed the part files (pass --keep-parts to keep them)')
    return total, len(failures)


def existing_output_is_current(final, fingerprint):
    """True if `final` is a valid output made with the same images and settings."""
    if not os.path.exists(final):
        return False
    try:
        meta = validate_latent_file(final)
    except ValueError as exc:
        log.warning('existing %s is not valid (%s); it will be rebuilt', final, exc)
        return False
    if meta['attrs'].get('fingerprint') != fingerprint:
        raise ExtractionError(f'{final} already exists but was made from other images or settings; '
                              'move it away or choose another --save-path')
    log.info('%s already exists and is valid (%d latents); nothing to do', final, meta['amount'])
    return True


def main(argv=None):
    """Extract latents as described in the module docstring. Returns 0; raises ExtractionError on a
    problem the user must fix."""
    args = parse_args(argv)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    setup_logging('latent_dataset', rank, prefix=f'[latent_dataset %(asctime)s rank {rank}/{world}] %(levelname)s ',
                  all_ranks=True)

    check_args(args)
    samples, classes = scan_and_check(args.data_path, verbose=rank == 0)
    fingerprint = settings_fingerprint(samples, classes, args)
    if rank == 0:
        log.info('found %d images in %d classes under %s', len(samples), len(classes), args.data_path)
    final = os.path.join(args.save_path, OUTPUT_NAME)
    if existing_output_is_current(final, fingerprint):
        return 0

    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    rank, world, device = setup_distributed(timeout_minutes=args.dist_timeout_min)
    set_numerics(device, args.exact_fp32)
    if device.type == 'cpu' and args.dtype == 'float16' and rank == 0:
        log.warning('--dtype float16 on CPU is slow; float32 is recommended there')
    try:
        # Every rank must have listed the same files (e.g. a lagging network file system would not).
        if len(set(all_gather_objects(fingerprint))) != 1:
            raise ExtractionError('ranks see different image lists under --data-path; make sure every '
                                  'process sees the same, complete folder')
        claim = claim_output(final, rank)
        start, stop = rank_bounds(len(samples), rank, world)
        path = part_path(args.save_path, rank, world)
        log.info('rank %d: images [%d, %d) of %d -> %s', rank, start, stop, len(samples), path)
        if rank == 0 and world > 1:
            log.info('the progress bar follows rank 0; the %d ranks together run about %d times its rate',
                     world, world)
        began = time.time()
        kept = (f'the parts in {os.path.dirname(path)} keep every chunk flushed so far; re-run the same command to '
                f'continue from there')
        try:
            with interruptible(lambda: kept, rank):
                stop_together(lambda: extract_part(args, samples, start, stop, path, fingerprint, device, rank,
                                                   world), rank)
                if rank == 0:
                    log.info('shards done in %.1f s', time.time() - began)
                    merge_parts(args, samples, classes, world, fingerprint)
                    elapsed = time.time() - began
                    log.info('all done in %.1f s (%.1f images/s over %d rank(s), VAE loading and merge included)',
                             elapsed, len(samples) / elapsed, world)
        finally:
            claim.release()
    finally:
        # The other ranks leave after the shards' collective; rank 0 merges alone (no collective is pending).
        cleanup_distributed()
    return 0


def stop_together(work, rank):
    """Runs `work` on every rank, then a collective (distributed.first_error): when any rank failed (a bad image,
    a failed write), every rank raises ExtractionError with the first failure's text instead of the others
    waiting for the process group's timeout."""
    error = None
    try:
        work()
    except (ExtractionError, OutputError) as e:
        error = f'rank {rank}: {e}'
    error = first_error(error)
    if error:
        raise ExtractionError(f'{error}\nThe parts keep every chunk flushed before the failure; after fixing the '
                              'cause, re-run the same command to continue.')


def claim_output(final, rank):
    """Rank 0 claims the output (the lock `{final}.lock`, safe_io.Claim) and checks that its folder is writable,
    before any work; every rank raises ExtractionError when that fails (another extraction into the same
    --save-path is refused, naming its host and process)."""
    claim = Claim(f'{final}.lock', final, 'latent file', 'another --save-path')
    note, error = claim_on_rank_zero(
        claim, rank, before=lambda: check_writable(os.path.dirname(os.path.abspath(final)), 'latent folder'))
    if error:
        raise ExtractionError(error)
    if note:
        log.warning('%s', note)
    return claim


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (ExtractionError, OutputError) as error:  # OutputError: the merged file's write (safe_io.WriteError)
        log.error('%s', error)
        sys.exit(1)
