"""DiT backbone for SoFlow (Peebles & Xie 2023, adaLN-Zero) with a second timestep embedder.

The network conditions on c = emb_t(t) + emb_s(t - s) + emb_y(y). Parameter names follow the
reference release (timm's Attention / Mlp / PatchEmbed), so released checkpoints load unchanged.
"""
import math

import numpy as np
import torch
import torch.nn as nn

from unet import checkpointed_call

# name -> (patch_size, hidden_size, depth, num_heads)
DIT_SIZES = {
    "DiT-B-4": (4, 768, 12, 12),
    "DiT-B-2": (2, 768, 12, 12),
    "DiT-M-2": (2, 1024, 16, 16),
    "DiT-L-2": (2, 1024, 24, 16),
    "DiT-XL-2": (2, 1152, 28, 16),
}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos | sin] of a batch of (raw, un-rescaled) times t: [N] -> [N, dim]."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # never below fp32 for times
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t):
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table. Row `num_classes` (present when the model is trained with label dropout,
    or is unconditional) is the null class. Labels are never dropped here: the loss does it."""

    def __init__(self, num_classes, hidden_size, has_null_class):
        super().__init__()
        self.num_classes = num_classes
        self.has_null_class = has_null_class
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), hidden_size)

    def forward(self, labels, batch_size, device):
        if labels is None:
            if not self.has_null_class:
                raise ValueError(
                    "labels=None asks for the null class, but this DiT was built with cfg_drop_rate=0 and "
                    f"num_classes={self.num_classes}, so its label table has no null row; pass class labels")
            labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        from timm.models.vision_transformer import Attention, Mlp  # here: a config check need not import timm
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """forward(x, t, s, labels) -> F_theta(x, t, s), same shape as x."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, has_null_class=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"data_size {input_size} is not divisible by the DiT patch size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.grad_checkpointing = False  # see set_grad_checkpointing
        from timm.models.vision_transformer import PatchEmbed
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size)  # embeds t - s
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, has_null_class)
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos table, a Parameter without gradient as in the reference state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            grid = int(self.x_embedder.num_patches ** 0.5)
            pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # As the release: only the t embedder's MLP is re-drawn; the (t - s) embedder keeps its xavier draw.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output layer at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, enabled=True):
        """Activation checkpointing of every DiT block in training-mode calls with gradient: each block keeps
        only its inputs and recomputes its activations in the backward pass, for less memory at the cost of
        about one more forward pass of the blocks. Off by default; returns self."""
        self.grad_checkpointing = bool(enabled)
        return self

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, s, labels=None, augment_labels=None):
        if augment_labels is not None:
            raise ValueError("the DiT backbone takes no augment_labels (augmentation is a U-Net/CIFAR feature)")
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.s_embedder(t - s) + self.y_embedder(labels, x.shape[0], x.device)
        c = c.to(h.dtype)
        for block in self.blocks:
            h = checkpointed_call(block, h, c, enabled=self.grad_checkpointing)
        return self.unpatchify(self.final_layer(h, c))


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """[grid_size**2, embed_dim] table: first half encodes the column (w) index, second half the row (h)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w varies fastest
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def build_dit(model_type, input_size, in_channels, num_classes, has_null_class, **overrides):
    """DiT of a reference size; `overrides` (patch_size, hidden_size, depth, num_heads) give custom sizes."""
    if model_type not in DIT_SIZES:
        raise ValueError(f"unknown DiT model_type {model_type!r}; accepted: {sorted(DIT_SIZES)}")
    patch_size, hidden_size, depth, num_heads = DIT_SIZES[model_type]
    sizes = dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads)
    unknown = set(overrides) - set(sizes)
    if unknown:
        raise ValueError(f"unknown DiT size overrides {sorted(unknown)}; accepted: {sorted(sizes)}")
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
               has_null_class=has_null_class, **sizes)
