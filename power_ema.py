"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024,
section 3): power-function EMAs tracked in training, their periodic snapshots, and the least-squares
reconstruction of the EMA of any relative width sigma_rel from those snapshots.

The maths (docs/posthoc_ema.md derives it):
- A power-function EMA of exponent gamma after t optimizer steps averages the weights theta_1 .. theta_t with the
  profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], where theta(tau) = theta_k for k - 1 < tau <= k.
  Its per-step update theta_hat_t = beta_t theta_hat_(t-1) + (1 - beta_t) theta_t with
  beta_t = (1 - 1/t)^(gamma + 1) gives theta_k exactly the weight (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1),
  the profile's integral over (k - 1, k]: the discrete EMA is the continuous average, with no approximation.
- The profile's standard deviation relative to t is sigma_rel = ((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))^0.5;
  gamma is the largest real root of the cubic this gives. sigma_rel < SIGMA_REL_MAX (about 0.3003, at
  gamma = (sqrt(5) - 3) / 2); on the branch above that gamma, sigma_rel falls as gamma grows.
- Two profiles have the closed-form L2 inner product
  <p_a, p_b> = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * m^(g_a + g_b + 1) / (t_a^(g_a + 1) t_b^(g_b + 1)),
  m = min(t_a, t_b).
  The reconstruction of a target profile from snapshot profiles p_i is sum_i w_i theta_hat_i with the w that
  minimises ||sum_i w_i p_i - p_target||: the normal equations A w = b, A_ij = <p_i, p_j>, b_i = <p_i, p_target>.

No import of config.py (which imports this module to check the keys).
"""
import copy
import hashlib
import math
import os
import re

import numpy as np
import torch

from distributed import first_error
from safe_io import OutputError, atomic_write

SNAPSHOT_DIR = "posthoc_ema"  # in working_dir: SNAPSHOT_DIR/{step}.pt
SNAPSHOT_FORMAT = "soflow-posthoc-ema-snapshot/1"
GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2  # where sigma_rel(gamma) peaks


# ----------------------------------------------------------------------------------------------------
# Profiles


def sigma_rel_of_gamma(gamma):
    """The relative standard deviation of the power-function profile of exponent `gamma` (> -1)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_AT_MAX)


