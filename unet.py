"""EDM's DDPM++ "SongUNet" (Karras et al. 2022) with a second time input for SoFlow.

Noise conditioning: sin-first positional embeddings of t and of (t - s), concatenated, plus the
embedding of the 6-wide augmentation labels, then two Linear+SiLU layers. Module names follow EDM
so that the reference checkpoints load with no renaming.
"""
import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel
from torch.utils.checkpoint import checkpoint


class _AttentionKernelsOfForward:
    """Context of a block's recomputation: the scaled-dot-product-attention kernels (and their priority) that
    were in force when the block ran forward. The backward pass may run outside the forward's `sdpa_kernel`
    context, and another kernel would recompute other activations. Re-enterable (a graph kept by
    retain_graph recomputes once per backward pass)."""

    def __init__(self):
        self.backends = _cur_sdpa_kernel_backends(with_priority=True)
        self._contexts = []

    def __enter__(self):
        context = sdpa_kernel(self.backends, set_priority=True)
        context.__enter__()
        self._contexts.append(context)

    def __exit__(self, *exc):
        return self._contexts.pop().__exit__(*exc)


def _forward_contexts():
    return contextlib.nullcontext(), _AttentionKernelsOfForward()


def checkpointed_call(block, *args, enabled=False):
    """block(*args), with activation checkpointing when `enabled`, the block is in training mode and gradients
    are on: only the block's inputs are kept for the backward pass, which recomputes its activations. The
    recomputation replays the random state of the forward (same dropout masks), its autocast state and its
    attention kernels, so gradients equal those without checkpointing. No-grad and eval calls run plainly, and
    so do calls under a torch.func transform (a MeanFlow JVP), which checkpointing does not support."""
    if not (enabled and block.training and torch.is_grad_enabled()):
        return block(*args)
    if torch.compiler.is_compiling():  # the compiled graph fixes the kernels; compile takes no custom contexts
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=True)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return block(*args)
    return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_forward_contexts)


def weight_init(shape, mode, fan_in, fan_out):
    if mode == "xavier_uniform":
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"invalid init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **kw) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **kw) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling through a fixed FIR resample filter."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), init_mode="kaiming_normal", init_weight=1, init_bias=0):
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **kw) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **kw) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.up:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=f_pad)
        if self.down:
            x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


class UNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = init or {}
        init_zero = init_zero or dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = 0 if not attention else (
            num_heads if num_heads is not None else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        x = F.silu(self.norm1(x.add_(params)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            x = self.proj(self._attention(self.norm2(x))).add_(x)
            x = x * self.skip_scale
        return x


    def _attention(self, x):
        """softmax(q^T k / sqrt(d)) v over the spatial positions of x [B, C, H, W], through SDPA. q, k and v go
        in as [B, heads, HW, C / heads] with unit stride in the last dimension: CUDA's fused kernels (flash and
        memory-efficient) take only 4-D inputs of that layout. qkv's channels are (head, channel, q/k/v), EDM's
        order, which the checkpoints' weights follow."""
        b, c, h, w = x.shape
        qkv = self.qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = (part.transpose(2, 3).contiguous() for part in qkv.unbind(3))  # [B, heads, HW, C / heads]
        a = F.scaled_dot_product_attention(q, k, v)
        return a.transpose(2, 3).reshape(b, c, h, w)


class PositionalEmbedding(nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # never below fp32 for times
        freqs = torch.arange(0, self.num_channels // 2, dtype=dtype, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.to(dtype).ger(freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module):
    """forward(x, t, s, labels=None, augment_labels=None) -> F_theta(x, t, s). Unconditional (no labels)."""

    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, augment_dim=6, model_channels=128,
                 channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.30,
                 channel_mult_noise=2, resample_filter=(1, 3, 3, 1)):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                            init=init, init_zero=init_zero, init_attn=init_attn)
        self.augment_dim = augment_dim
        self.dropout = dropout  # read by the SoFlow wrapper: dropout makes the consistency calls share RNG state
        self.grad_checkpointing = False  # see set_grad_checkpointing
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        # Two time inputs, t and t - s, each with its own positional embedding.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        self.map_augment = Linear(augment_dim, 2 * noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(2 * noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def set_grad_checkpointing(self, enabled=True):
        """Activation checkpointing of every encoder and decoder UNetBlock in training-mode calls with gradient:
        their activations are recomputed in the backward pass (with the forward's dropout masks) instead of
        kept, for less memory at the cost of about one more forward pass. Off by default; returns self."""
        self.grad_checkpointing = bool(enabled)
        return self

    def time_embedding(self, t):
        emb = self.map_noise(t)
        return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # sin first

    def forward(self, x, t, s, labels=None, augment_labels=None):
        if labels is not None:
            raise ValueError("the U-Net is unconditional (num_classes=0): pass labels=None")
        emb = torch.cat([self.time_embedding(t), self.time_embedding(t - s)], dim=1)
        if self.map_augment is not None:
            if augment_labels is None:
                augment_labels = torch.zeros(x.shape[0], self.augment_dim, device=x.device)
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        for block in self.enc.values():
            x = self._block(block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self._block(block, x, emb)
        return aux

    def _block(self, block, x, emb):
        return checkpointed_call(block, x, emb, enabled=self.grad_checkpointing)
