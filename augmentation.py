"""EDM-style geometric augmentation (Karras et al. 2022), restricted to what SoFlow's CIFAR-10 recipe uses:
x-flip, isotropic scaling, anisotropic scaling and fractional translation, each applied with probability
`p * multiplier`. Returns the augmented images and the 6-wide label vector that conditions the U-Net:
[xflip, scale, aniso_cos, aniso_sin, translate_x, translate_y].

Geometric transforms are carried out as in EDM: reflect-pad, 2x upsample with the sym6 wavelet,
bilinear resampling through the inverse transform, 2x downsample and crop.
"""
import math

import torch
import torch.nn.functional as F

# Low-pass decomposition filter of the Symlet-6 wavelet (its taps sum to sqrt(2)).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

LABEL_DIM = 6


def _matrix(rows, batch, device):
    """Batched [N, 3, 3] from nested rows whose entries are scalars or [N] tensors."""
    out = torch.empty(batch, 3, 3, device=device)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            out[:, i, j] = value
    return out


def translate2d(tx, ty, batch, device):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], batch, device)


def scale2d(sx, sy, batch, device):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], batch, device)


def rotate2d(theta, batch, device):
    return _matrix([[theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]], batch, device)


class AugmentPipe:
    """Callable: images [N, C, H, W] in [-1, 1] -> (augmented images, labels [N, 6]).

    The release builds it as `AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1,
    translate_frac=1)`, keywords accepted here as they are; y-flips and fractional rotations are not part of
    the recipe (the U-Net's 6 augmentation labels leave no room for their labels), so yflip and rotate_frac
    must be 0."""

    def __init__(self, p=0.12, xflip=1e8, scale=1, aniso=1, translate_frac=1, scale_std=0.2, aniso_std=0.2,
                 aniso_rotate_prob=0.5, translate_frac_std=0.125, yflip=0, rotate_frac=0):
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability p={p} must lie in [0, 1]")
        if yflip or rotate_frac:
            raise ValueError(f"yflip={yflip}, rotate_frac={rotate_frac}: y-flips and fractional rotations are not "
                             f"implemented (SoFlow's CIFAR-10 recipe and the release use 0); pass 0")
        self.p = float(p)
        self.xflip = float(xflip)
        self.scale = float(scale)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    def _gate(self, values, multiplier, shape, device, generator):
        """Keep `values` with probability multiplier * p, zero elsewhere."""
        keep = torch.rand(shape, device=device, generator=generator) < multiplier * self.p
        return torch.where(keep, values, torch.zeros_like(values))

    def __call__(self, images, generator=None):
        n, c, h, w = images.shape
        device = images.device
        rand = dict(device=device, generator=generator)
        labels = []

        # Pixel blitting: x-flip.
        flip = self._gate(torch.randint(2, (n, 1, 1, 1), **rand), self.xflip, (n, 1, 1, 1), device, generator)
        images = torch.where(flip == 1, images.flip(3), images)
        labels.append(flip.reshape(n, 1))

        # Geometric transformations, accumulated as one inverse matrix per sample.
        g_inv = torch.eye(3, device=device).expand(n, 3, 3)
        z = self._gate(torch.randn(n, **rand), self.scale, (n,), device, generator)
        s = (z * self.scale_std).exp2()
        g_inv = g_inv @ scale2d(1 / s, 1 / s, n, device)
        labels.append(z.reshape(n, 1))

        z = torch.randn(n, **rand)
        r = torch.rand(n, **rand) * 2 * math.pi
        z = self._gate(z, self.aniso, (n,), device, generator)
        r = torch.where(torch.rand(n, **rand) < self.aniso_rotate_prob, r, torch.zeros_like(r))
        s = (z * self.aniso_std).exp2()
        g_inv = g_inv @ rotate2d(-r, n, device) @ scale2d(1 / s, s, n, device) @ rotate2d(r, n, device)
        labels.append(torch.stack([z * r.cos(), z * r.sin()], dim=1))

        z = self._gate(torch.randn(2, n, **rand), self.translate_frac, (1, n), device, generator)
        g_inv = g_inv @ translate2d(-z[0] * w * self.translate_frac_std, -z[1] * h * self.translate_frac_std, n, device)
        labels.append(z.t())

        images = self._resample(images, g_inv)
        return images, torch.cat([x.float() for x in labels], dim=1)

    @staticmethod
    def _resample(images, g_inv):
        n, c, h, w = images.shape
        device = images.device
        hz = torch.tensor(SYM6, dtype=images.dtype, device=device)
        hz_pad = len(SYM6) // 4

        # Reflect-pad enough that the transformed corners stay inside the image.
        cx, cy = (w - 1) / 2, (h - 1) / 2
        corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=device)
        corners = g_inv @ corners.t()  # [N, xyz, corner]
        margin = corners[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * corner]
        margin = torch.cat([-margin, margin]).max(dim=1).values  # [x0, y0, x1, y1]
        margin = margin + torch.tensor([hz_pad * 2 - cx, hz_pad * 2 - cy] * 2, device=device)
        margin = margin.clamp(min=0).minimum(torch.tensor([w - 1, h - 1] * 2, device=device, dtype=margin.dtype))
        mx0, my0, mx1, my1 = (int(v) for v in margin.ceil().tolist())
        images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
        g_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, n, device) @ g_inv

        # 2x upsample with the wavelet filter (zero insertion, then a separable convolution).
        weight = hz.flip(0)[None, None].tile(c, 1, 1)
        pad = (len(SYM6) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(n, c, images.shape[2], -1)[..., :-1]
        images = F.conv2d(images, weight.unsqueeze(2), groups=c, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(n, c, -1, images.shape[3])[:, :, :-1]
        images = F.conv2d(images, weight.unsqueeze(3), groups=c, padding=[pad, 0])
        g_inv = scale2d(2, 2, n, device) @ g_inv @ scale2d(0.5, 0.5, n, device)
        g_inv = translate2d(-0.5, -0.5, n, device) @ g_inv @ translate2d(0.5, 0.5, n, device)

        # Resample through the inverse transform, in normalised coordinates.
        shape = [n, c, (h + hz_pad * 2) * 2, (w + hz_pad * 2) * 2]
        g_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], n, device) @ g_inv
                 @ scale2d(shape[3] / 2, shape[2] / 2, n, device))
        grid = F.affine_grid(g_inv[:, :2, :].to(images.dtype), shape, align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        # 2x downsample with the same filter and crop back to H x W.
        weight = hz[None, None].tile(c, 1, 1)
        pad = (len(SYM6) - 1) // 2
        images = F.conv2d(images, weight.unsqueeze(2), groups=c, stride=[1, 2], padding=[0, pad])[..., hz_pad:-hz_pad]
        images = F.conv2d(images, weight.unsqueeze(3), groups=c, stride=[2, 1], padding=[pad, 0])[:, :, hz_pad:-hz_pad]
        return images
