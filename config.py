"""The one config loader: reads a YAML file, checks every key, fills defaults, and builds the model.

Key names and spellings are the release's: its `imagenet.yaml`, `cifar.yaml` and the `config.yaml` beside each
published checkpoint load unchanged, and the `config.yaml` written into `working_dir` lists the release's keys
first, in its order (`RELEASE_KEYS`). Each key is declared once, as a field of `Config` (the loss settings as
fields of `models.Objective`, which `Config` extends); the keys this code adds have defaults under which a
release config runs the release's recipe (float32 with TF32, AdamW / RAdam, its EMA).
"""
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

from data import LATENT_SCALE
from dit import DIT_SIZES
from models import COEFFICIENT_TYPES, MODEL_TYPES, NOISING_TYPES, Objective, Soflow
from tracking import TRACKERS

# The release's keys, in the order of its files.
RELEASE_KEYS = (
    "working_dir", "noising_type", "coefficient_type", "model_type", "dataset_type", "data_size", "dataset_path",
    "velocity_loss_ratio", "p", "eps", "time_mean", "time_std", "cfg_scale", "mix_ratio", "cfg_drop_rate",
    "cfg_decay_time", "l_schedule", "l_init_ratio", "l_end_ratio", "total_steps", "ema_decay_rate",
    "learning_rate", "betas", "weight_decay", "batch_size", "num_workers", "prefetch_factor", "eval_steps",
    "eval_batch_size", "eval_NFE", "eval_demo_steps", "eval_demo_shape", "ckpt_saving_steps", "logging_steps",
    "seed")

# Spellings of earlier versions of this code, refused with the release's name.
RENAMED_KEYS = {"data_path": "dataset_path"}
RENAMED_VALUES = {("dataset_type", "ImageNet"): "Imagenet"}

# Defaults that depend on the data set (their one home): the data's geometry and the release's two recipes.
DATASETS = {
    "Imagenet": dict(data_channels=4, num_classes=1000, model_type="DiT-B-4", optimizer="AdamW", ema_steps=1),
    "CIFAR10": dict(data_channels=3, num_classes=0, model_type="UNet", optimizer="RAdam", ema_steps=16),
    "Digits": dict(data_channels=1, num_classes=10, model_type="DiT-B-4", optimizer="AdamW", ema_steps=1),
}
OPTIMIZERS = ("AdamW", "RAdam")
# fp32: the release's numerics (float32, TF32 on CUDA with `tf32`). bf16: autocast everywhere (training,
# sampling, VAE decode). bf16-guidance: autocast only for the no-grad guidance call of the loss, whose error
# is not amplified by 1 / (t - l) (benchmarks/precision.py).
PRECISIONS = ("fp32", "bf16", "bf16-guidance")
ATTENTIONS = ("auto", "efficient", "flash", "math")
_CHOICES = dict(dataset_type=tuple(DATASETS), model_type=MODEL_TYPES, noising_type=NOISING_TYPES,
                coefficient_type=COEFFICIENT_TYPES, optimizer=OPTIMIZERS, precision=PRECISIONS, attention=ATTENTIONS,
                tracker=TRACKERS)
_LIST_LENGTHS = dict(betas=2, eval_demo_shape=2)
_UNET_SIZES = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")
_DIT_SIZES = ("hidden_size", "depth", "num_heads", "patch_size")


class ConfigError(ValueError):
    pass


