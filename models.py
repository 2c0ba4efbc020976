"""SoFlow: the model, its training objectives, and the release's calls to them.

Time runs from data (t = 0) to noise (t = 1): x_t = alpha(t) x0 + beta(t) x1. The network F_theta
parameterises the solution operator f(x_t, t, s) = a(t, s) x_t + b(t, s) F_theta(x_t, t, s), which maps
the point x_t of a probability-flow trajectory to its point at time s; f(x, t, t) = x by construction.

This file by job, in the order it is written:
  Objective        the loss settings (the release's config keys and the meanflow_* keys), checked once;
  SoflowLoss       the paper's objective: a small callable class, `SoflowLoss(objective)(model, samples, labels)`;
  MeanFlowLoss     the MeanFlow baseline's objective, the same way (`training_loss` picks one by `method`);
  Release*Calls    the release's names and calls (docs/drop_in.md), in one place, mixed into the two classes below;
  Scheduler        noising (alpha, beta) and solution coefficients (a, b) with their derivatives;
  Soflow           the model: the backbone, solution_operator, predict_velocity and the sampler `sample`.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from config_keys import ConfigError, check_choice, check_declared, key
from dit import DIT_SIZES, build_dit
from distributed import autocast, shared_random_state
from unet import SongUNet

NOISING_TYPES = ("Linear", "Trig")
COEFFICIENT_TYPES = ("Euler", "Trig")
MODEL_TYPES = ("UNet",) + tuple(DIT_SIZES)
L_SCHEDULES = ("Const", "Linear", "Cosine", "Exponent")
METHODS = ("soflow", "meanflow")  # training objectives: the paper's, and the MeanFlow baseline (docs/method.md)
SAMPLERS = ("soflow", "meanflow", "euler")  # see Soflow.sample
CFG_DECAY_K = 0.025
MIN_TIME_GAP = 1e-4


def is_conditional(model_type, num_classes):
    """Whether a model is class-conditional: a DiT with num_classes > 0. The U-Net never is (the release builds its
    CIFAR-10 U-Net with num_classes=10 and passes labels=None)."""
    return model_type != "UNet" and bool(num_classes)


def check_guidance(setting, conditional, labels_given=True):
    """Guidance (SoFlow's cfg_scale, MeanFlow's cfg_scale / cfg_kappa) contrasts the class-conditional velocity with
    the null class's, so it needs a class-conditional model and, in a loss call, labels. `setting` names the guiding
    values in the error (the config check and the loss calls share this rule)."""
    if not (conditional and labels_given):
        raise ValueError(f"{setting} needs a class-conditional model and labels (a DiT with num_classes > 0)")


def _bcast(t, x):
    """Per-sample times [B] -> [B, 1, 1, ...] broadcastable against x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _as_time(t, like=None):
    """Times as tensors (the release's loops may pass Python numbers): a number becomes a 0-dim tensor of
    `like`'s dtype and device, or float64 on the CPU (a 0-dim tensor does not promote the other operand)."""
    if isinstance(t, torch.Tensor):
        return t
    return torch.as_tensor(t, dtype=torch.float64) if like is None else torch.as_tensor(t, dtype=like.dtype,
                                                                                          device=like.device)


