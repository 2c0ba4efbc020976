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


def test_shapes_and_conditioning():
    net = randomise(small_unet()).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    out = net(x, t, 0.5 * t)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, 0.2 * t))  # depends on t - s
    aug = torch.randn(2, 6)
    assert not torch.allclose(out, net(x, t, 0.5 * t, augment_labels=aug))
    assert torch.allclose(out, net(x, t, 0.5 * t, augment_labels=torch.zeros(2, 6)))
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, t, labels=torch.zeros(2, dtype=torch.long))


def test_time_embedding_sin_first():
    net = small_unet()
    emb = net.time_embedding(torch.zeros(1))
    half = emb.shape[1] // 2
    assert torch.all(emb[0, :half] == 0) and torch.all(emb[0, half:] == 1)


def test_dropout_random_in_train_mode_only():
    net = randomise(small_unet(dropout=0.3))
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    net.train()
    assert not torch.allclose(net(x, t, t), net(x, t, t))
    net.eval()
    assert torch.equal(net(x, t, t), net(x, t, t))


def test_initial_output_is_small():
    net = small_unet().eval()  # EDM zero-ish init of the output conv
    assert net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2)).abs().max() < 1e-3


def test_grad_checkpointing_replays_dropout_masks():
    """Checkpointed blocks (recomputed in backward) give the same output and gradients, dropout included."""
    net = randomise(small_unet(dropout=0.3)).train()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
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
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
