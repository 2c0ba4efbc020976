"""SoFlow wrapper: identities of the parameterisation, losses, gradients, CFG target, dropout sharing, sampler, and
the release's interface (its training loop's calls, its scheduler's names)."""
import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from helpers import (DEVICES, declared_values, release_guidance, release_objective, tiny_dit, tiny_unet, torchrun,
                     write_latent_file)
from models import (MIN_TIME_GAP, Objective, Scheduler, Soflow, SoflowLoss, average_velocity_jvp, draw_training_times,
                    middle_time, shared_random_state, to_uint8)

@pytest.mark.parametrize("coefficient_type", ["Euler", "Trig"])
def test_solution_operator_identity_at_s_equals_t(coefficient_type, device):
    model = tiny_dit(coefficient_type=coefficient_type).to(device)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64).to(device)
    t = torch.rand(3, dtype=torch.float64).to(device)
    labels = torch.tensor([1, 2, 10]).to(device)
    assert torch.allclose(model.solution_operator(x, t, t, labels), x, atol=1e-12)
    F = model.network(x, t, 0.3 * t, labels)
    assert F.abs().mean() > 1e-3  # the identity is not a zero network in disguise


@pytest.mark.parametrize("coefficient_type", ["Euler", "Trig"])
def test_velocity_is_derivative_in_s(coefficient_type, device):
    model = tiny_dit(coefficient_type=coefficient_type).to(device)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64).to(device)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64).to(device)
    labels = torch.tensor([3, 4]).to(device)
    h = 1e-5
    fd = (model.solution_operator(x, t, t + h, labels) - model.solution_operator(x, t, t - h, labels)) / (2 * h)
    v = model.predict_velocity(x, t, labels)
    assert torch.allclose(v, fd, atol=1e-7, rtol=1e-6)
    F = model.network(x, t, t, labels)
    expected = F if coefficient_type == "Euler" else math.pi / 2 * F
    assert torch.allclose(v, expected, atol=1e-12)


@pytest.mark.parametrize("noising_type", ["Linear", "Trig"])
def test_noising_matches_analytic_derivatives(noising_type):
    sch = Scheduler(noising_type, "Euler")
    x0, x1 = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 5, dtype=torch.float64)
    h = 1e-6
    x_t, v_t = sch.add_noise(x0, x1, t)
    fd = (sch.add_noise(x0, x1, t + h)[0] - sch.add_noise(x0, x1, t - h)[0]) / (2 * h)
    assert torch.allclose(v_t, fd, atol=1e-8)
    assert torch.allclose(sch.add_noise(x0, x1, torch.zeros(5, dtype=torch.float64))[0], x0)
    assert torch.allclose(sch.add_noise(x0, x1, torch.ones(5, dtype=torch.float64))[0], x1, atol=1e-12)
    if noising_type == "Linear":
        assert torch.allclose(x_t, (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * x1)
    else:
        c, s = torch.cos(math.pi / 2 * t).view(-1, 1, 1, 1), torch.sin(math.pi / 2 * t).view(-1, 1, 1, 1)
        assert torch.allclose(x_t, c * x0 + s * x1)


@pytest.mark.parametrize("coefficient_type", ["Euler", "Trig"])
def test_coefficient_partial_derivatives(coefficient_type):
    sch = Scheduler("Linear", coefficient_type)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    s = torch.tensor([0.2, 0.1], dtype=torch.float64)
    h = 1e-6
    for fn, dfn_ds, dfn_dt in ((sch.a, sch.da_ds, sch.da_dt), (sch.b, sch.db_ds, sch.db_dt)):
        assert torch.allclose(dfn_ds(t, s), (fn(t, s + h) - fn(t, s - h)) / (2 * h), atol=1e-8)
        assert torch.allclose(dfn_dt(t, s), (fn(t + h, s) - fn(t - h, s)) / (2 * h), atol=1e-8)


@pytest.mark.parametrize("coefficient_type", ["Euler", "Trig"])
def test_consistency_gradient_is_scaled_weighted_mse_gradient(coefficient_type, device):
    """grad sign(b) mean(F_t * sg(Delta w)) == (t - l)/|b(t,s)| grad 0.5 w mean(Delta^2), per sample."""
    model = tiny_dit(coefficient_type=coefficient_type).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for t, l, s, label, p, eps in ((0.9, 0.85, 0.2, 3, 1.0, 0.01), (0.5, 0.45, 0.05, 7, 0.75, 0.001)):
        x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64).to(device)
        x1 = torch.randn(1, 4, 8, 8, dtype=torch.float64).to(device)
        tt, lt, st = (torch.tensor([v], dtype=torch.float64, device=device) for v in (t, l, s))
        labels = torch.tensor([label]).to(device)
        loss, mse, weight = model.get_consistency_loss(x0, tt, lt, st, labels, p=p, eps=eps, noise=x1)
        g_surrogate = torch.autograd.grad(loss, params)

        sch = model.scheduler
        x_t, v_t = sch.add_noise(x0, x1, tt)
        with torch.no_grad():
            f_l = model.solution_operator(x_t + v_t * (l - t), lt, st, labels)
        f_t = model.solution_operator(x_t, tt, st, labels)
        delta = (f_t - f_l) / (t - l)
        w = 1 / (delta.detach().square().mean() + eps) ** p
        assert torch.allclose(mse, delta.detach().square().mean()) and torch.allclose(weight, w)
        g_mse = torch.autograd.grad(0.5 * w * delta.square().mean(), params)
        scale = (t - l) / sch.b(tt, st).abs().item()
        for a, b in zip(g_surrogate, g_mse):
            assert torch.allclose(a, scale * b, atol=1e-12, rtol=1e-8)
        assert sum(g.abs().sum() for g in g_surrogate) > 0