def _rows(x, part):
    """Rows `part` of a tensor, or of each tensor of a dict; None stays None."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: v[part] for k, v in x.items()}
    return x[part]


def cfg_decay_scale(t, decay_time=1.0, k=CFG_DECAY_K):
    """w_cfg(t): 1 up to decay_time, then 1 - exp(-k d / (1 - d)) with d = clamp((1 - t) / (1 - decay_time),
    0, 1 - 1e-6), which falls to 0 at t = 1. decay_time >= 1: 1 everywhere."""
    t = _as_time(t)
    if decay_time >= 1:
        return torch.ones_like(t)
    d = ((1 - t) / (1 - decay_time)).clamp(0, 1 - 1e-6)
    decayed = 1 - torch.exp(-k * d / (1 - d))
    return torch.where(t <= decay_time, torch.ones_like(t), decayed)


# ==================================================================================================================
# The loss settings: the config keys of the loss (config.Config extends this class)


@dataclass
class Objective:
    """The training-objective settings of the paper (config keys of the release, its ImageNet values as defaults).

    The first int(velocity_loss_ratio * B) rows of a batch feed the Flow Matching loss, the rest the
    consistency loss; times are logit-normal with (time_mean[i], time_std[i]), i = 0 for Flow Matching, 1 and
    2 for the consistency pair; p and eps shape the adaptive weights; cfg_scale, mix_ratio and cfg_decay_time
    the guided target; l_schedule, l_init_ratio, l_end_ratio and total_steps the middle time l. Each key is
    declared with its meaning and accepted values (config_keys.key).
    """
    velocity_loss_ratio: float = key(
        0.75, "share of each batch (its first rows) in the Flow Matching loss; the rest feed the consistency loss",
        within="[0, 1]", section="loss (models.Objective)")
    p: float = key(1.0, "exponent of the adaptive loss weight 1 / (mse + eps)^p", within="[0, inf)")
    eps: float = key(0.01, "offset of the adaptive loss weight 1 / (mse + eps)^p", within="(0, inf)")
    time_mean: List[float] = key([-0.2, -1.0, 0.2], "logit-normal time means: Flow Matching t, consistency s, t",
                                 length=3)
    time_std: List[float] = key([1.0, 0.8, 0.8], "logit-normal std, as time_mean", length=3, within="(0, inf)")
    cfg_scale: float = key(1.0, "classifier-free guidance scale of the training target (1: no guidance)",
                           within="[1, inf)")
    mix_ratio: float = key(1.0, "weight of the guided velocity in the target; the rest is the model's conditional "
                                "velocity (no gradient)", within="[0, 1]")
    cfg_decay_time: float = key(1.0, "guidance decays for t above this time (1: no decay)", within="(0, 1]")
    l_schedule: str = key("Exponent", "how the middle time l = t + (s - t) r moves from l_init_ratio to l_end_ratio "
                                      "over total_steps", choices=L_SCHEDULES)
    l_init_ratio: float = key(0.1, "r at step 0", within="[0, 1]")
    l_end_ratio: float = key(0.002, "r at total_steps", within="[0, 1]")
    total_steps: int = key(400_000, "training steps (also the length of the l schedule)", within="[1, inf)")
    # Keys of this code, read only with `method: meanflow`, which ignores the SoFlow keys above
    # except the class-drop rate `cfg_drop_rate`, shared because it sizes the network's label table. Defaults:
    # MeanFlow's ImageNet settings (Geng et al. 2025); its class-drop rate, 0.1, is also the release's ImageNet
    # `cfg_drop_rate`; eps is the least certain of them.
    method: str = key("soflow", "soflow (the paper's objective) or meanflow (the baseline)", choices=METHODS,
                      section="MeanFlow")
    meanflow_ratio: float = key(0.25, "share of rows with r != t (MeanFlow's ImageNet runs: 25%)", within="[0, 1]")
    meanflow_time_mean: float = key(-0.4, "(t, r) from two logit-normal draws: MeanFlow's ImageNet "
                                          "lognorm(-0.4, 1.0)")
    meanflow_time_std: float = key(1.0, "std of those two logit-normal draws (MeanFlow's ImageNet: 1.0)",
                                   within="(0, inf)")
    meanflow_p: float = key(1.0, "adaptive weight 1 / (mse + eps)^p: MeanFlow's ImageNet p = 1.0", within="[0, inf)")
    meanflow_eps: float = key(1e-3, "MeanFlow's constant c = 1e-3 of that weight", within="(0, inf)")
    # Training-time guidance v~ = w v + kappa u(z, t, t | y) + (1 - w - kappa) u(z, t, t | null). MeanFlow's
    # ImageNet runs are guided (a per-size effective scale w / (1 - kappa) of about 2 to 2.5); their (w, kappa)
    # pairs are not verified here, so the defaults are the unguided w = 1, kappa = 0: set both for a guided run.
    meanflow_cfg_scale: float = key(1.0, "w of the target w v + kappa u(.|y) + (1 - w - kappa) u(.|null); 1: "
                                         "unguided")
    meanflow_cfg_kappa: float = key(0.0, "kappa of that guided target (0: unguided)")

    def __post_init__(self):
        """The one place these settings are checked (the config loader relies on it): each key against its
        declaration (for a config.Config, every key of the config), then the combinations."""
        check_declared(self)
        if self.l_schedule == "Exponent" and (self.l_init_ratio <= 0 or self.l_end_ratio <= 0):
            raise ConfigError("l_schedule 'Exponent' needs l_init_ratio > 0 and l_end_ratio > 0")

    @property
    def meanflow_guided(self):
        return self.meanflow_cfg_scale != 1 or self.meanflow_cfg_kappa != 0

    @property
    def guided(self):
        return self.cfg_scale > 1

    def l_ratio(self, finished_steps):
        """r(k, K): where the middle time l sits between t (r = 0) and s (r = 1) after k finished steps."""
        progress = min(max(finished_steps / self.total_steps, 0.0), 1.0)
        init, end = self.l_init_ratio, self.l_end_ratio
        if self.l_schedule == "Const":
            return end
        if self.l_schedule == "Linear":
            return init + (end - init) * progress
        if self.l_schedule == "Cosine":
            return end + (init - end) * (1 + math.cos(math.pi * progress)) / 2
        return init * (end / init) ** progress


def logit_normal(n, mean, std, device, generator=None):
    return torch.sigmoid(torch.randn(n, device=device, generator=generator) * std + mean)


def time_between(t, s, r):
    """The time a share r of the way from t (r = 0) to s (r = 1)."""
    return t + (s - t) * r


def middle_time(t, s, r):
    """l = t + (s - t) r, kept at least MIN_TIME_GAP below t."""
    return torch.minimum(time_between(t, s, r), t - MIN_TIME_GAP)


def draw_cfg_mask(batch_size, device, cfg_drop_rate, conditional):
    """The CFG mask (rand < cfg_drop_rate): the rows trained with the null label; None when none can be."""
    if conditional and cfg_drop_rate > 0:
        return torch.rand(batch_size, device=device) < cfg_drop_rate
    return None


@dataclass
class TrainingDraws:
    """The per-step random choices of a loss: which rows are Flow Matching, the times, the CFG mask."""
    n_fm: int
    t: torch.Tensor
    s: torch.Tensor
    l: torch.Tensor
    cfg_mask: Optional[torch.Tensor]

    def rows(self, start, stop):
        """The draws of rows [start, stop) (a micro-batch): the Flow Matching rows stay first."""
        return TrainingDraws(min(max(self.n_fm - start, 0), stop - start), self.t[start:stop], self.s[start:stop],
                             self.l[start:stop], None if self.cfg_mask is None else self.cfg_mask[start:stop])


def _no_rows(samples):
    """(loss, mse, weight) of a part without rows."""
    zero = samples.new_zeros(())
    return zero, zero, zero


# ==================================================================================================================
# The training objectives. Each is a small class holding its settings (an Objective) and called on a model:
#     total, stats = SoflowLoss(objective)(model, samples, labels, augment_labels)
# stats: the detached means Vel_MSE, Vel_Weight (Flow Matching rows) and Con_MSE, Con_Weight (the others).


class SoflowLoss:
    """The paper's objective. A batch's first n_fm = int(velocity_loss_ratio B) rows feed the Flow Matching loss
    L_FM, the rest the consistency loss L_cons; total = L_FM n_fm / B + L_cons (B - n_fm) / B.

    `loss_parts` is the algorithm, top to bottom. It makes three network calls where the release's two loss
    functions make up to six (an optimisation of this code; the same values, tests/test_models.py): call 1 (no
    grad, only when guided) batches every guidance velocity, call 2 (with grad) is one batch of F(x_t, t, t) for
    the Flow Matching rows and F(x_t, t, s) for the consistency rows, call 3 (no grad) F(x_l, l, s) for the
    consistency rows, under the random state call 2 started from (so a network with dropout draws the same masks).
    """

    def __init__(self, objective=None):
        self.objective = objective if objective is not None else Objective()

    def draw(self, batch_size, finished_steps, device, cfg_drop_rate=0.0, conditional=False):
        """Rows [:n_fm]: t ~ logit-normal(0) (s = l = t, unused). Rows [n_fm:]: tau1 ~ logit-normal(1),
        tau2 ~ logit-normal(2), t = max(tau2, 1e-4), s = min(tau1, t - 1e-4), l between them by r(k, K).
        The CFG mask (rand < cfg_drop_rate, drawn only when guided: cfg_scale > 1) marks the null-label rows."""
        o = self.objective
        n_fm = int(o.velocity_loss_ratio * batch_size)
        t_fm = logit_normal(n_fm, o.time_mean[0], o.time_std[0], device)
        tau1 = logit_normal(batch_size - n_fm, o.time_mean[1], o.time_std[1], device)
        tau2 = logit_normal(batch_size - n_fm, o.time_mean[2], o.time_std[2], device)
        t_c = tau2.clamp(min=MIN_TIME_GAP)
        s_c = torch.minimum(tau1, t_c - MIN_TIME_GAP)
        l_c = middle_time(t_c, s_c, o.l_ratio(finished_steps))
        cfg_mask = draw_cfg_mask(batch_size, device, cfg_drop_rate, conditional) if o.guided else None
        return TrainingDraws(n_fm, torch.cat([t_fm, t_c]), torch.cat([t_fm, s_c]), torch.cat([t_fm, l_c]), cfg_mask)

    def __call__(self, model, samples, labels=None, augment_labels=None, *, draws=None, noise=None, finished_steps=0,
                 batch_rows=None, guidance_dtype=None):
        """(total, stats) of one batch. `draws` and `noise` are drawn here unless given; gradient accumulation
        passes a micro-batch's rows of them and `batch_rows` = B of the whole batch, so that the micro-batches'
        totals add up to the whole batch's."""
        B = samples.shape[0]
        if draws is None:
            draws = self.draw(B, finished_steps, samples.device, model.cfg_drop_rate, labels is not None)
        parts = self.loss_parts(model, samples, t=draws.t, s=draws.s, l=draws.l, n_fm=draws.n_fm, labels=labels,
                                cfg_mask=draws.cfg_mask, augment_labels=augment_labels, noise=noise,
                                guidance_dtype=guidance_dtype)
        fm_loss, fm_mse, fm_w = parts.get("fm", _no_rows(samples))
        con_loss, con_mse, con_w = parts.get("cons", _no_rows(samples))
        total_rows = batch_rows or B
        total = fm_loss * (draws.n_fm / total_rows) + con_loss * ((B - draws.n_fm) / total_rows)
        stats = {"Vel_MSE": fm_mse.detach(), "Vel_Weight": fm_w.detach(),
                 "Con_MSE": con_mse.detach(), "Con_Weight": con_w.detach()}
        return total, stats

    def loss_parts(self, model, samples, *, t, s, l, n_fm, labels=None, cfg_mask=None, augment_labels=None,
                   noise=None, guidance_dtype=None):
        """{'fm': (loss, mean mse, mean weight), 'cons': (...)} of the parts that have rows, for [B] times (s and l
        of the Flow Matching rows unused). `noise`: one randn_like(samples) unless given. The CFG mask acts only
        when guided (cfg_scale > 1), as in the release."""
        o = self.objective
        model.check_inputs(samples, labels, augment_labels, noise)
        cfg_mask = model.as_mask(cfg_mask, samples) if o.guided else None
        if o.guided:
            check_guidance(f"cfg_scale={o.cfg_scale} > 1", model.conditional, labels is not None)
        B = samples.shape[0]
        if B == 0:
            return {}
        fm, cons = slice(0, n_fm), slice(n_fm, B)
        x_t, v_t = model.scheduler.add_noise(samples, torch.randn_like(samples) if noise is None else noise, t)
        guidance = None
        if o.guided:  # call 1
            with autocast(samples.device, guidance_dtype):
                guidance = self.guidance(model, x_t, v_t, t, labels, n_fm, augment_labels)
        y = model.masked_labels(labels, cfg_mask)  # CFG-masked rows learn the null class
        s_net = torch.cat([t[fm], s[cons]])
        out = {}
        with shared_random_state(samples.device) as rewind:
            F = model.network_output(x_t, t, s_net, y, augment_labels)  # call 2, with grad
            if n_fm > 0:
                out["fm"] = self.flow_matching(model, x_t[fm], v_t[fm], t[fm], F[fm], _rows(guidance, fm),
                                               _rows(cfg_mask, fm))
            if n_fm < B:
                g, m = _rows(guidance, cons), _rows(cfg_mask, cons)
                with torch.no_grad():  # x_l: one Euler step of the target velocity from t to l
                    v_star = self.target(v_t[cons], g, g["v_cond"] if g else v_t[cons], m)
                    x_l = x_t[cons] + v_star * _bcast(l[cons] - t[cons], x_t)
                    rewind()  # call 3 under call 2's random state
                    if model.stochastic and n_fm > 0:  # dropout masks depend on the batch layout: call 2's
                        F_l = model.network_output(torch.cat([x_t[fm], x_l]), torch.cat([t[fm], l[cons]]), s_net, y,
                                                   augment_labels)[cons]
                    else:
                        F_l = model.network_output(x_l, l[cons], s[cons], _rows(y, cons), _rows(augment_labels, cons))
                out["cons"] = self.consistency(model, x_t[cons], t[cons], s[cons], l[cons], F[cons], x_l, F_l)
        return out

    @torch.no_grad()
    def guidance(self, model, x_t, v_t, t, labels, n_fm, augment_labels=None):
        """Call 1 (no grad): the guided velocity
            v_guided = v_t + w_cfg(t) (cfg_scale - 1) (v_t - v_theta(x_t, t, null))
        for every row, and the conditional prediction v_theta(x_t, t, y) for the consistency rows [n_fm:]
        (zeros for the Flow Matching rows, whose mix term is their own prediction: see `target`)."""
        B = x_t.shape[0]
        cons = slice(n_fm, B)
        aug = augment_labels
        v = model.predict_velocity(torch.cat([x_t, x_t[cons]]), torch.cat([t, t[cons]]),
                                   torch.cat([model.null_labels(B, labels.device), labels[cons]]),
                                   None if aug is None else torch.cat([aug, aug[cons]]))
        v = v.to(v_t.dtype)
        v_uncond, v_cond = v[:B], torch.cat([torch.zeros_like(v_t[:n_fm]), v[B:]])
        w_cfg = _bcast(cfg_decay_scale(t, self.objective.cfg_decay_time), x_t)
        return {"v_guided": v_t + w_cfg * (self.objective.cfg_scale - 1) * (v_t - v_uncond), "v_cond": v_cond}

    def target(self, v_t, guidance, v_mix, cfg_mask):
        """The target velocity: mix_ratio v_guided + (1 - mix_ratio) v_mix (detached) on unmasked rows; v_t on
        CFG-masked rows and when unguided (guidance None)."""
        if guidance is None:
            return v_t
        mix_ratio = self.objective.mix_ratio
        mixed = mix_ratio * guidance["v_guided"] + (1 - mix_ratio) * v_mix.detach()
        return mixed if cfg_mask is None else torch.where(_bcast(cfg_mask, v_t), v_t, mixed)

    def flow_matching(self, model, x_t, v_t, t, F, guidance, cfg_mask):
        """L_FM = mean over rows of w * mean(delta^2), delta = v_theta(x_t, t, y_masked) - target and
        w = 1 / (|d_s b(t, t)| (mean(delta^2) + eps)^p), detached. The mix term is the row's own (detached)
        prediction. Returns (loss, mean mse, mean weight)."""
        o = self.objective
        pred = model.velocity_from_output(x_t, t, F)
        target = self.target(v_t, guidance, pred, cfg_mask)
        mse = (pred - target).square().flatten(1).mean(1)
        weight = 1 / (model.scheduler.db_ds(t, t).abs() * (mse.detach() + o.eps) ** o.p)
        return (weight * mse).mean(), mse.detach().mean(), weight.mean()

    def consistency(self, model, x_t, t, s, l, F_t, x_l, F_l):
        """The JVP-free consistency loss of rows with s < l < t, from F_t = F_theta(x_t, t, s) (with grad) and
        F_l = F_theta(x_l, l, s) (without):
            Delta = (f(x_t, t, s) - f(x_l, l, s)) / (t - l),  w = 1 / (mean(Delta^2) + eps)^p,
            loss = mean over rows of sign(b(t, s)) mean(F_t * Delta * w)  (Delta and w detached).
        Its gradient is (t - l) / |b(t, s)| times that of 0.5 w |Delta|^2, with no division through the network.
        Returns (loss, mean |Delta|^2, mean weight)."""
        o = self.objective
        with torch.no_grad():
            f_l = model.solution_from_output(x_l, l, s, F_l)
            Delta = (model.solution_from_output(x_t, t, s, F_t.detach()) - f_l) / _bcast(t - l, x_t)
            mse = Delta.square().flatten(1).mean(1)
            weight = 1 / (mse + o.eps) ** o.p
        sign_b = _bcast(torch.sign(model.scheduler.b(t, s)), x_t)
        surrogate = (sign_b * F_t * (Delta * _bcast(weight, Delta))).flatten(1).mean(1)
        return surrogate.mean(), mse.mean(), weight.mean()


