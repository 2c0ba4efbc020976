"""A training loop written the way the SoFlow release writes its own (its interface: docs/drop_in.md), run by
tests/test_models.py under torchrun on 2 CPU ranks (gloo):

    torchrun --nproc-per-node=2 tests/release_style_loop.py OUT_DIR LATENT_FOLDER

It reaches this code's modules only through the release's interface: `ImagenetDataset` through a
DistributedSampler DataLoader (a tiny DiT) and `AugmentPipe` built with the release's keywords (a tiny U-Net built
with num_classes=10 and called with labels=None), the DDP-wrapped model called with get_velocity_loss=True / False
and times shaped [B, 1, 1, 1], `get_middle_time` with the release's keywords and the clamp done here, an optimizer
over `model.module.network.parameters()`, and a sampling loop over the EMA copy's `solution_operator` and
`scheduler.alpha / beta`. At every step it also evaluates `Soflow.fused_loss` on the same draws (times, CFG mask,
noise; the U-Net's dropout masks too) and writes both, with what the test checks, to OUT_DIR/{kind}_rank{R}.json.
"""
import copy
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from augmentation import AugmentPipe  # noqa: E402
from helpers import TINY_DIT, TINY_UNET, randomise, release_config  # noqa: E402
from latent_dataset import ImagenetDataset  # noqa: E402
from models import Objective, Soflow  # noqa: E402

LATENT_SCALE = 0.18215
STEPS = 3
LOCAL_BATCH = 8


def loss_settings(kind):
    """The loss settings and cfg_drop_rate of the release's `imagenet` or `cifar` config (read from configs/ as
    the release reads its YAML); total_steps is left out: this loop runs STEPS steps."""
    keys = ({f.name for f in dataclasses.fields(Objective)} - {"total_steps"}) | {"cfg_drop_rate"}
    return {key: value for key, value in release_config(kind).items() if key in keys}


RECIPES = {"dit": loss_settings("imagenet"), "unet": loss_settings("cifar")}


def logit_normal(n, mean, std):
    return torch.sigmoid(torch.randn(n, 1, 1, 1) * std + mean)


def draw_times(model, recipe, batch, step):
    """The release's time draws, shaped [B, 1, 1, 1]: t for the Flow Matching rows, (t, l, s) for the others."""
    n_fm = int(recipe["velocity_loss_ratio"] * batch)
    mean, std = recipe["time_mean"], recipe["time_std"]
    t_fm = logit_normal(n_fm, mean[0], std[0])
    tau1, tau2 = logit_normal(batch - n_fm, mean[1], std[1]), logit_normal(batch - n_fm, mean[2], std[2])
    t = tau2.clamp(min=1e-4)
    s = torch.minimum(tau1, t - 1e-4)
    l = model.get_middle_time(t, s, step, STEPS, init_ratio=recipe["l_init_ratio"],
                              end_ratio=recipe["l_end_ratio"], method=recipe["l_schedule"])
    return t_fm, t, torch.minimum(l, t - 1e-4), s  # the clamp is the caller's


def release_losses(ddp, samples, labels, augment_labels, times, cfg_mask, recipe):
    """The two DDP calls; returns their (loss, mse, weight) and the random states each started from."""
    t_fm, t, l, s = times
    n_fm = t_fm.shape[0]
    settings = {k: recipe[k] for k in ("cfg_scale", "cfg_decay_time", "p", "eps", "mix_ratio")}

    def rows(x, part):
        return None if x is None else x[part]
    fm_rows, cons_rows = slice(0, n_fm), slice(n_fm, None)
    states = [torch.get_rng_state()]
    fm = ddp(get_velocity_loss=True, samples=samples[fm_rows], t=t_fm, labels=rows(labels, fm_rows),
             cfg_mask=rows(cfg_mask, fm_rows), augment_labels=rows(augment_labels, fm_rows), **settings)
    states.append(torch.get_rng_state())
    cons = ddp(get_velocity_loss=False, samples=samples[cons_rows], t=t, l=l, s=s, labels=rows(labels, cons_rows),
               cfg_mask=rows(cfg_mask, cons_rows), augment_labels=rows(augment_labels, cons_rows), **settings)
    return fm, cons, states


@torch.no_grad()
def fused_on_the_same_draws(model, samples, labels, augment_labels, times, cfg_mask, recipe, states):
    """Soflow.fused_loss over the whole batch with the noise the two calls drew (replayed from their random
    states; the U-Net's dropout then draws what the consistency call drew). The loop's random state is kept."""
    t_fm, t, l, s = times
    n_fm = t_fm.shape[0]
    resume = torch.get_rng_state()
    noise = []
    for state, part in zip(states, (samples[:n_fm], samples[n_fm:])):
        torch.set_rng_state(state)
        noise.append(torch.randn_like(part))
    objective = Objective(**{k: v for k, v in recipe.items() if k != "cfg_drop_rate"}, total_steps=STEPS)
    flat = [x.reshape(-1) for x in (t_fm, t, l, s)]
    parts = model.fused_loss(samples, t=torch.cat([flat[0], flat[1]]), s=torch.cat([flat[0], flat[3]]),
                             l=torch.cat([flat[0], flat[2]]), n_fm=n_fm, objective=objective, labels=labels,
                             cfg_mask=cfg_mask, augment_labels=augment_labels, noise=torch.cat(noise))
    torch.set_rng_state(resume)
    zero = (samples.new_zeros(()),) * 3
    return parts.get("fm", zero), parts.get("cons", zero)