def test_cfg_decay_scale_by_hand():
    t = torch.tensor([0.5, 0.8, 0.9, 1.0])
    w = Soflow.get_cfg_decay_scale(t, 0.8)
    assert torch.allclose(w[:2], torch.ones(2))
    assert math.isclose(w[2].item(), 1 - math.exp(-0.025 * 0.5 / 0.5), rel_tol=1e-5)
    assert w[3].item() == 0.0
    assert torch.all(Soflow.get_cfg_decay_scale(t, 1.0) == 1)


def test_cfg_target_by_hand(device):
    """cfg_scale 3, decay time 0.8, mix 0.25: FM and consistency targets computed by hand."""
    model = tiny_dit().to(device)
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64).to(device)
    x1 = torch.randn(2, 4, 8, 8, dtype=torch.float64).to(device)
    labels = torch.tensor([4, 6]).to(device)
    mask = torch.tensor([False, True]).to(device)  # second sample: null label, plain target
    t = torch.tensor([0.9, 0.6], dtype=torch.float64).to(device)
    kw = dict(cfg_mask=mask, cfg_scale=3.0, cfg_decay_time=0.8, mix_ratio=0.25, p=0.0, eps=0.01, noise=x1)
    x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * x1
    v_t = x1 - x0
    w0 = 1 - math.exp(-0.025)  # t = 0.9: d = (1 - 0.9) / (1 - 0.8) = 0.5
    null = torch.tensor([10, 10]).to(device)
    with torch.no_grad():
        v_uncond = model.predict_velocity(x_t, t, null)
        v_cond = model.predict_velocity(x_t, t, labels)
    guided0 = v_t[0] + w0 * 2.0 * (v_t[0] - v_uncond[0])
    target = torch.stack([0.25 * guided0 + 0.75 * v_cond[0], v_t[1]])

    # Flow Matching: prediction with the masked labels, Euler weight |d_s b| = 1, p = 0 -> plain mse.
    pred = torch.stack([v_cond[0], v_uncond[1]])
    loss, mse, weight = model.get_velocity_loss(x0, t, labels, **kw)
    per_sample = (pred - target).square().flatten(1).mean(1)
    assert torch.allclose(loss, per_sample.mean()) and torch.allclose(mse, per_sample.mean())
    assert torch.allclose(weight, torch.ones((), dtype=torch.float64, device=device))

    # Consistency: x_l = x_t + target (l - t), Delta = (f_t - f_l) / (t - l).
    s = torch.tensor([0.1, 0.2], dtype=torch.float64).to(device)
    l = torch.tensor([0.7, 0.5], dtype=torch.float64).to(device)
    masked = torch.tensor([4, 10]).to(device)
    with torch.no_grad():
        f_l = model.solution_operator(x_t + target * (l - t).view(-1, 1, 1, 1), l, s, masked)
        f_t = model.solution_operator(x_t, t, s, masked)
    delta = (f_t - f_l) / (t - l).view(-1, 1, 1, 1)
    _, mse, _ = model.get_consistency_loss(x0, t, l, s, labels, **kw)
    assert torch.allclose(mse, delta.square().flatten(1).mean(1).mean())


def test_fused_training_losses_equal_separate_calls(device):
    """The fused three-call computation equals separate FM and consistency calls: loss and gradients."""
    model = tiny_dit().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    B, n_fm = 8, 6
    x0 = torch.randn(B, 4, 8, 8, dtype=torch.float64).to(device)
    x1 = torch.randn(B, 4, 8, 8, dtype=torch.float64).to(device)
    labels = torch.randint(0, 10, (B,)).to(device)
    mask = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool).to(device)
    t = (torch.rand(B, dtype=torch.float64) * 0.9 + 0.1).to(device)
    s = t * 0.3
    l = t - 0.05
    kw = dict(**release_guidance("imagenet"), augment_labels=None)
    objective = release_objective("imagenet")
    parts = model.fused_loss(x0, t=t, s=s, l=l, n_fm=n_fm, objective=objective, labels=labels, cfg_mask=mask,
                             noise=x1)
    fused = parts["fm"][0] * n_fm / B + parts["cons"][0] * (B - n_fm) / B
    g_fused = torch.autograd.grad(fused, params)
    fm = model.get_velocity_loss(x0[:n_fm], t[:n_fm], labels[:n_fm], mask[:n_fm], noise=x1[:n_fm], **kw)
    cons = model.get_consistency_loss(x0[n_fm:], t[n_fm:], l[n_fm:], s[n_fm:], labels[n_fm:], mask[n_fm:],
                                      noise=x1[n_fm:], **kw)
    separate = fm[0] * n_fm / B + cons[0] * (B - n_fm) / B
    g_separate = torch.autograd.grad(separate, params)
    assert torch.allclose(fused, separate, atol=1e-12)
    for a, b in zip(g_fused, g_separate):
        assert torch.allclose(a, b, atol=1e-12)
    for i in (1, 2):
        assert torch.allclose(parts["fm"][i], fm[i]) and torch.allclose(parts["cons"][i], cons[i])