class MeanFlowLoss:
    """The MeanFlow baseline (Geng et al. 2025; `method: meanflow`, docs/method.md) with the meanflow_* settings of
    an Objective. The average velocity is the same network with s = r, u(z_t, r, t) = F(z_t, t, r), so that
    z_r = f(z_t, t, r) = z_t - (t - r) u (Linear noising, Euler coefficients only). total = sum over the rows of
    weight * mse / B; stats: Vel_* over the rows with r = t (the first draws.n_fm), Con_* over r < t."""

    def __init__(self, objective=None):
        self.objective = objective if objective is not None else Objective(method="meanflow")

    def draw(self, batch_size, finished_steps, device, cfg_drop_rate=0.0, conditional=False):
        """Two logit-normal draws, t the larger and r the smaller; the last int(meanflow_ratio * B) rows keep
        r <= t, the first rows get r = t (their loss is flow matching's). As TrainingDraws: n_fm = the rows with
        r = t, s = r (the network's second time), l = t (unused). `finished_steps`: unused (no schedule)."""
        o = self.objective
        a = logit_normal(batch_size, o.meanflow_time_mean, o.meanflow_time_std, device)
        b = logit_normal(batch_size, o.meanflow_time_mean, o.meanflow_time_std, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        n_eq = batch_size - int(o.meanflow_ratio * batch_size)
        r = torch.cat([t[:n_eq], r[n_eq:]])
        return TrainingDraws(n_eq, t, r, t.clone(), draw_cfg_mask(batch_size, device, cfg_drop_rate, conditional))

    def __call__(self, model, samples, labels=None, augment_labels=None, *, draws=None, noise=None, finished_steps=0,
                 batch_rows=None, guidance_dtype=None):
        """(total, stats) of one batch, as SoflowLoss's (`guidance_dtype` unused: the target's calls are the
        JVP's)."""
        if draws is None:
            draws = self.draw(samples.shape[0], finished_steps, samples.device, model.cfg_drop_rate,
                              labels is not None)
        t, r = model.as_times(draws.t, samples), model.as_times(draws.s, samples)
        mse, weight, _, _ = self.rows(model, samples, t, r, labels=labels, cfg_mask=draws.cfg_mask, noise=noise,
                                      augment_labels=augment_labels)
        total = (weight * mse).sum() / (batch_rows or samples.shape[0])
        zero, n = samples.new_zeros(()), draws.n_fm

        def mean(x):
            return x.detach().mean() if x.numel() else zero
        stats = {"Vel_MSE": mean(mse[:n]), "Vel_Weight": mean(weight[:n]),
                 "Con_MSE": mean(mse[n:]), "Con_Weight": mean(weight[n:])}
        return total, stats

    def rows(self, model, samples, t, r, *, labels=None, cfg_mask=None, noise=None, augment_labels=None):
        """Per-row MeanFlow error and weight for [B] times r <= t: z_t = (1 - t) x + t e, v = e - x,
        u_tgt = v~ - (t - r) du/dt (stop-gradient), mse = mean over dimensions of (u - u_tgt)^2 (with grad),
        weight = 1 / (mse + eps)^p (detached). CFG-masked rows see the null label. Returns (mse, weight, u, u_tgt)."""
        sch = model.scheduler
        if sch.noising_type != "Linear" or sch.coefficient_type != "Euler":
            raise ValueError(f"MeanFlow needs noising_type Linear and coefficient_type Euler (z_r = z_t - (t - r) u), "
                             f"got {sch.noising_type} / {sch.coefficient_type}")
        model.check_inputs(samples, labels, augment_labels, noise)
        cfg_mask = model.as_mask(cfg_mask, samples)
        z, v = sch.add_noise(samples, torch.randn_like(samples) if noise is None else noise, t)
        v_tilde = self.target_velocity(model, z, v, t, labels, cfg_mask, augment_labels)
        y = model.masked_labels(labels, cfg_mask)
        u, dudt = average_velocity_jvp(model.network, z, t, r, v_tilde, y if model.conditional else None,
                                       augment_labels)
        u_tgt = (v_tilde - _bcast(t - r, z) * dudt).detach()
        mse = (u - u_tgt).square().flatten(1).mean(1)
        o = self.objective
        return mse, 1 / (mse.detach() + o.meanflow_eps) ** o.meanflow_p, u, u_tgt

    @torch.no_grad()
    def target_velocity(self, model, z, v, t, labels, cfg_mask, augment_labels=None):
        """MeanFlow's target velocity v~ (no grad): w v + kappa u(z, t, t | y) + (1 - w - kappa) u(z, t, t | null)
        (w = meanflow_cfg_scale, kappa = meanflow_cfg_kappa; both u in one batched call) on rows that keep their
        label, v on CFG-masked rows, and v everywhere when unguided (w 1, kappa 0)."""
        w, kappa = self.objective.meanflow_cfg_scale, self.objective.meanflow_cfg_kappa
        if w == 1 and kappa == 0:
            return v
        check_guidance(f"MeanFlow guidance (cfg_scale {w}, cfg_kappa {kappa})", model.conditional, labels is not None)
        B = z.shape[0]
        aug = None if augment_labels is None else torch.cat([augment_labels, augment_labels])
        u = model.network_output(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]),
                                 torch.cat([labels, model.null_labels(B, z.device)]), aug).to(v.dtype)
        guided = w * v + kappa * u[:B] + (1 - w - kappa) * u[B:]
        return guided if cfg_mask is None else torch.where(_bcast(cfg_mask, v), v, guided)


