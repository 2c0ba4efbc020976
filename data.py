"""Training data: CIFAR-10, the scikit-learn digits, and ImageNet SD-VAE latents, behind one interface.

Every dataset has `get_batch(indices) -> (x, labels)` on the CPU and `prepare(x, generator=None)`, run on
the training device, that turns a stored batch into model inputs (latent sampling, augmentation) and
returns (samples, augment_labels). The order of samples is a pure function of (seed, step), so a resumed
run reads exactly the batches an uninterrupted one would.
"""
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from augmentation import AugmentPipe

CIFAR_FOLDER = "cifar-10-batches-py"


class TensorDataset:
    """A dataset held in memory as [-1, 1] float images and int64 labels."""

    def __init__(self, images, labels, augment=None):
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self):
        return len(self.images)

    def get_batch(self, indices):
        return self.images[indices], self.labels[indices]

    def prepare(self, x, generator=None):
        if self.augment is None:
            return x, None
        return self.augment(x, generator=generator)


def load_cifar10(root, download=False):
    """The 50,000 CIFAR-10 training images as [-1, 1] floats, read from the python-format batches."""
    folder = os.path.join(root, CIFAR_FOLDER)
    if download:
        import torchvision
        torchvision.datasets.CIFAR10(root, train=True, download=True)
    files = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {missing[0]} is missing. Point dataset_path at the folder that contains "
            f"'{CIFAR_FOLDER}', or set 'download: true' in the config to fetch it with torchvision.")
    images, labels = [], []
    for path in files:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        try:
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a CIFAR-10 python batch ({e})") from None
    images = torch.from_numpy(np.concatenate(images)).float() / 127.5 - 1
    return images, torch.tensor(labels, dtype=torch.long)


def load_digits(data_size=8, channels=1):
    """The 1,797 8 x 8 handwritten digits shipped with scikit-learn, as [-1, 1] floats (no download)."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1
    if data_size != 8:
        images = F.interpolate(images, size=(data_size, data_size), mode="bilinear", align_corners=False)
    return images.repeat(1, channels, 1, 1).contiguous(), torch.tensor(digits.target, dtype=torch.long)


class LatentBatches:
    """ImageNet SD-VAE posteriors (mean | std) from `imagenet_latent.hdf5`; `prepare` draws the latent."""

    def __init__(self, path, latent_scale, load_into_memory):
        from latent_dataset import LatentDataset
        if os.path.isdir(path):
            path = os.path.join(path, "imagenet_latent.hdf5")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ImageNet latents not found at {path}; run latent_dataset.py first and point "
                                    f"dataset_path at its --save-path")
        self.dataset = LatentDataset(path, load_into_memory=load_into_memory)
        self.latent_scale = latent_scale

    def __len__(self):
        return len(self.dataset)

    def get_batch(self, indices):
        return self.dataset.get_batch(indices)

    def prepare(self, params, generator=None):
        from latent_dataset import sample_latents
        return sample_latents(params, self.latent_scale, generator=generator), None


def build_dataset(cfg):
    if cfg.dataset_type == "Imagenet":
        dataset = LatentBatches(cfg.dataset_path, cfg.latent_scale, cfg.load_into_memory)
        if dataset.dataset.latent_size != cfg.data_size:
            raise ValueError(f"{cfg.dataset_path}: latents are {dataset.dataset.latent_size} x "
                             f"{dataset.dataset.latent_size} but data_size is {cfg.data_size}")
        return dataset
    if cfg.dataset_type == "CIFAR10":
        images, labels = load_cifar10(cfg.dataset_path, cfg.download)
        augment = AugmentPipe(p=cfg.augment_p) if cfg.augment_p > 0 else None
        return TensorDataset(images, labels, augment)
    images, labels = load_digits(cfg.data_size, cfg.data_channels)
    return TensorDataset(images, labels)


class StepBatches(torch.utils.data.Dataset):
    """Item k = this rank's share of global batch k. Epoch e is a permutation seeded by (seed, e); each
    epoch has len(dataset) // batch_size full batches, so the position in the epoch is step % that."""

    def __init__(self, dataset, global_batch, rank, world_size, seed):
        self.dataset = dataset
        self.global_batch = global_batch
        self.rank = rank
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch "
                             f"(batch_size={global_batch}); lower batch_size")
        self._epoch, self._perm = None, None

    def __len__(self):
        return 2 ** 62  # indexed by step, never exhausted

    def indices(self, step):
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=g)
        start = position * self.global_batch + self.rank * self.local_batch
        return self._perm[start:start + self.local_batch]

    def __getitem__(self, step):
        return self.dataset.get_batch(self.indices(step))


def batch_loader(dataset, global_batch, rank, world_size, seed, first_step, last_step, num_workers, pin_memory,
                 prefetch_factor=None):
    """Iterator over this rank's batches for steps first_step .. last_step - 1 (`num_workers` and
    `prefetch_factor` are the DataLoader's, as in the release's configs)."""
    batches = StepBatches(dataset, global_batch, rank, world_size, seed)
    loader = torch.utils.data.DataLoader(batches, sampler=range(first_step, last_step), batch_size=None,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         prefetch_factor=prefetch_factor if num_workers > 0 else None,
                                         persistent_workers=False,
                                         # its own generator: iterator start-up must not draw from the
                                         # global random state, which checkpoints restore
                                         generator=torch.Generator().manual_seed(seed))
    return loader, batches.steps_per_epoch
