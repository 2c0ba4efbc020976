"""Shared test utilities: generated data sets, config files (the release's values read from configs/), tiny runs
and torchrun launches. Fixtures live in conftest.py; test modules import from here (and from inception_graphs.py),
never from each other."""
import dataclasses
import math
import os
import pickle
import subprocess
import sys
import typing

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import inference
from checkpoints import save_checkpoint
from config import load_config, read_values, save_config, write_variant
from config_keys import declaration, declared_default, is_list_key, unwrap_optional
from models import Soflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------
# Tiny models (the one set of factories of the tests)

TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2, patch_size=2)
TINY_UNET = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


def randomise(model, std=0.05, seed=0):
    """Every trainable weight drawn from N(0, std^2): adaLN-Zero's and the U-Net's zero initialisations would
    leave most terms of a loss untested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_dit(num_classes=10, cfg_drop_rate=0.1, noising_type="Linear", coefficient_type="Euler", data_size=8,
             dtype=torch.float64, seed=0, randomised=True, **sizes):
    """A class-conditional (or, with num_classes None / 0, unconditional) latent DiT with 4 channels."""
    torch.manual_seed(seed)
    model = Soflow(4, data_size, num_classes, cfg_drop_rate, noising_type, coefficient_type, "DiT-B-4",
                   network_kwargs={**TINY_DIT, **sizes})
    return (randomise(model, seed=seed) if randomised else model).to(dtype)


def tiny_unet(dropout=0.0, data_size=8, dtype=torch.float32, seed=0, randomised=True, **sizes):
    """An unconditional 3-channel U-Net, the CIFAR recipe's backbone in miniature."""
    torch.manual_seed(seed)
    model = Soflow(3, data_size, None, 0.0, "Linear", "Euler", "UNet",
                   network_kwargs={**TINY_UNET, "dropout": dropout, **sizes})
    return (randomise(model, std=0.1, seed=seed) if randomised else model).to(dtype)



# A DINOv2 ViT of timm's family (vit_*_patch14_dinov2) small enough for tests; its native grid of position
# embeddings is 5 x 5 (70 x 70 inputs), resampled to the protocol's 16 x 16 when loaded.
TINY_DINOV2 = dict(arch="vit_small_patch14_dinov2", embed_dim=32, depth=2, num_heads=2)
TINY_DINOV2_NATIVE_SIZE = 70


def write_tiny_dinov2(path, seed=0, original_layout=False, **sizes):
    """Random weights of a tiny DINOv2 ViT (TINY_DINOV2 with `sizes`) saved at `path`: timm's layout as
    .safetensors, or with original_layout the layout of the DINOv2 release (its `mask_token`, torch.save)."""
    import timm
    from safetensors.torch import save_file
    kwargs = {**TINY_DINOV2, **sizes}
    torch.manual_seed(seed)
    network = timm.create_model(kwargs.pop("arch"), pretrained=False, img_size=TINY_DINOV2_NATIVE_SIZE,
                                num_classes=0, **kwargs)
    randomise(network, std=0.1, seed=seed)  # timm's LayerScale starts at 1e-5: the image would barely matter
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.add_(1.0)  # scales around 1
    state = {k: v.clone() for k, v in network.state_dict().items()}
    if original_layout:
        torch.save({**state, "mask_token": torch.zeros(1, kwargs["embed_dim"])}, path)
    else:
        save_file(state, str(path))
    return path


def tiny_dinov2_features(weights, device="cpu", **preprocessing):
    """dinov2_features.DINOv2Features of a write_tiny_dinov2 file."""
    import dinov2_features
    network = dinov2_features.build_network(weights, **TINY_DINOV2)
    return dinov2_features.DINOv2Features(network, dinov2_features.Preprocessing(**preprocessing), device=device)


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


# The release's two config files (its imagenet.yaml and cifar.yaml), shipped in configs/ key for key: the one
# copy of the release's values the tests read.
RELEASE_CONFIG_FILES = {"imagenet": "imagenet.yaml", "cifar": "cifar.yaml"}