def average_velocity_jvp(network, z, t, r, v_tilde, labels=None, augment_labels=None):
    """MeanFlow's (u, du/dt) for u(z, r, t) = network(z, t, s=r): u and its derivative along
    (dz, dr, dt) = (v~, 0, 1), i.e. v~ . d_z u + d_t u, from one torch.func.jvp of the eager network (a
    compiled one's original module) under the math attention kernel, the one with forward-mode derivatives.
    u keeps its graph to the weights."""
    network = getattr(network, "_orig_mod", network)

    def u_fn(z_, t_, r_):
        return network(z_, t_, r_, labels, augment_labels)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(u_fn, (z, t, r), (v_tilde, torch.ones_like(t), torch.zeros_like(r)))


def training_loss(objective):
    """The loss of `objective.method`: SoflowLoss or MeanFlowLoss, holding `objective`."""
    return MeanFlowLoss(objective) if objective.method == "meanflow" else SoflowLoss(objective)


def draw_training_times(objective, batch_size, finished_steps, device, cfg_drop_rate=0.0, conditional=False):
    """The random choices of one step of `objective`'s loss (SoflowLoss.draw or MeanFlowLoss.draw)."""
    return training_loss(objective).draw(batch_size, finished_steps, device, cfg_drop_rate, conditional)


