"""benchmarks/step_cost.py and step_variants.py on a tiny DiT: the reference-style SoFlow loss equals the
fused one, every variant's training step runs, and the MeanFlow JVP target matches a finite difference."""
import pytest
import torch

import step_cost
import step_variants
from helpers import TINY_DIT, randomise


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = step_variants.build_model("DiT-B-4", 8, dit_sizes=TINY_DIT)
    return randomise(model, seed=1).to(dtype).train()


def batch(n=8, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=dtype)
    labels = torch.randint(0, step_variants.NUM_CLASSES, (n,), generator=g)
    return x, labels


@pytest.mark.parametrize("finished_steps", [0, 250_000])
def test_reference_loss_equals_fused_loss_and_gradient(finished_steps):
    model = tiny_model()
    x, labels = batch()
    o = step_variants.imagenet_objective()
    torch.manual_seed(3)
    draws, noise = step_variants.sample_soflow_inputs(model, x, o, finished_steps)
    t, s, l, n_fm, mask = draws.t, draws.s, draws.l, draws.n_fm, draws.cfg_mask
    mask[0], mask[-1] = True, True  # a dropped label in both parts
    mask[1], mask[-2] = False, False
    c = slice(n_fm, None)
    assert 0 < n_fm < x.shape[0] and bool((s[c] <= l[c]).all() and (l[c] < t[c]).all())
    args = dict(t=t, s=s, l=l, n_fm=n_fm, objective=o, labels=labels, cfg_mask=mask, noise=noise)

    fused = model.fused_loss(x, **args)
    fused_total = fused["fm"][0] * n_fm / 8 + fused["cons"][0] * (8 - n_fm) / 8
    fused_grads = torch.autograd.grad(fused_total, [p for p in model.parameters() if p.requires_grad])

    ref = step_variants.reference_losses(model, x, **args)
    ref_total = ref["fm"][0] * n_fm / 8 + ref["cons"][0] * (8 - n_fm) / 8
    ref_grads = torch.autograd.grad(ref_total, [p for p in model.parameters() if p.requires_grad])

    for part in ("fm", "cons"):
        for a, b in zip(fused[part], ref[part]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fused_total.abs() > 1e-6
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_every_variant_step_runs_and_counts_passes():
    model = tiny_model(torch.float32)
    x, labels = batch(dtype=torch.float32)
    optimizer = step_variants.make_optimizer(model)
    expected_rows = {"fm": 1.0, "soflow": 2.5, "reference": 2.5, "meanflow": 1.0}
    expected_calls = {"fm": 1, "soflow": 3, "reference": 6, "meanflow": 1}
    for variant in step_variants.VARIANTS:
        before = [p.detach().clone() for p in model.network.parameters()]
        loss = step_variants.train_step(model, optimizer, variant, x, labels, step=1)
        assert torch.isfinite(loss), variant
        assert any(not torch.equal(a, b) for a, b in zip(before, model.network.parameters())), variant
        passes = step_variants.count_passes(model, variant, x, labels)
        assert passes["calls"] == expected_calls[variant], (variant, passes)
        rows = passes["grad"] + passes["nograd"] + passes["jvp"]
        assert rows == pytest.approx(expected_rows[variant]), (variant, passes)
        assert passes["grad" if variant != "meanflow" else "jvp"] == pytest.approx(1.0), (variant, passes)


def test_meanflow_jvp_target_matches_finite_difference():
    model = tiny_model()
    x, labels = batch(4)
    torch.manual_seed(4)
    t, r = step_variants.sample_meanflow_times(4, x.device, torch.float64)
    assert bool((r[:3] == t[:3]).all() and (r[3:] < t[3:]).all())  # r = t rows first, as SoFlow's FM rows
    noise = torch.randn_like(x)
    z, v = model.scheduler.add_noise(x, noise, t)
    torch.testing.assert_close(v, noise - x)
    u, dudt = step_variants.meanflow_jvp(model.network, z, r, t, v, labels)
    torch.testing.assert_close(u, model.network(z, t, r, labels))
    h = 1e-5
    fd = (model.network(z + h * v, t + h, r, labels) - model.network(z - h * v, t - h, r, labels)) / (2 * h)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)
    assert dudt.abs().mean() > 1e-4

    mask = torch.zeros(4, dtype=torch.bool)
    loss, u2, u_tgt = step_variants.meanflow_losses(model, x, labels, t, r, mask, noise)
    torch.testing.assert_close(u_tgt, v - (t - r).reshape(-1, 1, 1, 1) * dudt)
    assert not u_tgt.requires_grad and u2.requires_grad and torch.isfinite(loss)