def test_training_forward_objective_and_time_ordering(monkeypatch, device):
    model = tiny_dit(dtype=torch.float32).to(device)
    seen = {}
    original = SoflowLoss.loss_parts

    def spy(loss, model, samples, **kwargs):
        seen.update(kwargs)
        return original(loss, model, samples, **kwargs)
    monkeypatch.setattr(SoflowLoss, "loss_parts", spy)
    objective = release_objective("imagenet")
    torch.manual_seed(0)
    x = torch.randn(16, 4, 8, 8).to(device)
    loss, stats = model(x, torch.randint(0, 10, (16,)).to(device), objective=objective, finished_steps=100)
    loss.backward()
    assert seen["n_fm"] == 12 and torch.isfinite(loss)
    c = slice(12, 16)
    assert torch.all(seen["s"][c] <= seen["l"][c]) and torch.all(seen["l"][c] <= seen["t"][c] - MIN_TIME_GAP + 1e-7)
    assert set(stats) == {"Vel_MSE", "Vel_Weight", "Con_MSE", "Con_Weight"}
    assert all(torch.isfinite(v) and v > 0 for v in stats.values())


def test_objective_checks_each_declared_key_then_the_combination():
    """Objective checks each loss setting against its declaration by itself (the release's calls build one from
    their keywords, without the config loader), raising a ValueError that names the key; then the combination."""
    for f in dataclasses.fields(Objective):
        outside, inside = declared_values(f)
        for value in outside:
            with pytest.raises(ValueError, match=f"^'{f.name}' (must|items must|is )"):
                Objective(**{f.name: value})
        for value in inside:
            assert getattr(Objective(**{"l_schedule": "Linear", f.name: value}), f.name) == value
    with pytest.raises(ValueError, match="l_schedule 'Exponent' needs l_init_ratio > 0 and l_end_ratio > 0"):
        Objective(l_end_ratio=0.0)


def l_ratio(k, total, name, init, end):
    return Objective(l_schedule=name, l_init_ratio=init, l_end_ratio=end, total_steps=total).l_ratio(k)


def test_l_schedules():
    for name, init, end in (("Const", 0.1, 0.002), ("Linear", 0.1, 0.002), ("Cosine", 0.1, 0.002),
                            ("Exponent", 0.1, 0.002)):
        r0 = l_ratio(0, 100, name, init, end)
        r1 = l_ratio(100, 100, name, init, end)
        assert math.isclose(r1, end)
        assert math.isclose(r0, end if name == "Const" else init)
    assert math.isclose(l_ratio(50, 100, "Exponent", 0.1, 0.001), 0.01)
    assert math.isclose(l_ratio(50, 100, "Linear", 0.1, 0.002), 0.051)
    assert math.isclose(l_ratio(50, 100, "Cosine", 0.1, 0.002), 0.051)
    t, s = torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.4999])
    l = Soflow.get_middle_time(t, s, 0, 100, init_ratio=0.1, end_ratio=0.5, method="Const")
    assert torch.allclose(l, t + (s - t) * 0.5)  # not clamped: the release's caller clamps
    assert torch.allclose(middle_time(t, s, 0.5), torch.stack([torch.tensor(0.5), torch.tensor(0.5 - MIN_TIME_GAP)]))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_rng_sharing_on_unet(device):
    model = tiny_unet(dropout=0.3).to(device).train()
    x, t = torch.randn(2, 3, 8, 8, device=device), torch.rand(2, device=device)
    assert not torch.allclose(model.network(x, t, t), model.network(x, t, t))
    with shared_random_state(x.device) as rewind:
        a = model.network(x, t, t)
        rewind()
        b = model.network(x, t, t)
    assert torch.equal(a, b)


class MaskRecorder(torch.nn.Module):
    """Backbone stand-in whose output is its dropout mask, so a test can compare masks between calls."""
    dropout = 0.5

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, t, s, labels=None, augment_labels=None):
        out = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=self.training) * self.weight
        self.calls.append(out.detach())
        return out


@pytest.mark.parametrize("n_fm", [0, 3])
def test_consistency_calls_share_dropout_masks(n_fm, device):
    model = tiny_unet(dropout=0.3).train().to(device)
    model.network = MaskRecorder().to(device)
    x = torch.randn(6, 3, 8, 8).to(device)
    t = torch.full((6,), 0.8).to(device)
    model.fused_loss(x, t=t, s=t * 0.2, l=t - 0.1, n_fm=n_fm, objective=Objective(p=1.0, eps=0.01))
    grad_call, l_call = model.network.calls
    assert torch.equal(grad_call[n_fm:], l_call[-(6 - n_fm):])
    assert not torch.equal(grad_call[n_fm:], torch.ones_like(grad_call[n_fm:]) * 2)  # masks are random