# ==================================================================================================================
# The release's names and calls (docs/drop_in.md), in one place: each a thin wrapper over the code above, so that the
# release's own train.py and inference.py run on these classes unchanged and compute the same numbers.


class ReleaseCalls:
    """What both of the release's classes answer to."""
    get_cfg_decay_scale = staticmethod(cfg_decay_scale)


class ReleaseSchedulerCalls(ReleaseCalls):
    """The release scheduler's names for Scheduler's quantities, and its noising call."""

    def alpha_grad(self, t):
        return self.d_alpha(t)

    def beta_grad(self, t):
        return self.d_beta(t)

    def a_grad(self, t, s):
        """(d a / d t, d a / d s)."""
        return self.da_dt(t, s), self.da_ds(t, s)

    def b_grad(self, t, s):
        """(d b / d t, d b / d s)."""
        return self.db_dt(t, s), self.db_ds(t, s)

    def get_x_t_v_t(self, x_0, t):
        """The release's noising call: draws x1 = randn_like(x_0) and returns (x_t, v_t)."""
        return self.add_noise(x_0, torch.randn_like(x_0), t)


class ReleaseModelCalls(ReleaseCalls):
    """The release's calls on its model (through DDP: `forward`), its schedule helper, and this code's loss calls
    in the same style: `fused_loss` (SoflowLoss.loss_parts on this model) and `get_meanflow_loss`."""

    def forward(self, samples, labels=None, augment_labels=None, *, objective: Optional[Objective] = None,
                get_velocity_loss=None, noise=None, **kwargs):
        """The one entry point DDP wraps. This code's training call: `objective=` (an Objective) with the
        keywords of SoflowLoss.__call__ (draws, noise, finished_steps, batch_rows, guidance_dtype) returns
        (total loss, stats) of `training_loss(objective)`. The release's: `get_velocity_loss=True` with
        `get_velocity_loss`'s keywords returns that loss, `get_velocity_loss=False` with `get_consistency_loss`'s
        keywords (t, l, s, ...) that one."""
        if get_velocity_loss is not None:
            loss = self.get_velocity_loss if get_velocity_loss else self.get_consistency_loss
            return loss(samples, labels=labels, augment_labels=augment_labels, noise=noise, **kwargs)
        unexpected = sorted(set(kwargs) - {"draws", "finished_steps", "batch_rows", "guidance_dtype"})
        if unexpected:
            raise TypeError(f"Soflow.forward got unexpected keyword(s) {unexpected}; the release's loss "
                            f"keywords come with get_velocity_loss=True or False")
        if objective is None:
            raise TypeError("Soflow.forward needs objective= (this code's training call) or get_velocity_loss=True "
                            "or False (the release's loss calls)")
        return training_loss(objective)(self, samples, labels, augment_labels, noise=noise, **kwargs)

    @staticmethod
    def get_middle_time(t, s, now_steps, total_steps, init_ratio=0.1, end_ratio=0.002, method="Exponent"):
        """The release's call: l = t + (s - t) r(now_steps, total_steps) under the `method` schedule (Const,
        Linear, Cosine, Exponent; see Objective.l_ratio), not clamped: the caller keeps l <= t - 1e-4
        (`middle_time` does both)."""
        objective = Objective(l_schedule=method, l_init_ratio=init_ratio, l_end_ratio=end_ratio,
                              total_steps=total_steps)
        return time_between(t, s, objective.l_ratio(now_steps))

    @staticmethod
    def _release_loss(cfg_scale, cfg_decay_time, p, eps, mix_ratio):
        """The SoflowLoss of the release's loss keywords (the others at their defaults: unused by its calls)."""
        return SoflowLoss(Objective(p=p, eps=eps, cfg_scale=cfg_scale, mix_ratio=mix_ratio,
                                    cfg_decay_time=cfg_decay_time))

    def get_velocity_loss(self, samples, t, labels=None, cfg_mask=None, cfg_scale=1.0, cfg_decay_time=1.0,
                          p=1.0, eps=0.01, mix_ratio=1.0, augment_labels=None, noise=None):
        """The release's Flow Matching loss call (noise: one randn_like(samples) unless given). The CFG mask
        acts only with cfg_scale > 1. Returns (loss, mean mse, mean weight); zeros for an empty batch."""
        t = self.as_times(t, samples)
        loss = self._release_loss(cfg_scale, cfg_decay_time, p, eps, mix_ratio)
        parts = loss.loss_parts(self, samples, t=t, s=t, l=t, n_fm=samples.shape[0], labels=labels,
                                cfg_mask=cfg_mask, augment_labels=augment_labels, noise=noise)
        return parts.get("fm", _no_rows(samples))

    def get_consistency_loss(self, samples, t, l, s, labels=None, cfg_mask=None, cfg_scale=1.0,
                             cfg_decay_time=1.0, p=1.0, eps=0.01, mix_ratio=1.0, augment_labels=None, noise=None):
        """The release's consistency loss call (s < l < t; noise as in `get_velocity_loss`). Returns (surrogate
        loss, mean |Delta|^2, mean weight); zeros for an empty batch."""
        t, l, s = self.as_times(t, samples), self.as_times(l, samples), self.as_times(s, samples)
        loss = self._release_loss(cfg_scale, cfg_decay_time, p, eps, mix_ratio)
        parts = loss.loss_parts(self, samples, t=t, s=s, l=l, n_fm=0, labels=labels, cfg_mask=cfg_mask,
                                augment_labels=augment_labels, noise=noise)
        return parts.get("cons", _no_rows(samples))

    def fused_loss(self, samples, *, objective, **times_and_inputs):
        """SoflowLoss(objective).loss_parts on this model: {'fm': ..., 'cons': ...} for given times t, s, l, n_fm
        (tests/release_style_loop.py compares the release's two calls with it)."""
        return SoflowLoss(objective).loss_parts(self, samples, **times_and_inputs)

    def get_meanflow_loss(self, samples, t, r, labels=None, cfg_mask=None, cfg_scale=1.0, cfg_kappa=0.0, p=1.0,
                          eps=1e-3, noise=None, augment_labels=None):
        """The MeanFlow loss in the style of the release's loss calls (times [B] or [B, 1, 1, 1], r <= t):
        loss = batch mean of weight * mse. Returns (loss, mean mse, mean weight)."""
        t, r = self.as_times(t, samples), self.as_times(r, samples)
        loss = MeanFlowLoss(Objective(method="meanflow", meanflow_cfg_scale=cfg_scale, meanflow_cfg_kappa=cfg_kappa,
                                      meanflow_p=p, meanflow_eps=eps))
        mse, weight, _, _ = loss.rows(self, samples, t, r, labels=labels, cfg_mask=cfg_mask, noise=noise,
                                      augment_labels=augment_labels)
        return (weight * mse).mean(), mse.detach().mean(), weight.mean()


