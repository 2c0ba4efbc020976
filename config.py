"""The one config loader: reads a YAML file, checks every key, fills defaults, and builds the model.

Key names and spellings are the release's: its `imagenet.yaml`, `cifar.yaml` and the `config.yaml` beside each
published checkpoint load unchanged. A config this code writes (`save_config`: `working_dir/config.yaml`, exports)
holds the release's keys alone, in its order (`RELEASE_KEYS`), so that the release's scripts read it as it is
(its train.py passes every key to a constructor that knows no others); this code's other keys go to a companion
file beside it (`companion_path`: config.yaml -> config.soflow.yaml), which `load_config` reads back.

Each key is declared once, as a field of `Config` (the loss settings as fields of `models.Objective`, which `Config`
extends) with its meaning and accepted values (`config_keys.key`): the checks and the key reference
(docs/config_keys.md) read them from there. The keys this code adds have defaults under which a release config runs
the release's recipe (float32 with TF32, AdamW / RAdam, its EMA).
"""
import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass
from typing import List, Optional

import yaml

from checkpoints import companion_path
from config_keys import ConfigError, accepted_text, declaration, declared_default, key, unwrap_optional
from data import LATENT_SCALE
from dit import DIT_SIZES
from models import COEFFICIENT_TYPES, MODEL_TYPES, NOISING_TYPES, Objective, Soflow, check_guidance, is_conditional
from power_ema import SIGMA_REL_MAX
from safe_io import atomic_write
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
    "MNIST": dict(data_channels=1, num_classes=10, model_type="DiT-B-4", optimizer="AdamW", ema_steps=1),
}
OPTIMIZERS = ("AdamW", "RAdam")
# fp32: the release's numerics (float32, TF32 on CUDA with `tf32`). bf16: autocast everywhere (training,
# sampling, VAE decode). bf16-guidance: autocast only for the no-grad guidance call of the loss, whose error
# is not amplified by 1 / (t - l) (benchmarks/precision.py).
PRECISIONS = ("fp32", "bf16", "bf16-guidance")
ATTENTIONS = ("auto", "efficient", "flash", "math")
_UNET_SIZES = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")
_DIT_SIZES = ("hidden_size", "depth", "num_heads", "patch_size")