def test_one_and_two_nfe_sampling(device):
    model = tiny_dit().eval().to(device)
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64).to(device)
    labels = torch.tensor([0, 5, 9]).to(device)
    assert torch.allclose(model.sample(noise, labels, nfe=1), model.solution_operator(noise, 1.0, 0.0, labels))
    out = model.sample(noise, labels, nfe=2, generator=torch.Generator(device).manual_seed(7))  # drawn on the device
    eps = torch.randn(noise.shape, dtype=noise.dtype, device=device, generator=torch.Generator(device).manual_seed(7))
    x0_hat = model.solution_operator(noise, 1.0, 0.0, labels)
    x_half = 0.5 * x0_hat + 0.5 * eps  # Linear: alpha(1/2) = beta(1/2) = 1/2
    assert torch.allclose(out, model.solution_operator(x_half, 0.5, 0.0, labels))
    renoise = torch.randn(3, 3, 4, 8, 8, dtype=torch.float64).to(device)
    x = noise
    for i, ti in enumerate([1.0, 0.75, 0.5]):
        x = model.solution_operator(x, ti, 0.0, labels)
        x = (1 - (ti - 0.25)) * x + (ti - 0.25) * renoise[i]
    assert torch.allclose(model.sample(noise, labels, nfe=4, renoise=renoise),
                          model.solution_operator(x, 0.25, 0.0, labels))


def test_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 5.0]).view(1, 1, 2, 2)
    out = to_uint8(x)
    assert out.shape == (1, 2, 2, 3) and out.dtype == torch.uint8
    assert out[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255]


