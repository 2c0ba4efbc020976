"""EDM-style augmentation: probabilities, label layout, geometry."""
import math

import pytest
import torch

from augmentation import LABEL_DIM, SYM6, AugmentPipe


def smooth_images(n=4, size=32):
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([torch.sin(3 * x + 2 * y), torch.cos(2 * x - y), x * y], dim=0)
    return base.unsqueeze(0).repeat(n, 1, 1, 1)


def test_sym6_filter_normalised():
    assert math.isclose(sum(SYM6), math.sqrt(2), rel_tol=1e-9)


def test_p_zero_is_identity_with_zero_labels(device):
    x = torch.randn(3, 3, 32, 32).to(device)
    y, labels = AugmentPipe(p=0.0)(x)
    assert labels.shape == (3, LABEL_DIM) and torch.all(labels == 0)
    assert torch.allclose(y, x, atol=1e-4)


def test_xflip_only_flips_and_labels_first_column(device):
    x = smooth_images(64).to(device)
    pipe = AugmentPipe(p=1.0, scale=0, aniso=0, translate_frac=0)
    torch.manual_seed(0)
    y, labels = pipe(x)
    flipped = labels[:, 0] == 1
    assert 10 < flipped.sum() < 54  # x-flip with probability 1/2
    assert torch.all(labels[:, 1:] == 0)
    assert torch.allclose(y[flipped], x[flipped].flip(3), atol=1e-4)
    assert torch.allclose(y[~flipped], x[~flipped], atol=1e-4)


def test_translation_moves_content_by_label(device):
    x = smooth_images(8).to(device)
    pipe = AugmentPipe(p=1.0, xflip=0, scale=0, aniso=0, translate_frac=1)
    torch.manual_seed(1)
    y, labels = pipe(x)
    assert torch.all(labels[:, :4] == 0) and torch.all(labels[:, 4:] != 0)
    # a shift by (dx, dy) pixels: compare the interior against the shifted original
    dx = (labels[0, 4] * 32 * 0.125).item()
    dy = (labels[0, 5] * 32 * 0.125).item()
    grid_y, grid_x = torch.meshgrid(torch.arange(32.0, device=device), torch.arange(32.0, device=device), indexing="ij")
    src_x, src_y = grid_x - dx, grid_y - dy
    expected = torch.nn.functional.grid_sample(
        x[:1], torch.stack([(2 * src_x + 1) / 32 - 1, (2 * src_y + 1) / 32 - 1], dim=-1)[None],
        mode="bilinear", padding_mode="reflection", align_corners=False)
    inner = slice(8, 24)
    assert torch.allclose(y[0, :, inner, inner], expected[0, :, inner, inner], atol=0.05)


def test_probability_of_geometric_ops(device):
    torch.manual_seed(0)  # on CUDA other draws: each bound is about 4 standard deviations of its frequency
    x = torch.zeros(2000, 1, 8, 8, device=device)
    _, labels = AugmentPipe(p=0.12)(x)
    assert abs((labels[:, 0] == 1).float().mean().item() - 0.5) < 0.05  # x-flip always eligible
    for col in (1, 4):
        frac = (labels[:, col] != 0).float().mean().item()
        assert abs(frac - 0.12) < 0.03, (col, frac)
    aniso = labels[:, 2] != 0
    assert abs(aniso.float().mean().item() - 0.12) < 0.03
    rotated = (labels[aniso, 3] != 0).float().mean().item()  # rotated frame with probability 0.5
    assert abs(rotated - 0.5) < 0.12


def test_release_constructor_and_call(device):
    """The release builds AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1, translate_frac=1)
    and calls it on a batch: (images, labels [N, 6]), the same as this code's default pipe."""
    x = smooth_images(8, 16).to(device)
    release = AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1, translate_frac=1)
    images, labels = release(x, generator=torch.Generator(device).manual_seed(4))  # the draws are on the device
    assert images.shape == x.shape and labels.shape == (8, LABEL_DIM)
    ours = AugmentPipe()(x, generator=torch.Generator(device).manual_seed(4))
    assert torch.equal(images, ours[0]) and torch.equal(labels, ours[1])
    for unsupported in (dict(yflip=1), dict(rotate_frac=1)):
        with pytest.raises(ValueError, match="not implemented .* pass 0"):
            AugmentPipe(**unsupported)


def test_generator_makes_it_deterministic_and_rejects_bad_p(device):
    x = torch.randn(4, 3, 16, 16).to(device)
    a = AugmentPipe(p=0.5)(x, generator=torch.Generator(device).manual_seed(3))
    b = AugmentPipe(p=0.5)(x, generator=torch.Generator(device).manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="p=1.5"):
        AugmentPipe(p=1.5)
