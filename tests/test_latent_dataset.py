"""Tests of latent_dataset.py: extraction (2 ranks on CPU through torchrun, resume, bad images, argument
checks) and the reader training uses (data.LatentDataset). A tiny randomly initialised AutoencoderKL saved to a temporary
folder stands in for the SD-VAE, so nothing is downloaded."""
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import data as datasets
import latent_dataset as ld
from helpers import ROOT, make_image_folder, make_tiny_vae, torchrun, write_latent_file
from safe_io import Claim

IMAGE_SIZE = 16
# (width, height), file extension, PIL mode: non-square, smaller than / larger than 2 x IMAGE_SIZE,
# several formats, grayscale, RGBA and palette images. 9 images over 3 classes.
@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp('latents')
    make_image_folder(base / 'images')
    make_tiny_vae(base / 'vae')
    return base


def cli_args(data, save, vae, *extra, batch=2, workers=0):
    return ['--data-path', str(data), '--save-path', str(save), '--image-size', str(IMAGE_SIZE),
            '--device-batch-size', str(batch), '--num-workers', str(workers), '--seed', '0', '--vae', str(vae),
            *extra]


def extract(args, env=None, check=True):
    """Run the extractor with 2 ranks under torchrun, on CPU and gloo whatever the machine has (two ranks
    cannot share one GPU under NCCL)."""
    return torchrun('latent_dataset.py', args, env={'CUDA_VISIBLE_DEVICES': '', **(env or {})}, check=check)


@pytest.fixture(scope='module')
def extracted(workspace):
    """One 2-rank extraction (parts kept) that several tests inspect or start from."""
    save = workspace / 'out'
    result = extract(cli_args(workspace / 'images', save, workspace / 'vae', '--keep-parts', workers=1))
    return save, result.stderr


def read_all(path):
    with h5py.File(path, 'r') as f:
        return {name: f[name][()] for name in f}


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

def test_scan_matches_torchvision_image_folder(workspace):
    from torchvision.datasets import ImageFolder

    samples, classes = ld.scan_image_folder(str(workspace / 'images'))
    reference = ImageFolder(str(workspace / 'images'))
    assert classes == reference.classes
    assert [(str(workspace / 'images' / p), y) for p, y in samples] == reference.samples


