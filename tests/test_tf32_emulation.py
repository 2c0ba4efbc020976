"""benchmarks/tf32_emulation.py: TF32 rounding and the operands it is applied to."""
import os
import sys

import torch
import torch.nn.functional as F

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from tf32_emulation import EmulateTF32, round_to_tf32  # noqa: E402


def test_round_to_tf32_known_values():
    ulp = 2.0 ** -10  # TF32 keeps 10 explicit mantissa bits
    x = torch.tensor([1 + ulp, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0 ** -20, -(1 + 3 * ulp / 2),
                      1 + ulp / 4, 0.0, 2.0 ** -126, float("inf"), float("-inf")])
    expected = [1 + ulp, 1.0, 1 + 2 * ulp, 1 + ulp, -(1 + 2 * ulp), 1.0, 0.0, 2.0 ** -126, float("inf"),
                float("-inf")]  # exact, tie to even (down), tie to even (up), above the tie, negative, below
    assert round_to_tf32(x).tolist() == expected
    assert round_to_tf32(torch.tensor([float("nan")])).isnan().all()
    # Every result has its 13 low mantissa bits clear, and is within half a TF32 ulp of the input.
    y = torch.randn(10_000) * 100
    r = round_to_tf32(y)
    assert (r.view(torch.int32) & 0x1FFF).eq(0).all()
    assert ((r - y).abs() <= y.abs() * 2.0 ** -11).all()
    assert round_to_tf32(y.double()) is not None and round_to_tf32(y.double()).dtype == torch.float64
    # Autograd passes through (straight-through), as the benchmark runs call 2 with grad.
    w = torch.randn(4, requires_grad=True)
    round_to_tf32(w).sum().backward()
    assert torch.equal(w.grad, torch.ones(4))


def test_emulation_rounds_matmul_operands_only():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=g) for shape in ((3, 8), (5, 8), (5,)))
    emulator = EmulateTF32()
    with emulator:
        out = F.linear(x, w, b)
        mm = x @ w.t()
        plain = x + 1  # not a contraction: untouched
    rx, rw = round_to_tf32(x), round_to_tf32(w)
    assert torch.equal(out, F.linear(rx, rw, b)) and not torch.equal(out, F.linear(x, w, b))
    assert torch.equal(mm, rx @ rw.t())
    assert torch.equal(plain, x + 1)
    assert emulator.counts == {"linear": 1, "matmul": 1}
