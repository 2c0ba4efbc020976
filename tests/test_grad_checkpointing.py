"""Activation checkpointing (`set_grad_checkpointing`) of the DiT and U-Net blocks.

The losses and gradients with checkpointing are compared bit for bit (torch.equal) with those without it. That
holds on the CPU because non-reentrant checkpointing records the same autograd graph (it only swaps the saved
activations for a recomputation), and the recomputation runs the same kernels on the same inputs under the
forward's random state, autocast state and attention kernels. (On CUDA, kernels with atomic reductions are not
bitwise repeatable between two runs anyway; compare there with a tolerance.)
"""
import weakref

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import unet as unet_module
from helpers import release_objective, tiny_dit, tiny_unet
from unet import UNetBlock


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (OpenMP threads contending on a loaded machine cost 10-50x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loss_and_grads(model, checkpointing, x, labels, objective, seed=5, finished_steps=1000):
    """Soflow.forward (times, CFG mask, noise and dropout drawn from `seed`) and backward."""
    model.network.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, stats = model(x, labels, objective=objective, finished_steps=finished_steps)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), stats, grads


# CUDA's tolerances (the CPU compares bit for bit): its atomic reductions (weight-gradient convolutions, index_add,
# the fused attention backward) are not bitwise repeatable between two runs; per dtype, a few float rounding steps.
CUDA_TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}
CUDA_BF16_TOLERANCE = dict(rtol=2e-2, atol=1e-3)  # bf16 autocast: the same reorderings at bfloat16's 8 bits


def same(a, b, tolerance=None):
    """torch.equal on the CPU; on CUDA equal up to CUDA_TOLERANCE (or `tolerance`)."""
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, **(tolerance or CUDA_TOLERANCE.get(a.dtype, CUDA_TOLERANCE[torch.float32])))


def assert_bitwise_equal(a, b, tolerance=None):
    """Bit for bit on the CPU (see the module docstring), CUDA_TOLERANCE (or `tolerance`) on CUDA."""
    loss_a, stats_a, grads_a = a
    loss_b, stats_b, grads_b = b
    assert same(loss_a, loss_b, tolerance), (loss_a, loss_b)
    for key in stats_a:
        assert same(stats_a[key], stats_b[key], tolerance), key
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert same(grads_a[name], grads_b[name], tolerance), name


def grads_differ(a, b):
    return any(not same(a[2][name], b[2][name]) for name in a[2])


class CheckpointCalls:
    """Counts the calls of torch.utils.checkpoint.checkpoint made by the backbones."""

    def __init__(self, monkeypatch, **overrides):
        self.count = 0
        real = unet_module.checkpoint

        def counting(*args, **kwargs):
            self.count += 1
            return real(*args, **{**kwargs, **overrides})
        monkeypatch.setattr(unet_module, "checkpoint", counting)


def unet_blocks(model):
    return [m for m in model.network.modules() if isinstance(m, UNetBlock)]


# ------------------------------------------------------------------------------------------------------
# Gradients equal without checkpointing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dit_soflow_loss_and_gradients_bitwise_equal(dtype, device):
    model = tiny_dit(dtype=dtype).train().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 8, 8, generator=g).to(dtype).to(device)
    labels = torch.randint(0, 10, (8,), generator=g).to(device)
    objective = release_objective("imagenet")
    plain = loss_and_grads(model, False, x, labels, objective)
    checkpointed = loss_and_grads(model, True, x, labels, objective)
    assert_bitwise_equal(plain, checkpointed)
    assert all(g.abs().sum() > 0 for name, g in plain[2].items() if name.startswith("network.blocks"))


def test_dit_bitwise_equal_under_bf16_autocast(device):
    """The recomputation runs under the forward's autocast state, not the backward's (none here)."""
    model = tiny_dit(dtype=torch.float32).train().to(device)
    x, labels = torch.randn(8, 4, 8, 8).to(device), torch.randint(0, 10, (8,)).to(device)
    objective = release_objective("imagenet")

    def run(checkpointing):
        model.network.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = model(x, labels, objective=objective)
        loss.backward()
        return loss.detach(), {}, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert_bitwise_equal(run(False), run(True), CUDA_BF16_TOLERANCE)


