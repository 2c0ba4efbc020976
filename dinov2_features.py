"""Frechet distance in DINOv2 features (FD-DINOv2): the network, its preprocessing, float64 statistics and the
cache of reference statistics, following the protocol of EDM2's metrics script (Karras et al. 2024,
`calculate_metrics.py`, its `DINOv2Detector` with the default `resize_mode='torch'`, itself modelled on dgm-eval,
Stein et al. 2023):

- network: DINOv2 ViT-L/14 (LVD-142M weights), built here by timm as `vit_large_patch14_dinov2` for 224 x 224
  inputs (a 16 x 16 patch grid). The released weights carry a 37 x 37 grid of position embeddings (518 x 518
  inputs); they are resampled to 16 x 16 the way the DINOv2 hub model does it at run time for a 224 x 224 input
  (`interpolate_pos_encoding`: bicubic, scale factor (16 + 0.1) / 37, no antialiasing, class-token embedding
  kept), which is what EDM2's `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')` runs. timm's own
  resampling (bicubic to an exact size, antialiased) would give other position embeddings, so it is not used.
- preprocessing: uint8 RGB images as float32 in [0, 255], resized to 224 x 224 by `torch.nn.functional.interpolate`
  (bicubic, antialias=True, align_corners=False; values not clamped), divided by 255, then ImageNet's mean
  (0.485, 0.456, 0.406) subtracted and the result divided by the std (0.229, 0.224, 0.225), per channel.
- features: the model's default output, the class token after the final LayerNorm (1024-d, float32; timm:
  num_classes=0 with token pooling, DINOv2 hub: `x_norm_clstoken`).
- statistics: float64 sums of the features and of their outer products, mu = sum / n and
  sigma = (sum of outer products - n mu mu^T) / (n - 1), as EDM2 accumulates them; the distance is
  evaluator.frechet_distance (scipy's sqrtm).

Weights: `--dinov2 PATH` (timm's model.safetensors or the original dinov2_vitl14_pretrain.pth), else the Hugging
Face Hub cache (timm/vit_large_patch14_dinov2.lvd142m) or torch hub's checkpoint folder; nothing is downloaded.
Reference statistics are cached (<cache>/dinov2_ref_stats/) under a key naming the network (architecture, a
digest of its weights), the preprocessing and the reference images' source.
"""
import dataclasses
import hashlib
import logging
import math
from pathlib import Path

import numpy as np

from safe_io import atomic_write

log = logging.getLogger("dinov2_features")

DINOV2_ARCH = "vit_large_patch14_dinov2"  # timm's name of DINOv2 ViT-L/14
HUB_REPO = "timm/vit_large_patch14_dinov2.lvd142m"
HUB_FILENAME = "model.safetensors"
ORIGINAL_FILENAME = "dinov2_vitl14_pretrain.pth"
ORIGINAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
POS_EMBED_OFFSET = 0.1  # the DINOv2 hub model's offset of the grid size in its position-embedding resampling
STATS_VERSION = 1  # bump when the cached statistics' layout or meaning changes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class MissingWeightsError(FileNotFoundError):
    """The DINOv2 weights are neither at the given path nor in a local cache; the message says how to get them."""


class WeightsError(ValueError):
    """A weights file that does not fit the DINOv2 network; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The images' way into the network (see the module docstring); `describe()` enters the cache key."""
    resolution: int = 224
    interpolation: str = "bicubic"
    antialias: bool = True
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def describe(self):
        return (f"uint8 RGB -> float32 [0, 255] -> interpolate {self.resolution}x{self.resolution} "
                f"{self.interpolation} antialias={self.antialias} align_corners=False, unclamped -> /255 -> "
                f"-mean {self.mean} -> /std {self.std}")

    def __call__(self, images, device):
        """Network input [B, 3, R, R] (float32, on `device`) of images [B, H, W, 3] in [0, 255] (NumPy or torch)."""
        import torch
        import torch.nn.functional as F
        x = torch.as_tensor(images).to(device)
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        size = (self.resolution, self.resolution)
        x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=self.antialias)
        x = x / 255
        x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return x / torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------------
# Weights and network
# --------------------------------------------------------------------------------------------------

def _hub_cached_file():
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(HUB_REPO, HUB_FILENAME)
    return Path(found) if isinstance(found, str) else None


def _torch_hub_file():
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints" / ORIGINAL_FILENAME


