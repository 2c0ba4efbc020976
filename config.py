"""The one config loader: reads a YAML file, checks every key, fills defaults, and builds the model.

Key names are those of the reference release (SPEC section 7), so published configs load unchanged;
the extra keys of this implementation have defaults that reproduce the reference behaviour.
"""
import copy
import difflib
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional

import yaml

from dit import DIT_SIZES
from models import COEFFICIENT_TYPES, L_SCHEDULES, MODEL_TYPES, NOISING_TYPES, Objective, Soflow

_OBJECTIVE_DEFAULTS = Objective()

DATASET_TYPES = ("ImageNet", "CIFAR10", "Digits")
OPTIMIZERS = ("AdamW", "RAdam")
PRECISIONS = ("auto", "bf16", "fp32")
ATTENTIONS = ("auto", "math")


class ConfigError(ValueError):
    pass


@dataclass
class Config:
    # --- data ---
    dataset_type: str = "ImageNet"
    data_path: str = "./data"
    data_channels: int = 4
    data_size: int = 32
    num_classes: int = 1000
    download: bool = False              # CIFAR10: let torchvision download it (only when asked)
    load_into_memory: bool = False      # ImageNet latents: read the whole HDF5 file into memory once
    augment_p: float = 0.12             # CIFAR10: EDM augmentation probability (0 disables)
    latent_scale: float = 0.18215       # ImageNet: SD-VAE latent scale
    vae: str = "stabilityai/sd-vae-ft-mse"  # ImageNet: decoder for sample grids and FID dumps
    num_workers: int = 4
    # --- model ---
    model_type: str = "DiT-B-4"
    noising_type: str = "Linear"
    coefficient_type: str = "Euler"
    dropout: float = 0.30               # UNet only
    model_channels: Optional[int] = None  # UNet size overrides for small experiments (EDM names)
    channel_mult: Optional[List[int]] = None
    num_blocks: Optional[int] = None
    attn_resolutions: Optional[List[int]] = None
    hidden_size: Optional[int] = None   # DiT size overrides for small experiments
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    # --- objective (SPEC section 3); defaults are those of models.Objective, the loss's own settings ---
    velocity_loss_ratio: float = Objective.velocity_loss_ratio
    p: float = Objective.p
    eps: float = Objective.eps
    time_mean: List[float] = field(default_factory=lambda: list(_OBJECTIVE_DEFAULTS.time_mean))
    time_std: List[float] = field(default_factory=lambda: list(_OBJECTIVE_DEFAULTS.time_std))
    cfg_scale: float = Objective.cfg_scale
    mix_ratio: float = Objective.mix_ratio
    cfg_drop_rate: float = 0.0
    cfg_decay_time: float = Objective.cfg_decay_time
    l_schedule: str = Objective.l_schedule
    l_init_ratio: float = Objective.l_init_ratio
    l_end_ratio: float = Objective.l_end_ratio
    # --- optimisation ---
    total_steps: int = Objective.total_steps
    batch_size: int = 256               # global, over all ranks
    learning_rate: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    optimizer: Optional[str] = None     # default: AdamW for ImageNet/Digits, RAdam for CIFAR10
    ema_decay_rate: float = 0.9999
    ema_steps: Optional[int] = None     # EMA every k steps with decay**k; default 1, CIFAR10 16
    seed: int = 42
    # --- speed (used where CUDA exists; CPU runs stay fp32 eager unless asked) ---
    precision: str = "auto"             # auto = bf16 autocast on CUDA, fp32 on CPU
    tf32: bool = True
    compile: bool = False
    channels_last: bool = True          # UNet on CUDA
    fused_optimizer: bool = True        # fused AdamW kernel (RAdam: foreach)
    attention: str = "auto"             # auto: PyTorch picks flash / memory-efficient SDPA; math: reference kernel
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

    # ------------------------------------------------------------------------------------------
    @property
    def conditional(self):
        return self.num_classes > 0

    def objective(self):
        """The loss settings, under the same names as in the config."""
        return Objective(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(Objective)})

    def network_kwargs(self):
        if self.model_type == "UNet":
            names, kwargs = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions"), {"dropout": self.dropout}
        else:
            names, kwargs = ("hidden_size", "depth", "num_heads", "patch_size"), {}
        kwargs.update({k: getattr(self, k) for k in names if getattr(self, k) is not None})
        return kwargs

    def build_model(self):
        return Soflow(self.data_channels, self.data_size, self.num_classes, self.cfg_drop_rate, self.noising_type,
                      self.coefficient_type, self.model_type, network_kwargs=self.network_kwargs())

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


