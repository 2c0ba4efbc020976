"""Sample dumps from a SoFlow checkpoint at any NFE, in the ADM `.npz` format, on one or many ranks.

    torchrun --nproc-per-node=N inference.py --config CFG --ckpt-steps K --eval-NFE 1 --eval-batch-size 125 --seed 0
    torchrun --nproc-per-node=N inference.py --ckpt hf://ORG/REPO/model.safetensors --eval-NFE 1 --seed 0
    python inference.py --export DIR --config CFG --ckpt-steps K      # DIR/model.safetensors, DIR/config*.yaml

`--ckpt` takes a `.pt` checkpoint (this code's or the release's), a `.safetensors` file of weights or
`hf://ORG/REPO[@REVISION]/PATH` (fetched through the Hugging Face cache; HF_HUB_OFFLINE=1 reads the cache only).
Without `--config`, the config inside the checkpoint is used (train.py writes it into every checkpoint, so a file
copied alone samples), else the config.yaml beside it (the release's; checkpoints.config_beside); a `--config`
given wins, and each key where it differs from the checkpoint's own is named.

Sample i takes its label and all of its noise from a generator seeded by (seed, i) (`sample_inputs`); what
that makes reproducible, and how exactly: docs/determinism.md. The same functions write the FID dumps and the
sample grids of train.py and sample.py: every image goes through `sample_images`.
"""
import argparse
import errno
import math
import os
import secrets
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from distributed import (all_gather_objects, attention_context, claim_on_rank_zero, cleanup_distributed,
                         configure_backends, first_error, interruptible, precision_context, rank_bounds,
                         setup_distributed, setup_logging)
from models import to_uint8
from safe_io import Claim, ClaimError, OutputError, WriteError, atomic_write

# ----------------------------------------------------------------------------------------------------
# Per-sample randomness


def sample_rng(seed, index):
    """The generator of global sample `index` under `seed`: NumPy PCG64 with a 128-bit state hashed from
    (index, seed) by SeedSequence, so streams do not collide across seeds or indices. (A torch CPU
    generator would not do: it keeps only the low 32 bits of its seed, so packing (seed, index) into one
    integer either drops the seed or, hashed to 32 bits, collides within a 50K dump.)"""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(index), int(seed)])


def sample_inputs(indices, num_classes, class_balanced, shape, nfe, seed):
    """Labels [n] (None when unconditional) and noise [nfe, n, *shape] for global sample indices. A random
    label is drawn before the noise from the same generator; with class_balanced (label i % num_classes) or
    no classes, sample i's noise is `sample_noise`'s."""
    labels, noise = [], []
    for i in indices:
        rng = sample_rng(seed, i)
        if num_classes > 0:
            labels.append(int(i) % num_classes if class_balanced else int(rng.integers(num_classes)))
        noise.append(torch.from_numpy(rng.standard_normal((nfe, *shape), dtype=np.float32)))
    labels = torch.tensor(labels, dtype=torch.long) if num_classes > 0 else None
    return labels, torch.stack(noise, dim=1)


def sample_noise(indices, shape, nfe, seed):
    """Noise [nfe, n, *shape] of the given sample indices for samples whose labels are chosen, not drawn
    (grids, sample.py)."""
    return sample_inputs(indices, 0, False, shape, nfe, seed)[1]


def load_sampling_model(cfg, ckpt, device="cpu", state=None):
    """The config's model with the sampling (EMA) weights of checkpoint `ckpt` (a `.pt` or `.safetensors` file,
    or hf://ORG/REPO/PATH; `state`: its contents, when already read), strict, in eval mode."""
    from checkpoints import check_weights_fit, load_checkpoint, model_state, resolve_checkpoint
    model = cfg.build_model()
    weights = model_state(state if state is not None else load_checkpoint(resolve_checkpoint(ckpt)))
    check_weights_fit(model, weights, cfg.model_type, ckpt)
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()


