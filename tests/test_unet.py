"""EDM SongUNet with two time inputs: conditioning, dropout, resampling."""
import torch
import pytest

from unet import SongUNet


def small_unet(dropout=0.0):
    torch.manual_seed(0)
    return SongUNet(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(8,), dropout=dropout)


def randomise(net):
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


def test_shapes_and_conditioning(device):
    net = randomise(small_unet()).eval().to(device)
    x, t = torch.randn(2, 3, 16, 16).to(device), torch.rand(2).to(device)
    out = net(x, t, 0.5 * t)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, 0.2 * t))  # depends on t - s
    aug = torch.randn(2, 6).to(device)
    assert not torch.allclose(out, net(x, t, 0.5 * t, augment_labels=aug))
    assert torch.allclose(out, net(x, t, 0.5 * t, augment_labels=torch.zeros(2, 6, device=device)))
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, t, labels=torch.zeros(2, dtype=torch.long, device=device))


def test_time_embedding_sin_first(device):
    net = small_unet().to(device)
    emb = net.time_embedding(torch.zeros(1, device=device))
    half = emb.shape[1] // 2
    assert torch.all(emb[0, :half] == 0) and torch.all(emb[0, half:] == 1)


def test_dropout_random_in_train_mode_only(device):
    net = randomise(small_unet(dropout=0.3)).to(device)
    x, t = torch.randn(2, 3, 16, 16).to(device), torch.rand(2).to(device)
    net.train()
    assert not torch.allclose(net(x, t, t), net(x, t, t))
    net.eval()
    assert torch.equal(net(x, t, t), net(x, t, t))


def test_initial_output_is_small(device):
    net = small_unet().eval().to(device)  # EDM zero-ish init of the output conv
    x, t, s = torch.randn(2, 3, 16, 16).to(device), torch.rand(2).to(device), torch.rand(2).to(device)
    assert net(x, t, s).abs().max() < 1e-3


def test_grad_checkpointing_replays_dropout_masks(device):
    """Checkpointed blocks (recomputed in backward) give the same output and gradients, dropout included."""
    net = randomise(small_unet(dropout=0.3)).train().to(device)
    x, t = torch.randn(2, 3, 16, 16).to(device), torch.rand(2).to(device)
    results = []
    for enabled in (False, True):
        assert net.set_grad_checkpointing(enabled) is net
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = net(x, t, 0.5 * t)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    if device.type == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    else:  # CUDA's weight-gradient convolution and attention backward kernels may sum with atomics (run-to-run
        # reordering): the same masks give gradients equal to float32 rounding, not bit for bit.
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))



def attention_as_before(block, y):
    """The attention of the normalised input y as the earlier code computed it: 3-D [B * heads, HW, C / heads]
    SDPA inputs (which CUDA's fused kernels refuse)."""
    b, c, h, w = y.shape
    q, k, v = block.qkv(y).reshape(b * block.num_heads, c // block.num_heads, 3, h * w).unbind(2)
    a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return a.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_4d_equals_the_earlier_3d_layout(num_heads, monkeypatch, device):
    """The 4-D [B, heads, HW, C / heads] attention computes what the 3-D layout did (same weights, same channel
    order of qkv), forward and backward, and hands SDPA unit-stride last dimensions."""
    from unet import UNetBlock
    torch.manual_seed(0)
    block = randomise(UNetBlock(16, 16, emb_channels=8, attention=True, num_heads=num_heads, eps=1e-6)).double()
    block = block.to(device)  # float64: CUDA runs SDPA's math kernel (the fused ones take no float64)
    y = torch.randn(2, 16, 4, 4, dtype=torch.float64).to(device).requires_grad_()
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.dim(), tuple(q.shape), q.stride(-1), k.stride(-1), v.stride(-1)))
        return real_sdpa(q, k, v, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        new = block._attention(y)
    assert seen == [(4, (2, num_heads, 16, 16 // num_heads), 1, 1, 1)]
    old = attention_as_before(block, y)
    assert torch.allclose(new, old, rtol=1e-12, atol=1e-12)
    g_new, = torch.autograd.grad(new.square().sum(), y)
    g_old, = torch.autograd.grad(old.square().sum(), y)
    assert torch.allclose(g_new, g_old, rtol=1e-10, atol=1e-12)
    # The whole float32 network against itself with the earlier attention.
    net = randomise(small_unet()).eval().to(device)
    x, t = torch.randn(2, 3, 16, 16).to(device), torch.rand(2).to(device)
    out = net(x, t, 0.5 * t)
    monkeypatch.setattr(UNetBlock, "_attention", attention_as_before)
    assert torch.allclose(out, net(x, t, 0.5 * t), rtol=1e-5, atol=1e-6)