def how_to_get_weights():
    return (f"Get them on a machine with network access: `hf download {HUB_REPO} {HUB_FILENAME}` (into the "
            f"Hugging Face Hub cache, found there by default; copy that cache or the file), or download "
            f"{ORIGINAL_URL}; then pass the file's path with --dinov2 PATH (training: fid_dinov2_weights: PATH)")


def find_weights(path=None):
    """The DINOv2 ViT-L/14 weights file: `path`, else the Hub cache's timm file, else torch hub's checkpoint of the
    original weights. Nothing is downloaded; MissingWeightsError says which files were looked for and how to get
    them."""
    if path is not None:
        if not Path(path).is_file():
            raise MissingWeightsError(f"DINOv2 weights {path}: file not found. {how_to_get_weights()}")
        return Path(path)
    for found in (_hub_cached_file(), _torch_hub_file()):
        if found is not None and found.is_file():
            return found
    from huggingface_hub.constants import HF_HUB_CACHE
    raise MissingWeightsError(
        f"DINOv2 ViT-L/14 weights not found: neither {HUB_FILENAME} of {HUB_REPO} in the Hugging Face Hub cache "
        f"({HF_HUB_CACHE}) nor {_torch_hub_file()}. {how_to_get_weights()}")


def _read_state_dict(path):
    import torch
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"DINOv2 weights {path}: unreadable ({type(err).__name__}: {err})") from err
    return state.get("model", state) if isinstance(state, dict) else state