def gamma_of_sigma_rel(sigma_rel):
    """The exponent gamma whose profile has relative width `sigma_rel`: the largest real root of
    s^2 (g + 2)^2 (g + 3) - (g + 1) = 0, i.e. s^2 g^3 + 7 s^2 g^2 + (16 s^2 - 1) g + 12 s^2 - 1 = 0. ValueError for
    a sigma_rel outside (0, SIGMA_REL_MAX)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}): a power-function EMA averages "
                         f"over [0, t] and cannot be wider than that")
    s2 = sigma_rel ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9))
    if gamma < GAMMA_AT_MAX or not math.isclose(sigma_rel_of_gamma(gamma), sigma_rel, rel_tol=1e-9):
        raise ValueError(f"sigma_rel {sigma_rel}: no exponent found (closest root {gamma})")
    return gamma


def power_beta(t, gamma):
    """The decay of step t (1-based: the optimizer steps taken so far): (1 - 1/t)^(gamma + 1); 0 at t = 1."""
    return (1 - 1 / t) ** (gamma + 1)


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> over [0, inf) of the power profiles (t_a, gamma_a) and (t_b, gamma_b), broadcast over arrays;
    computed in logarithms (t^(2 gamma + 1) overflows float64 for gamma ~ 17 at t ~ 1e6)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    log = (np.log((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)) + (gamma_a + gamma_b + 1) * np.log(m)
           - (gamma_a + 1) * np.log(t_a) - (gamma_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_weights(steps, gammas, step, gamma):
    """(w, profile error) of the least-squares reconstruction of the profile (step, gamma) from the snapshot
    profiles (steps[i], gammas[i]): w solves A w = b; the error is ||sum w_i p_i - p|| / ||p|| (L2, relative)."""
    steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
    a = profile_inner(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = profile_inner(steps, gammas, step, gamma)
    c = float(profile_inner(step, gamma, step, gamma))
    try:
        w = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # two identical profiles (the same snapshot twice): the minimum-norm solution
        w = np.linalg.lstsq(a, b, rcond=None)[0]
    squared = max(float(w @ a @ w - 2 * w @ b + c), 0.0)
    return w, math.sqrt(squared / c)


# ----------------------------------------------------------------------------------------------------
# Tracking in training


class PowerEMATracker:
    """The power-function EMAs of one model, one per sigma_rel, updated after every optimizer step in the model's
    dtype (as the release's EMA: ema * beta + param * (1 - beta), buffers copied), and written as a snapshot
    (SNAPSHOT_DIR/{step}.pt, both EMAs, float32 or float16) every `every` steps and at the last step."""

    def __init__(self, model, sigma_rels, every, float16=False, copy_of=None):
        """`model`: the trained model (its parameters that require a gradient are averaged, the others copied as
        the buffers, so that a frozen tensor stays exact); the EMAs start as copies of `copy_of` (default `model`;
        train.py passes its eager EMA copy, as a compiled network does not deep-copy)."""
        if len(set(sigma_rels)) != len(sigma_rels) or not sigma_rels:
            raise ValueError(f"posthoc_ema_sigma_rels must be distinct values, got {sigma_rels}")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.every, self.float16 = every, float16
        self.trained = [p.requires_grad for p in model.parameters()]
        self.models = [copy.deepcopy(copy_of or model).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model, t):
        """After optimizer step `t` (1-based)."""
        params = [p.detach() for p in model.parameters()]
        for gamma, ema in zip(self.gammas, self.models):
            beta = power_beta(t, gamma)
            pairs = list(zip(ema.parameters(), params, self.trained))
            averaged = [e for e, _, trained in pairs if trained]
            torch._foreach_mul_(averaged, beta)
            torch._foreach_add_(averaged, [p for _, p, trained in pairs if trained], alpha=1 - beta)
            for e, p, trained in pairs:
                if not trained:
                    e.copy_(p)
            for b_ema, b in zip(ema.buffers(), model.buffers()):
                b_ema.copy_(b)

    def state_dict(self):
        return {"sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas),
                "emas": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state, source):
        """The EMAs of a checkpoint's `posthoc_ema` entry; ValueError, naming `source`, when it tracks other
        sigma_rels than the config."""
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"{source} tracks post-hoc EMAs of sigma_rel {state['sigma_rels']}, the config asks for "
                             f"{self.sigma_rels}: the EMAs average the whole run, so they cannot change in its "
                             f"middle. Restore posthoc_ema_sigma_rels, or start a new run with another working_dir")
        for ema, weights in zip(self.models, state["emas"]):
            ema.load_state_dict(weights)

    def is_due(self, step, total_steps):
        return step > 0 and (step % self.every == 0 or step == total_steps)

    def describe(self):
        """A log line: what is tracked, and the disk cost of one snapshot."""
        tensors = self.models[0].state_dict().values()
        size = len(self.models) * sum(t.numel() * (2 if self.float16 and t.is_floating_point() else t.element_size())
                                      for t in tensors)
        dtype = "float16" if self.float16 else "float32"
        return (f"post-hoc EMA: power-function EMAs of sigma_rel {self.sigma_rels} (gamma "
                f"{', '.join(f'{g:.3f}' for g in self.gammas)}), a snapshot every {self.every} steps in "
                f"{SNAPSHOT_DIR}/ of {size / 2 ** 20:.1f} MiB ({dtype}), never deleted")

    def snapshot(self, step, folder, rank, log=print, only_if_missing=False):
        """Writes SNAPSHOT_DIR/{step}.pt (rank 0, atomically; with `only_if_missing`, only when it is not there);
        a collective: OutputError on every rank when the write fails. Returns the file's size in bytes (rank 0 when
        written; None otherwise)."""
        path, error, size = os.path.join(folder, f"{step}.pt"), None, None
        if rank == 0 and not (only_if_missing and os.path.isfile(path)):
            try:
                write_snapshot(path, step, self.every, self.sigma_rels, self.gammas,
                               [m.state_dict() for m in self.models], self.float16)
                size = os.path.getsize(path)
                log(f"wrote post-hoc EMA snapshot {path} ({size / 2 ** 20:.1f} MiB: {len(self.models)} EMAs in "
                    f"{'float16' if self.float16 else 'float32'})")
            except OutputError as e:
                error = str(e)
        error = first_error(error)
        if error:
            raise OutputError(error)
        return size


# ----------------------------------------------------------------------------------------------------
# Snapshot files


class SnapshotError(ValueError):
    """A snapshot that cannot be used, or a reconstruction the snapshots cannot give; the message says which."""


def weights_digest(emas):
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor of the snapshot's EMAs, in order."""
    h = hashlib.sha256()
    for weights in emas:
        for name, tensor in weights.items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def write_snapshot(path, step, every, sigma_rels, gammas, emas, float16=False):
    """Atomically writes the snapshot of `step`: the EMAs' weights (floating tensors in float16 when asked) on the
    CPU, with their sigma_rels, gammas and a digest that reading checks."""
    dtype = torch.float16 if float16 else torch.float32
    stored = [{k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in weights.items()} for weights in emas]
    state = {"format": SNAPSHOT_FORMAT, "finished_steps": int(step), "every": int(every),
             "sigma_rels": list(sigma_rels), "gammas": list(gammas), "emas": stored,
             "sha256": weights_digest(stored)}
    atomic_write(path, lambda tmp: torch.save(state, tmp), "post-hoc EMA snapshot")