def test_errors_name_bad_values(device):
    with pytest.raises(ValueError, match="'DiT-Q-1'.*UNet"):
        Soflow(4, 32, 10, 0.1, "Linear", "Euler", "DiT-Q-1")
    with pytest.raises(ValueError, match="'Cubic'.*Linear, Trig"):
        Soflow(4, 32, 10, 0.1, "Cubic", "Euler", "DiT-B-4")
    with pytest.raises(ValueError, match="'Heun'.*Euler, Trig"):
        Soflow(4, 32, 10, 0.1, "Linear", "Heun", "DiT-B-4")
    with pytest.raises(ValueError, match="'Step'.*Const, Linear, Cosine, Exponent"):
        Objective(l_schedule="Step")
    unet = tiny_unet().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with pytest.raises(ValueError, match="unconditional"):
        unet.predict_velocity(x, 0.5, labels=torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        unet.predict_velocity(torch.randn(2, 3, 16, 16, device=device), 0.5)
    dit = tiny_dit().to(device)
    xd = torch.randn(2, 4, 8, 8, dtype=torch.float64, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="labels must be shaped"):
        dit.predict_velocity(xd, 0.5, labels=torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="noise shape"):
        dit.get_velocity_loss(xd, 0.5, labels, noise=torch.randn(1, 4, 8, 8, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="times must be"):
        dit.predict_velocity(xd, torch.rand(3, dtype=torch.float64, device=device), labels)
    with pytest.raises(ValueError, match="cfg_scale"):
        unet.get_velocity_loss(x, 0.5, cfg_scale=2.0)


# ----------------------------------------------------------------------------------------------------
# The release's Python API (its constructor and call pattern)


def test_release_constructor_positional_and_keyword(device):
    kw = dict(network_kwargs={"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 2})
    a = Soflow(4, 8, 10, 0.1, "Linear", "Euler", "DiT-B-4", **kw)
    b = Soflow(data_channels=4, data_size=8, num_classes=10, cfg_drop_rate=0.1, noising_type="Linear",
               coefficient_type="Euler", model_type="DiT-B-4", **kw)
    assert a.state_dict().keys() == b.state_dict().keys() and a.conditional and a.num_classes == 10
    uncond = Soflow(4, 8, None, 0.0, "Linear", "Euler", "DiT-B-4", **kw).to(device)  # the release's unconditional marker
    assert not uncond.conditional and uncond.network.y_embedder.embedding_table.num_embeddings == 1
    x = torch.randn(2, 4, 8, 8, device=device)
    t = torch.rand(2, device=device)
    assert uncond.solution_operator(x, t, torch.zeros(2, device=device), None, None).shape == x.shape
    with pytest.raises(ValueError, match="unconditional but labels were given"):
        uncond.predict_velocity(x, t, torch.zeros(2, dtype=torch.long, device=device))


def test_release_cifar_unet_with_ten_classes_and_no_labels(device):
    """The release builds its CIFAR-10 U-Net with num_classes=10 and always passes labels=None."""
    torch.manual_seed(0)
    model = Soflow(3, 8, 10, 0.0, "Linear", "Euler", "UNet", network_kwargs=dict(
        model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)).to(device)
    assert not model.conditional and model.num_classes == 0
    x, aug = (v.to(device) for v in (torch.randn(4, 3, 8, 8), torch.zeros(4, 6)))
    t = (torch.rand(4, 1, 1, 1) * 0.8 + 0.2).to(device)
    l, s = t - 0.01, t * 0.2
    loss, mse, weight = model.get_consistency_loss(x, t, l, s, None, None, 1.0, 1.0, 0.75, 0.001, 1.0, aug)
    assert torch.isfinite(loss) and mse > 0 and weight > 0
    assert model.predict_velocity(x, t.flatten(), None, aug).shape == x.shape


@pytest.mark.parametrize("shape", ["[B]", "[B,1,1,1]"])
def test_release_loss_calls_accept_both_time_shapes(shape, device):
    """Positional release calls with times shaped [B, 1, 1, 1] (its training loop) equal the [B] calls."""
    model = tiny_dit().to(device)
    B = 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 10, (B,), generator=g).to(device)
    mask = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool).to(device)
    t = (torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.2).to(device)
    l, s = t - 0.002 * t, 0.3 * t
    shaped = (lambda v: v.view(B, 1, 1, 1)) if shape == "[B,1,1,1]" else (lambda v: v)
    settings = (*release_guidance("imagenet").values(), None)  # cfg_scale, ..., mix_ratio, augment_labels
    results = []
    for times, m in ((shaped, shaped), (lambda v: v, lambda v: v)):
        torch.manual_seed(1)
        fm = model.get_velocity_loss(x, times(t), labels, m(mask), *settings)
        torch.manual_seed(2)
        cons = model.get_consistency_loss(x, times(t), times(l), times(s), labels, m(mask), *settings)
        results.append((fm, cons))
    for got, want in zip(results[0], results[1]):
        assert len(got) == 3  # (loss, mse, weight)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    torch.manual_seed(2)
    by_keyword = model.get_consistency_loss(samples=x, t=shaped(t), l=shaped(l), s=shaped(s), labels=labels,
                                            cfg_mask=mask, **release_guidance("imagenet"), augment_labels=None)
    assert torch.equal(by_keyword[0], results[1][1][0])
    assert torch.equal(model.solution_operator(x, shaped(t), shaped(s), labels, None),
                       model.solution_operator(x, t, s, labels, None))
    assert torch.equal(model.predict_velocity(x, shaped(t), labels, None), model.predict_velocity(x, t, labels))


# ----------------------------------------------------------------------------------------------------
# The rest of the release's interface (docs/drop_in.md): its training loop's calls, its scheduler, its sampler


def test_release_training_loop_on_two_ranks(tmp_path):
    """A loop written as the release writes its train.py (tests/release_style_loop.py) runs on this code's modules
    on 2 gloo ranks, a tiny DiT over ImagenetDataset and a tiny U-Net (dropout 0.3) over AugmentPipe'd images, and
    its losses equal Soflow.fused_loss on the same draws."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((32, 8, 8, 8)).astype(np.float32)
    latents[:, 4:] = np.abs(latents[:, 4:]) * 0.5  # the std half
    latents[:, 0, 0, 0], latents[:, 4, 0, 0] = np.arange(32), 0  # each row's mean names its index, exactly
    (tmp_path / "latents").mkdir()
    write_latent_file(tmp_path / "latents" / "imagenet_latent.hdf5", n=32, size=8, latents=latents,
                      labels=rng.integers(0, 10, 32))
    torchrun("tests/release_style_loop.py", [str(tmp_path), str(tmp_path / "latents")])
    for kind in ("dit", "unet"):
        ranks = [json.loads((tmp_path / f"{kind}_rank{r}.json").read_text()) for r in (0, 1)]
        for record in ranks:
            assert len(record["steps"]) == 3 and record["dataset"][0] == 32
            for step in record["steps"]:
                np.testing.assert_allclose(step["release"], step["fused"], rtol=1e-5, atol=1e-7)
                loss, fm_loss, _, _, cons_loss, cons_mse, cons_weight = step["release"]
                assert np.isfinite(loss) and cons_mse > 0 and cons_weight > 0 and cons_loss != 0
                assert (fm_loss > 0) == (kind == "dit")  # the CIFAR recipe has no Flow Matching rows
            assert all(d < 1e-6 for d in record["sampling"]["max_diff"].values())
            assert record["sampling"]["scheduler"] == "Scheduler" and record["sampling"]["ema_has_its_own_scheduler"]
            assert record["weights"] != record["initial_weights"]  # it trained
        assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the ranks in step
        assert ranks[0]["initial_weights"] == ranks[1]["initial_weights"]  # rank 0's, broadcast
        # the DistributedSampler's shards of each epoch are disjoint
        for epoch in (0, 1):
            shards = [{i for e, rows in r["rows"] if e == epoch for i in rows} for r in ranks]
            assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) > 0
    assert ranks[0]["dataset"] == [32, None] and json.loads((tmp_path / "dit_rank0.json").read_text())["dataset"] == [
        32, 8]


@pytest.mark.parametrize("noising_type, coefficient_type", [("Linear", "Euler"), ("Trig", "Trig")])
def test_release_scheduler_names(noising_type, coefficient_type):
    """alpha_grad / beta_grad are the derivatives of alpha / beta; a_grad / b_grad the pairs (d/dt, d/ds);
    get_x_t_v_t draws its noise with one randn_like; Python numbers are accepted where the release's loops
    may pass them."""
    sch = Scheduler(noising_type, coefficient_type)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64).view(2, 1, 1, 1)
    s = torch.tensor([0.05, 0.3], dtype=torch.float64).view(2, 1, 1, 1)
    h = 1e-6
    assert torch.allclose(sch.alpha_grad(t), (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h), atol=1e-8)
    assert torch.allclose(sch.beta_grad(t), (sch.beta(t + h) - sch.beta(t - h)) / (2 * h), atol=1e-8)
    for fn, grad in ((sch.a, sch.a_grad), (sch.b, sch.b_grad)):
        d_dt, d_ds = grad(t, s)
        assert torch.allclose(d_dt, (fn(t + h, s) - fn(t - h, s)) / (2 * h), atol=1e-8)
        assert torch.allclose(d_ds, (fn(t, s + h) - fn(t, s - h)) / (2 * h), atol=1e-8)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.manual_seed(5)
    x_t, v_t = sch.get_x_t_v_t(x0, t)
    torch.manual_seed(5)
    expected = sch.add_noise(x0, torch.randn_like(x0), t)
    assert torch.equal(x_t, expected[0]) and torch.equal(v_t, expected[1])
    assert torch.allclose(torch.as_tensor(sch.alpha(0.5)), sch.alpha(torch.tensor(0.5, dtype=torch.float64)))
    assert (sch.beta(0.5) * torch.ones(2)).dtype == torch.float32  # a number does not promote float32 images


def test_release_model_attributes_and_stateless_scheduler(device):
    """model.scheduler (an nn.Module with no state), its deep copy on an EMA model, the attributes the release's
    sampler reads, and the optimizer's parameter list model.network.parameters()."""
    model = tiny_dit().to(device)
    ema = copy.deepcopy(model)
    assert isinstance(model.scheduler, torch.nn.Module) and dict(model.named_children())["scheduler"] is model.scheduler
    assert isinstance(ema.scheduler, Scheduler) and ema.scheduler is not model.scheduler
    assert not list(model.scheduler.parameters()) and not list(model.scheduler.buffers())
    assert all(k.startswith("network.") for k in model.state_dict())  # the manifest's keys (tests/test_dit.py)
    assert [p for p in model.network.parameters()] == [p for p in model.parameters()]
    assert (ema.num_classes, ema.data_channels, ema.data_size) == (10, 4, 8)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, device=device)
    labels = torch.tensor([1, 2], device=device)
    ones = torch.ones(2, dtype=torch.float64, device=device)
    assert torch.equal(ema.solution_operator(x, ones, 0 * ones, labels, None),
                       model.solution_operator(x, 1.0, 0.0, labels))


def test_release_schedule_helpers_take_its_keywords():
    t = torch.tensor([0.5, 0.9, 1.0]).view(3, 1, 1, 1)
    for owner in (Soflow, Scheduler):
        assert torch.equal(owner.get_cfg_decay_scale(t), torch.ones_like(t))  # decay_time 1: no decay
        w = owner.get_cfg_decay_scale(t, decay_time=0.8, k=0.05)
        assert w[0].item() == 1.0 and math.isclose(w[1].item(), 1 - math.exp(-0.05 * 0.5 / 0.5), rel_tol=1e-5)
        assert torch.equal(owner.get_cfg_decay_scale(t, 0.8), owner.get_cfg_decay_scale(t, decay_time=0.8, k=0.025))
    s = t * 0.1
    for method in ("Const", "Linear", "Cosine", "Exponent"):
        l = Soflow.get_middle_time(t, s, now_steps=30, total_steps=100, init_ratio=0.2, end_ratio=0.01, method=method)
        assert torch.allclose(l, t + (s - t) * l_ratio(30, 100, method, 0.2, 0.01))
    l = tiny_dit().get_middle_time(t, s, 0, 100)  # the release's defaults: Exponent from 0.1 to 0.002
    assert torch.allclose(l, t + (s - t) * 0.1)


def release_batch(device, B=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (B,), generator=g)
    t = (torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.2).view(B, 1, 1, 1)
    mask = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool).view(B, 1, 1, 1)
    return tuple(v.to(device) for v in (x, labels, t, mask))