def test_format_table_prints_the_ratio_line():
    def result(ms, mem, calls, grad, nograd, jvp=0.0):
        return dict(times=[ms / 1e3] * 3, memory=dict(peak=(1000 + mem) * 2**20, baseline=1000 * 2**20),
                    passes=dict(calls=calls, grad=grad, nograd=nograd, jvp=jvp))
    results = {"fm": result(100, 50, 1, 1, 0), "soflow": result(150, 52, 3, 1, 1.5),
               "reference": result(200, 80, 6, 1, 1.5), "meanflow": result(250, 90, 1, 0, 0, 1)}
    table, ratios = step_cost.format_table(results, None)
    assert "soflow" in table and "meanflow" in table
    assert ratios == "ratios: soflow/fm=1.500 soflow/reference=0.750 soflow_mem/fm_mem=1.040 meanflow/fm=2.500"


def test_grad_checkpointing_variants_step_alike_and_print_gc_ratios():
    """A '+gc' variant's step (blocks checkpointed) gives the same loss and the same updated weights as the plain
    one; `--grad-checkpointing` adds the twins of the named variants where it applies; the gc lines read right."""
    x, labels = batch(dtype=torch.float32)
    for variant in step_variants.GC_VARIANTS:
        weights = []
        for name in (variant, variant + step_variants.GC_SUFFIX):
            base, gc = step_variants.split_variant(name)
            model = tiny_model(torch.float32)
            model.network.set_grad_checkpointing(gc)
            optimizer = step_variants.make_optimizer(model)
            torch.manual_seed(7)
            loss = step_variants.train_step(model, optimizer, base, x, labels, step=1)
            weights.append((loss, [p.detach().clone() for p in model.parameters()]))
        (loss_a, w_a), (loss_b, w_b) = weights
        assert torch.equal(loss_a, loss_b), variant
        assert all(torch.equal(a, b) for a, b in zip(w_a, w_b)), variant

    args = step_cost.parse_args(["--variants", "soflow", "meanflow", "--grad-checkpointing"])
    assert args.grad_checkpointing and step_cost.parse_args([]).grad_checkpointing is False
    assert step_cost.parse_args(["--worker", "soflow+gc"]).worker == "soflow+gc"

    def result(ms, mem, peak=1000):
        return dict(times=[ms / 1e3] * 3, memory=dict(peak=(peak + mem) * 2**20, baseline=peak * 2**20),
                    passes=dict(calls=3, grad=1, nograd=1.5, jvp=0))
    results = {"fm": result(100, 50), "soflow": result(150, 200), "soflow+gc": result(195, 50)}
    assert step_cost.format_gc_ratios(results) == [
        "gc: time 1.30, step memory 0.25, peak memory 0.88 (soflow+gc / soflow)"]  # 1050 / 1200 MiB
    table, ratios = step_cost.format_table(results, None)
    rows = [line.split()[0] for line in table.splitlines()[2:]]
    assert rows == ["fm", "soflow", "soflow+gc"] and "grad checkpointing" in table
    assert ratios == "ratios: soflow/fm=1.500 soflow_mem/fm_mem=4.000"