def read_snapshot(path):
    """A snapshot, its digest checked; SnapshotError naming the file when it is unreadable, incomplete or its
    weights do not match the digest written with them."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SnapshotError(f"post-hoc EMA snapshot {path} is missing") from None
    except Exception as e:  # truncated zip, bad archive, unsafe pickle ...
        raise SnapshotError(f"post-hoc EMA snapshot {path} cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); it may be truncated") from None
    keys = ("format", "finished_steps", "every", "sigma_rels", "gammas", "emas", "sha256")
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT or any(k not in state for k in keys):
        raise SnapshotError(f"{path} is not a post-hoc EMA snapshot of this code (format {SNAPSHOT_FORMAT})")
    if len(state["emas"]) != len(state["gammas"]) or weights_digest(state["emas"]) != state["sha256"]:
        raise SnapshotError(f"post-hoc EMA snapshot {path} is corrupt: its weights do not match the digest written "
                            f"with them")
    if state["finished_steps"] != snapshot_step(path):
        raise SnapshotError(f"post-hoc EMA snapshot {path} holds step {state['finished_steps']}, not the step of "
                            f"its name (renamed?)")
    return state


def snapshot_step(path):
    match = re.fullmatch(r"(\d+)\.pt", os.path.basename(path))
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------
# Reconstruction

DEFAULT_MAX_ERROR = 0.05  # largest relative L2 error of a reconstructed profile that is accepted
SIGMA_REL_GRID = np.round(np.arange(0.005, 0.3, 0.005), 3)  # where the representable range is looked for


class Snapshot:
    """A usable snapshot: its step, file, and the (sigma_rel, gamma) of each EMA it holds."""

    def __init__(self, step, path, sigma_rels, gammas, every):
        self.step, self.path, self.sigma_rels, self.gammas, self.every = step, path, sigma_rels, gammas, every


def scan_snapshots(folder, warn=print):
    """(usable snapshots sorted by step, [problem messages]). Every file is read and its digest checked; an
    unreadable or corrupt one is named and skipped, and so is a step of the snapshots' cadence with no file."""
    if not os.path.isdir(folder):
        raise SnapshotError(f"{folder} does not exist: no post-hoc EMA snapshots (the run needs "
                            f"posthoc_ema_sigma_rels and posthoc_ema_every in its config)")
    found = sorted((snapshot_step(name), os.path.join(folder, name)) for name in os.listdir(folder)
                   if snapshot_step(name) is not None)
    usable, problems = [], []
    from tqdm import tqdm
    for step, path in tqdm(found, desc="check snapshots", leave=False):
        try:
            state = read_snapshot(path)
        except SnapshotError as e:
            problems.append(f"skipped: {e}")
            continue
        usable.append(Snapshot(step, path, [float(s) for s in state["sigma_rels"]],
                               [float(g) for g in state["gammas"]], int(state["every"])))
    if usable:
        every = max(s.every for s in usable)
        present = {step for step, _ in found}
        problems += [f"skipped: post-hoc EMA snapshot {os.path.join(folder, f'{s}.pt')} is missing (snapshots every "
                     f"{every} steps)" for s in range(every, usable[-1].step + 1, every) if s not in present]
    for message in problems:
        warn(f"warning: {message}")
    return usable, problems