_FIELDS = {f.name: f for f in fields(Config)}
_CHOICES = dict(dataset_type=DATASET_TYPES, model_type=MODEL_TYPES, noising_type=NOISING_TYPES,
                coefficient_type=COEFFICIENT_TYPES, l_schedule=L_SCHEDULES, optimizer=OPTIMIZERS,
                precision=PRECISIONS, attention=ATTENTIONS)
_LISTS = dict(time_mean=(float, 3), time_std=(float, 3), betas=(float, 2), eval_demo_shape=(int, 2))


_OPTIONAL = dict(hidden_size=int, depth=int, num_heads=int, patch_size=int, ema_steps=int, optimizer=str,
                 model_channels=int, num_blocks=int, channel_mult=list, attn_resolutions=list)


def _coerce(name, value, source):
    """Checks the YAML value of one key against the type of its default."""
    if value is None:
        if name in _OPTIONAL:
            return None
        raise ConfigError(f"{source}: '{name}' must not be empty")
    if _OPTIONAL.get(name) is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in value) or not value:
            raise ConfigError(f"{source}: '{name}' must be a non-empty list of positive integers, got {value!r}")
        return value
    if name in _LISTS:
        kind, length = _LISTS[name]
        if (not isinstance(value, (list, tuple)) or len(value) != length
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or (kind is int and not all(float(v).is_integer() for v in value))):
            raise ConfigError(f"{source}: '{name}' must be a list of {length} {kind.__name__}s, got {value!r}")
        return [kind(v) for v in value]
    kind = _OPTIONAL.get(name) or type(_FIELDS[name].default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{name}' must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{source}: '{name}' must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{name}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: '{name}' must be a string, got {value!r}")
    return value


def _dataset_defaults(values):
    """Defaults that depend on the dataset: the reference's CIFAR recipe, and its data geometry."""
    kind = values.get("dataset_type", "ImageNet")
    defaults = {}
    if kind == "CIFAR10":
        defaults = dict(data_channels=3, data_size=32, num_classes=0, model_type="UNet", optimizer="RAdam",
                        ema_steps=16)
    elif kind == "Digits":
        defaults = dict(data_channels=1, data_size=8, num_classes=10)
    return {**defaults, **values}


def from_dict(values, source="config"):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    unknown = [k for k in values if k not in _FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(_FIELDS), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; remove them or fix the spelling")
    values = _dataset_defaults(values)
    cfg = Config(**{k: _coerce(k, v, source) for k, v in values.items()})
    if cfg.optimizer is None:
        cfg.optimizer = "AdamW"
    if cfg.ema_steps is None:
        cfg.ema_steps = 1
    validate(cfg, source)
    return cfg


def validate(cfg, source="config", world_size=None):
    """Checks values and combinations; raises ConfigError naming the key and the fix."""
    def fail(msg):
        raise ConfigError(f"{source}: {msg}")

    for name, accepted in _CHOICES.items():
        value = getattr(cfg, name)
        if value is not None and value not in accepted:
            fail(f"'{name}' is {value!r}; accepted: {', '.join(accepted)}")
    for name in ("data_channels", "data_size", "total_steps", "batch_size", "logging_steps", "eval_demo_steps",
                 "ckpt_saving_steps", "eval_steps", "eval_batch_size", "eval_NFE", "ema_steps"):
        if getattr(cfg, name) < 1:
            fail(f"'{name}' must be >= 1, got {getattr(cfg, name)}")
    for name in ("num_classes", "num_workers", "num_eval_samples", "seed"):
        if getattr(cfg, name) < 0:
            fail(f"'{name}' must be >= 0, got {getattr(cfg, name)}")
    for name in ("velocity_loss_ratio", "cfg_drop_rate", "mix_ratio", "augment_p", "ema_decay_rate", "dropout",
                 "l_init_ratio", "l_end_ratio"):
        if not 0 <= getattr(cfg, name) <= 1:
            fail(f"'{name}' must lie in [0, 1], got {getattr(cfg, name)}")
    if cfg.cfg_decay_time <= 0 or cfg.cfg_decay_time > 1:
        fail(f"'cfg_decay_time' must lie in (0, 1], got {cfg.cfg_decay_time}")
    if any(s <= 0 for s in cfg.time_std):
        fail(f"'time_std' values must be > 0, got {cfg.time_std}")
    if cfg.eps <= 0 or cfg.p < 0:
        fail(f"'eps' must be > 0 and 'p' >= 0, got eps={cfg.eps}, p={cfg.p}")
    if cfg.learning_rate <= 0 or not all(0 <= b < 1 for b in cfg.betas):
        fail(f"'learning_rate' must be > 0 and 'betas' in [0, 1), got {cfg.learning_rate}, {cfg.betas}")
    if cfg.l_schedule == "Exponent" and (cfg.l_init_ratio <= 0 or cfg.l_end_ratio <= 0):
        fail("l_schedule 'Exponent' needs l_init_ratio > 0 and l_end_ratio > 0")
    if cfg.cfg_scale < 1:
        fail(f"'cfg_scale' must be >= 1 (1 disables guidance), got {cfg.cfg_scale}")
    if cfg.cfg_scale > 1 and cfg.cfg_drop_rate <= 0:
        fail(f"cfg_scale={cfg.cfg_scale} > 1 needs cfg_drop_rate > 0 (the model must learn the unconditional "
             f"velocity); set cfg_drop_rate (reference: 0.1) or cfg_scale: 1.0")
    if cfg.cfg_scale > 1 and not cfg.conditional:
        fail(f"cfg_scale={cfg.cfg_scale} > 1 needs a class-conditional model (num_classes > 0)")
    if cfg.model_type == "UNet":
        if cfg.conditional:
            fail(f"model_type 'UNet' is unconditional, but num_classes={cfg.num_classes}: use a DiT model_type "
                 f"for {cfg.dataset_type}, or num_classes: 0")
        levels = len(cfg.channel_mult or (2, 2, 2))
        if cfg.data_size % 2 ** (levels - 1):
            fail(f"the UNet halves data_size {levels - 1} times; data_size={cfg.data_size} must be divisible "
                 f"by {2 ** (levels - 1)}")
        if cfg.dataset_type == "ImageNet":
            fail("dataset_type 'ImageNet' (class-conditional latents) with model_type 'UNet' is not a supported "
                 "recipe; use a DiT model_type (reference: DiT-B-4)")
    else:
        patch = cfg.patch_size or DIT_SIZES[cfg.model_type][0]
        hidden = cfg.hidden_size or DIT_SIZES[cfg.model_type][1]
        heads = cfg.num_heads or DIT_SIZES[cfg.model_type][3]
        if cfg.data_size % patch:
            fail(f"data_size={cfg.data_size} is not divisible by the DiT patch size {patch}; change data_size "
                 f"or patch_size")
        if hidden % heads:
            fail(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    unet_keys = [k for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")
                 if getattr(cfg, k) is not None]
    dit_keys = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(cfg, k) is not None]
    if cfg.model_type == "UNet" and dit_keys or cfg.model_type != "UNet" and unet_keys:
        fail(f"size override(s) {dit_keys or unet_keys} do not apply to model_type {cfg.model_type!r}; "
             f"hidden_size/depth/num_heads/patch_size are DiT keys, model_channels/channel_mult/num_blocks/"
             f"attn_resolutions UNet keys")
    if cfg.dataset_type == "ImageNet" and cfg.data_channels != 4:
        fail(f"dataset_type 'ImageNet' trains on 4-channel SD-VAE latents; got data_channels={cfg.data_channels}")
    if cfg.dataset_type == "CIFAR10" and (cfg.data_channels != 3 or cfg.data_size != 32 or cfg.conditional):
        fail("dataset_type 'CIFAR10' is unconditional 3 x 32 x 32 (data_channels: 3, data_size: 32, num_classes: 0)")
    if cfg.dataset_type == "Digits":
        if cfg.data_channels not in (1, 3) or cfg.num_classes not in (0, 10) or cfg.data_size < 8:
            fail("dataset_type 'Digits' needs data_channels 1 or 3, num_classes 10 (or 0) and data_size >= 8")
    if world_size is not None:
        if cfg.batch_size % world_size:
            fail(f"'batch_size'={cfg.batch_size} (global) is not divisible by the world size {world_size}; "
                 f"choose a multiple of {world_size} or change --nproc-per-node")
    return cfg


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
    """Copies the YAML config at `config_path` to `out_path` with some keys changed (not validated here:
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