@pytest.mark.parametrize("velocity", [True, False])
def test_forward_dispatches_the_release_loss_calls(velocity, device):
    """model(get_velocity_loss=True/False, samples=..., ...) is get_velocity_loss / get_consistency_loss, whose
    noise is one randn_like(samples) drawn first; the native forward(samples, labels, objective=...) is unchanged."""
    model = tiny_dit().to(device)
    x, labels, t, mask = release_batch(device)
    settings = dict(labels=labels, cfg_mask=mask, **release_guidance("imagenet"), augment_labels=None)
    times = dict(t=t) if velocity else dict(t=t, l=t - 0.01, s=t * 0.3)
    torch.manual_seed(3)
    got = model(get_velocity_loss=velocity, samples=x, **times, **settings)
    torch.manual_seed(3)
    noise = torch.randn_like(x)
    loss = model.get_velocity_loss if velocity else model.get_consistency_loss
    want = loss(x, **times, **settings, noise=noise)
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    total, stats = model(x, labels, objective=release_objective("imagenet"))
    assert torch.isfinite(total) and set(stats) == {"Vel_MSE", "Vel_Weight", "Con_MSE", "Con_Weight"}
    with pytest.raises(TypeError, match="needs objective= .* or get_velocity_loss=True or False"):
        model(x, labels)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['cfg_scale'\]"):
        model(x, labels, objective=Objective(), cfg_scale=3.0)


