"""Each speed path against fp32 eager on CPU: bf16 autocast, torch.compile, flash SDPA, fused AdamW,
foreach EMA, channels_last U-Net, and the fused (batched) loss against separate calls (test_models.py)."""
import copy
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from config import from_dict
from distributed import precision_context
from helpers import release_objective, tiny_dit, tiny_unet

TINY = dict(hidden_size=64, num_heads=4)


def tiny_model(seed=0):
    return tiny_dit(dtype=torch.float32, seed=seed, **TINY)


def fixed_batch(B=8, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    x1 = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.rand(B, generator=g) * 0.8 + 0.2
    labels = torch.randint(0, 10, (B,), generator=g)
    mask = torch.rand(B, generator=g) < 0.2
    return tuple(v.to(device) for v in (x0, x1, t, t * 0.3, t - 0.05, labels, mask))


def reference_loss(model):
    x0, x1, t, s, l, labels, mask = fixed_batch(device=next(model.parameters()).device)
    objective = release_objective("imagenet")
    parts = model.fused_loss(x0, t=t, s=s, l=l, n_fm=6, objective=objective, labels=labels, cfg_mask=mask, noise=x1)
    return parts["fm"][0] * 6 / 8 + parts["cons"][0] * 2 / 8


def grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.network.parameters() if p.requires_grad])


def test_bf16_autocast_close_to_fp32(device):
    model = tiny_model().to(device)
    fp32 = reference_loss(model)
    with precision_context(device, "bf16"):
        bf16 = reference_loss(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert torch.isclose(bf16.float(), fp32, rtol=5e-2), (bf16, fp32)


def test_flash_attention_matches_math_kernel():
    model = tiny_model()
    with sdpa_kernel(SDPBackend.MATH):
        loss_math = reference_loss(model)
        g_math = grads(model, loss_math)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss_flash = reference_loss(model)
        g_flash = grads(model, loss_flash)
    assert torch.allclose(loss_math, loss_flash, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_math, g_flash):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# Inductor's C++ code generation takes minutes on 2 CPU cores; the suite traces the same graph with the
# aot_eager backend (Dynamo + AOTAutograd, as train.py's compile) and SOFLOW_TEST_INDUCTOR=1 runs inductor.
COMPILE_BACKEND = "inductor" if os.environ.get("SOFLOW_TEST_INDUCTOR") else "aot_eager"


def test_compiled_network_matches_eager(device):
    model = tiny_model().to(device)
    eager = reference_loss(model)
    g_eager = grads(model, eager)
    compiled = copy.deepcopy(model)
    compiled.network.compile(backend=COMPILE_BACKEND)
    assert list(compiled.state_dict()) == list(model.state_dict())  # keys unchanged by in-place compile
    loss = reference_loss(compiled)
    g = grads(compiled, loss)
    assert torch.allclose(loss, eager, rtol=1e-4, atol=1e-6)
    for a, b in zip(g, g_eager):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_fused_adamw_matches_plain(device):
    cfg = from_dict({"dataset_type": "Digits", "model_type": "DiT-B-4", "fused_optimizer": True, **TINY})
    models = [tiny_model().to(device), tiny_model().to(device)]
    opts = [torch.optim.AdamW([p for p in models[0].network.parameters() if p.requires_grad], lr=1e-3,
                              betas=(0.9, 0.99), weight_decay=0.0, foreach=False),
            torch.optim.AdamW([p for p in models[1].network.parameters() if p.requires_grad], lr=1e-3,
                              betas=(0.9, 0.99), weight_decay=0.0, fused=True)]
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            reference_loss(model).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # what train.py builds
    built = train.build_optimizer(cfg, models[0])
    assert isinstance(built, torch.optim.AdamW) and built.defaults["fused"]
    assert not train.build_optimizer(from_dict({"dataset_type": "Digits"}), models[0]).defaults["fused"]


def test_foreach_ema_matches_python_loop():
    """The every-step EMA is DiT's ema.mul_(decay).add_(param, alpha=1 - decay), bit for bit."""
    model, other = tiny_model(0), tiny_model(1)
    ema = train.EMA(model, 0.99)
    expected = {k: v.clone() for k, v in ema.model.state_dict().items()}
    for (name, p_ema), p in zip(ema.model.named_parameters(), other.parameters()):
        expected[name] = p_ema.detach().clone().mul_(0.99).add_(p.detach(), alpha=1 - 0.99)
    ema.update(other, step=0)
    for name, value in ema.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_channels_last_unet_matches(device):
    model = tiny_unet(data_size=16, attn_resolutions=(8,)).eval().to(device)
    x, t = torch.randn(2, 3, 16, 16, device=device), torch.rand(2, device=device)
    ref = model.solution_operator(x, t, t * 0.5)
    model.to(memory_format=torch.channels_last)
    out = model.solution_operator(x.contiguous(memory_format=torch.channels_last), t, t * 0.5)
    assert torch.allclose(out, ref, atol=1e-5)


def test_total_grad_norm_matches_manual():
    model = tiny_model()
    reference_loss(model).backward()
    gs = [p.grad for p in model.network.parameters() if p.grad is not None]
    manual = torch.sqrt(sum(g.square().sum() for g in gs))
    assert torch.allclose(torch.nn.utils.get_total_norm(gs), manual)