class Plan:
    """The weights of one reconstruction: `columns` [(snapshot, index of its EMA)] and `weights` aligned to them."""

    def __init__(self, sigma_rel, gamma, step, columns, weights, error):
        self.sigma_rel, self.gamma, self.step, self.error = sigma_rel, gamma, step, error
        self.columns, self.weights = columns, [float(w) for w in weights]

    def weight(self, snapshot, index):
        return sum(w for (s, i), w in zip(self.columns, self.weights) if s is snapshot and i == index)

    def summary(self):
        """What the reconstructed checkpoint records of how it was made."""
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "finished_steps": self.step,
                "profile_error": self.error, "weights": self.weights, "weight_sum": float(sum(self.weights)),
                "snapshots": [{"step": s.step, "sigma_rel": s.sigma_rels[i], "gamma": s.gammas[i]}
                              for s, i in self.columns]}


def _columns(snapshots, step):
    return [(s, i) for s in snapshots if s.step <= step for i in range(len(s.gammas))]


def _solve(snapshots, step, gamma):
    columns = _columns(snapshots, step)
    return columns, *solve_weights([s.step for s, _ in columns], [s.gammas[i] for s, i in columns], step, gamma)


def representable(snapshots, step, max_error=DEFAULT_MAX_ERROR):
    """The sigma_rels of SIGMA_REL_GRID whose profile at `step` the snapshots reconstruct within `max_error`."""
    return [float(s) for s in SIGMA_REL_GRID if _solve(snapshots, step, gamma_of_sigma_rel(s))[2] <= max_error]


def _describe(sigma_rels):
    """'sigma_rel 0.04 to 0.06, 0.09 to 0.125': the runs of consecutive points of SIGMA_REL_GRID."""
    if not sigma_rels:
        return "no sigma_rel"
    grid = [float(s) for s in SIGMA_REL_GRID]
    runs = [[sigma_rels[0]]]
    for s in sigma_rels[1:]:
        if grid.index(s) == grid.index(runs[-1][-1]) + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return "sigma_rel " + ", ".join(f"{r[0]:g}" if len(r) == 1 else f"{r[0]:g} to {r[-1]:g}" for r in runs)