def release_config_path(kind):
    return os.path.join(ROOT, "configs", RELEASE_CONFIG_FILES[kind])


def release_config(kind, *keys):
    """The keys and values of the release's `imagenet` or `cifar` config, in its order, as its YAML reads; only
    `keys` where some are named."""
    values, _ = read_values(release_config_path(kind))
    return {key: values[key] for key in keys} if keys else values


def release_objective(kind, **changes):
    """The loss settings (models.Objective) of the release's `imagenet` or `cifar` config, with `changes`."""
    objective = load_config(release_config_path(kind)).objective()
    return dataclasses.replace(objective, **changes)


def release_guidance(kind):
    """The guidance and loss-weight keywords of the release's `kind` config that the loss functions
    (Soflow.get_velocity_loss / get_consistency_loss) take, in their argument order."""
    return release_config(kind, "cfg_scale", "cfg_decay_time", "p", "eps", "mix_ratio")


def declared_values(f):
    """(values just outside, values inside) what the declaration (config_keys.key) of the config field `f` accepts:
    at each finite end of its interval, one step (1 for integers, 1e-6) past it and the end itself (or one step in,
    for an open end); a name not among its choices and each choice; for a list key, lists of `length` (or one)
    such items (inside: of its first default item, when nothing else is declared), the empty list and a list one
    item too long (with a declared length)."""
    declared = declaration(f)
    kind = unwrap_optional(f.type)[0]
    item = typing.get_args(kind)[0] if is_list_key(f) else kind
    step = 1 if item is int else 1e-6
    outside, inside = [], []
    interval = declared["within"]
    if interval is not None:
        for end, closed, away in ((float(interval.low), interval.text[0] == "[", -step),
                                  (float(interval.high), interval.text[-1] == "]", step)):
            if math.isfinite(end):
                outside.append(item(end + away if closed else end))
                inside.append(item(end if closed else end - away))
    if declared["choices"] is not None:
        outside.append("not-a-choice")
        inside += list(declared["choices"])
    if not is_list_key(f):
        return outside, inside
    n = declared["length"] or 1
    example = (inside or declared_default(f))[0]
    too_long = [[example] * (n + 1)] if declared["length"] else []
    return [[v] * n for v in outside] + [[]] + too_long, [[v] * n for v in inside or [example]]


def write_release_config(kind, path, **changes):
    """The release's `imagenet.yaml` or `cifar.yaml` as its authors wrote it (1e-4 as YAML reads it: a
    string), with `changes` applied."""
    values = {**release_config(kind), **changes}
    with open(path, "w") as f:
        for key, value in values.items():
            f.write(f"{key}: {'1e-4' if key == 'learning_rate' and value == 1e-4 else value}\n")
    return str(path)


def assert_same_final_state(run_a, run_b, step=6):
    """The checkpoints of `step` of two runs hold bit-identical weights, EMA and optimizer state."""
    from checkpoints import load_checkpoint
    a, b = load_checkpoint(run_a / "ckpts" / f"{step}.pt"), load_checkpoint(run_b / "ckpts" / f"{step}.pt")
    for key in ("model", "ema_model"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name]))


def import_tf_or_skip():
    """TensorFlow, imported as the evaluator imports it; the calling test is skipped where that fails."""
    import evaluator
    try:
        return evaluator._import_tensorflow()
    except ImportError as err:
        pytest.skip(f"TensorFlow is not importable ({err})")


def write_config(base_name, path, **changes):
    return write_variant(os.path.join(ROOT, "configs", base_name), path, **changes)