def test_center_crop_arr():
    rng = np.random.default_rng(1)
    # Exactly the target size: unchanged.
    square = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    assert np.array_equal(ld.center_crop_arr(Image.fromarray(square), IMAGE_SIZE), square)
    # Twice the size: one BOX halving, i.e. the (rounded) mean of each 2x2 block.
    double = rng.integers(0, 256, (2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3), dtype=np.uint8)
    blocks = double.reshape(IMAGE_SIZE, 2, IMAGE_SIZE, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(ld.center_crop_arr(Image.fromarray(double), IMAGE_SIZE) - blocks).max() <= 1
    # Short side already at size: only the centre crop, offset (W - size) // 2.
    wide = rng.integers(0, 256, (IMAGE_SIZE, 2 * IMAGE_SIZE + 9, 3), dtype=np.uint8)
    left = (wide.shape[1] - IMAGE_SIZE) // 2
    assert np.array_equal(ld.center_crop_arr(Image.fromarray(wide), IMAGE_SIZE), wide[:, left:left + IMAGE_SIZE])
    # Grayscale and RGBA inputs come out as RGB; odd shapes come out square.
    for mode, size in (('L', (50, 23)), ('RGBA', (19, 77)), ('P', (64, 40))):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        out = ld.center_crop_arr(image, IMAGE_SIZE)
        assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and out.dtype == np.uint8


def test_load_image_range(workspace):
    tensor = ld.load_image(workspace / 'images' / 'dog' / 'img0.png', IMAGE_SIZE)
    assert tensor.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------

def test_two_rank_extraction_layout_and_values(workspace, extracted):
    from diffusers import AutoencoderKL

    save, log_text = extracted
    data = read_all(save / ld.OUTPUT_NAME)
    samples, classes = ld.scan_image_folder(str(workspace / 'images'))
    n, latent_size = len(samples), IMAGE_SIZE // 2  # the tiny VAE downsamples by 2
    assert data['latents'].shape == (n, 8, latent_size, latent_size) and data['latents'].dtype == np.float32
    assert data['labels'].dtype == np.int64 and data['labels'].tolist() == [y for _, y in samples]
    assert data['amount'] == n and data['latent_size'] == latent_size
    assert [c.decode() for c in data['class_names']] == classes == ['cat', 'dog', 'emu']
    assert data['source_indices'].tolist() == list(range(n))
    assert 'rank 1/2' in log_text and 'wrote' in log_text

    # Same numbers as a direct single-process encode of each image.
    vae = AutoencoderKL.from_pretrained(workspace / 'vae').eval()
    images = torch.stack([ld.load_image(workspace / 'images' / p, IMAGE_SIZE) for p, _ in samples])
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    np.testing.assert_allclose(data['latents'][:, :4], posterior.mean.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(data['latents'][:, 4:], posterior.std.numpy(), atol=1e-5, rtol=0)


def test_existing_valid_output_is_not_redone(workspace, extracted, caplog):
    save, _ = extracted
    mtime = os.stat(save / ld.OUTPUT_NAME).st_mtime_ns
    with caplog.at_level(logging.INFO, logger='latent_dataset'):
        assert ld.main(cli_args(workspace / 'images', save, workspace / 'vae')) == 0
    assert 'already exists and is valid' in caplog.text
    assert os.stat(save / ld.OUTPUT_NAME).st_mtime_ns == mtime


def test_killed_rank_resumes_and_complete_part_is_reused(workspace, extracted, tmp_path):
    save, _ = extracted
    out = tmp_path / 'out'
    part0, part1 = out / 'parts' / 'part_00000_of_00002.hdf5', out / 'parts' / 'part_00001_of_00002.hdf5'
    # Rank 0's part is already complete (taken from the reference run: same images and settings, so the
    # same fingerprint). This keeps the crash below free of a race on how far rank 0 got.
    part0.parent.mkdir(parents=True)
    shutil.copy2(save / 'parts' / part0.name, part0)
    mtime = os.stat(part0).st_mtime_ns

    args = cli_args(workspace / 'images', out, workspace / 'vae', '--keep-parts')
    crashed = extract(args, env={'SOFLOW_TEST_CRASH': 'chunk:1@1'}, check=False)  # rank 1 killed after 1 chunk
    assert crashed.returncode != 0
    assert 'SIGKILL on rank 1 at chunk 1' in crashed.stderr
    assert not (out / ld.OUTPUT_NAME).exists()
    with h5py.File(part1, 'r') as f:
        assert f.attrs['num_done'] == 2 and not f.attrs['complete']

    result = extract(args)
    assert 'part_00000_of_00002.hdf5 is complete (4 images); not recomputing it' in result.stderr
    assert 'part_00001_of_00002.hdf5 after its last flushed chunk: 2 of 5 images already done' in result.stderr
    assert os.stat(part0).st_mtime_ns == mtime
    expected, got = read_all(save / ld.OUTPUT_NAME), read_all(out / ld.OUTPUT_NAME)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_a_failed_part_write_stops_every_rank_and_names_the_part(workspace, extracted, tmp_path):
    """Rank 1 cannot create its part (its path is a folder): both ranks stop at once with the part's path and the
    free space, rank 0's finished part is kept, and no output appears."""
    out = tmp_path / 'out'
    (out / 'parts' / 'part_00001_of_00002.hdf5').mkdir(parents=True)
    began = time.time()
    failed = extract(cli_args(workspace / 'images', out, workspace / 'vae', '--keep-parts'), check=False)
    assert failed.returncode != 0 and time.time() - began < 300  # not the process group's timeout
    assert re.search(r'rank 1: could not write latent part \S*part_00001_of_00002.hdf5 .*GiB free', failed.stderr)
    assert 're-run the same command to continue' in failed.stderr
    assert not (out / ld.OUTPUT_NAME).exists()
    with h5py.File(out / 'parts' / 'part_00000_of_00002.hdf5', 'r') as f:
        assert f.attrs['complete']


def test_second_extraction_into_one_folder_is_refused_and_write_failures_lose_nothing(workspace, extracted,
                                                                                      tmp_path, monkeypatch):
    save, _ = extracted
    out = tmp_path / 'out'
    args = cli_args(workspace / 'images', out, workspace / 'vae')
    held = Claim(out / f'{ld.OUTPUT_NAME}.lock', out / ld.OUTPUT_NAME, 'latent file')
    held.acquire()  # a live process (this one) extracting into the same folder
    with pytest.raises(ld.ExtractionError, match=rf'in use by another process: pid {os.getpid()}.*another --save-path'):
        ld.main(args)
    assert not (out / 'parts').exists()  # refused before any work
    held.release()

    def full_disk(self):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(h5py.File, 'flush', full_disk)
    with pytest.raises(ld.ExtractionError, match=r'could not write latent part .*No space left.*GiB free'):
        ld.main(args)
    monkeypatch.undo()
    assert ld.main(args) == 0  # the same command again: it finishes
    assert not (out / f'{ld.OUTPUT_NAME}.lock').exists() and not list(out.glob('*.tmp*'))
    expected, got = read_all(save / ld.OUTPUT_NAME), read_all(out / ld.OUTPUT_NAME)
    assert expected.keys() == got.keys()
    for name in expected:  # one process with every core against the reference's 2 ranks of one thread each
        if name == 'latents':
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(expected[name], got[name]), name


def test_bad_image_stops_or_is_skipped(workspace, tmp_path, caplog):
    images = tmp_path / 'images'
    shutil.copytree(workspace / 'images', images)
    good = (images / 'cat' / 'img1.jpg').read_bytes()
    bad = images / 'dog' / 'broken.jpg'  # sorts first in 'dog': source index 3
    bad.write_bytes(good[:len(good) // 2])  # truncated JPEG
    args = cli_args(images, tmp_path / 'out', workspace / 'vae', workers=1)

    with pytest.raises(ld.ExtractionError, match='broken.jpg') as error:
        ld.main(args)
    assert '--skip-bad-images' in str(error.value)
    assert not (tmp_path / 'out' / ld.OUTPUT_NAME).exists()

    with caplog.at_level(logging.INFO, logger='latent_dataset'):
        assert ld.main(args + ['--skip-bad-images']) == 0
    assert str(bad) in caplog.text and '1 bad image(s) skipped' in caplog.text
    data = read_all(tmp_path / 'out' / ld.OUTPUT_NAME)
    samples, _ = ld.scan_image_folder(str(images))
    assert data['amount'] == len(samples) - 1 == 9
    assert data['source_indices'].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert data['labels'].tolist() == [samples[i][1] for i in data['source_indices']]
    assert np.isfinite(data['latents']).all()
    assert not (tmp_path / 'out' / 'parts').exists()  # removed after the merge (no --keep-parts)


@pytest.mark.parametrize('setup, message', [
    ('missing', 'is not an existing folder'),
    ('no_classes', 'no class sub-folders'),
    ('no_images', 'no images with extensions'),
    ('bad_size', 'multiple of 8'),
])
def test_argument_errors(tmp_path, setup, message):
    data = tmp_path / 'data'
    if setup != 'missing':
        data.mkdir()
    if setup == 'no_images':
        (data / 'a').mkdir()
        (data / 'a' / 'readme.txt').write_text('x')
    if setup == 'bad_size':
        (data / 'a').mkdir()
        Image.new('RGB', (8, 8)).save(data / 'a' / 'x.png')
    args = cli_args(data, tmp_path / 'out', tmp_path / 'no_vae')
    if setup == 'bad_size':
        args[args.index('--image-size') + 1] = '12'
    with pytest.raises(ld.ExtractionError, match=message):
        ld.main(args)


def test_script_reports_errors_without_traceback(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, 'latent_dataset.py'), '--data-path', str(tmp_path / 'nope'),
           '--save-path', str(tmp_path / 'out')]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert 'is not an existing folder' in result.stderr and 'Traceback' not in result.stderr


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def test_dataset_reads(extracted):
    save, _ = extracted
    path = save / ld.OUTPUT_NAME
    data = read_all(path)
    dataset = datasets.LatentDataset(path)
    assert dataset.read_mode == 'mmap'
    assert len(dataset) == 9 and dataset.latent_size == 8 and dataset.data_channels == 4
    assert dataset.num_classes == 3 and dataset.class_names == ['cat', 'dog', 'emu']

    latent, label = dataset[4]
    assert latent.dtype == torch.float32 and label.dtype == torch.int64
    assert np.array_equal(latent.numpy(), data['latents'][4]) and label.item() == data['labels'][4]

    # Unsorted, with a repeat: returned in the requested order.
    order = [7, 2, 2, 0, 8, 5]
    latents, labels = dataset.get_batch(order)
    assert latents.shape == (6, 8, 8, 8) and labels.dtype == torch.int64
    assert np.array_equal(latents.numpy(), np.stack([dataset[i][0].numpy() for i in order]))
    assert labels.tolist() == data['labels'][order].tolist()
    assert torch.equal(dataset[torch.tensor(order)][0], latents)
    with pytest.raises(IndexError):
        dataset.get_batch([9])
    with pytest.raises(IndexError):
        dataset[9]

    in_memory = datasets.LatentDataset(path, load_into_memory=True)
    assert in_memory.read_mode == 'memory'
    assert all(torch.equal(a, b) for a, b in zip(in_memory.get_batch(order), (latents, labels)))

    forced = datasets.LatentDataset(path, mmap=False)
    assert forced.read_mode == 'h5py'
    assert all(torch.equal(a, b) for a, b in zip(forced.get_batch(order), (latents, labels)))
    assert torch.equal(forced[4][0], latent)

    # A chunked, compressed copy is read through h5py instead of the memory map.
    compressed = save.parent / 'compressed.hdf5'
    with h5py.File(compressed, 'w') as f:
        for name, value in data.items():
            if name == 'latents':
                f.create_dataset(name, data=value, chunks=(2, 8, 8, 8), compression='gzip')
            else:
                f.create_dataset(name, data=value)
    chunked = datasets.LatentDataset(compressed)
    assert chunked.read_mode == 'h5py'
    assert all(torch.equal(a, b) for a, b in zip(chunked.get_batch(order), (latents, labels)))


def test_dataset_in_dataloader_workers(extracted):
    save, _ = extracted
    dataset = datasets.LatentDataset(save / ld.OUTPUT_NAME)
    dataset.get_batch([0])  # opens the file in this process before the workers fork
    batches = torch.utils.data.BatchSampler(range(len(dataset)), 4, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None, num_workers=2)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([latents for latents, _ in batches]), dataset.get_batch(range(9))[0])
    # The standard per-sample path through a DataLoader works as well.
    per_sample = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1)
    assert torch.equal(torch.cat([latents for latents, _ in per_sample]), dataset.get_batch(range(9))[0])


def test_release_imagenet_dataset(tmp_path):
    """`from latent_dataset import ImagenetDataset`: ImagenetDataset(dataset_path) over dataset_path/
    imagenet_latent.hdf5, `amount`, `latent_size`, items (latent [8, L, L] float32, label int64), opened in each
    DataLoader worker (a distributed shard here, as the release reads it)."""
    latents = np.random.default_rng(0).standard_normal((6, 8, 4, 4)).astype(np.float32)
    write_latent_file(tmp_path / ld.OUTPUT_NAME, n=6, latents=latents, labels=np.array([3, 1, 4, 1, 5, 9]))
    dataset = ld.ImagenetDataset(str(tmp_path))
    assert (dataset.amount, dataset.latent_size, len(dataset)) == (6, 4, 6)
    latent, label = dataset[2]
    assert latent.shape == (8, 4, 4) and latent.dtype == torch.float32 and np.array_equal(latent.numpy(), latents[2])
    assert label.dtype == torch.int64 and label.item() == 4
    dataset.get_batch([0])  # a handle in this process; the workers open their own
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=1))
    assert [b[1].tolist() for b in batches] == [[1, 1], [9]] and batches[0][0].shape == (2, 8, 4, 4)
    assert torch.equal(batches[0][0][1], torch.from_numpy(latents[3]))
    with pytest.raises(FileNotFoundError, match='run latent_dataset.py first'):
        ld.ImagenetDataset(str(tmp_path / 'empty'))