# ==================================================================================================================
# The model


class Scheduler(ReleaseSchedulerCalls, nn.Module):
    """Noising process (alpha, beta) and solution coefficients (a, b) with their derivatives.

    A module, as the release's (reachable as `model.scheduler`, deep-copied with an EMA copy), holding no
    parameters or buffers: the state-dict keys are the network's alone. Times may be tensors of any shape or
    Python numbers."""

    def __init__(self, noising_type="Linear", coefficient_type="Euler"):
        super().__init__()
        check_choice("noising_type", noising_type, NOISING_TYPES)
        check_choice("coefficient_type", coefficient_type, COEFFICIENT_TYPES)
        self.noising_type = noising_type
        self.coefficient_type = coefficient_type

    def extra_repr(self):
        return f"noising_type={self.noising_type!r}, coefficient_type={self.coefficient_type!r}"

    # noising: x_t = alpha(t) x0 + beta(t) x1
    def alpha(self, t):
        t = _as_time(t)
        return 1 - t if self.noising_type == "Linear" else torch.cos(math.pi / 2 * t)

    def beta(self, t):
        t = _as_time(t)
        return t if self.noising_type == "Linear" else torch.sin(math.pi / 2 * t)

    def d_alpha(self, t):
        t = _as_time(t)
        return -torch.ones_like(t) if self.noising_type == "Linear" else -math.pi / 2 * torch.sin(math.pi / 2 * t)

    def d_beta(self, t):
        t = _as_time(t)
        return torch.ones_like(t) if self.noising_type == "Linear" else math.pi / 2 * torch.cos(math.pi / 2 * t)

    def add_noise(self, x0, x1, t):
        """(x_t, conditional velocity v_t) for per-sample times t."""
        tb = _bcast(_as_time(t, like=x0), x0)
        x_t = self.alpha(tb) * x0 + self.beta(tb) * x1
        v_t = self.d_alpha(tb) * x0 + self.d_beta(tb) * x1
        return x_t, v_t

    # solution coefficients: f(x_t, t, s) = a(t, s) x_t + b(t, s) F(x_t, t, s); both depend on s - t only
    def a(self, t, s):
        t, s = _as_time(t), _as_time(s)
        return torch.ones_like(t) if self.coefficient_type == "Euler" else torch.cos(math.pi / 2 * (s - t))

    def b(self, t, s):
        t, s = _as_time(t), _as_time(s)
        return s - t if self.coefficient_type == "Euler" else torch.sin(math.pi / 2 * (s - t))

    def da_ds(self, t, s):
        t, s = _as_time(t), _as_time(s)
        return torch.zeros_like(t) if self.coefficient_type == "Euler" else -math.pi / 2 * torch.sin(math.pi / 2 * (s - t))

    def db_ds(self, t, s):
        t, s = _as_time(t), _as_time(s)
        return torch.ones_like(t) if self.coefficient_type == "Euler" else math.pi / 2 * torch.cos(math.pi / 2 * (s - t))

    def da_dt(self, t, s):
        return -self.da_ds(t, s)

    def db_dt(self, t, s):
        return -self.db_ds(t, s)