@dataclass
class Config(Objective):
    """Every config key with its default (the loss settings are the inherited `Objective` fields).
    `None` defaults are filled from DATASETS or mean "not set"."""
    # --- data ---
    dataset_type: str = "Imagenet"
    dataset_path: str = "./imagenet_latent"  # folder of imagenet_latent.hdf5 (or the file), or the CIFAR-10 root
    data_size: int = 32
    data_channels: Optional[int] = None     # DATASETS
    num_classes: Optional[int] = None       # DATASETS; 0 = unconditional
    num_workers: int = 4                    # DataLoader workers per rank
    prefetch_factor: Optional[int] = None   # DataLoader prefetch per worker (None: PyTorch's; unused with 0 workers)
    download: bool = False                  # CIFAR10: let torchvision download it (only when asked)
    load_into_memory: bool = False          # Imagenet latents: read the whole HDF5 file into memory once
    augment_p: float = 0.12                 # CIFAR10: EDM augmentation probability (0 disables)
    latent_scale: float = LATENT_SCALE      # Imagenet: SD-VAE latent scale
    vae: str = "stabilityai/sd-vae-ft-mse"  # Imagenet: decoder for sample grids and FID dumps (Hub id or folder)
    # --- model ---
    model_type: Optional[str] = None        # DATASETS
    noising_type: str = "Linear"
    coefficient_type: str = "Euler"
    cfg_drop_rate: float = 0.0
    dropout: float = 0.30                   # UNet only
    model_channels: Optional[int] = None    # UNet size overrides for small experiments (EDM names)
    channel_mult: Optional[List[int]] = None
    num_blocks: Optional[int] = None
    attn_resolutions: Optional[List[int]] = None
    hidden_size: Optional[int] = None       # DiT size overrides for small experiments
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    # --- optimisation ---
    batch_size: int = 256                   # global, over all ranks
    learning_rate: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    optimizer: Optional[str] = None         # DATASETS
    ema_decay_rate: float = 0.9999
    ema_steps: Optional[int] = None         # DATASETS: EMA after steps 1, 1 + k, 1 + 2k, ... with decay**k
    seed: int = 42
    # --- speed (defaults: the release's numerics) ---
    precision: str = "fp32"
    tf32: bool = True                       # TF32 matmuls and convolutions on CUDA (the release's setting)
    attention: str = "auto"                 # auto: memory-efficient SDPA on CUDA (the release's), PyTorch's on CPU
    compile: bool = False                   # torch.compile of the network, in place (state-dict keys unchanged)
    channels_last: bool = False             # channels_last U-Net on CUDA
    fused_optimizer: bool = False           # fused AdamW / foreach RAdam kernels
    grad_accum_steps: int = 1               # micro-batches per rank and step (same draws, one DDP sync per step)
    grad_checkpointing: bool = False        # recompute each DiT / U-Net block in the backward pass (less memory)
    # --- bookkeeping ---
    working_dir: str = "./results/run"
    logging_steps: int = 100
    eval_demo_steps: int = 1000
    eval_demo_shape: List[int] = field(default_factory=lambda: [4, 8])
    ckpt_saving_steps: int = 25_000
    eval_steps: int = 25_000
    eval_batch_size: int = 125
    eval_NFE: int = 1
    num_eval_samples: int = 50_000
    fid_ref_batch: Optional[str] = None     # ADM reference batch (.npz): score each periodic dump in training
    fid_inception_graph: Optional[str] = None  # classify_image_graph_def.pb (None: the evaluator's cached download)
    eval_save_samples: bool = True          # false: score the periodic dumps without writing their images
    ckpt_keep_last: Optional[int] = None    # keep only the newest k periodic checkpoints (None: keep all, as the release)
    ckpt_keep_every: Optional[int] = None   # checkpoints of steps divisible by this are never deleted
    tracker: str = "auto"                   # auto (TensorBoard when importable), tensorboard, wandb, none
    wandb_project: str = "soflow"

    def __post_init__(self):
        for key, value in DATASETS.get(self.dataset_type, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        super().__post_init__()  # the loss settings' own checks
        _check(self)

    @property
    def conditional(self):
        return self.model_type != "UNet" and self.num_classes > 0

    def objective(self):
        """The loss settings, under the same names as in the config."""
        return Objective(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Objective)})

    def network_kwargs(self):
        names, kwargs = (_UNET_SIZES, {"dropout": self.dropout}) if self.model_type == "UNet" else (_DIT_SIZES, {})
        kwargs.update({k: getattr(self, k) for k in names if getattr(self, k) is not None})
        return kwargs

    def build_model(self):
        return Soflow(self.data_channels, self.data_size, self.num_classes or None, self.cfg_drop_rate,
                      self.noising_type, self.coefficient_type, self.model_type, network_kwargs=self.network_kwargs())

    def to_dict(self):
        """All keys, the release's first and in its order."""
        names = [f.name for f in dataclasses.fields(self)]
        return {k: getattr(self, k) for k in sorted(names, key=lambda k: (k not in RELEASE_KEYS,
                                                                        RELEASE_KEYS.index(k) if k in RELEASE_KEYS else 0))}


_TYPES = typing.get_type_hints(Config)


