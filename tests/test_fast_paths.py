"""Each speed path against fp32 eager on CPU: bf16 autocast, torch.compile, flash SDPA, fused AdamW,
foreach EMA, channels_last U-Net, and the fused (batched) loss against separate calls (test_models.py)."""
import copy
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from config import from_dict
from inference import autocast_context
from models import Soflow

TINY = dict(hidden_size=64, depth=2, num_heads=4, patch_size=2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Soflow(4, 8, 10, 0.1, "Linear", "Euler", "DiT-B-4", network_kwargs=TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def fixed_batch(B=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    x1 = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.rand(B, generator=g) * 0.8 + 0.2
    labels = torch.randint(0, 10, (B,), generator=g)
    mask = torch.rand(B, generator=g) < 0.2
    return x0, x1, t, t * 0.3, t - 0.05, labels, mask


def reference_loss(model):
    x0, x1, t, s, l, labels, mask = fixed_batch()
    parts = model._losses(x0, t, s, l, 6, labels, mask, 3.0, 0.8, 1.0, 0.01, 0.25, None, x1)
    return parts["fm"][0] * 6 / 8 + parts["cons"][0] * 2 / 8


def grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.network.parameters() if p.requires_grad])


def test_bf16_autocast_close_to_fp32():
    model = tiny_model()
    fp32 = reference_loss(model)
    with autocast_context(torch.device("cpu"), "bf16"):
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


def test_compiled_network_matches_eager():
    model = tiny_model()
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


def test_fused_adamw_matches_plain():
    cfg = from_dict({"dataset_type": "Digits", "model_type": "DiT-B-4", **TINY})
    models = [tiny_model(), tiny_model()]
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
    built = train.build_optimizer(cfg, list(models[0].parameters()), torch.device("cpu"))
    assert isinstance(built, torch.optim.AdamW) and built.defaults["fused"]


def test_foreach_ema_matches_python_loop():
    ema, model = tiny_model(0), tiny_model(1)
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    for (name, p_ema), p in zip(ema.named_parameters(), model.parameters()):
        expected[name] = 0.99 * p_ema.detach() + 0.01 * p.detach()
    train.ema_update(ema, model, 0.99)
    for name, value in ema.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-7), name


def test_channels_last_unet_matches():
    torch.manual_seed(0)
    model = Soflow(3, 16, 0, 0.0, "Linear", "Euler", "UNet", network_kwargs=dict(
        model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
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