def torchrun(script, args, nproc=2, env=None, check=True, timeout=600, torchrun_args=()):
    """torchrun --standalone in a session of its own (a test's Ctrl-C to its process group reaches it alone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *torchrun_args, os.path.join(ROOT, script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


# ----------------------------------------------------------------------------------------------------
# Tiny runs of the sampling scripts (inference.py, sample.py, checkpoint sources)

# The environment variables through which torchrun and SLURM name a process's rank and world size.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")

# A 2-step class-conditional Digits run of a tiny DiT (the variant of imagenet.yaml the sampling tests train).
DIGITS_TINY = dict(dataset_type="Digits", model_type="DiT-B-4", hidden_size=32, depth=2, num_heads=2, patch_size=2,
                   data_size=8, data_channels=1, num_classes=10, batch_size=16, total_steps=2, logging_steps=1,
                   eval_demo_steps=2, ckpt_saving_steps=2, eval_steps=2, num_eval_samples=10, eval_batch_size=5,
                   eval_demo_shape=[10, 2], cfg_scale=2.0, cfg_drop_rate=0.1, mix_ratio=0.5, num_workers=0)


def grid_tiles(grid, rows, cols, size=8, scale=8, gap=inference.GRID_GAP):
    """The raw tiles [rows, cols, size, size, 3] of a saved grid, checking its layout: every tile enlarged
    scale x scale by nearest neighbour, `gap` black pixels between tiles."""
    step = size * scale + gap
    assert grid.shape == (rows * step - gap, cols * step - gap, 3)
    out = np.zeros((rows, cols, size, size, 3), np.uint8)
    gaps = np.ones(grid.shape[:2], bool)
    for r in range(rows):
        for c in range(cols):
            tile = grid[r * step:r * step + size * scale, c * step:c * step + size * scale]
            out[r, c] = tile[::scale, ::scale]
            assert np.array_equal(out[r, c].repeat(scale, 0).repeat(scale, 1), tile)
            gaps[r * step:r * step + size * scale, c * step:c * step + size * scale] = False
    assert not grid[gaps].any()
    return out


def make_run(root, std=0.05, base="imagenet.yaml", **changes):
    """A run folder as train.py lays it out (config.yaml, ckpts/2.pt in the release's layout) holding a tiny
    DiT with random weights (a trained 2-step EMA is too close to adaLN-Zero's identity to tell classes apart):
    by default DIGITS_TINY, else `base` with `changes`. Returns (config path, checkpoint)."""
    src = write_config(base, root / "src.yaml", working_dir=str(root / "run"),
                       **{**(DIGITS_TINY if base == "imagenet.yaml" else {}), **changes})
    cfg = load_config(src)
    os.makedirs(root / "run" / "ckpts")
    save_config(cfg, root / "run" / "config.yaml")
    weights = randomise(cfg.build_model(), std=std).state_dict()
    ckpt = root / "run" / "ckpts" / "2.pt"
    save_checkpoint({"model": weights, "ema_model": weights, "optimizer": {}, "finished_steps": 2,
                     "finished_epochs": 0}, str(ckpt))
    return str(root / "run" / "config.yaml"), str(ckpt)


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


def write_latent_file(path, n=4, channels=8, size=4, **overrides):
    """A latent file in latent_dataset.py's layout (zero latents, labels 0..n-1 unless overridden; an override of
    None leaves that dataset out)."""
    values = {'latents': np.zeros((n, channels, size, size), np.float32), 'labels': np.arange(n, dtype=np.int64),
              'amount': np.int64(n), 'latent_size': np.int64(size)}
    values.update(overrides)
    with h5py.File(path, 'w') as f:
        for name, value in values.items():
            if value is not None:
                f.create_dataset(name, data=value)
    return path


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


# ----------------------------------------------------------------------------------------------------
# CUDA's SDPA kernel rules, checked on any device

class CudaKernelError(RuntimeError):
    """An SDPA call that no enabled CUDA kernel would run (CUDA: "No available kernel. Aborting execution.")."""


def cuda_kernel_refusals(kernel, q, k, v, attn_mask=None, dtype=None):
    """Why CUDA's `kernel` (an SDPBackend, sm80 or newer, PyTorch's sdp_utils) would refuse the call
    scaled_dot_product_attention(q, k, v, attn_mask) whose inputs run in `dtype` (the autocast dtype, else
    theirs); [] when it runs it. The math kernel takes anything."""
    from torch.nn.attention import SDPBackend
    if kernel == SDPBackend.MATH:
        return []
    name = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient"}[kernel]
    dtypes = {q.dtype, k.dtype, v.dtype} if dtype is None else {dtype}
    refusals = []
    if not q.dim() == k.dim() == v.dim() == 4:
        refusals.append(f"{name}: inputs must be 4-D [B, heads, L, head_dim], got {q.dim()}-D")
    if len(dtypes) > 1:
        refusals.append(f"{name}: q, k, v must share one dtype, got {sorted(map(str, dtypes))}")
    accepted = (torch.float16, torch.bfloat16) + ((torch.float32,) if name == "efficient" else ())
    if not dtypes <= set(accepted):
        refusals.append(f"{name}: dtype {sorted(map(str, dtypes))} not in {[str(d) for d in accepted]}")
    if attn_mask is not None:
        refusals.append(f"{name}: an attention mask (this code passes none)")
    if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (q, k, v)):
        refusals.append(f"{name}: the last dimension needs stride 1, got strides {[t.stride(-1) for t in (q, k, v)]}")
    head, value_head = q.shape[-1], v.shape[-1]
    if q.dim() == 4 and (q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]):
        refusals.append(f"{name}: batch and heads must agree, got {[tuple(t.shape) for t in (q, k, v)]}")
    if name == "flash" and not (head == k.shape[-1] == value_head and head <= 256):
        refusals.append(f"{name}: head dims must be equal and <= 256, got {head}, {k.shape[-1]}, {value_head}")
    if name == "efficient":
        alignment = 4 if dtypes == {torch.float32} else 8  # 128-bit loads on sm80+
        if head != k.shape[-1] or head % alignment or value_head % alignment:
            refusals.append(f"{name}: head dims must be multiples of {alignment}, got {head}, {value_head}")
    return refusals


def enabled_sdpa_kernels():
    """The SDPA kernels `sdpa_kernel` leaves enabled (process-wide flags, on any device), in CUDA's order."""
    from torch.nn.attention import SDPBackend
    flags = torch.backends.cuda
    return [kernel for kernel, on in ((SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
                                      (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
                                      (SDPBackend.MATH, flags.math_sdp_enabled())) if on]


class CudaSDPARules(torch.overrides.TorchFunctionMode):
    """Runs code on any device while checking every F.scaled_dot_product_attention call against the CUDA kernels
    enabled at that call (by `sdpa_kernel`, e.g. distributed.attention_context(attention, cuda)), in CUDA's order
    (flash, memory-efficient, math): the call fails with CudaKernelError when none of them would take it. The call
    itself then runs on a kernel of its own device. `calls` lists (CUDA kernel, shape, dtype) per call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        device_type = q.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        enabled = enabled_sdpa_kernels()
        refusals = {kernel: cuda_kernel_refusals(kernel, q, k, v, mask, dtype) for kernel in enabled}
        chosen = next((kernel for kernel in enabled if not refusals[kernel]), None)
        if chosen is None:
            raise CudaKernelError(f"no enabled CUDA SDPA kernel takes q {tuple(q.shape)} {dtype or q.dtype}: "
                                  + "; ".join(r for kernel in enabled for r in refusals[kernel]))
        self.calls.append((chosen, tuple(q.shape), dtype or q.dtype))
        if device_type == "cuda":
            return func(*args, **kwargs)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # the kernels the CPU has
            return func(*args, **kwargs)


_SDPA = torch.nn.functional.scaled_dot_product_attention


# ----------------------------------------------------------------------------------------------------
# Devices: tests that build a model, take a step, sample or score run on each device present

CUDA_MISSING = "CUDA is not available on this machine (the case runs where a GPU is)"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_MISSING)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


class Planted:
    """A pickled payload whose unpickling runs code: it writes a marker file (for the refusals of unsafe files)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)