class Soflow(ReleaseModelCalls, nn.Module):
    """The release's model class: `Soflow(data_channels, data_size, num_classes, cfg_drop_rate, noising_type,
    coefficient_type, model_type)`, positional or by keyword.

    `num_classes=None` (or 0) builds an unconditional model. The U-Net is always unconditional: the release
    builds its CIFAR-10 model with num_classes=10 and passes labels=None, and so does this class
    (`self.num_classes` is then 0: the number of classes the network is conditioned on). Times may be
    scalars or shaped [B] or [B, 1, 1, 1] (how the release's training loop passes them). `network_kwargs`
    reach the backbone: SongUNet arguments (dropout, model_channels, channel_mult, num_blocks,
    attn_resolutions) or DiT size overrides (hidden_size, depth, num_heads, patch_size).

    The training losses are SoflowLoss and MeanFlowLoss, called through `forward` (ReleaseModelCalls, which also
    holds the release's loss calls).
    """

    def __init__(self, data_channels, data_size, num_classes, cfg_drop_rate, noising_type="Linear",
                 coefficient_type="Euler", model_type="DiT-B-4", network_kwargs=None):
        super().__init__()
        check_choice("model_type", model_type, MODEL_TYPES)
        if num_classes is not None and num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 or None (None or 0: unconditional)")
        self.scheduler = Scheduler(noising_type, coefficient_type)
        self.data_channels = data_channels
        self.data_size = data_size
        self.cfg_drop_rate = cfg_drop_rate
        self.model_type = model_type
        self.num_classes = num_classes if is_conditional(model_type, num_classes) else 0
        if model_type == "UNet":
            self.network = SongUNet(img_resolution=data_size, in_channels=data_channels,
                                    out_channels=data_channels, **(network_kwargs or {}))
        else:
            # The null class row exists when labels are dropped for CFG, and is the only row when unconditional.
            self.network = build_dit(model_type, data_size, data_channels, self.num_classes,
                                     has_null_class=cfg_drop_rate > 0 or self.num_classes == 0,
                                     **(network_kwargs or {}))

    @property
    def conditional(self):
        return self.num_classes > 0

    @property
    def stochastic(self):
        """Whether a network call draws random numbers (dropout while training)."""
        return self.training and getattr(self.network, "dropout", 0) > 0

    # ----------------------------------------------------------------------------------------------
    # Inputs
    def as_times(self, t, x):
        """Times as a [B] tensor (float64 for float64 samples, otherwise float32, also under autocast)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.as_tensor(t, dtype=dtype, device=x.device)
        if t.dim() == 0:
            return t.expand(x.shape[0])
        if t.shape[0] != x.shape[0] or t.numel() != x.shape[0]:
            raise ValueError(f"times must be scalars or shaped [B] or [B, 1, 1, 1] with B={x.shape[0]}, "
                             f"got {tuple(t.shape)}")
        return t.reshape(-1)

    def check_inputs(self, x, labels=None, augment_labels=None, noise=None):
        """Shapes of samples (or x_t), labels, augment labels and noise, with what to pass instead."""
        expected = (self.data_channels, self.data_size, self.data_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected samples shaped [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {tuple(x.shape)}")
        if labels is not None:
            if not self.conditional:
                raise ValueError(f"this {self.model_type} model is unconditional but labels were given; "
                                 f"pass labels=None")
            if labels.shape != (x.shape[0],):
                raise ValueError(f"labels must be shaped [{x.shape[0]}], got {tuple(labels.shape)}")
        if augment_labels is not None and augment_labels.shape[0] != x.shape[0]:
            raise ValueError(f"augment_labels batch {augment_labels.shape[0]} != samples batch {x.shape[0]}")
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != samples shape {tuple(x.shape)}")

    def as_mask(self, cfg_mask, x):
        """The CFG mask as a [B] bool tensor (the release may pass it shaped [B, 1, 1, 1])."""
        if cfg_mask is None:
            return None
        if cfg_mask.shape[0] != x.shape[0] or cfg_mask.numel() != x.shape[0]:
            raise ValueError(f"cfg_mask must be shaped [{x.shape[0]}] or [{x.shape[0]}, 1, 1, 1], "
                             f"got {tuple(cfg_mask.shape)}")
        return cfg_mask.reshape(-1).bool()

    def null_labels(self, batch_size, device):
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)

    def masked_labels(self, labels, cfg_mask):
        """The labels with the CFG-masked rows set to the null class."""
        if labels is None or cfg_mask is None:
            return labels
        return torch.where(cfg_mask, self.null_labels(labels.shape[0], labels.device), labels)

    # ----------------------------------------------------------------------------------------------
    # Solution operator and velocity
    def network_output(self, x, t, s, labels, augment_labels):
        """F_theta(x, t, s) for [B] times (labels ignored by an unconditional model)."""
        return self.network(x, t, s, labels if self.conditional else None, augment_labels)

    def solution_from_output(self, x, t, s, F):
        """f = a(t, s) x + b(t, s) F for a network output F."""
        sch = self.scheduler
        return _bcast(sch.a(t, s), x) * x + _bcast(sch.b(t, s), x) * F

    def velocity_from_output(self, x_t, t, F):
        """v = d_s f(x_t, t, s) at s = t = d_s a(t, t) x_t + d_s b(t, t) F for F = F_theta(x_t, t, t)."""
        sch = self.scheduler
        return _bcast(sch.da_ds(t, t), x_t) * x_t + _bcast(sch.db_ds(t, t), x_t) * F

    def solution_operator(self, x_t, t, s, labels=None, augment_labels=None):
        """f_theta(x_t, t, s) = a(t, s) x_t + b(t, s) F_theta(x_t, t, s)."""
        self.check_inputs(x_t, labels, augment_labels)
        t, s = self.as_times(t, x_t), self.as_times(s, x_t)
        return self.solution_from_output(x_t, t, s, self.network_output(x_t, t, s, labels, augment_labels))

    def predict_velocity(self, x_t, t, labels=None, augment_labels=None):
        """v_theta(x_t, t) = d_s f(x_t, t, s) at s = t."""
        self.check_inputs(x_t, labels, augment_labels)
        t = self.as_times(t, x_t)
        return self.velocity_from_output(x_t, t, self.network_output(x_t, t, t, labels, augment_labels))

    # ----------------------------------------------------------------------------------------------
    # Sampling
    @torch.no_grad()
    def sample(self, noise, labels=None, nfe=1, generator=None, renoise=None, sampler="soflow"):
        """n-NFE sampling from t = 1 to 0 over t_i = 1 - i / nfe, by `sampler`:
          soflow    (the paper's) x0 = f(x, t_i, 0) and, except at the last step, re-noise
                    x = alpha(t_{i+1}) x0 + beta(t_{i+1}) eps. `renoise` [nfe - 1, *noise.shape] fixes the
                    re-noising draws; otherwise they come from `generator`.
          meanflow  x = f(x, t_i, t_{i+1}), MeanFlow's z_r = z_t - (t - r) u(z_t, r, t); deterministic.
          euler     x = x + (t_{i+1} - t_i) v_theta(x, t_i), the Euler solver of a flow-matching model.
        At nfe = 1 the soflow and meanflow samplers are the same map, f(noise, 1, 0)."""
        check_choice("sampler", sampler, SAMPLERS)
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        if renoise is not None and tuple(renoise.shape) != (nfe - 1, *noise.shape):
            raise ValueError(f"renoise must be shaped {(nfe - 1, *noise.shape)}, got {tuple(renoise.shape)}")
        times = [1 - i / nfe for i in range(nfe + 1)]
        if sampler != "soflow":
            return _deterministic_sample(self, noise, labels, times, sampler)
        x = noise
        for i in range(nfe):
            x0 = self.solution_operator(x, times[i], 0.0, labels)
            if i == nfe - 1:
                return x0
            eps = renoise[i] if renoise is not None else torch.randn(
                noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
            t_next = torch.tensor(times[i + 1], device=noise.device)
            x = self.scheduler.alpha(t_next) * x0 + self.scheduler.beta(t_next) * eps


def _deterministic_sample(model, x, labels, times, sampler):
    """The meanflow and euler samplers of Soflow.sample (only `model`'s solution_operator / predict_velocity)."""
    for t, t_next in zip(times[:-1], times[1:]):
        if sampler == "euler":
            x = x + (t_next - t) * model.predict_velocity(x, t, labels)
        else:
            x = model.solution_operator(x, t, t_next, labels)
    return x


def to_uint8(x):
    """[-1, 1] NCHW float -> uint8 NHWC as in the ADM sample files (grayscale repeated to 3 channels)."""
    x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu()