def test_dit_recomputes_with_the_forward_attention_kernel(device):
    """The backward pass runs outside the forward's `sdpa_kernel` context (the benchmark's reference variant does
    this): the blocks are recomputed with the forward's kernel, not the one in force during backward."""
    model = tiny_dit(dtype=torch.float32).train().to(device)
    x, labels, t = (v.to(device) for v in (torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,)), torch.rand(4)))

    def run(checkpointing):
        model.network.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):
            out = model.network(x, t, 0.5 * t, labels)
        out.square().sum().backward()
        return out.detach(), {}, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True)
    assert_bitwise_equal(run(False), run(True))
    assert torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True) == before  # the context is left


@pytest.mark.parametrize("velocity_loss_ratio", [0.0, 0.5])
def test_unet_dropout_masks_replayed_and_shared_by_calls_2_and_3(velocity_loss_ratio, monkeypatch, device):
    """U-Net with dropout 0.3 in train mode: the consistency loss draws dropout masks in call 2 (with gradient,
    checkpointed) and replays them in call 3 (no gradient, after rewinding the random state); the backward
    recomputation of call 2's blocks must draw them once more. With velocity_loss_ratio 0.5, call 3 re-runs
    call 2's whole batch layout (Flow Matching rows included) so that every row meets its call-2 mask."""
    model = tiny_unet(dropout=0.3).train().to(device)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    objective = release_objective("cifar", velocity_loss_ratio=velocity_loss_ratio)
    rows = []
    hook = model.network.register_forward_pre_hook(lambda m, args: rows.append((args[0].shape[0],
                                                                               torch.is_grad_enabled())))
    plain = loss_and_grads(model, False, x, None, objective)
    hook.remove()
    # call 2 (grad) and call 3 (no grad); with 4 Flow Matching rows, call 3 still runs all 8 rows (call 2's layout)
    assert rows == [(8, True), (8, False)]
    checkpointed = loss_and_grads(model, True, x, None, objective)
    assert_bitwise_equal(plain, checkpointed)
    assert plain[1]["Con_MSE"] > 0 and (velocity_loss_ratio == 0 or plain[1]["Vel_MSE"] > 0)

    # The comparison sees the masks: another seed changes the loss, and a recomputation that does not replay
    # the random state (preserve_rng_state=False) changes the gradients.
    assert not same(plain[0], loss_and_grads(model, False, x, None, objective, seed=6)[0])
    CheckpointCalls(monkeypatch, preserve_rng_state=False)
    unreplayed = loss_and_grads(model, True, x, None, objective)
    assert same(unreplayed[0], plain[0]) and grads_differ(unreplayed, plain)


# ------------------------------------------------------------------------------------------------------
# Checkpointing is active where it should be, and only there


def test_dit_blocks_recomputed_in_backward_and_activations_released(monkeypatch, device):
    model = tiny_dit(dtype=torch.float32).train().to(device)
    x, labels = torch.randn(8, 4, 8, 8).to(device), torch.randint(0, 10, (8,)).to(device)
    objective = release_objective("imagenet")
    block = model.network.blocks[0]
    calls = {"forward": 0, "backward": 0}
    phase = ["forward"]
    block.register_forward_pre_hook(lambda m, args: calls.__setitem__(phase[0], calls[phase[0]] + 1))
    hidden = []  # weak references to the MLP's hidden activations of the calls with gradient
    block.mlp.fc1.register_forward_hook(
        lambda m, args, out: hidden.append(weakref.ref(out)) if torch.is_grad_enabled() else None)

    def forward_then_backward(checkpointing):
        model.network.set_grad_checkpointing(checkpointing)
        calls.update(forward=0, backward=0)
        hidden.clear()
        phase[0] = "forward"
        torch.manual_seed(5)
        loss, _ = model(x, labels, objective=objective)
        alive = sum(ref() is not None for ref in hidden)
        phase[0] = "backward"
        loss.backward()
        return dict(calls), alive

    plain_calls, plain_alive = forward_then_backward(False)
    counter = CheckpointCalls(monkeypatch)
    gc_calls, gc_alive = forward_then_backward(True)
    # calls 1 (guidance) and 3 without gradient, call 2 with: the block runs 3 times forward either way ...
    assert plain_calls == {"forward": 3, "backward": 0}
    # ... and with checkpointing once more in backward, call 2's recomputation
    assert gc_calls == {"forward": 3, "backward": 1}
    # only call 2's blocks are checkpointed (depth 2): the no-grad calls pay nothing
    assert counter.count == len(model.network.blocks)
    # the MLP's hidden activation of call 2 is kept for backward without checkpointing, freed with it
    assert plain_alive == 1 and gc_alive == 0


