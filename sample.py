"""A grid of SoFlow samples from a checkpoint, one row per class, as one PNG (in the spirit of DiT's sample.py).

    python sample.py --config C --ckpt K --classes 207 360 387 974 --nfe 1 --seed 0 --out samples.png
    python sample.py --ckpt results/digits_demo/ckpts/3000.pt --out digits.png     # the config inside it

--ckpt takes a .pt checkpoint (this code's or the release's), a .safetensors file of weights or
hf://ORG/REPO[@REVISION]/PATH (Hugging Face cache; HF_HUB_OFFLINE=1 reads the cache only); without --config, the
config inside the checkpoint (train.py's carry theirs), else the config.yaml beside it (inference.load_run). Row r shows class classes[r], --per-class samples of it; unconditional
models ignore --classes (their grid has --rows rows). Sample i (row-major) starts from the noise of index i under
--seed and is drawn by the function that draws training's grids and inference.py's dumps (inference.sample_grid),
so the defaults (the config's eval_demo_shape, seed and eval_NFE) redraw training's figs/{step}.png
(docs/determinism.md). Small tiles are enlarged as in training's grids (docs/sampling.md; --scale 1 --gap 0: the
raw size). CPU or GPU (--device).
"""
import argparse

import torch

from distributed import attention_context, configure_backends, setup_logging
from inference import GRID_GAP, grid_labels, load_run, load_sampler, sample_grid, sampling_precision
from safe_io import WriteError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a .pt or .safetensors file, or hf://ORG/REPO[@REVISION]/PATH")
    p.add_argument("--config", default=None, help="the model's config (default: the one inside --ckpt, else the "
                   "config.yaml beside it)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="one row per class (default: --rows classes spread over all, as training's grids)")
    p.add_argument("--per-class", type=int, default=None, help="samples per row (default: eval_demo_shape[1])")
    p.add_argument("--rows", type=int, default=None, help="rows without --classes (default: eval_demo_shape[0])")
    p.add_argument("--nfe", type=int, default=None, help="function evaluations per sample (default: eval_NFE)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the config's seed)")
    p.add_argument("--out", default="samples.png", help="the image file to write")
    p.add_argument("--scale", type=int, default=None, help="pixel enlargement (default: tiles to >= 64 px)")
    p.add_argument("--gap", type=int, default=GRID_GAP, help="black pixels between tiles (--scale 1 --gap 0: raw)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--vae", default=None, help="SD-VAE id or folder for ImageNet latents (default: the config's)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: the config's")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    log = setup_logging("sample")
    cfg, ckpt, state = load_run(args.config, args.ckpt, warn=log.warning)
    precision = sampling_precision(cfg, args.precision)
    def given(value, default):
        return default if value is None else value
    rows, per_class = given(args.rows, cfg.eval_demo_shape[0]), given(args.per_class, cfg.eval_demo_shape[1])
    nfe, seed = given(args.nfe, cfg.eval_NFE), given(args.seed, cfg.seed)
    if min(rows, per_class, nfe, given(args.scale, 1)) < 1 or min(seed, args.gap) < 0:
        raise SystemExit("--rows, --per-class, --nfe and --scale must be >= 1, --seed and --gap >= 0")
    classes = args.classes
    if not cfg.conditional:
        if classes:
            log.info(f"the model is unconditional: --classes {' '.join(map(str, classes))} ignored")
        classes = None
    elif classes is None:
        classes = grid_labels(rows, 1, cfg.num_classes).tolist()
    elif args.rows not in (None, len(classes)):
        raise SystemExit(f"--rows {args.rows} contradicts the {len(classes)} --classes (one row per class)")
    elif not all(0 <= c < cfg.num_classes for c in classes):
        raise SystemExit(f"--classes must lie in [0, {cfg.num_classes}) for this model, got {classes}")
    rows = len(classes) if classes else rows
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_backends(device, cfg.tf32)
    model, decode = load_sampler(cfg, ckpt, state, device, args.vae)
    del state
    try:
        with attention_context(cfg.attention, device):
            images = sample_grid(model, (rows, per_class), nfe, seed, device, args.out, decode,
                                 precision, classes, args.scale, args.gap)
    except WriteError as e:
        raise SystemExit(f"error: {e}") from None
    what = f"classes {' '.join(map(str, classes))}" if classes else "unconditional"
    log.info(f"wrote {args.out}: {rows} x {per_class} samples ({what}) at {nfe} NFE, seed {seed}, from the EMA "
             f"weights of {args.ckpt} on {device}")
    return images


if __name__ == "__main__":
    main()