@torch.no_grad()
def sample_images(model, noise, labels, device, decode=None, precision="fp32"):
    """The one sampling function (dumps, grids, train.py, sample.py): noise [nfe, n, C, H, W] (the starting
    noise, then the re-noising draws of each further step) and labels [n] (None: unconditional) -> uint8 NHWC
    images, through `model.sample` at nfe = len(noise), decoded by `decode` (the SD-VAE) when given."""
    nfe = noise.shape[0]
    noise = noise.to(device)
    with precision_context(device, precision):
        x = model.sample(noise[0], labels.to(device) if labels is not None else None, nfe=nfe,
                         renoise=noise[1:] if nfe > 1 else None)
        if decode is not None:
            x = decode(x)
    return to_uint8(x.float())


def generate(model, indices, nfe, seed, device, decode=None, class_balanced=False, precision="fp32"):
    """uint8 NHWC images (and labels) of the given global sample indices, labels and noise by sample_inputs."""
    shape = (model.data_channels, model.data_size, model.data_size)
    labels, noise = sample_inputs(indices, model.num_classes, class_balanced, shape, nfe, seed)
    return sample_images(model, noise, labels, device, decode, precision), labels


class DecoderError(RuntimeError):
    pass


def build_decoder(vae, latent_scale, device, chunk_size=32):
    """Latents -> [-1, 1] images with the SD-VAE decoder (float32, as the release), `chunk_size` latents at a
    time to bound memory. `vae` is a Hub id or a local `save_pretrained` folder."""
    from diffusers import AutoencoderKL
    try:
        model = AutoencoderKL.from_pretrained(vae).to(device).eval()
    except Exception as e:  # offline, no such repository, a folder without weights, ...
        from checkpoints import hub_offline
        offline = hub_offline()
        raise DecoderError(
            f"could not load the SD-VAE {vae!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"Hugging Face offline mode is {'on' if offline else 'off'} (HF_HUB_OFFLINE). It decodes the latents "
            f"of sample grids and FID dumps. Fix: on a machine with network, run `python -c \"from diffusers import "
            f"AutoencoderKL; AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-mse').save_pretrained("
            f"'sd-vae-ft-mse')\"`, copy the folder here and set `vae: ./sd-vae-ft-mse` in the config "
            f"(or --vae for inference.py and sample.py)") from None

    def decode(latents):
        return torch.cat([model.decode(chunk.float() / latent_scale).sample
                          for chunk in latents.split(chunk_size)])
    return decode


# ----------------------------------------------------------------------------------------------------
# Writing


def _write_npz_streaming(path, parts, labels):
    """Writes `arr_0` (and `arr_1` labels) by streaming the parts, so no rank holds all images at once."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    total = sum(len(a) for a in arrays)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (total, *max(arrays, key=len).shape[1:])}
            np.lib.format.write_array_header_2_0(f, header)
            for a in arrays:
                for start in range(0, len(a), 1024):
                    f.write(np.ascontiguousarray(a[start:start + 1024]).tobytes())
        if labels is not None:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels)


def _open_part(path, shape):
    """A memory-mapped uint8 .npy of `shape`, its blocks reserved now: a full disk then fails here, with an error,
    instead of with SIGBUS when a page of the map is first written."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.path.getsize(path))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it: the map as it is
            raise
    finally:
        os.close(fd)
    return images


def _sample_share(model, indices, part, nfe, seed, batch_size, device, decode, class_balanced, precision, bar,
                  world_size, on_batch):
    """Samples this rank's `indices`, writing the images into the .npy `part` as they come (None: not kept);
    returns their labels."""
    images = None
    labels = np.zeros(len(indices), dtype=np.int64)
    for lo in range(0, len(indices), batch_size):
        batch = indices[lo:lo + batch_size]
        x, y = generate(model, batch, nfe, seed, device, decode, class_balanced, precision)
        if on_batch is not None:
            on_batch(x.numpy())
        if part is not None:
            if images is None:
                images = _open_part(part, (len(indices), *x.shape[1:]))
            images[lo:lo + len(batch)] = x.numpy()
        if y is not None:
            labels[lo:lo + len(batch)] = y.numpy()
        bar.update(len(batch) * world_size)  # tqdm's rate is then the images/s of all ranks
    if part is not None and images is None:  # more ranks than samples
        np.save(part, np.zeros((0, model.data_size, model.data_size, 3), np.uint8))
    elif images is not None:
        images.flush()
    return labels


