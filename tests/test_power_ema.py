"""power_ema.py: the power-function profiles, the trackers' updates, the snapshot files and the least-squares
reconstruction, checked against profiles integrated numerically and EMAs tracked directly."""
import math
import os

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from power_ema import (SIGMA_REL_MAX, PowerEMATracker, SnapshotError, gamma_of_sigma_rel, plan_reconstruction,
                       profile_inner, read_snapshot, reconstruct, scan_snapshots, sigma_rel_of_gamma, solve_weights,
                       weights_digest)


class Vector(torch.nn.Module):
    """A trained vector, a frozen parameter (as the DiT's position table) and a buffer."""

    def __init__(self, dim, dtype=torch.float32):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.frozen = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=dtype) / 3, requires_grad=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def trajectory(steps, dim, seed=0):
    """theta_1 .. theta_steps: a drifting random walk with a slow oscillation, float64."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0, 0.1, (steps, dim)), axis=0)
    t = np.arange(1, steps + 1)[:, None]
    return walk + np.sin(t / 9 + rng.uniform(0, 6, dim)) + 0.02 * t


def track(thetas, sigma_rels, every, folder=None, dtype=torch.float32, float16=False):
    """Trackers run over the trajectory `thetas`; snapshots written into `folder` when given."""
    model = Vector(thetas.shape[1], dtype)
    tracker = PowerEMATracker(model, sigma_rels, every, float16)
    for t, theta in enumerate(thetas, 1):
        with torch.no_grad():
            model.theta.copy_(torch.from_numpy(theta))
            model.count.fill_(t)
        tracker.update(model, t)
        if folder is not None and tracker.is_due(t, len(thetas)):
            tracker.snapshot(t, folder, rank=0, log=lambda message: None)
    return tracker


def profile(t, gamma):
    return lambda tau: (gamma + 1) * tau ** gamma / t ** (gamma + 1) if tau <= t else 0.0


# ----------------------------------------------------------------------------------------------------
# Profiles


def test_sigma_rel_and_gamma_are_the_papers():
    # EDM2 (section 3): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.07, 0.2, 0.3):
        gamma = gamma_of_sigma_rel(s)
        assert sigma_rel_of_gamma(gamma) == pytest.approx(s, rel=1e-12)
        # the profile's standard deviation over [0, 1], integrated numerically
        p = profile(1.0, gamma)
        mean = quad(lambda x: x * p(x), 0, 1)[0]
        assert math.sqrt(quad(lambda x: (x - mean) ** 2 * p(x), 0, 1)[0]) == pytest.approx(s, rel=1e-7)
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.4):
        with pytest.raises(ValueError, match="outside"):
            gamma_of_sigma_rel(bad)


def test_update_gives_each_step_the_integral_of_the_profile():
    """After T steps, step k's weights carry (k^(g+1) - (k-1)^(g+1)) / T^(g+1): the continuous profile's integral
    over (k - 1, k], so the L2 maths of the profiles is exact for the discrete EMA."""
    steps = 40
    tracker = track(np.eye(steps), [0.05, 0.15], every=1000, dtype=torch.float64)
    k = np.arange(1, steps + 1)
    for gamma, ema in zip(tracker.gammas, tracker.models):
        expected = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / steps ** (gamma + 1)
        np.testing.assert_allclose(ema.theta.numpy(), expected, rtol=1e-10, atol=1e-300)
        assert torch.equal(ema.frozen, Vector(1, torch.float64).frozen) and int(ema.count) == steps


@pytest.mark.parametrize("a, b", [((10.0, 6.94), (10.0, 16.97)), ((3.0, 6.94), (10.0, 2.0)), ((7.0, 0.5), (2.0, 30.0))])
def test_inner_product_of_profiles_matches_quadrature(a, b):
    numeric = quad(lambda x: profile(*a)(x) * profile(*b)(x), 0, min(a[0], b[0]), epsabs=0, epsrel=1e-12)[0]
    assert float(profile_inner(*a, *b)) == pytest.approx(numeric, rel=1e-9)
    assert float(profile_inner(*a, *b)) == pytest.approx(float(profile_inner(*b, *a)), rel=1e-14)
    # no overflow at a million steps
    assert np.isfinite(profile_inner(1.2e6, 16.97, 1e6, 16.97)) and profile_inner(1.2e6, 16.97, 1e6, 16.97) > 0


def test_weights_match_an_independent_solve_on_a_grid():
    """The weights of the closed form against a least-squares fit of the profiles sampled on a fine grid."""
    steps = np.array([100, 200, 300, 400] * 2, float)
    gammas = np.array([gamma_of_sigma_rel(0.05)] * 4 + [gamma_of_sigma_rel(0.10)] * 4)
    target = gamma_of_sigma_rel(0.07)
    w, error = solve_weights(steps, gammas, 400, target)
    tau = (np.arange(400 * 200) + 0.5) / 200  # midpoints, 200 per step
    columns = np.stack([[profile(t, g)(x) for x in tau] for t, g in zip(steps, gammas)], axis=1)
    goal = np.array([profile(400, target)(x) for x in tau])
    independent = np.linalg.lstsq(columns, goal, rcond=None)[0]
    np.testing.assert_allclose(w, independent, rtol=2e-3, atol=2e-4)
    residual = np.sqrt(np.sum((columns @ w - goal) ** 2) / np.sum(goal ** 2))
    assert error == pytest.approx(residual, rel=1e-3) and 0 < error < 0.05


# ----------------------------------------------------------------------------------------------------
# Reconstruction from snapshots


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """60 steps of a 64-dim trajectory, snapshots of sigma_rel 0.05 and 0.10 every 5 steps, and a third EMA
    (sigma_rel 0.07) tracked directly."""
    folder = str(tmp_path_factory.mktemp("posthoc") / "posthoc_ema")
    thetas = trajectory(60, 64)
    return dict(thetas=thetas, folder=folder, tracked=track(thetas, [0.05, 0.10], 5, folder),
                direct=track(thetas, [0.07], 5), direct_30=track(thetas[:30], [0.07], 5))


def test_a_tracked_sigma_rel_is_reproduced_to_float_rounding(run):
    snapshots, problems = scan_snapshots(run["folder"], warn=lambda m: None)
    assert problems == [] and [s.step for s in snapshots] == list(range(5, 61, 5))
    plans = [plan_reconstruction(snapshots, 0.10), plan_reconstruction(snapshots, 0.05, step=30)]
    assert plans[0].error < 1e-9 and plans[1].error < 1e-9
    at_60, at_30 = reconstruct(snapshots, plans)
    expected_30 = read_snapshot(os.path.join(run["folder"], "30.pt"))["emas"][0]
    for got, want in ((at_60, run["tracked"].models[1].state_dict()), (at_30, expected_30)):
        assert got.keys() == want.keys()
        torch.testing.assert_close(got["theta"], want["theta"], rtol=1.2e-7, atol=0)  # one float32 ulp
        assert torch.equal(got["frozen"], want["frozen"]) and torch.equal(got["count"], want["count"])


def profile_bound(plan, thetas, float_slack):
    """The largest difference, per element, between the reconstruction and the target EMA that the profile error
    allows: rec - target = int r(tau) theta(tau) dtau with r = p_rec - p_target; with m the time mean of theta,
    |.| <= ||r|| ||theta - m|| + |sum(w) - 1| |m| (Cauchy-Schwarz; every profile integrates to 1)."""
    thetas = thetas[:plan.step]
    norm_r = plan.error * math.sqrt(float(profile_inner(plan.step, plan.gamma, plan.step, plan.gamma)))
    m = thetas.mean(0)
    return norm_r * np.sqrt(((thetas - m) ** 2).sum(0)) + abs(sum(plan.weights) - 1) * np.abs(m) + float_slack


@pytest.mark.parametrize("step, direct", [(60, "direct"), (30, "direct_30")])
def test_an_untracked_sigma_rel_matches_an_ema_tracked_directly(run, step, direct):
    """sigma_rel 0.07 from the 0.05 and 0.10 snapshots against a third EMA of 0.07 tracked directly. Tolerance:
    profile_bound, the error the fit's profile residual allows on this trajectory, plus 1e-5 for the float32
    rounding of 60 EMA updates and of the snapshots."""
    snapshots, _ = scan_snapshots(run["folder"], warn=lambda m: None)
    plan = plan_reconstruction(snapshots, 0.07, step=step)
    assert 0 < plan.error < 0.05
    got = reconstruct(snapshots, [plan])[0]["theta"].double().numpy()
    want = run[direct].models[0].theta.double().numpy()
    bound = profile_bound(plan, run["thetas"], 1e-5)
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) - bound)
    # a check that can fail: the bound, and ten times the error, are below the gap to the tracked EMAs
    gaps = [np.abs(track(run["thetas"][:step], [s], 5).models[0].theta.double().numpy() - want).max()
            for s in (0.05, 0.10)]
    assert bound.max() < min(gaps) and np.abs(got - want).max() < min(gaps) / 10


def test_frozen_tensors_are_copied_not_scaled(run):
    snapshots, _ = scan_snapshots(run["folder"], warn=lambda m: None)
    plan = plan_reconstruction(snapshots, 0.07)
    assert abs(sum(plan.weights) - 1) > 1e-6  # the combination alone would scale the frozen tensor
    got = reconstruct(snapshots, [plan])[0]
    assert torch.equal(got["frozen"], Vector(1).frozen) and int(got["count"]) == 60


def test_refusals_name_what_can_be_reconstructed(run):
    snapshots, _ = scan_snapshots(run["folder"], warn=lambda m: None)
    with pytest.raises(SnapshotError, match=r"step 58 has no usable post-hoc EMA snapshot.*: 5, 10, 15, .*, 55, 60$"):
        plan_reconstruction(snapshots, 0.07, step=58)
    with pytest.raises(SnapshotError, match=r"sigma_rel 0.28 at step 60: .* relative L2 error of 0\.\d+ "
                                            r"\(limit 0.05\); representable at step 60: sigma_rel 0.035 to 0.21$"):
        plan_reconstruction(snapshots, 0.28)
    with pytest.raises(SnapshotError, match="outside"):
        plan_reconstruction(snapshots, 0.31)


def test_corrupt_truncated_and_missing_snapshots_are_named_and_skipped(run, tmp_path):
    folder = tmp_path / "posthoc_ema"
    track(run["thetas"], [0.05, 0.10], 5, str(folder))
    rotten = torch.load(folder / "20.pt", weights_only=True)
    rotten["emas"][1]["theta"][3] += 1e-3  # bit rot under an intact zip: only the digest notices
    torch.save(rotten, folder / "20.pt")
    data = (folder / "35.pt").read_bytes()
    (folder / "35.pt").write_bytes(data[: len(data) // 2])
    os.remove(folder / "45.pt")
    warnings = []
    snapshots, problems = scan_snapshots(str(folder), warn=warnings.append)
    assert [s.step for s in snapshots] == [5, 10, 15, 25, 30, 40, 50, 55, 60]
    assert len(problems) == 3 and len(warnings) == 3
    assert "20.pt is corrupt" in problems[0] and "35.pt cannot be read" in problems[1]
    assert "45.pt is missing (snapshots every 5 steps)" in problems[2]
    with pytest.raises(SnapshotError, match="step 20 has no usable"):
        plan_reconstruction(snapshots, 0.05, step=20)
    plan = plan_reconstruction(snapshots, 0.10)
    assert {s.step for s, _ in plan.columns} == {5, 10, 15, 25, 30, 40, 50, 55, 60}
    torch.testing.assert_close(reconstruct(snapshots, [plan])[0]["theta"], run["tracked"].models[1].theta.detach(),
                               rtol=1.2e-7, atol=0)
    os.rename(folder / "25.pt", folder / "26.pt")
    with pytest.raises(SnapshotError, match="holds step 25, not the step of its name"):
        read_snapshot(str(folder / "26.pt"))


def test_float16_snapshots_hold_the_rounded_emas(run, tmp_path):
    tracker = track(run["thetas"][:10], [0.05, 0.10], 5, str(tmp_path), float16=True)
    state = read_snapshot(str(tmp_path / "10.pt"))
    assert state["emas"][0]["theta"].dtype == torch.float16 and state["sha256"] == weights_digest(state["emas"])
    assert torch.equal(state["emas"][0]["theta"], tracker.models[0].theta.detach().half())
    assert os.path.getsize(tmp_path / "10.pt") < os.path.getsize(os.path.join(run["folder"], "10.pt"))


def test_checkpoint_state_round_trip_and_other_sigma_rels_refused(run):
    state = run["tracked"].state_dict()
    fresh = PowerEMATracker(Vector(64), [0.05, 0.10], 5)
    fresh.load_state_dict(state, "ckpt.pt")
    for a, b in zip(fresh.models, run["tracked"].models):
        assert torch.equal(a.theta, b.theta)
    with pytest.raises(ValueError, match=r"ckpt.pt tracks post-hoc EMAs of sigma_rel \[0.05, 0.1\], the config "
                                         r"asks for \[0.05, 0.12\]"):
        PowerEMATracker(Vector(64), [0.05, 0.12], 5).load_state_dict(state, "ckpt.pt")