@dataclass
class Config(Objective):
    """Every config key with its default, meaning and accepted values (the loss settings are the inherited
    `Objective` fields). `None` defaults are filled from DATASETS or mean "not set"."""
    dataset_type: str = key("Imagenet", "the data: SD-VAE ImageNet latents, CIFAR-10 images, scikit-learn digits, "
                                        "MNIST", choices=tuple(DATASETS), section="data")
    dataset_path: str = key("./imagenet_latent", "folder of imagenet_latent.hdf5 (or the file), or the CIFAR-10 root")
    data_size: int = key(32, "side of the training tensors: latent side (Imagenet) or image side", within="[1, inf)")
    data_channels: Optional[int] = key(None, "channels of the training tensors (latent or image)", within="[1, inf)")
    num_classes: Optional[int] = key(None, "0 = unconditional", within="[0, inf)")
    num_workers: int = key(4, "DataLoader workers per rank", within="[0, inf)")
    prefetch_factor: Optional[int] = key(None, "DataLoader prefetch per worker (None: PyTorch's; unused with 0 "
                                               "workers)", within="[1, inf)")
    download: bool = key(False, "CIFAR10: let torchvision download it (only when asked)")
    load_into_memory: bool = key(False, "Imagenet latents: read the whole HDF5 file into memory once")
    augment_p: float = key(0.12, "CIFAR10: EDM augmentation probability (0 disables)", within="[0, 1]")
    latent_scale: float = key(LATENT_SCALE, "Imagenet: SD-VAE latent scale")
    vae: str = key("stabilityai/sd-vae-ft-mse", "Imagenet: decoder for sample grids and FID dumps (Hub id or "
                                                "folder)")

    model_type: Optional[str] = key(None, "backbone: the EDM U-Net or a DiT size", choices=MODEL_TYPES,
                                    section="model")
    noising_type: str = key("Linear", "x_t = alpha x0 + beta x1; Linear: 1 - t, t; Trig: cos, sin of pi t / 2",
                            choices=NOISING_TYPES)
    coefficient_type: str = key("Euler", "f = a x_t + b F; Euler: a = 1, b = s - t; Trig: cos, sin of pi (s - t) / 2",
                                choices=COEFFICIENT_TYPES)
    cfg_drop_rate: float = key(0.0, "share of rows trained with the null label (needed when cfg_scale > 1)",
                               within="[0, 1]")
    dropout: float = key(0.30, "UNet dropout probability", within="[0, 1]")
    model_channels: Optional[int] = key(None, "UNet size override for small experiments (EDM names): base channels",
                                        within="[1, inf)")
    channel_mult: Optional[List[int]] = key(None, "UNet size override: channel multiplier per resolution",
                                            within="[1, inf)")
    num_blocks: Optional[int] = key(None, "UNet size override: residual blocks per resolution", within="[1, inf)")
    attn_resolutions: Optional[List[int]] = key(None, "UNet size override: resolutions with self-attention",
                                                within="[1, inf)")
    hidden_size: Optional[int] = key(None, "DiT size override for small experiments: width", within="[1, inf)")
    depth: Optional[int] = key(None, "DiT size override: number of blocks", within="[1, inf)")
    num_heads: Optional[int] = key(None, "DiT size override: attention heads", within="[1, inf)")
    patch_size: Optional[int] = key(None, "DiT size override: patch side", within="[1, inf)")

    batch_size: int = key(256, "global, over all ranks", within="[1, inf)", section="optimisation")
    learning_rate: float = key(1e-4, "constant: no warm-up or schedule", within="(0, inf)")
    betas: List[float] = key([0.9, 0.99], "AdamW / RAdam betas", length=2, within="[0, 1)")
    weight_decay: float = key(0.0, "AdamW / RAdam weight decay", within="[0, inf)")
    optimizer: Optional[str] = key(None, "the release uses AdamW for ImageNet, RAdam for CIFAR-10", choices=OPTIMIZERS)
    ema_decay_rate: float = key(0.9999, "EMA decay per step", within="[0, 1]")
    ema_steps: Optional[int] = key(None, "EMA after steps 1, 1 + k, 1 + 2k, ... with decay**k (float64 when k > 1)",
                                   within="[1, inf)")
    posthoc_ema_sigma_rels: Optional[List[float]] = key(
        None, "post-hoc EMA (docs/posthoc_ema.md): the relative widths of the power-function EMAs kept beside "
              "ema_model (EDM2: [0.05, 0.10]; None: off)", within=f"(0, {SIGMA_REL_MAX!r})")
    posthoc_ema_every: int = key(10_000, "steps between post-hoc EMA snapshots (working_dir/posthoc_ema/{step}.pt)",
                                 within="[1, inf)")
    posthoc_ema_float16: bool = key(False, "store the snapshots in float16 (half the disk; the EMAs stay float32)")
    seed: int = key(42, "rank r seeds with seed + r; the batch order depends on (seed, step)", within="[0, inf)")

    precision: str = key("fp32", "fp32: float32 (TF32 with tf32); bf16: autocast everywhere; bf16-guidance: "
                                 "autocast for the loss's guidance call only", choices=PRECISIONS,
                         section="speed (defaults: the release's numerics)")
    tf32: bool = key(True, "TF32 matmuls and convolutions on CUDA (the release's setting)")
    attention: str = key("auto", "auto: memory-efficient SDPA on CUDA (the release's), PyTorch's on CPU",
                         choices=ATTENTIONS)
    compile: bool = key(False, "torch.compile of the network, in place (state-dict keys unchanged)")
    channels_last: bool = key(False, "channels_last U-Net on CUDA")
    fused_optimizer: bool = key(False, "fused AdamW / foreach RAdam kernels (same maths, other rounding)")
    grad_accum_steps: int = key(1, "micro-batches per rank and step (same draws, one DDP sync per step)",
                                within="[1, inf)")
    grad_checkpointing: bool = key(False, "recompute each DiT / U-Net block in the backward pass (less memory)")

    working_dir: str = key("./results/run", "the run's folder: config.yaml, log.txt, ckpts/, figs/, evals/, tb/",
                           section="bookkeeping")
    logging_steps: int = key(100, "steps per log line (averages over the window and all ranks)", within="[1, inf)")
    eval_demo_steps: int = key(1000, "steps between EMA sample grids (figs/{step}.png)", within="[1, inf)")
    eval_demo_shape: List[int] = key([4, 8], "rows (classes) and columns of the grids", length=2, within="[1, inf)")
    ckpt_saving_steps: int = key(25_000, "steps between checkpoints (ckpts/{step}.pt)", within="[1, inf)")
    eval_steps: int = key(25_000, "steps between FID dumps (evals/{step}.npz)", within="[1, inf)")
    eval_batch_size: int = key(125, "samples per rank and batch when sampling grids and dumps", within="[1, inf)")
    eval_NFE: int = key(1, "network calls per sample for grids and dumps", within="[1, inf)")
    num_eval_samples: int = key(50_000, "images per FID dump", within="[0, inf)")
    fid_ref_batch: Optional[str] = key(None, "ADM reference batch (.npz): score each periodic dump in training")
    fid_inception_graph: Optional[str] = key(None, "classify_image_graph_def.pb (None: the evaluator's cached "
                                                   "download)")
    fid_dinov2: bool = key(False, "with fid_ref_batch: FD-DINOv2 (EDM2's protocol) on the same line")
    fid_dinov2_weights: Optional[str] = key(None, "DINOv2 ViT-L/14 weights file (None: the Hugging Face Hub cache)")
    eval_save_samples: bool = key(True, "false: score the periodic dumps without writing their images")
    ckpt_keep_last: Optional[int] = key(None, "keep only the newest k periodic checkpoints (None: keep all, as the "
                                              "release)", within="[1, inf)")
    ckpt_keep_every: Optional[int] = key(None, "checkpoints of steps divisible by this are never deleted",
                                         within="[1, inf)")
    tracker: str = key("auto", "training's scalars and grids (auto: TensorBoard when importable)", choices=TRACKERS)
    wandb_project: str = key("soflow", "Weights & Biases project (tracker: wandb)")

    def __post_init__(self):
        for name, value in DATASETS.get(self.dataset_type, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()  # every key against its declaration, then the loss settings' combinations
        _check_posthoc_ema(self.posthoc_ema_sigma_rels)
        _check_model_and_data(self)

    @property
    def conditional(self):
        return is_conditional(self.model_type, self.num_classes)

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

    def uses_channels_last(self, device):
        """Whether the network and its inputs are channels_last on `device`: with `channels_last`, for the U-Net
        (the DiT's patch embedding gains nothing) on CUDA (cuDNN's NHWC convolutions; the CPU's are slower)."""
        return self.channels_last and self.model_type == "UNet" and device.type == "cuda"

    def to_dict(self):
        """All keys, the release's first and in its order."""
        names = [f.name for f in dataclasses.fields(self)]
        return {k: getattr(self, k) for k in sorted(names, key=lambda k: (k not in RELEASE_KEYS,
                                                                        RELEASE_KEYS.index(k) if k in RELEASE_KEYS else 0))}


_TYPES = typing.get_type_hints(Config)


def _check_posthoc_ema(sigma_rels):
    if sigma_rels is not None and len(set(sigma_rels)) != len(sigma_rels):
        raise ConfigError(f"'posthoc_ema_sigma_rels' must be distinct (each a power-function EMA kept beside "
                          f"ema_model), got {sigma_rels!r}")


def _check_model_and_data(cfg):
    """The combinations of model, guidance and data set."""
    def fail(msg):
        raise ConfigError(msg)

    if not cfg.eval_save_samples and not cfg.fid_ref_batch:
        fail("eval_save_samples: false keeps nothing of the periodic dumps unless fid_ref_batch scores them; set "
             "fid_ref_batch (an ADM reference batch) or eval_save_samples: true")
    if cfg.fid_dinov2 and not cfg.fid_ref_batch:
        fail("fid_dinov2: true scores the periodic dumps in training, which needs fid_ref_batch (an ADM reference "
             "batch, whose images give the DINOv2 reference statistics)")
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
    if cfg.method == "soflow" and not cfg.guided and cfg.cfg_drop_rate > 0:
        fail(f"cfg_drop_rate={cfg.cfg_drop_rate} with cfg_scale={cfg.cfg_scale}: labels are dropped only for guided "
             f"training (cfg_scale > 1), so the release requires cfg_drop_rate 0 here; set cfg_drop_rate: 0.0, or "
             f"cfg_scale > 1 (release: 3.0) to train with guidance")
    if cfg.guided:
        _check_guidance(f"cfg_scale={cfg.cfg_scale} > 1", cfg)
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
    if cfg.dataset_type == "MNIST" and (cfg.data_channels not in (1, 3) or cfg.num_classes not in (0, 10)
                                        or cfg.data_size < 8):
        fail("dataset_type 'MNIST' needs data_channels 1 or 3, num_classes 10 (or 0) and data_size >= 8 "
             "(28: the digits as they are; larger sizes pad them, smaller ones resize them)")
    _check_meanflow(cfg)


def _check_guidance(setting, cfg):
    try:
        check_guidance(setting, cfg.conditional)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_meanflow(cfg):
    """`method: meanflow`: the model and speed settings its loss supports."""
    if cfg.method != "meanflow":
        return
    if cfg.noising_type != "Linear" or cfg.coefficient_type != "Euler":
        raise ConfigError(f"method 'meanflow' needs noising_type: Linear and coefficient_type: Euler "
                          f"(z_r = z_t - (t - r) u), got {cfg.noising_type} / {cfg.coefficient_type}")
    if cfg.meanflow_guided:
        _check_guidance(f"meanflow_cfg_scale={cfg.meanflow_cfg_scale} / meanflow_cfg_kappa={cfg.meanflow_cfg_kappa}",
                        cfg)
    if cfg.meanflow_guided and cfg.cfg_drop_rate <= 0:
        raise ConfigError(f"meanflow_cfg_scale={cfg.meanflow_cfg_scale} / meanflow_cfg_kappa={cfg.meanflow_cfg_kappa} "
                          f"(guided) needs a class-conditional model with cfg_drop_rate > 0 (MeanFlow's: 0.1); "
                          f"set cfg_drop_rate or meanflow_cfg_scale: 1.0 and meanflow_cfg_kappa: 0.0")
    unsupported = [k for k in ("compile", "grad_checkpointing") if getattr(cfg, k)]
    if unsupported or cfg.precision != "fp32":
        raise ConfigError(f"method 'meanflow' runs its torch.func.jvp on the eager float32 network: remove "
                          f"{unsupported + (['precision'] if cfg.precision != 'fp32' else [])} from the config")


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
    kind, optional = unwrap_optional(_TYPES[name])
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
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats; no key takes them
            raise ConfigError(f"'{name}' must be a finite number, got {value!r}")
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


_COMPANION_NOTE = "# The release's keys. The keys this code adds are in "


def _companion_note(path):
    return f"{_COMPANION_NOTE}{os.path.basename(companion_path(path))} beside this file.\n"


def _read_yaml(path):
    with open(path) as f:
        text = f.read()
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def read_values(path):
    """(keys and values, source name) of a config file merged with its companion file when there is one;
    ConfigError when the file is missing, names a missing companion, or shares a key with it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    values, text = _read_yaml(path)
    if values is None:  # not taken as "all defaults": that would train an unintended recipe in ./results/run
        raise ConfigError(f"{path} is empty; write the run's keys into it (see configs/ for complete examples)")
    companion = companion_path(path)
    if not isinstance(values, dict):
        return values, path
    if not os.path.isfile(companion):
        if text.startswith(_COMPANION_NOTE):
            raise ConfigError(f"{path} keeps this code's other keys in {companion}, which is missing; copy that "
                              f"file beside it (it is written with config.yaml)")
        return values, path
    extra = _read_yaml(companion)[0] or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{companion}: expected a mapping of keys to values, got {type(extra).__name__}")
    shared = sorted(set(values) & set(extra))
    if shared:
        raise ConfigError(f"{path} and {companion} both set {shared}; keep each key in one of the two files")
    return {**values, **extra}, f"{path} (+ {os.path.basename(companion)})"


def load_config(path):
    """The checked Config of a YAML file (and of its companion file, when this code wrote the pair)."""
    values, source = read_values(path)
    return from_dict(values, source=source)


def write_variant(config_path, out_path, **changes):
    """Copies the YAML config at `config_path` (with its companion's keys) to the one file `out_path` with some
    keys changed (not checked here: load_config reads the result)."""
    values, _ = read_values(config_path)
    values.update(changes)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return str(out_path)


def _write_yaml(path, values, header=""):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(header)
            yaml.safe_dump(values, f, sort_keys=False)
    atomic_write(path, write, "config")


def save_config(cfg, path):
    """Writes the release's keys, in its order, to `path` and this code's other keys to companion_path(path),
    each atomically, the companion first; load_config(path) reads the pair back as `cfg`."""
    values = cfg.to_dict()
    _write_yaml(companion_path(path), {k: v for k, v in values.items() if k not in RELEASE_KEYS})
    _write_yaml(path, {k: values[k] for k in RELEASE_KEYS}, header=_companion_note(path))


# On resume, every key that differs from the run's config.yaml is one of three kinds. The model's and the data's
# refuse (the checkpoint's weights and the batch order depend on them); the optimizer's are applied to the
# optimizer (train.py); the others are logged, and those below change nothing of the training's numbers.
RESUME_REFUSED = ("dataset_type", "dataset_path", "data_size", "data_channels", "num_classes", "latent_scale",
                  "augment_p", "model_type", "noising_type", "coefficient_type", "cfg_drop_rate", "dropout",
                  *_UNET_SIZES, *_DIT_SIZES, "optimizer", "seed", "method")
RESUME_OPTIMIZER = ("learning_rate", "betas", "weight_decay")
RESUME_NO_EFFECT = ("working_dir", "num_workers", "prefetch_factor", "download", "load_into_memory", "vae",
                    "logging_steps", "eval_demo_steps", "eval_demo_shape", "ckpt_saving_steps", "eval_steps",
                    "eval_batch_size", "eval_NFE", "num_eval_samples", "fid_ref_batch", "fid_inception_graph",
                    "fid_dinov2", "fid_dinov2_weights", "eval_save_samples", "ckpt_keep_last", "ckpt_keep_every",
                    "tracker", "wandb_project", "posthoc_ema_sigma_rels", "posthoc_ema_every", "posthoc_ema_float16")


def changed_keys(old, new):
    """[(key, old value, new value)] of the keys whose values differ between two Configs."""
    a, b = old.to_dict(), new.to_dict()
    return [(k, a.get(k), b[k]) for k in b if a.get(k) != b[k]]


def check_resume(old, new, old_source, new_source):
    """The changes from the run's config `old` to `new`, split as (optimizer, others); raises ConfigError listing
    every model or data key that changed, with both values."""
    changes = changed_keys(old, new)
    refused = [c for c in changes if c[0] in RESUME_REFUSED]
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise ConfigError(f"{new_source} changes model or data settings of the run recorded in {old_source}: "
                          f"{listed}. These cannot change on resume (the checkpoints' weights and the order of the "
                          f"batches depend on them): restore them, or start a new run with another working_dir")
    return ([c for c in changes if c[0] in RESUME_OPTIMIZER], [c for c in changes if c[0] not in RESUME_OPTIMIZER])


# --- the key reference (docs/config_keys.md is this output: python config.py --keys > docs/config_keys.md) ---

KEYS_PAGE_INTRO = """# Config keys

Every key of a config file, with its default, meaning and accepted values. This page is the output of
`python config.py --keys > docs/config_keys.md`, generated from the declarations of the fields of `config.Config`
and `models.Objective` (`config_keys.key`: the loader checks each value against the same declaration; a test checks
that this page matches). "release": a key of the release's config files, where this code keeps the release's name
and meaning ([drop_in.md](drop_in.md)); with the defaults of the other keys a release config runs the release's
recipe. "by dataset_type": the default comes from `config.DATASETS`. "accepted": the values a key takes besides its
type (a number, a string, true / false, a list); unset keys (`None`) skip it. Combinations of keys are checked too
(for example cfg_scale > 1 needs cfg_drop_rate > 0); the error names the keys and the fix.
"""


def _yaml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _default(f):
    value = declared_default(f)
    if value is None:
        by_dataset = [f"`{_yaml_value(d[f.name])}` {name}" for name, d in DATASETS.items() if f.name in d]
        return "by dataset_type: " + ", ".join(by_dataset) if by_dataset else "unset"
    return f"`{_yaml_value(value)}`"


def keys_markdown():
    """The Markdown page of every config key, by section, in declaration order: name, whether it is one of the
    release's, default, meaning and accepted values (from the fields' declarations)."""
    sections = {}  # section -> rows
    section = None
    for f in dataclasses.fields(Config):
        declared = declaration(f)
        section = declared["section"] or section
        cells = [f"`{f.name}`", "yes" if f.name in RELEASE_KEYS else "", _default(f), declared["help"],
                 accepted_text(f)]
        sections.setdefault(section, []).append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out = [KEYS_PAGE_INTRO]
    for section, rows in sections.items():
        out += [f"## {section}", "", "| key | release | default | meaning | accepted |", "|---|---|---|---|---|",
                *rows, ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="The config keys of this code.")
    p.add_argument("--keys", action="store_true", help="print the Markdown table of every key (docs/config_keys.md)")
    args = p.parse_args(argv)
    if not args.keys:
        p.print_help()
        return
    sys.stdout.write(keys_markdown())


if __name__ == "__main__":
    main()