def _failure(rank, error):
    """One rank's failure, as the text every rank reports (safe_io.WriteError names the file and free space)."""
    return f"rank {rank}: {error}" if isinstance(error, WriteError) else f"rank {rank}: {type(error).__name__}: {error}"


def _claim_dump(out_path, rank):
    """Rank 0 claims `out_path` (the lock `{out_path}.lock`); every rank learns the outcome and the name stem of
    this dump's parts, unique to it. Raises ClaimError on every rank when another process writes `out_path`."""
    claim = Claim(f"{out_path}.lock", out_path, "sample dump", "another --out")
    _, error = claim_on_rank_zero(claim, rank)
    if error:
        raise ClaimError(error)
    return claim, all_gather_objects(f"{out_path}.{secrets.token_hex(6)}")[0]


def check_class_balanced(num_samples, num_classes):
    """A class-balanced dump (label i % num_classes) holds each class equally often only when num_samples is a
    multiple of num_classes (any number for an unconditional model, num_classes 0)."""
    if num_classes > 0 and num_samples % num_classes:
        raise ValueError(f"class-balanced samples need --num-samples ({num_samples}) divisible by {num_classes}, "
                         f"the number of classes")


def dump_samples(model, out_path, num_samples, nfe, seed, batch_size, device, rank=0, world_size=1, decode=None,
                 class_balanced=False, precision="fp32", progress=True, on_batch=None, write=True):
    """Samples `num_samples` images over all ranks (rank r its contiguous share) and writes them to `out_path`
    (ADM format); returns the path on rank 0. `on_batch(images)` sees every uint8 NHWC batch of this rank as it
    is sampled (in-training FID); with write=False nothing is written.

    The output is claimed first (a second writer of the same file is refused, safe_io.ClaimError), the ranks'
    parts carry names unique to this dump, and the file appears complete or not at all. A failure on any rank
    stops every rank with the same OutputError (nobody waits for the process group's timeout)."""
    if class_balanced:
        check_class_balanced(num_samples, model.num_classes)
    indices = range(*rank_bounds(num_samples, rank, world_size))
    bar = tqdm(total=num_samples, desc=f"sampling {os.path.basename(out_path)}", unit="img",
               disable=not progress or rank != 0, dynamic_ncols=True)
    args = (nfe, seed, batch_size, device, decode, class_balanced, precision, bar, world_size, on_batch)
    if not write:
        _sample_share(model, indices, None, *args)
        bar.close()
        return None
    claim, stem = _claim_dump(out_path, rank)
    part, label_part = f"{stem}.part{rank:05d}.npy", f"{stem}.labels{rank:05d}.npy"
    try:
        error = None
        try:
            labels = _sample_share(model, indices, part, *args)
            if model.num_classes > 0:
                np.save(label_part, labels)
        except Exception as e:
            error = _failure(rank, e)
        bar.close()
        error = first_error(error)
        if error is None and rank == 0:
            try:
                all_labels = (np.concatenate([np.load(f"{stem}.labels{r:05d}.npy") for r in range(world_size)])
                              if model.num_classes > 0 else None)
                parts = [f"{stem}.part{r:05d}.npy" for r in range(world_size)]
                atomic_write(out_path, lambda tmp: _write_npz_streaming(tmp, parts, all_labels), "sample dump")
            except Exception as e:
                error = _failure(rank, e)
        error = first_error(error)
        if error:
            raise OutputError(f"sample dump {out_path} not written: {error}")
    finally:
        for f in (part, label_part):
            if os.path.exists(f):
                os.remove(f)
        claim.release()
    return out_path if rank == 0 else None


