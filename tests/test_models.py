"""SoFlow wrapper: identities of the parameterisation, losses, gradients, CFG target, dropout sharing, sampler."""
import math

import pytest
import torch

from models import MIN_TIME_GAP, Objective, Scheduler, Soflow, shared_random_state, to_uint8

TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2, patch_size=2)


def randomise(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_dit(coefficient_type="Euler", noising_type="Linear", num_classes=10, cfg_drop_rate=0.1, dtype=torch.float64):
    torch.manual_seed(0)
    model = Soflow(4, 8, num_classes, cfg_drop_rate, noising_type, coefficient_type, "DiT-B-4",
                   network_kwargs=TINY_DIT)
    return randomise(model).to(dtype)


def tiny_unet(dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    model = Soflow(3, 8, 0, 0.0, "Linear", "Euler", "UNet", network_kwargs=dict(
        model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=dropout))
    return randomise(model, std=0.1).to(dtype)


@pytest.mark.parametrize("coefficient_type", ["Euler", "Trig"])
def test_solution_operator_identity_at_s_equals_t(coefficient_type):
    model = tiny_dit(coefficient_type)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.rand(3, dtype=torch.float64)
    labels = torch.tensor([1, 2, 10])
    assert torch.allclose(model.solution_operator(x, t, t, labels), x, atol=1e-12)
    F = model.network(x, t, 0.3 * t, labels)
    assert F.abs().mean() > 1e-3  # the identity is not a zero network in disguise


@pytest.mark.parametrize("coefficient_type", ["Euler", "Trig"])
def test_velocity_is_derivative_in_s(coefficient_type):
    model = tiny_dit(coefficient_type)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    labels = torch.tensor([3, 4])
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
def test_consistency_gradient_is_scaled_weighted_mse_gradient(coefficient_type):
    """grad sign(b) mean(F_t * sg(Delta w)) == (t - l)/|b(t,s)| grad 0.5 w mean(Delta^2), per sample."""
    model = tiny_dit(coefficient_type)
    params = [p for p in model.parameters() if p.requires_grad]
    for t, l, s, label, p, eps in ((0.9, 0.85, 0.2, 3, 1.0, 0.01), (0.5, 0.45, 0.05, 7, 0.75, 0.001)):
        x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64)
        x1 = torch.randn(1, 4, 8, 8, dtype=torch.float64)
        tt, lt, st = (torch.tensor([v], dtype=torch.float64) for v in (t, l, s))
        labels = torch.tensor([label])
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


def test_cfg_target_by_hand():
    """cfg_scale 3, decay time 0.8, mix 0.25: FM and consistency targets computed by hand."""
    model = tiny_dit()
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    x1 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    labels = torch.tensor([4, 6])
    mask = torch.tensor([False, True])  # second sample: null label, plain target
    t = torch.tensor([0.9, 0.6], dtype=torch.float64)
    kw = dict(cfg_mask=mask, cfg_scale=3.0, cfg_decay_time=0.8, mix_ratio=0.25, p=0.0, eps=0.01, noise=x1)
    x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * x1
    v_t = x1 - x0
    w0 = 1 - math.exp(-0.025)  # t = 0.9: d = (1 - 0.9) / (1 - 0.8) = 0.5
    null = torch.tensor([10, 10])
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
    assert torch.allclose(weight, torch.ones((), dtype=torch.float64))

    # Consistency: x_l = x_t + target (l - t), Delta = (f_t - f_l) / (t - l).
    s = torch.tensor([0.1, 0.2], dtype=torch.float64)
    l = torch.tensor([0.7, 0.5], dtype=torch.float64)
    masked = torch.tensor([4, 10])
    with torch.no_grad():
        f_l = model.solution_operator(x_t + target * (l - t).view(-1, 1, 1, 1), l, s, masked)
        f_t = model.solution_operator(x_t, t, s, masked)
    delta = (f_t - f_l) / (t - l).view(-1, 1, 1, 1)
    _, mse, _ = model.get_consistency_loss(x0, t, l, s, labels, **kw)
    assert torch.allclose(mse, delta.square().flatten(1).mean(1).mean())


def test_fused_training_losses_equal_separate_calls():
    """The fused three-call computation equals separate FM and consistency calls: loss and gradients."""
    model = tiny_dit()
    params = [p for p in model.parameters() if p.requires_grad]
    B, n_fm = 8, 6
    x0 = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    x1 = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 10, (B,))
    mask = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    t = torch.rand(B, dtype=torch.float64) * 0.9 + 0.1
    s = t * 0.3
    l = t - 0.05
    kw = dict(cfg_scale=3.0, cfg_decay_time=0.8, p=1.0, eps=0.01, mix_ratio=0.25, augment_labels=None)
    parts = model._losses(x0, t, s, l, n_fm, labels, mask, noise=x1, **kw)
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