@pytest.mark.parametrize('exact_fp32', [False, True])
def test_extraction_numerics_default_to_pytorchs(exact_fp32, monkeypatch):
    """By default the extractor leaves PyTorch's numerics as they are (the release's: cuDNN TF32 convolutions on
    CUDA); --exact-fp32 turns TF32 off through distributed.configure_backends. Parts made either way differ."""
    calls = []
    monkeypatch.setattr(ld, 'configure_backends', lambda device, tf32: calls.append((device.type, tf32)))
    args = ld.parse_args(['--data-path', 'x', '--save-path', 'y'] + (['--exact-fp32'] if exact_fp32 else []))
    assert args.exact_fp32 == exact_fp32
    ld.set_numerics(torch.device('cpu'), args.exact_fp32)
    ld.set_numerics(torch.device('cuda'), args.exact_fp32)  # a device object only: nothing runs on it
    assert calls == ([('cuda', False)] if exact_fp32 else [])
    other = ld.parse_args(['--data-path', 'x', '--save-path', 'y'] + ([] if exact_fp32 else ['--exact-fp32']))
    samples, classes = [('a/1.png', 0)], ['a']
    assert ld.settings_fingerprint(samples, classes, args) != ld.settings_fingerprint(samples, classes, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA: the TF32 settings act on CUDA only')
def test_extraction_default_keeps_cudnn_tf32_on_cuda():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    ld.set_numerics(torch.device('cuda'), exact_fp32=False)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_sample_latents():
    mean, std = 0.5, 2.0
    params = torch.cat([torch.full((64, 4, 16, 16), mean), torch.full((64, 4, 16, 16), std)], dim=1)
    latents = datasets.sample_latents(params, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (64, 4, 16, 16) and latents.dtype == torch.float32
    assert abs(latents.mean().item() - mean * datasets.LATENT_SCALE) < 0.01
    assert abs(latents.std().item() - std * datasets.LATENT_SCALE) < 0.01
    again = datasets.sample_latents(params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latents, again)
    # std = 0 gives back the scaled mean exactly; latent_scale is honoured.
    exact = torch.cat([torch.full((2, 4, 4, 4), mean), torch.zeros(2, 4, 4, 4)], dim=1)
    assert torch.equal(datasets.sample_latents(exact, latent_scale=1.0), torch.full((2, 4, 4, 4), mean))
    with pytest.raises(ValueError):
        datasets.sample_latents(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize('overrides, message', [
    ({'labels': None}, 'missing dataset'),
    ({'latents': np.zeros((4, 8, 4, 4), np.float64)}, 'float32'),
    ({'latents': np.zeros((4, 8, 4), np.float32)}, r'\[N, C, L, L\]'),
    ({'labels': np.arange(4, dtype=np.int32)}, 'int64'),
    ({'amount': np.int64(5)}, 'amount mismatch'),
    ({'latent_size': np.int64(8)}, 'latent_size is 8'),
    ({'latents': np.zeros((4, 7, 4, 4), np.float32)}, 'even number of channels'),
    ({'labels': np.array([0, -1, 2, 3])}, 'negative label'),
])
def test_dataset_validation_errors(tmp_path, overrides, message):
    path = tmp_path / 'bad.hdf5'
    write_latent_file(path, **overrides)
    with pytest.raises(ValueError, match=message) as error:
        datasets.LatentDataset(path)
    assert str(path) in str(error.value)


def test_dataset_validation_file_errors(tmp_path):
    with pytest.raises(ValueError, match='no such file'):
        datasets.LatentDataset(tmp_path / 'absent.hdf5')
    garbage = tmp_path / 'garbage.hdf5'
    garbage.write_bytes(b'not hdf5 at all')
    with pytest.raises(ValueError, match='not a readable HDF5 file'):
        datasets.LatentDataset(garbage)
    good = tmp_path / 'good.hdf5'
    write_latent_file(good)
    assert len(datasets.LatentDataset(good)) == 4 and datasets.LatentDataset(good).num_classes == 4


def test_scan_follows_no_symlink_loops_and_names_what_it_skipped(tmp_path, caplog):
    """Links back to the class folder, to the data root and into another class would repeat the images under
    wrong labels (6 images became 246 latents); they are skipped, counted and named. A link to a folder of
    images outside the tree is followed, as ImageFolder does."""
    make_image_folder(tmp_path / 'images')
    images = tmp_path / 'images'
    expected, _ = ld.scan_image_folder(str(images))
    os.symlink('..', images / 'cat' / 'loop_to_root')
    os.symlink('.', images / 'dog' / 'loop_to_itself')
    os.symlink(str(images / 'cat'), images / 'emu' / 'into_cat')
    (tmp_path / 'extra').mkdir()
    Image.new('RGB', (9, 9)).save(tmp_path / 'extra' / 'x.png')
    os.symlink(str(tmp_path / 'extra'), images / 'dog' / 'more')
    with caplog.at_level(logging.WARNING, logger='latent_dataset'):
        samples, classes = ld.scan_image_folder(str(images))
    assert sorted(samples) == sorted(expected + [(os.path.join('dog', 'more', 'x.png'), 1)])
    assert 'skipped 3 linked folder(s)' in caplog.text
    for name in ('cat/loop_to_root', 'dog/loop_to_itself', 'emu/into_cat'):
        assert name in caplog.text


def test_ctrl_c_keeps_the_flushed_chunks_and_says_how_to_resume(workspace, extracted, tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGINT) and SIGTERM (what torchrun forwards) after the first chunk: status 130, a line naming the
    parts kept and the command to continue; the same command then finishes with the reference's values."""
    save, _ = extracted
    out = tmp_path / 'out'
    args = cli_args(workspace / 'images', out, workspace / 'vae', '--keep-parts')
    part = out / 'parts' / 'part_00000_of_00001.hdf5'
    for signum in ('SIGINT', 'SIGTERM'):
        monkeypatch.setenv('SOFLOW_TEST_CRASH', f'chunk:{1 if signum == "SIGINT" else 2}={signum}')
        with pytest.raises(SystemExit) as stop:
            ld.main(args)
        assert stop.value.code == 130
        assert f'interrupted: the parts in {out / "parts"} keep every chunk flushed so far; re-run the same ' \
               f'command to continue' in capsys.readouterr().err
        with h5py.File(part, 'r') as f:
            assert f.attrs['num_done'] == (2 if signum == 'SIGINT' else 6) and not f.attrs['complete']  # 2 per chunk
        assert not (out / f'{ld.OUTPUT_NAME}.lock').exists()
    monkeypatch.delenv('SOFLOW_TEST_CRASH')
    assert ld.main(args) == 0
    expected, got = read_all(save / ld.OUTPUT_NAME), read_all(out / ld.OUTPUT_NAME)
    assert np.array_equal(expected['labels'], got['labels'])
    assert np.allclose(expected['latents'], got['latents'], atol=1e-5)  # one process against 2 ranks