GRID_MIN_TILE = 64  # pixels: smaller tiles are enlarged (nearest neighbour) to at least this size
GRID_GAP = 4        # pixels of black between neighbouring tiles


def grid_scale(tile_size):
    """The enlargement of a grid's tiles: 1 for tiles of GRID_MIN_TILE pixels or more, else
    ceil(GRID_MIN_TILE / tile_size) (8 px digits 8x, 16 px 4x, 32 px CIFAR 2x)."""
    return 1 if tile_size >= GRID_MIN_TILE else math.ceil(GRID_MIN_TILE / tile_size)


def save_grid(images, rows, path, scale=None, gap=GRID_GAP):
    """uint8 NHWC images -> one image file (PNG unless `path` names another format) with `rows` rows, row-major,
    each pixel repeated `scale` x `scale` times (default: grid_scale of the tile size) and `gap` black pixels
    between neighbouring tiles: rows * h * scale + (rows - 1) * gap pixels high. scale=1, gap=0: the raw size."""
    from PIL import Image
    n, h, w, c = images.shape
    scale = grid_scale(min(h, w)) if scale is None else int(scale)
    if scale < 1 or gap < 0:
        raise ValueError(f"grid scale must be >= 1 and gap >= 0, got {scale} and {gap}")
    cols = math.ceil(n / rows)
    th, tw = h * scale, w * scale
    canvas = np.zeros((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        y, x = r * (th + gap), col * (tw + gap)
        canvas[y:y + th, x:x + tw] = img.repeat(scale, axis=0).repeat(scale, axis=1)
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    image = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
    atomic_write(path, lambda tmp: image.save(tmp, format=image_format), "sample grid")


def grid_labels(rows, cols, num_classes, classes=None):
    """Row r shows class classes[r] (default: r * (num_classes // rows), one row per class when rows ==
    num_classes), `cols` times; None for an unconditional model."""
    if num_classes == 0:
        return None
    if classes is None:
        step = max(num_classes // rows, 1)
        classes = [(r * step) % num_classes for r in range(rows)]
    if len(classes) != rows or not all(0 <= int(c) < num_classes for c in classes):
        raise ValueError(f"a grid of {rows} rows needs {rows} classes in [0, {num_classes}), got {list(classes)}")
    return torch.tensor([int(c) for c in classes for _ in range(cols)], dtype=torch.long)


def sample_grid(model, shape, nfe, seed, device, path, decode=None, precision="fp32", classes=None, scale=None,
                gap=GRID_GAP):
    """A rows x cols grid (shape) saved to `path` (save_grid: enlarged by `scale`, `gap` pixels between tiles):
    row r of class classes[r] (grid_labels), sample i = r * cols + c with the noise of index i under `seed`
    (sample_noise); returns the uint8 NHWC images."""
    rows, cols = shape
    labels = grid_labels(rows, cols, model.num_classes, classes)
    noise = sample_noise(range(rows * cols), (model.data_channels, model.data_size, model.data_size), nfe, seed)
    images = sample_images(model, noise, labels, device, decode, precision).numpy()
    save_grid(images, rows, path, scale, gap)
    return images


# ----------------------------------------------------------------------------------------------------
# Command line


def export(cfg, ckpt, out_dir, state=None):
    """Writes `out_dir/model.safetensors` (the sampling (EMA) weights of checkpoint `ckpt`, checked against the
    config's model first; metadata: finished_steps, which weights, the source file's name) and
    `out_dir/config.yaml` with its companion `out_dir/config.soflow.yaml` (the full config, as training writes
    it), each atomically: the folder to upload to the Hub, read back as `--ckpt out_dir/model.safetensors` or
    `--ckpt hf://ORG/REPO/model.safetensors`. Returns the weights' and the config's paths."""
    from checkpoints import check_weights_fit, load_checkpoint, model_state, resolve_checkpoint, save_weights
    from config import save_config
    state = state if state is not None else load_checkpoint(resolve_checkpoint(ckpt))
    weights = model_state(state)
    model = cfg.build_model()
    check_weights_fit(model, weights, cfg.model_type, ckpt)  # fails here, before writing, on a wrong config
    model.load_state_dict(weights, strict=True)
    metadata = {"format": "pt", "weights": "ema_model" if "ema_model" in state else "model",
                "source": os.path.basename(str(ckpt))}
    if "finished_steps" in state:
        metadata["finished_steps"] = int(state["finished_steps"])
    weights_path, config_path = os.path.join(out_dir, "model.safetensors"), os.path.join(out_dir, "config.yaml")
    save_weights(weights, weights_path, metadata)
    save_config(cfg, config_path)
    return weights_path, config_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="the training config (YAML); default with --ckpt: the one inside the checkpoint, else the "
                        "config.yaml beside it")
    p.add_argument("--ckpt-steps", type=int, default=None, help="use working_dir/ckpts/{K}.pt (needs --config)")
    p.add_argument("--ckpt", default=None,
                   help="any checkpoint: a .pt file (a released one included), a .safetensors file of weights, "
                        "or hf://ORG/REPO[@REVISION]/PATH on the Hugging Face Hub")
    p.add_argument("--eval-NFE", type=int, default=1, help="number of function evaluations")
    p.add_argument("--eval-batch-size", type=int, default=32, help="images per forward pass and rank (the release's "
                   "default; its README passes 125)")
    p.add_argument("--seed", type=int, default=42, help="noise and label seed (the release's default)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--vae", default=None, help="SD-VAE id or folder for ImageNet (default: the config's)")
    p.add_argument("--out", default=None, help="output folder (default: working_dir/evals)")
    p.add_argument("--class-balanced", action="store_true",
                   help="exactly num_samples / num_classes images per class (default: uniform random labels)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="default: the config's (fp32, the release's: float32 with TF32 on CUDA)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write DIR/model.safetensors (EMA weights), DIR/config.yaml and its companion "
                        "DIR/config.soflow.yaml, ready to upload, and exit "
                        "without sampling")
    return p.parse_args(argv)


def sampling_precision(cfg, precision=None):
    """--precision (default: the config's); SystemExit when the config's attention kernel cannot run it on CUDA.
    Shared with sample.py."""
    from config import attention_precision_error
    precision = precision or cfg.precision
    error = attention_precision_error(cfg.attention, precision)
    if error:
        raise SystemExit(f"--precision {precision}: {error}")
    return precision


def load_run(config, ckpt, ckpt_steps=None, warn=print):
    """(config, local checkpoint path, the checkpoint's contents) from the command line's --config / --ckpt /
    --ckpt-steps; SystemExit with the reason when they do not add up. The config: --config when given (`warn`
    names each key where it differs from the config inside the checkpoint), else the one inside the checkpoint
    (this code's carry it, so a file copied alone samples), else the config.yaml beside it (the release's
    checkpoints). Shared with sample.py."""
    from checkpoints import CheckpointSourceError, load_checkpoint, is_hub, resolve_checkpoint
    from config import ConfigError, load_config
    if (ckpt is None) == (ckpt_steps is None):
        raise SystemExit("give exactly one of --ckpt-steps K or --ckpt PATH")
    if ckpt_steps is not None and config is None:
        raise SystemExit("--ckpt-steps K reads working_dir/ckpts/K.pt of the config: give --config too")
    if ckpt is not None and not is_hub(ckpt) and not os.path.isfile(ckpt):
        raise SystemExit(f"checkpoint {ckpt} does not exist")
    try:  # a checkpoint that cannot be had is reported before its config
        path = resolve_checkpoint(ckpt) if ckpt is not None else None
        given = load_config(config) if config is not None else None
        path = path or os.path.join(given.working_dir, "ckpts", f"{ckpt_steps}.pt")
        if not os.path.isfile(path):
            raise SystemExit(f"checkpoint {path} does not exist")
        state = load_checkpoint(path)
        return checkpoint_config(given, config, state, ckpt or path, warn), path, state
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    except (CheckpointSourceError, ValueError) as e:  # unreadable or unsafe checkpoint: the message says which
        raise SystemExit(f"error: {e}") from None


def checkpoint_config(given, given_path, state, source, warn):
    """The config to sample `source` with (see load_run); ConfigError or CheckpointSourceError when there is none."""
    from checkpoints import config_beside
    from config import changed_keys, from_dict, load_config
    inside = state.get("config")
    inside = from_dict(inside, source=f"the config inside {source}") if inside is not None else None
    if given is None:
        return inside if inside is not None else load_config(config_beside(source))
    if inside is not None:
        for key, theirs, ours in changed_keys(inside, given):
            warn(f"--config {given_path} sets {key}: {ours!r}, the config inside {source} {theirs!r}; "
                 f"{ours!r} (the command line's) is used")
    return given


def load_sampler(cfg, ckpt, state, device, vae=None):
    """(the model with the checkpoint's sampling weights, the SD-VAE decoder for latent configs or None), or
    SystemExit naming what failed. Shared with sample.py."""
    try:
        model = load_sampling_model(cfg, ckpt, device, state)
    except ValueError as e:  # not this config's checkpoint: the message says which sizes differ
        raise SystemExit(f"error: {e}") from None
    try:
        decode = build_decoder(vae or cfg.vae, cfg.latent_scale, device) if cfg.dataset_type == "Imagenet" else None
    except DecoderError as e:
        raise SystemExit(str(e)) from None
    return model, decode


def main(argv=None):
    args = parse_args(argv)
    log = setup_logging("inference", int(os.environ.get("RANK", 0)))
    cfg, ckpt, state = load_run(args.config, args.ckpt, args.ckpt_steps, warn=log.warning)
    source = args.ckpt or ckpt
    if args.export:
        if int(os.environ.get("RANK", 0)) == 0:
            try:
                paths = export(cfg, ckpt, args.export, state)
            except (ValueError, OutputError) as e:
                raise SystemExit(f"error: {e}") from None
            log.info(f"exported the EMA weights of {source} and its config to {' and '.join(paths)}")
        return
    if args.eval_NFE < 1 or args.num_samples < 1 or args.eval_batch_size < 1:
        raise SystemExit("--eval-NFE, --num-samples and --eval-batch-size must be >= 1")
    if args.seed < 0:
        raise SystemExit(f"--seed must be >= 0, got {args.seed}")
    if args.class_balanced:
        try:
            check_class_balanced(args.num_samples, cfg.num_classes if cfg.conditional else 0)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    precision = sampling_precision(cfg, args.precision)
    rank, world_size, device = setup_distributed()
    log = setup_logging("inference", rank)
    configure_backends(device, cfg.tf32)
    try:
        model, decode = load_sampler(cfg, ckpt, state, device, args.vae)
        del state  # the optimizer's moments, among others: not kept while sampling
        name = os.path.splitext(os.path.basename(ckpt))[0]
        out_dir = args.out or os.path.join(cfg.working_dir, "evals")
        out = os.path.join(out_dir, f"{name}_{args.eval_NFE}NFE_{args.seed}.npz")
        log.info(f"sampling {args.num_samples} images at {args.eval_NFE} NFE from the EMA weights of {source} "
                 f"on {world_size} rank(s) -> {out}")
        kept = (f"nothing was written to {out} (each rank's partial file was removed); re-run the same command to "
                f"sample again from the start")
        try:
            with interruptible(lambda: kept, rank), attention_context(cfg.attention, device):
                dump_samples(model, out, args.num_samples, args.eval_NFE, args.seed, args.eval_batch_size, device,
                             rank, world_size, decode, args.class_balanced, precision)
        except OutputError as e:  # claimed by another writer, or a failed write: nothing written under `out`
            raise SystemExit(f"error: {e}") from None
        log.info(f"wrote {out}")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