def weight_sums(model):
    return [p.detach().double().sum().item() for p in model.parameters()]


def total(fm, cons, n_fm, batch):
    return fm[0] * (n_fm / batch) + cons[0] * ((batch - n_fm) / batch)


@torch.no_grad()
def release_style_sample(ema, noise, labels, nfe):
    """The release's sampling loop over the EMA copy: x0 = f(x, t_i, 0), re-noised with its scheduler."""
    x, n = noise[0], noise.shape[1]
    for i in range(nfe):
        x0 = ema.solution_operator(x, torch.full((n,), 1 - i / nfe), torch.zeros(n), labels, None)
        if i == nfe - 1:
            return x0
        t_next = 1 - (i + 1) / nfe
        x = ema.scheduler.alpha(t_next) * x0 + ema.scheduler.beta(t_next) * noise[i + 1]


def build(kind, rank):
    """The model (the release's constructor; tiny sizes), its data loader and optimizer class."""
    torch.manual_seed(rank)  # seed + rank, as the release; DDP broadcasts rank 0's weights
    if kind == "dit":
        model = randomise(Soflow(4, 8, 10, 0.1, "Linear", "Euler", "DiT-B-4", network_kwargs=TINY_DIT))
        return model, ImagenetDataset(sys.argv[2]), torch.optim.AdamW
    model = randomise(Soflow(3, 8, 10, 0.0, "Linear", "Euler", "UNet",
                             network_kwargs={**TINY_UNET, "dropout": 0.3}), std=0.1)
    images = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model, TensorDataset(images, torch.arange(32)), torch.optim.RAdam


def batch_inputs(kind, data, labels):
    """(samples, labels, augment_labels, row ids) of a loader batch, drawn as the release draws them."""
    if kind == "dit":
        mean, std = data.chunk(2, dim=1)
        return (mean + std * torch.randn_like(mean)) * LATENT_SCALE, labels, None, mean[:, 0, 0, 0].tolist()
    augment_pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1, translate_frac=1)
    images, augment_labels = augment_pipe(data)
    return images, None, augment_labels, labels.tolist()  # the release passes labels=None to the U-Net


def run(kind, rank, world):
    recipe = RECIPES[kind]
    model, dataset, optimizer_class = build(kind, rank)
    ddp = DDP(model)
    ema = copy.deepcopy(ddp.module).eval()
    optimizer = optimizer_class(ddp.module.network.parameters(), lr=1e-3)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=LOCAL_BATCH, sampler=sampler, num_workers=1, drop_last=True)
    record = {"steps": [], "rows": [], "initial_weights": weight_sums(ddp.module),
              "dataset": [getattr(dataset, "amount", len(dataset)), getattr(dataset, "latent_size", None)]}
    step, epoch = 0, 0
    while step < STEPS:
        sampler.set_epoch(epoch)
        for data, labels in loader:
            samples, labels, augment_labels, rows = batch_inputs(kind, data, labels)
            record["rows"].append([epoch, rows])
            times = draw_times(ddp.module, recipe, samples.shape[0], step)
            cfg_mask = None
            if recipe["cfg_scale"] > 1:  # the release masks labels only when guided
                cfg_mask = torch.rand(samples.shape[0], 1, 1, 1) < recipe["cfg_drop_rate"]
            fm, cons, states = release_losses(ddp, samples, labels, augment_labels, times, cfg_mask, recipe)
            fused = fused_on_the_same_draws(ddp.module, samples, labels, augment_labels, times, cfg_mask, recipe,
                                            states)
            n_fm = times[0].shape[0]
            loss = total(fm, cons, n_fm, samples.shape[0])
            record["steps"].append({
                "release": [loss.item()] + [v.item() for v in (*fm, *cons)],
                "fused": [total(*fused, n_fm, samples.shape[0]).item()] + [v.item() for v in (*fused[0], *fused[1])]})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), ddp.module.parameters()):
                    e.mul_(0.9).add_(p, alpha=0.1)
            step += 1
            if step == STEPS:
                break
        epoch += 1
    record["weights"] = weight_sums(ddp.module)
    record["sampling"] = sampling_checks(ema)
    record["sampling"]["ema_has_its_own_scheduler"] = ema.scheduler is not ddp.module.scheduler
    return record


def sampling_checks(ema):
    """Largest difference between the release-style sampling loop and Soflow.sample on the same draws, per NFE."""
    g = torch.Generator().manual_seed(1)
    n = 3
    noise = torch.randn(2, n, ema.data_channels, ema.data_size, ema.data_size, generator=g)
    labels = torch.randint(0, ema.num_classes, (n,), generator=g) if ema.num_classes else None
    diffs = {}
    for nfe in (1, 2):
        ours = ema.sample(noise[0], labels, nfe=nfe, renoise=noise[1:nfe])
        diffs[nfe] = (release_style_sample(ema, noise, labels, nfe) - ours).abs().max().item()
    return {"max_diff": diffs, "scheduler": type(ema.scheduler).__name__}


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for kind in RECIPES:
            record = run(kind, rank, world)
            with open(os.path.join(out, f"{kind}_rank{rank}.json"), "w") as f:
                json.dump(record, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