def saved_bytes(fn):
    """Bytes of the distinct tensors that autograd saves for backward outside checkpointed regions."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("backbone", ["dit", "unet"])
def test_saved_activation_bytes_drop(backbone, device):
    if backbone == "dit":
        model, x, labels, objective = (tiny_dit(dtype=torch.float32, depth=4).train(), torch.randn(8, 4, 8, 8),
                                       torch.randint(0, 10, (8,)), release_objective("imagenet"))
    else:
        model, x, labels, objective = (tiny_unet(dropout=0.3).train(), torch.randn(8, 3, 8, 8), None,
                                       release_objective("cifar", velocity_loss_ratio=0.0))
    model, x = model.to(device), x.to(device)
    labels = labels.to(device) if labels is not None else None

    def loss(checkpointing):
        model.network.set_grad_checkpointing(checkpointing)
        torch.manual_seed(5)
        return lambda: model(x, labels, objective=objective)[0]

    plain, loss_plain = saved_bytes(loss(False))
    checkpointed, loss_gc = saved_bytes(loss(True))
    assert same(loss_plain, loss_gc)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_unet_every_block_checkpointed_once_and_recomputed(monkeypatch, device):
    model = tiny_unet(dropout=0.3).train().to(device)
    blocks = unet_blocks(model)
    assert len(blocks) == 10  # encoder: block0, down, block0; decoder: in0, in1, 2 blocks, up, 2 blocks
    recomputed = []
    in_backward = [False]
    for b in blocks:
        b.register_forward_pre_hook(lambda m, args: recomputed.append(m) if in_backward[0] else None)
    counter = CheckpointCalls(monkeypatch)
    model.network.set_grad_checkpointing(True)
    torch.manual_seed(5)
    loss, _ = model(torch.randn(8, 3, 8, 8).to(device), objective=release_objective("cifar", velocity_loss_ratio=0.5))
    assert counter.count == len(blocks)  # call 2 only: call 3 runs without gradient
    in_backward[0] = True
    loss.backward()
    assert sorted(map(id, recomputed)) == sorted(map(id, blocks))


@pytest.mark.parametrize("backbone", ["dit", "unet"])
def test_no_checkpointing_without_grad_in_eval_or_when_off(backbone, monkeypatch, device):
    model = (tiny_dit(dtype=torch.float32) if backbone == "dit" else tiny_unet(dropout=0.3)).to(device)
    net = model.network
    x = torch.randn(2, net.in_channels, 8, 8).to(device)
    t = torch.rand(2).to(device)
    labels = torch.tensor([1, 2], device=device) if backbone == "dit" else None
    counter = CheckpointCalls(monkeypatch)
    assert net.grad_checkpointing is False  # off by default
    net.train()(x, t, t, labels).sum().backward()
    assert counter.count == 0
    assert net.set_grad_checkpointing() is net and net.grad_checkpointing is True
    with torch.no_grad():
        net.train()(x, t, t, labels)
    net.eval()(x, t, t, labels).sum().backward()
    assert counter.count == 0
    net.train()(x, t, t, labels).sum().backward()
    assert counter.count > 0
    net.set_grad_checkpointing(False)
    assert net.grad_checkpointing is False


def test_state_dict_unchanged_and_jvp_runs_plainly(device):
    model = tiny_dit(dtype=torch.float64).train().to(device)
    keys = list(model.state_dict())
    model.network.set_grad_checkpointing(True)
    assert list(model.state_dict()) == keys
    # torch.func transforms (the MeanFlow benchmark's JVP) do not support checkpointing: blocks run plainly there
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.float64).to(device), torch.rand(2, dtype=torch.float64).to(device)
    labels = torch.tensor([1, 2], device=device)
    def jvp():
        with sdpa_kernel(SDPBackend.MATH):  # the kernel with forward-mode derivatives
            return torch.func.jvp(lambda x_: model.network(x_, t, t / 2, labels), (x,), (torch.ones_like(x),))

    out, tangent = jvp()
    model.network.set_grad_checkpointing(False)
    ref_out, ref_tangent = jvp()
    assert same(out, ref_out) and same(tangent, ref_tangent)