def dinov2_pos_embed(pos_embed, grid, offset=POS_EMBED_OFFSET):
    """Position embeddings [1, 1 + M*M, D] (class token first) resampled to a grid x grid patch grid as the DINOv2
    hub model does for its input size at run time: the patch part through bicubic interpolation with scale factor
    (grid + offset) / M (not an exact output size; no antialiasing), the class token's embedding unchanged."""
    import torch
    import torch.nn.functional as F
    tokens = pos_embed.shape[1] - 1
    m = math.isqrt(tokens)
    if m * m != tokens:
        raise WeightsError(f"position embeddings of {tokens} patches are not a square grid")
    if m == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (grid + offset) / m
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic")
    if tuple(patches.shape[-2:]) != (grid, grid):
        raise WeightsError(f"resampling {m}x{m} position embeddings gave {tuple(patches.shape[-2:])}, not {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def build_network(weights=None, arch=DINOV2_ARCH, resolution=224, **arch_kwargs):
    """timm's DINOv2 ViT (`arch`, sizes overridable through `arch_kwargs`) for resolution x resolution inputs,
    its output the normed class token; with `weights` (a file) loaded, the position embeddings resampled by
    dinov2_pos_embed; without, timm's random initialisation. Evaluation mode, no gradients."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    model = timm.create_model(arch, pretrained=False, img_size=resolution, num_classes=0, **arch_kwargs)
    if weights is not None:
        state = _read_state_dict(weights)
        if not isinstance(state, dict) or "pos_embed" not in state:
            raise WeightsError(f"DINOv2 weights {weights}: no 'pos_embed' entry; not a DINOv2 ViT state dict")
        state = dict(state, pos_embed=dinov2_pos_embed(state["pos_embed"], model.patch_embed.grid_size[0]))
        try:
            model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
        except RuntimeError as err:
            raise WeightsError(f"DINOv2 weights {weights} do not fit timm's {arch}: {err}") from err
    return model.eval().requires_grad_(False)


def _network_description(network):
    """Architecture and a SHA-256 digest of every parameter and buffer (the weights as the network holds them)."""
    import torch
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    blocks = network.blocks
    return (f"timm {type(network).__name__} patch {network.patch_embed.patch_size} grid "
            f"{network.patch_embed.grid_size} dim {network.embed_dim} depth {len(blocks)} heads "
            f"{blocks[0].attn.num_heads} output normed class token; weights sha256 {digest.hexdigest()}")


# --------------------------------------------------------------------------------------------------
# Features and statistics
# --------------------------------------------------------------------------------------------------

class Moments:
    """Running float64 sums of features [n, D] and of their outer products (EDM2's accumulation); statistics()
    gives mu and the unbiased covariance. Sums from several processes add up (merge)."""

    def __init__(self):
        self.count, self.total, self.outer = 0, None, None

    def add(self, features):
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"expected features [N, D], got shape {features.shape}")
        if self.total is None:
            self.total = np.zeros(features.shape[1])
            self.outer = np.zeros((features.shape[1],) * 2)
        self.count += len(features)
        self.total += features.sum(axis=0)
        self.outer += features.T @ features
        return self

    def statistics(self):
        """(mu [D], sigma [D, D]), float64."""
        if self.count < 2:
            raise ValueError(f"FD-DINOv2 needs at least 2 images, got {self.count}")
        mu = self.total / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


class DINOv2Features:
    """Features of uint8 images [N, H, W, 3] through `network` (build_network) after `preprocessing`, on `device`
    (default: CUDA when available), in exact float32 (no TF32 on CUDA). `identity` names the network, its weights
    and the preprocessing (the cache key of reference statistics)."""

    def __init__(self, network, preprocessing=Preprocessing(), device=None):
        import torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.preprocessing = preprocessing
        self._identity = f"{_network_description(network)}; preprocessing {preprocessing.describe()}"
        self.network = network.to(self.device)

    @property
    def identity(self):
        return self._identity

    def forward(self, images):
        """Features [B, D] (float32 torch tensor on the device) of one batch."""
        import torch
        from distributed import tf32_mode
        with torch.no_grad(), tf32_mode(False):
            return self.network(self.preprocessing(images, self.device)).float()

    def features_of(self, images):
        return self.forward(images).cpu().numpy()

    def moments(self, batches, desc="DINOv2 features", total=None):
        """Moments of the features of every batch of `batches` (an iterable of uint8 [B, H, W, 3])."""
        from tqdm import tqdm
        moments = Moments()
        for batch in tqdm(batches, desc=desc, unit="batch", total=total):
            moments.add(self.features_of(batch))
        return moments


def batches_of(images, batch_size):
    """Consecutive slices of `batch_size` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return (images[start:start + batch_size] for start in range(0, len(images), batch_size))


# --------------------------------------------------------------------------------------------------
# Reference images and their cached statistics
# --------------------------------------------------------------------------------------------------

def folder_images(folder):
    """The image files under `folder` (recursively, sorted); ValueError naming the folder when there are none."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ValueError(f"reference folder {folder}: {len(files)} image file(s) ({', '.join(IMAGE_SUFFIXES)}); "
                         f"FD-DINOv2 needs at least 2")
    return files


def folder_signature(folder, files):
    """The files' names (relative), sizes and modification times: a changed folder gets a new cache key."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"folder {Path(folder).resolve()} {len(files)} files {digest.hexdigest()}"


def folder_batches(files, batch_size):
    """uint8 RGB batches of the image files, consecutive files of the same size together (each image is resized
    on its own, so the grouping changes nothing of the features)."""
    from PIL import Image
    batch = []
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(array)
    if batch:
        yield np.stack(batch)


def stats_cache_path(features, source_name, source_signature, cache_folder):
    """(path, key) of the cached reference statistics: the key names the network and weights, the preprocessing
    (features.identity) and the reference source."""
    key = hashlib.sha256(f"v{STATS_VERSION}|{features.identity}|{source_signature}".encode()).hexdigest()
    return Path(cache_folder) / f"{source_name}-{key[:20]}.npz", key


def _load_cached_stats(path, key):
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["key"]) != key:
                return None
            return cached["mu"], cached["sigma"]
    except Exception as err:  # a corrupt or foreign file is recomputed, not fatal
        log.warning("ignoring unreadable DINOv2 reference statistics %s (%s)", path, err)
        return None


def reference_statistics(features, batches, source_name, source_signature, cache_folder, total=None):
    """(mu, sigma) of the reference images (`batches`, read only when not cached), from or into the cache."""
    path, key = stats_cache_path(features, source_name, source_signature, cache_folder)
    cached = _load_cached_stats(path, key) if path.is_file() else None
    if cached is not None:
        log.info("using cached DINOv2 reference statistics %s", path)
        return cached
    log.info("computing DINOv2 reference statistics of %s (cached to %s)", source_name, path)
    moments = features.moments(batches, desc=f"DINOv2 reference {source_name}", total=total)
    mu, sigma = moments.statistics()

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, key=np.array(key), mu=mu, sigma=sigma, count=np.array(moments.count),
                     identity=np.array(features.identity), source=np.array(source_signature))
    atomic_write(path, write, "DINOv2 reference-statistics cache")
    return mu, sigma