def test_cfg_mask_acts_only_when_guided(device):
    """As the release: with cfg_scale 1 a CFG mask leaves the labels alone (and the native draws hold none)."""
    model = tiny_dit().to(device)
    x, labels, t, mask = release_batch(device)
    noise = torch.randn_like(x)
    masked = torch.where(mask.view(-1), torch.full_like(labels, 10), labels)
    l, s = t - 0.01, t * 0.3
    for loss, times in ((model.get_velocity_loss, (t,)), (model.get_consistency_loss, (t, l, s))):
        with_mask = loss(x, *times, labels, mask, 1.0, noise=noise)
        assert all(torch.equal(a, b) for a, b in zip(with_mask, loss(x, *times, labels, None, 1.0, noise=noise)))
        assert not torch.equal(with_mask[0], loss(x, *times, masked, None, 1.0, noise=noise)[0])
        guided = loss(x, *times, labels, mask, 3.0, noise=noise)
        assert not torch.equal(guided[0], loss(x, *times, labels, None, 3.0, noise=noise)[0])
    assert draw_training_times(Objective(), 8, 0, device, cfg_drop_rate=0.5, conditional=True).cfg_mask is None
    guided_draws = draw_training_times(Objective(cfg_scale=2.0), 8, 0, device, 0.5, conditional=True)
    assert guided_draws.cfg_mask is not None and guided_draws.t.device == torch.device(device)


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_release_losses_of_an_empty_part_are_zeros(make, device):
    """A part without rows (the CIFAR recipe's Flow Matching rows) gives zeros, without a network call."""
    model = make().to(device)
    x = torch.zeros(0, model.data_channels, 8, 8, dtype=next(model.parameters()).dtype, device=device)
    t = torch.zeros(0, 1, 1, 1, dtype=x.dtype, device=device)
    for got in (model(get_velocity_loss=True, samples=x, t=t), model(get_velocity_loss=False, samples=x, t=t, l=t, s=t)):
        assert [v.item() for v in got] == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# MeanFlow baseline (`method: meanflow`, docs/method.md)


def _meanflow_inputs(shape=(4, 1, 1, 1)):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.35], dtype=torch.float64)
    r = torch.tensor([0.2, 0.7, 0.05, 0.3], dtype=torch.float64)  # one row with r = t
    labels = torch.tensor([1, 4, 7, 9])
    mask = torch.tensor([False, True, False, False])
    return x, noise, t.reshape(shape), r.reshape(shape), labels, mask


@pytest.mark.parametrize("shape", [(4,), (4, 1, 1, 1)])
def test_meanflow_loss_equals_a_float64_finite_difference_computation(shape, device):
    """Everything rebuilt from plain network calls: the guided velocity v~, the total derivative of
    u(z, r, t) = F(z, t, r) along (v~, 0, 1) as a central difference, the target, error, weight and loss."""
    model = tiny_dit(cfg_drop_rate=0.1).to(device)
    x, noise, t, r, labels, mask = (v.to(device) for v in _meanflow_inputs(shape))
    w, kappa, p, eps = 1.7, 0.4, 0.75, 1e-3
    loss, mse_mean, weight_mean = model.get_meanflow_loss(x, t, r, labels, mask, cfg_scale=w, cfg_kappa=kappa,
                                                          p=p, eps=eps, noise=noise)
    t, r = t.reshape(-1), r.reshape(-1)
    tb, F = t.reshape(-1, 1, 1, 1), model.network
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        z, v = (1 - tb) * x + tb * noise, noise - x
        guided = w * v + kappa * F(z, t, t, labels) + (1 - w - kappa) * F(z, t, t, null)
        v_tilde = torch.where(mask.reshape(-1, 1, 1, 1), v, guided)
        y = torch.where(mask, null, labels)
        h = 1e-5
        dudt = (F(z + h * v_tilde, t + h, r, y) - F(z - h * v_tilde, t - h, r, y)) / (2 * h)
        u_tgt = v_tilde - (tb - r.reshape(-1, 1, 1, 1)) * dudt
    u = F(z, t, r, y)
    mse = (u - u_tgt).square().flatten(1).mean(1)
    weight = 1 / (mse.detach() + eps) ** p
    expected = (weight * mse).mean()
    assert dudt.abs().mean() > 1e-3 and (guided - v).abs().mean() > 1e-3  # both terms matter
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=0)
    torch.testing.assert_close(mse_mean, mse.detach().mean(), rtol=1e-7, atol=0)
    torch.testing.assert_close(weight_mean, weight.mean(), rtol=1e-7, atol=0)
    params = [q for q in model.parameters() if q.requires_grad]
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)  # stop-gradient: only u carries the gradient