def test_training_forward_objective_and_time_ordering(monkeypatch):
    model = tiny_dit(dtype=torch.float32)
    seen = {}
    original = model._losses

    def spy(samples, t, s, l, n_fm, *args, **kwargs):
        seen.update(t=t, s=s, l=l, n_fm=n_fm)
        return original(samples, t, s, l, n_fm, *args, **kwargs)
    monkeypatch.setattr(model, "_losses", spy)
    objective = Objective(cfg_scale=3.0, mix_ratio=0.25, cfg_decay_time=0.8)
    torch.manual_seed(0)
    x = torch.randn(16, 4, 8, 8)
    loss, stats = model(x, torch.randint(0, 10, (16,)), objective=objective, finished_steps=100)
    loss.backward()
    assert seen["n_fm"] == 12 and torch.isfinite(loss)
    c = slice(12, 16)
    assert torch.all(seen["s"][c] <= seen["l"][c]) and torch.all(seen["l"][c] <= seen["t"][c] - MIN_TIME_GAP + 1e-7)
    assert set(stats) == {"Vel_MSE", "Vel_Weight", "Con_MSE", "Con_Weight"}
    assert all(torch.isfinite(v) and v > 0 for v in stats.values())


def test_l_schedules():
    for name, init, end in (("Const", 0.1, 0.002), ("Linear", 0.1, 0.002), ("Cosine", 0.1, 0.002),
                            ("Exponent", 0.1, 0.002)):
        r0 = Soflow.l_ratio(0, 100, name, init, end)
        r1 = Soflow.l_ratio(100, 100, name, init, end)
        assert math.isclose(r1, end)
        assert math.isclose(r0, end if name == "Const" else init)
    assert math.isclose(Soflow.l_ratio(50, 100, "Exponent", 0.1, 0.001), 0.01)
    assert math.isclose(Soflow.l_ratio(50, 100, "Linear", 0.1, 0.002), 0.051)
    assert math.isclose(Soflow.l_ratio(50, 100, "Cosine", 0.1, 0.002), 0.051)
    t, s = torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.4999])
    l = Soflow.get_middle_time(t, s, 0, 100, "Const", 0.1, 0.5)
    assert torch.allclose(l, torch.stack([torch.tensor(0.5), torch.tensor(0.5 - MIN_TIME_GAP)]))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
def test_consistency_calls_share_dropout_masks(n_fm):
    model = tiny_unet(dropout=0.3).train()
    model.network = MaskRecorder()
    x = torch.randn(6, 3, 8, 8)
    t = torch.full((6,), 0.8)
    model._losses(x, t, t * 0.2, t - 0.1, n_fm, None, None, 1.0, 1.0, 1.0, 0.01, 1.0, None, None)
    grad_call, l_call = model.network.calls
    assert torch.equal(grad_call[n_fm:], l_call[-(6 - n_fm):])
    assert not torch.equal(grad_call[n_fm:], torch.ones_like(grad_call[n_fm:]) * 2)  # masks are random


def test_one_and_two_nfe_sampling():
    model = tiny_dit().eval()
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 5, 9])
    assert torch.allclose(model.sample(noise, labels, nfe=1), model.solution_operator(noise, 1.0, 0.0, labels))
    out = model.sample(noise, labels, nfe=2, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(noise.shape, dtype=noise.dtype, generator=torch.Generator().manual_seed(7))
    x0_hat = model.solution_operator(noise, 1.0, 0.0, labels)
    x_half = 0.5 * x0_hat + 0.5 * eps  # Linear: alpha(1/2) = beta(1/2) = 1/2
    assert torch.allclose(out, model.solution_operator(x_half, 0.5, 0.0, labels))
    renoise = torch.randn(3, 3, 4, 8, 8, dtype=torch.float64)
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


def test_errors_name_bad_values():
    with pytest.raises(ValueError, match="'DiT-Q-1'.*UNet"):
        Soflow(4, 32, 10, 0.1, "Linear", "Euler", "DiT-Q-1")
    with pytest.raises(ValueError, match="'Cubic'.*Linear, Trig"):
        Soflow(4, 32, 10, 0.1, "Cubic", "Euler", "DiT-B-4")
    with pytest.raises(ValueError, match="'Heun'.*Euler, Trig"):
        Soflow(4, 32, 10, 0.1, "Linear", "Heun", "DiT-B-4")
    with pytest.raises(ValueError, match="'Step'.*Const, Linear, Cosine, Exponent"):
        Objective(l_schedule="Step")
    with pytest.raises(ValueError, match="num_classes must be 0"):
        Soflow(3, 32, 10, 0.0, "Linear", "Euler", "UNet")
    unet = tiny_unet()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        unet.predict_velocity(x, 0.5, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        unet.predict_velocity(torch.randn(2, 3, 16, 16), 0.5)
    dit = tiny_dit()
    xd = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels must be shaped"):
        dit.predict_velocity(xd, 0.5, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="noise shape"):
        dit.get_velocity_loss(xd, 0.5, torch.zeros(2, dtype=torch.long), noise=torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="times must be"):
        dit.predict_velocity(xd, torch.rand(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cfg_scale"):
        unet.get_velocity_loss(x, 0.5, cfg_scale=2.0)
