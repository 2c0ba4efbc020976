"""Shared test utilities: generated data sets, config files and torchrun launches."""
import os
import pickle
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from config import write_variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cifar_folder(root, per_batch=8, seed=0):
    """A CIFAR-10 python-format folder (5 training batches) of random images."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch, f)
    return root


def write_config(base_name, path, **changes):
    return write_variant(os.path.join(ROOT, "configs", base_name), path, **changes)


def torchrun(script, args, nproc=2, env=None, check=True, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


# Images for the latent extractor: (width, height), extension, PIL mode -- non-square, smaller and larger
# than 2 x the image size, several formats, grayscale, RGBA and palette images; 9 images over 3 classes.
IMAGE_SPECS = {
    'cat': [((40, 24), 'png', 'RGB'), ((70, 90), 'jpg', 'RGB'), ((16, 16), 'png', 'L')],
    'dog': [((33, 65), 'png', 'RGBA'), ((100, 40), 'JPEG', 'RGB')],
    'emu': [((20, 18), 'bmp', 'RGB'), ((64, 64), 'png', 'P'), ((50, 31), 'webp', 'RGB'), ((17, 300), 'jpeg', 'L')],
}


def make_image_folder(root, seed=0):
    rng = np.random.default_rng(seed)
    for name, specs in IMAGE_SPECS.items():
        os.makedirs(root / name)
        for k, ((width, height), ext, mode) in enumerate(specs):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f'img{k}.{ext}')
    (root / 'cat' / 'notes.txt').write_text('not an image: ignored')


def make_tiny_vae(folder):
    """A small randomly initialised AutoencoderKL (2x down-sampling, 4 latent channels), saved with
    save_pretrained so that the real from_pretrained loading code reads it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32)
    vae.save_pretrained(folder)
    return vae
