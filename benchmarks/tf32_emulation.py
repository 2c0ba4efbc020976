"""An emulation of TF32 tensor cores on any device, for benchmarks/precision.py.

TF32 keeps float32's 8 exponent bits and 10 of its 23 mantissa bits. `EmulateTF32`, a TorchFunctionMode,
rounds the operands of every float32 linear / matmul / mm / bmm / baddbmm / addmm / convolution /
scaled_dot_product_attention call to the nearest TF32 value (ties to even); the products of TF32 numbers
are exact in float32 and the accumulation stays float32, as on the hardware. It is an emulation, not the
hardware: tensor cores may truncate rather than round, cuBLAS may split the reduction differently, and in
attention only q, k and v are rounded (the attention probabilities are not; the CUDA memory-efficient
kernel may not use TF32 at all). Calls under autocast are left alone: they run in the autocast dtype.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _tf32_bits(value):
    """float32 (no grad) -> nearest TF32 value, ties to even, as float32; inf and NaN unchanged."""
    bits = value.view(torch.int32)
    lsb = (bits >> 13) & 1                                          # last kept mantissa bit, for ties to even
    rounded = ((bits + 0xFFF + lsb) & -8192).view(torch.float32)    # -8192 == ~0x1FFF: clears 13 bits
    return torch.where(torch.isfinite(value), rounded, value)


class _StraightThrough(torch.autograd.Function):
    """Returns `rounded` in the forward pass; the gradient goes to `x` unchanged."""

    @staticmethod
    def forward(ctx, x, rounded):
        return rounded.view_as(rounded)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_to_tf32(x, rounded=None):
    """float32 -> the nearest TF32 value (8 exponent bits, 10 explicit mantissa bits), ties to even, kept in
    float32, with a straight-through gradient. Other dtypes, infinities and NaNs pass through unchanged.
    `rounded`: the rounded value when already known (the weight cache of EmulateTF32)."""
    if x.dtype != torch.float32:
        return x
    if rounded is None:
        rounded = _tf32_bits(x.detach())
    return _StraightThrough.apply(x, rounded) if x.requires_grad and torch.is_grad_enabled() else rounded


# func -> positions of the arguments a TF32 tensor core reads (biases and addends stay float32)
_TF32_OPERANDS = {
    F.linear: (0, 1),
    F.conv1d: (0, 1), F.conv2d: (0, 1), F.conv3d: (0, 1),
    F.conv_transpose1d: (0, 1), F.conv_transpose2d: (0, 1), F.conv_transpose3d: (0, 1),
    torch.matmul: (0, 1), torch.Tensor.matmul: (0, 1), torch.Tensor.__matmul__: (0, 1),
    torch.Tensor.__rmatmul__: (0, 1),
    torch.mm: (0, 1), torch.Tensor.mm: (0, 1), torch.bmm: (0, 1), torch.Tensor.bmm: (0, 1),
    torch.addmm: (1, 2), torch.Tensor.addmm: (1, 2), torch.baddbmm: (1, 2), torch.Tensor.baddbmm: (1, 2),
    F.scaled_dot_product_attention: (0, 1, 2),
}
_TF32_KWARGS = {"input", "weight", "mat1", "mat2", "batch1", "batch2", "other", "query", "key", "value"}


class EmulateTF32(TorchFunctionMode):
    """Rounds the matmul / convolution / attention operands of float32 calls to TF32 (see the module doc).
    Calls under autocast are left alone (they run in the autocast dtype, as on CUDA). Rounded weights (views
    of Parameters) are cached per parameter version. `counts` tallies the rounded calls by function name
    (the audit that the emulation is applied)."""

    def __init__(self):
        super().__init__()
        self.counts = {}
        self._cache = {}

    def _round(self, a):
        if not isinstance(a, torch.Tensor) or a.dtype != torch.float32:
            return a
        base = a._base if a._base is not None else a
        if not isinstance(base, torch.nn.Parameter):
            return round_to_tf32(a)
        key = (id(base), base._version, tuple(a.shape), a.stride(), a.storage_offset())
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = (base, _tf32_bits(a.detach()))  # base kept alive: id stays unique
        return round_to_tf32(a, hit[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions = _TF32_OPERANDS.get(func)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if positions is not None and first is not None and not torch.is_autocast_enabled(first.device.type):
            args = tuple(self._round(a) if i in positions else a for i, a in enumerate(args))
            kwargs = {k: self._round(v) if k in _TF32_KWARGS else v for k, v in kwargs.items()}
            name = getattr(func, "__name__", str(func))
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)