def plan_reconstruction(snapshots, sigma_rel, step=None, max_error=DEFAULT_MAX_ERROR):
    """The Plan of the EMA of `sigma_rel` at `step` (default: the newest snapshot's) from the snapshots of steps
    <= step. SnapshotError, naming what can be reconstructed, for a step without a usable snapshot (the interval
    after the previous one is unknown) or a profile the snapshots represent only beyond `max_error`."""
    if not snapshots:
        raise SnapshotError("no usable post-hoc EMA snapshot")
    steps = [s.step for s in snapshots]
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        shown = ", ".join(map(str, steps if len(steps) <= 12 else steps[:5] + ["..."] + steps[-5:]))
        raise SnapshotError(f"step {step} has no usable post-hoc EMA snapshot, and the weights after the previous "
                            f"one are unknown; steps that can be reconstructed: {shown}")
    try:
        gamma = gamma_of_sigma_rel(sigma_rel)
    except ValueError as e:
        raise SnapshotError(str(e)) from None
    columns, weights, error = _solve(snapshots, step, gamma)
    if error > max_error:
        raise SnapshotError(f"sigma_rel {sigma_rel:g} at step {step}: the snapshots reconstruct its averaging "
                            f"profile only to a relative L2 error of {error:.3f} (limit {max_error:g}); "
                            f"representable at step {step}: {_describe(representable(snapshots, step, max_error))}")
    return Plan(sigma_rel, gamma, step, columns, weights, error)


def _accumulate(sums, constant, state_emas, plans, snapshot):
    for index, emas in enumerate(state_emas):
        for plan, acc in zip(plans, sums):
            w = plan.weight(snapshot, index)
            for name, tensor in emas.items():
                if tensor.is_floating_point():
                    acc.setdefault(name, torch.zeros(tensor.shape, dtype=torch.float64)).add_(tensor.double(), alpha=w)
                elif snapshot.step == plan.step:  # an integer tensor that changes: the target step's value
                    acc[name] = tensor.clone()
                if name not in constant:
                    constant[name] = tensor.clone()
                elif constant[name] is not None and not torch.equal(constant[name], tensor):
                    constant[name] = None  # changed during training: combined, not copied


def reconstruct(snapshots, plans, dtype=torch.float32):
    """The state dicts of the plans' EMAs, each snapshot read once (its digest checked again): sum_i w_i theta_i in
    float64, cast to `dtype`. A tensor equal in every snapshot read (a frozen parameter such as the DiT's position
    table, a constant buffer) is copied: the combination would scale it by sum(w), which is 1 only to the fit's
    accuracy. An integer tensor that changes takes its value at the plan's step."""
    from tqdm import tqdm
    last = max(plan.step for plan in plans)
    used = [s for s in snapshots if s.step <= last]
    sums, constant = [{} for _ in plans], {}
    for snapshot in tqdm(used, desc="reconstruct", leave=False):
        state = read_snapshot(snapshot.path)
        _accumulate(sums, constant, state["emas"], plans, snapshot)
    out = []
    for acc in sums:
        weights = {}
        for name, value in constant.items():
            kept = value if value is not None else acc[name]
            weights[name] = kept.to(dtype) if kept.is_floating_point() else kept
        out.append(weights)
    return out


def tracker_of_run(cfg, model, copy_of, state, source):
    """The run's PowerEMATracker (None when cfg.posthoc_ema_sigma_rels is unset), with the EMAs of the resumed
    checkpoint `state` (read from `source`). ValueError when the checkpoint of a step > 0 has none: the power EMAs
    average the whole run, which a fresh start at that step would not."""
    if not cfg.posthoc_ema_sigma_rels:
        return None
    tracker = PowerEMATracker(model, cfg.posthoc_ema_sigma_rels, cfg.posthoc_ema_every, cfg.posthoc_ema_float16,
                              copy_of=copy_of)
    if state is None or int(state["finished_steps"]) == 0:
        return tracker
    if "posthoc_ema" not in state:
        raise ValueError(f"{source} (step {state['finished_steps']}) holds no post-hoc EMAs, and they average the "
                         f"whole run from step 1: remove posthoc_ema_sigma_rels to resume this run, or start a new "
                         f"run with another working_dir")
    tracker.load_state_dict(state["posthoc_ema"], source)
    return tracker