def test_meanflow_jvp_is_the_total_derivative(device):
    model = tiny_dit().to(device)
    x, noise, t, r, labels, _ = (v.to(device) for v in _meanflow_inputs((4,)))
    z = (1 - t.reshape(-1, 1, 1, 1)) * x + t.reshape(-1, 1, 1, 1) * noise
    u, dudt = average_velocity_jvp(model.network, z, t, r, noise - x, labels)
    torch.testing.assert_close(u, model.network(z, t, r, labels))
    h = 1e-5
    fd = (model.network(z + h * (noise - x), t + h, r, labels)
          - model.network(z - h * (noise - x), t - h, r, labels)) / (2 * h)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-9)


def test_meanflow_with_r_equal_t_is_flow_matching(device):
    model = tiny_dit(cfg_drop_rate=0.1).to(device)
    x, noise, t, _, labels, mask = (v.to(device) for v in _meanflow_inputs((4,)))
    mf = model.get_meanflow_loss(x, t, t, labels, mask, p=1.0, eps=1e-3, noise=noise)
    # unguided, get_velocity_loss leaves a CFG mask alone (as the release): pass the dropped labels themselves
    dropped = torch.where(mask, torch.full_like(labels, 10), labels)
    fm = model.get_velocity_loss(x, t, dropped, None, cfg_scale=1.0, p=1.0, eps=1e-3, noise=noise)
    for a, b in zip(mf, fm):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    params = [q for q in model.parameters() if q.requires_grad]
    for a, b in zip(torch.autograd.grad(mf[0], params), torch.autograd.grad(fm[0], params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def test_meanflow_training_forward_draws_and_micro_batches(device):
    from models import draw_training_times
    model = tiny_dit(cfg_drop_rate=0.1).to(device)
    o = Objective(method="meanflow", meanflow_cfg_scale=1.5, meanflow_cfg_kappa=0.2)
    torch.manual_seed(5)
    draws = draw_training_times(o, 8, 0, device, 0.1, conditional=True)
    n_eq = 8 - int(o.meanflow_ratio * 8)
    assert draws.n_fm == n_eq and torch.equal(draws.s[:n_eq], draws.t[:n_eq])
    assert bool((draws.s[n_eq:] < draws.t[n_eq:]).all())  # logit-normal draws are a.s. distinct
    x, noise = (torch.randn(8, 4, 8, 8, dtype=torch.float64, device=device) for _ in range(2))
    labels = torch.arange(8, device=device)
    total, stats = model(x, labels, objective=o, draws=draws, noise=noise)
    loss, mse, weight = model.get_meanflow_loss(x, draws.t, draws.s, labels, draws.cfg_mask, cfg_scale=1.5,
                                                cfg_kappa=0.2, p=o.meanflow_p, eps=o.meanflow_eps, noise=noise)
    torch.testing.assert_close(total, loss)
    n_cons = 8 - n_eq
    torch.testing.assert_close((stats["Vel_MSE"] * n_eq + stats["Con_MSE"] * n_cons) / 8, mse)
    torch.testing.assert_close((stats["Vel_Weight"] * n_eq + stats["Con_Weight"] * n_cons) / 8, weight)
    parts = [model(x[a:b], labels[a:b], objective=o, draws=draws.rows(a, b), noise=noise[a:b], batch_rows=8)[0]
             for a, b in ((0, 3), (3, 8))]
    torch.testing.assert_close(parts[0] + parts[1], total)


def test_meanflow_and_euler_samplers(device):
    model = tiny_dit().eval().to(device)
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64).to(device)
    labels = torch.tensor([0, 5, 9]).to(device)
    one = model.sample(noise, labels, nfe=1, sampler="meanflow")
    assert torch.allclose(one, model.sample(noise, labels, nfe=1))  # the same map at 1 NFE: f(noise, 1, 0)
    half = model.solution_operator(noise, 1.0, 0.5, labels)
    assert torch.allclose(model.sample(noise, labels, nfe=2, sampler="meanflow"),
                          model.solution_operator(half, 0.5, 0.0, labels))
    x = noise - 0.5 * model.predict_velocity(noise, 1.0, labels)
    assert torch.allclose(model.sample(noise, labels, nfe=2, sampler="euler"),
                          x - 0.5 * model.predict_velocity(x, 0.5, labels))
    with pytest.raises(ValueError, match="sampler"):
        model.sample(noise, labels, sampler="heun")


def test_meanflow_refuses_what_it_does_not_define():
    model = tiny_dit(coefficient_type="Trig")
    x, noise, t, r, labels, _ = _meanflow_inputs((4,))
    with pytest.raises(ValueError, match="Linear and coefficient_type Euler"):
        model.get_meanflow_loss(x, t, r, labels, noise=noise)
    with pytest.raises(ValueError, match="class-conditional model and labels"):
        tiny_dit(num_classes=None).get_meanflow_loss(x, t, r, None, cfg_scale=2.0, noise=noise)
    with pytest.raises(ValueError, match="method"):
        Objective(method="mean_flow")