def _check(cfg):
    """Checks values, then combinations (the loss settings are checked by Objective); raises ConfigError
    naming the key and the fix."""
    def fail(msg):
        raise ConfigError(msg)

    for name, accepted in _CHOICES.items():
        if getattr(cfg, name) not in accepted:
            fail(f"'{name}' is {getattr(cfg, name)!r}; accepted: {', '.join(accepted)}")
    for name, length in _LIST_LENGTHS.items():
        if len(getattr(cfg, name)) != length:
            fail(f"'{name}' must be a list of {length} numbers, got {getattr(cfg, name)!r}")
    for name in ("data_channels", "data_size", "batch_size", "logging_steps", "eval_demo_steps", "ckpt_saving_steps",
                 "eval_steps", "eval_batch_size", "eval_NFE", "ema_steps", "prefetch_factor", *_DIT_SIZES,
                 "model_channels", "num_blocks", "grad_accum_steps", "ckpt_keep_last", "ckpt_keep_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            fail(f"'{name}' must be >= 1, got {getattr(cfg, name)}")
    for name in ("channel_mult", "attn_resolutions", "eval_demo_shape"):
        if getattr(cfg, name) is not None and (not getattr(cfg, name) or min(getattr(cfg, name)) < 1):
            fail(f"'{name}' must be a non-empty list of positive integers, got {getattr(cfg, name)!r}")
    for name in ("num_classes", "num_workers", "num_eval_samples", "seed"):
        if getattr(cfg, name) < 0:
            fail(f"'{name}' must be >= 0, got {getattr(cfg, name)}")
    for name in ("cfg_drop_rate", "augment_p", "ema_decay_rate", "dropout"):
        if not 0 <= getattr(cfg, name) <= 1:
            fail(f"'{name}' must lie in [0, 1], got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0 or not all(0 <= b < 1 for b in cfg.betas) or cfg.weight_decay < 0:
        fail(f"'learning_rate' must be > 0, 'betas' in [0, 1) and 'weight_decay' >= 0, got {cfg.learning_rate}, "
             f"{cfg.betas}, {cfg.weight_decay}")
    _check_model_and_data(cfg)


def _check_model_and_data(cfg):
    """The combinations of model, guidance and data set."""
    def fail(msg):
        raise ConfigError(msg)

    if not cfg.eval_save_samples and not cfg.fid_ref_batch:
        fail("eval_save_samples: false keeps nothing of the periodic dumps unless fid_ref_batch scores them; set "
             "fid_ref_batch (an ADM reference batch) or eval_save_samples: true")
    if cfg.model_type == "UNet":
        if cfg.num_classes:
            fail(f"model_type 'UNet' is unconditional, but num_classes={cfg.num_classes}: use a DiT model_type "
                 f"for {cfg.dataset_type}, or num_classes: 0")
        levels = len(cfg.channel_mult or (2, 2, 2))
        if cfg.data_size % 2 ** (levels - 1):
            fail(f"the UNet halves data_size {levels - 1} times; data_size={cfg.data_size} must be divisible "
                 f"by {2 ** (levels - 1)}")
        if cfg.dataset_type == "Imagenet":
            fail("dataset_type 'Imagenet' (class-conditional latents) with model_type 'UNet' is not a supported "
                 "recipe; use a DiT model_type (release: DiT-B-4)")
    else:
        default_patch, default_hidden, _, default_heads = DIT_SIZES[cfg.model_type]
        patch, hidden = cfg.patch_size or default_patch, cfg.hidden_size or default_hidden
        heads = cfg.num_heads or default_heads
        if cfg.data_size % patch:
            fail(f"data_size={cfg.data_size} is not divisible by the DiT patch size {patch}; change data_size "
                 f"or patch_size")
        if hidden % heads:
            fail(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    if attention_precision_error(cfg.attention, cfg.precision):
        fail(attention_precision_error(cfg.attention, cfg.precision))
    if cfg.guided and cfg.cfg_drop_rate <= 0:
        fail(f"cfg_scale={cfg.cfg_scale} > 1 needs cfg_drop_rate > 0 (the model must learn the unconditional "
             f"velocity); set cfg_drop_rate (release: 0.1) or cfg_scale: 1.0")
    if cfg.guided and not cfg.conditional:
        fail(f"cfg_scale={cfg.cfg_scale} > 1 needs a class-conditional model (a DiT with num_classes > 0)")
    foreign = [k for k in (_DIT_SIZES if cfg.model_type == "UNet" else _UNET_SIZES) if getattr(cfg, k) is not None]
    if foreign:
        fail(f"size override(s) {foreign} do not apply to model_type {cfg.model_type!r}; hidden_size/depth/"
             f"num_heads/patch_size are DiT keys, model_channels/channel_mult/num_blocks/attn_resolutions UNet keys")
    if cfg.dataset_type == "Imagenet" and cfg.data_channels != 4:
        fail(f"dataset_type 'Imagenet' trains on 4-channel SD-VAE latents; got data_channels={cfg.data_channels}")
    if cfg.dataset_type == "CIFAR10" and (cfg.data_channels != 3 or cfg.data_size != 32 or cfg.conditional):
        fail("dataset_type 'CIFAR10' is unconditional 3 x 32 x 32 (data_channels: 3, data_size: 32, num_classes: 0)")
    if cfg.dataset_type == "Digits" and (cfg.data_channels not in (1, 3) or cfg.num_classes not in (0, 10)
                                         or cfg.data_size < 8):
        fail("dataset_type 'Digits' needs data_channels 1 or 3, num_classes 10 (or 0) and data_size >= 8")


def attention_precision_error(attention, precision):
    """Why the SDPA kernel `attention` pins on CUDA cannot run the network calls of `precision` (None when it
    can): the flash kernel takes only float16 / bfloat16, and only `bf16` runs every call under autocast."""
    if attention == "flash" and precision != "bf16":
        return (f"attention 'flash' with precision {precision!r}: CUDA's flash kernel takes only float16 / bfloat16 "
                f"inputs, and this precision runs network calls in float32; set precision: bf16, or attention: auto "
                f"(the release's memory-efficient kernel, any dtype)")
    return None


def _coerce(name, value):
    """The YAML value of one key, checked against (and converted to) the type of its field."""
    kind = _TYPES[name]
    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if value is None:
        if optional:
            return None
        raise ConfigError(f"'{name}' must not be empty")
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list of {item.__name__}s, got {value!r}")
        return [_scalar(name, v, item, f"a list of {item.__name__}s, got {value!r}") for v in value]
    return _scalar(name, value, kind)


def _scalar(name, value, kind, expected=None):
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{name}' must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, str) and kind is float:  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and ok and isinstance(value, float) and not value.is_integer():
            ok = False
        if not ok:
            raise ConfigError(f"'{name}' must be {expected or ('an integer' if kind is int else 'a number')}, "
                              f"got {value!r}")
        return kind(value)
    if not isinstance(value, str):
        raise ConfigError(f"'{name}' must be a string, got {value!r}")
    return value


def from_dict(values, source="config"):
    """A checked Config from a mapping of keys to values; raises ConfigError naming `source` and the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    problems = []
    for k in values:
        if k in RENAMED_KEYS:
            problems.append(f"'{k}' is now '{RENAMED_KEYS[k]}' (the release's name): rename the key")
        elif k not in _TYPES:
            close = difflib.get_close_matches(str(k), list(_TYPES), n=1)
            problems.append(f"unknown key '{k}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                            + "; remove it or fix the spelling")
    for (k, old), new in RENAMED_VALUES.items():
        if values.get(k) == old:
            problems.append(f"{k}: {old} is spelled '{new}' (the release's spelling): write {k}: {new}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    try:
        return Config(**{k: _coerce(k, v) for k, v in values.items()})
    except ValueError as e:  # ConfigError and the loss settings' own checks
        raise ConfigError(f"{source}: {e}") from None


def check_world_size(cfg, world_size, source="config"):
    if cfg.batch_size % world_size:
        raise ConfigError(f"{source}: 'batch_size'={cfg.batch_size} (global) is not divisible by the world size "
                          f"{world_size}; choose a multiple of {world_size} or change --nproc-per-node")
    if cfg.grad_accum_steps > cfg.batch_size // world_size:
        raise ConfigError(f"{source}: 'grad_accum_steps'={cfg.grad_accum_steps} exceeds the per-rank batch "
                          f"{cfg.batch_size // world_size}; lower it")


def load_config(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return from_dict(values, source=path)


def write_variant(config_path, out_path, **changes):
    """Copies the YAML config at `config_path` to `out_path` with some keys changed (not checked here:
    load_config reads the result)."""
    with open(config_path) as f:
        values = yaml.safe_load(f) or {}
    values.update(changes)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return str(out_path)


def save_config(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
