"""SoFlow: the solution-operator wrapper around a backbone, its two losses and the sampler.

Time runs from data (t = 0) to noise (t = 1): x_t = alpha(t) x0 + beta(t) x1. The network F_theta
parameterises the solution operator f(x_t, t, s) = a(t, s) x_t + b(t, s) F_theta(x_t, t, s), which maps
the point x_t of a probability-flow trajectory to its point at time s; f(x, t, t) = x by construction.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn

from dit import DIT_SIZES, build_dit
from unet import SongUNet

NOISING_TYPES = ("Linear", "Trig")
COEFFICIENT_TYPES = ("Euler", "Trig")
MODEL_TYPES = ("UNet",) + tuple(DIT_SIZES)
L_SCHEDULES = ("Const", "Linear", "Cosine", "Exponent")
CFG_DECAY_K = 0.025
MIN_TIME_GAP = 1e-4


def _check_choice(name, value, accepted):
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


def _bcast(t, x):
    """Per-sample times [B] -> [B, 1, 1, ...] broadcastable against x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Scheduler:
    """Noising process (alpha, beta) and solution coefficients (a, b) with their derivatives."""

    def __init__(self, noising_type="Linear", coefficient_type="Euler"):
        _check_choice("noising_type", noising_type, NOISING_TYPES)
        _check_choice("coefficient_type", coefficient_type, COEFFICIENT_TYPES)
        self.noising_type = noising_type
        self.coefficient_type = coefficient_type

    # noising: x_t = alpha(t) x0 + beta(t) x1
    def alpha(self, t):
        return 1 - t if self.noising_type == "Linear" else torch.cos(math.pi / 2 * t)

    def beta(self, t):
        return t if self.noising_type == "Linear" else torch.sin(math.pi / 2 * t)

    def d_alpha(self, t):
        return -torch.ones_like(t) if self.noising_type == "Linear" else -math.pi / 2 * torch.sin(math.pi / 2 * t)

    def d_beta(self, t):
        return torch.ones_like(t) if self.noising_type == "Linear" else math.pi / 2 * torch.cos(math.pi / 2 * t)

    def add_noise(self, x0, x1, t):
        """(x_t, conditional velocity v_t) for per-sample times t."""
        tb = _bcast(t, x0)
        x_t = self.alpha(tb) * x0 + self.beta(tb) * x1
        v_t = self.d_alpha(tb) * x0 + self.d_beta(tb) * x1
        return x_t, v_t

    # solution coefficients: f(x_t, t, s) = a(t, s) x_t + b(t, s) F(x_t, t, s); both depend on s - t only
    def a(self, t, s):
        return torch.ones_like(t) if self.coefficient_type == "Euler" else torch.cos(math.pi / 2 * (s - t))

    def b(self, t, s):
        return s - t if self.coefficient_type == "Euler" else torch.sin(math.pi / 2 * (s - t))

    def da_ds(self, t, s):
        return torch.zeros_like(t) if self.coefficient_type == "Euler" else -math.pi / 2 * torch.sin(math.pi / 2 * (s - t))

    def db_ds(self, t, s):
        return torch.ones_like(t) if self.coefficient_type == "Euler" else math.pi / 2 * torch.cos(math.pi / 2 * (s - t))

    def da_dt(self, t, s):
        return -self.da_ds(t, s)

    def db_dt(self, t, s):
        return -self.db_ds(t, s)


@dataclass
class Objective:
    """The training-objective settings of SPEC section 3 (reference config key names)."""
    velocity_loss_ratio: float = 0.75
    p: float = 1.0
    eps: float = 0.01
    time_mean: List[float] = field(default_factory=lambda: [-0.2, -1.0, 0.2])
    time_std: List[float] = field(default_factory=lambda: [1.0, 0.8, 0.8])
    cfg_scale: float = 1.0
    mix_ratio: float = 1.0
    cfg_decay_time: float = 1.0
    l_schedule: str = "Exponent"
    l_init_ratio: float = 0.1
    l_end_ratio: float = 0.002
    total_steps: int = 400_000

    def __post_init__(self):
        _check_choice("l_schedule", self.l_schedule, L_SCHEDULES)
        for key in ("time_mean", "time_std"):
            if len(getattr(self, key)) != 3:
                raise ValueError(f"{key} needs 3 values (FM, consistency tau1, consistency tau2), "
                                 f"got {getattr(self, key)}")
        if not 0 <= self.velocity_loss_ratio <= 1:
            raise ValueError(f"velocity_loss_ratio={self.velocity_loss_ratio} must lie in [0, 1]")


@contextmanager
def shared_random_state(device):
    """Yields a function that rewinds the random state of `device` (and the CPU) to where it stood on entry.

    Used so that the second consistency-loss network call draws the same dropout masks as the first.
    """
    device = torch.device(device)
    cpu_state = torch.get_rng_state()
    accel = torch.get_device_module(device.type) if device.type != "cpu" else None
    accel_state = accel.get_rng_state(device) if accel is not None else None

    def rewind():
        torch.set_rng_state(cpu_state)
        if accel is not None:
            accel.set_rng_state(accel_state, device)
    yield rewind


class Soflow(nn.Module):
    def __init__(self, data_channels, data_size, num_classes, cfg_drop_rate, noising_type="Linear",
                 coefficient_type="Euler", model_type="DiT-B-4", network_kwargs=None):
        """`network_kwargs` reach the backbone: SongUNet arguments (dropout, model_channels, channel_mult,
        num_blocks, attn_resolutions) or DiT size overrides (hidden_size, depth, num_heads, patch_size)."""
        super().__init__()
        _check_choice("model_type", model_type, MODEL_TYPES)
        self.scheduler = Scheduler(noising_type, coefficient_type)
        self.data_channels = data_channels
        self.data_size = data_size
        self.num_classes = num_classes
        self.cfg_drop_rate = cfg_drop_rate
        self.model_type = model_type
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0 means unconditional)")
        if model_type == "UNet":
            if num_classes != 0:
                raise ValueError(f"model_type 'UNet' is the unconditional EDM U-Net; num_classes must be 0, "
                                 f"got {num_classes} (use a DiT model_type for class-conditional data)")
            self.network = SongUNet(img_resolution=data_size, in_channels=data_channels,
                                    out_channels=data_channels, **(network_kwargs or {}))
        else:
            # The null class row exists when labels are dropped for CFG, and is the only row when unconditional.
            self.network = build_dit(model_type, data_size, data_channels, num_classes,
                                     has_null_class=cfg_drop_rate > 0 or num_classes == 0, **(network_kwargs or {}))

    # ----------------------------------------------------------------------------------------------
    # Inputs
    def _times(self, t, x):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # times stay >= fp32 under bf16
        t = torch.as_tensor(t, dtype=dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"times must be scalars or shaped [batch]={x.shape[0]}, got {tuple(t.shape)}")
        return t

    def _check_inputs(self, x, labels=None, augment_labels=None):
        expected = (self.data_channels, self.data_size, self.data_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected samples shaped [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {tuple(x.shape)}")
        if labels is not None:
            if self.num_classes == 0:
                raise ValueError("this model is unconditional (num_classes=0) but labels were given; pass labels=None")
            if labels.shape != (x.shape[0],):
                raise ValueError(f"labels must be shaped [{x.shape[0]}], got {tuple(labels.shape)}")
        if augment_labels is not None and augment_labels.shape[0] != x.shape[0]:
            raise ValueError(f"augment_labels batch {augment_labels.shape[0]} != samples batch {x.shape[0]}")

    def null_labels(self, batch_size, device):
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)

    def _network_labels(self, labels):
        # Unconditional models never pass labels to the backbone; the DiT then uses its null row.
        return labels if self.num_classes > 0 else None

    # ----------------------------------------------------------------------------------------------
    # Solution operator and velocity
    def _F(self, x, t, s, labels, augment_labels):
        return self.network(x, t, s, self._network_labels(labels), augment_labels)

    def solution_operator(self, x_t, t, s, labels=None, augment_labels=None):
        """f_theta(x_t, t, s) = a(t, s) x_t + b(t, s) F_theta(x_t, t, s)."""
        self._check_inputs(x_t, labels, augment_labels)
        t, s = self._times(t, x_t), self._times(s, x_t)
        sch = self.scheduler
        F = self._F(x_t, t, s, labels, augment_labels)
        return _bcast(sch.a(t, s), x_t) * x_t + _bcast(sch.b(t, s), x_t) * F

    def _velocity(self, x_t, t, F):
        sch = self.scheduler
        return _bcast(sch.da_ds(t, t), x_t) * x_t + _bcast(sch.db_ds(t, t), x_t) * F

    def predict_velocity(self, x_t, t, labels=None, augment_labels=None):
        """v_theta(x_t, t) = d_s f(x_t, t, s) at s = t."""
        self._check_inputs(x_t, labels, augment_labels)
        t = self._times(t, x_t)
        return self._velocity(x_t, t, self._F(x_t, t, t, labels, augment_labels))

    # ----------------------------------------------------------------------------------------------
    # Schedules
    @staticmethod
    def get_cfg_decay_scale(t, cfg_decay_time):
        """w_cfg(t): 1 up to cfg_decay_time, then decays towards 0 at t = 1."""
        if cfg_decay_time >= 1:
            return torch.ones_like(t)
        d = ((1 - t) / (1 - cfg_decay_time)).clamp(0, 1 - 1e-6)
        decayed = 1 - torch.exp(-CFG_DECAY_K * d / (1 - d))
        return torch.where(t <= cfg_decay_time, torch.ones_like(t), decayed)

    @staticmethod
    def l_ratio(finished_steps, total_steps, l_schedule, l_init_ratio, l_end_ratio):
        _check_choice("l_schedule", l_schedule, L_SCHEDULES)
        progress = min(max(finished_steps / max(total_steps, 1), 0.0), 1.0)
        if l_schedule == "Const":
            return l_end_ratio
        if l_schedule == "Linear":
            return l_init_ratio + (l_end_ratio - l_init_ratio) * progress
        if l_schedule == "Cosine":
            return l_end_ratio + (l_init_ratio - l_end_ratio) * (1 + math.cos(math.pi * progress)) / 2
        return l_init_ratio * (l_end_ratio / l_init_ratio) ** progress

    @classmethod
    def get_middle_time(cls, t, s, finished_steps, total_steps, l_schedule, l_init_ratio, l_end_ratio):
        """l = t + (s - t) r(k, K), kept at least MIN_TIME_GAP below t."""
        r = cls.l_ratio(finished_steps, total_steps, l_schedule, l_init_ratio, l_end_ratio)
        return torch.minimum(t + (s - t) * r, t - MIN_TIME_GAP)

    # ----------------------------------------------------------------------------------------------
    # Losses
    def _masked_labels(self, labels, cfg_mask):
        if labels is None or cfg_mask is None:
            return labels
        return torch.where(cfg_mask, self.null_labels(labels.shape[0], labels.device), labels)

    def _stochastic(self):
        return self.training and getattr(self.network, "dropout", 0) > 0

    def _losses(self, samples, t, s, l, n_fm, labels, cfg_mask, cfg_scale, cfg_decay_time, p, eps, mix_ratio,
                augment_labels, noise):
        """Flow Matching loss on rows [:n_fm], consistency loss on rows [n_fm:], in three network calls.

        1. one no-grad call for every guidance velocity (unconditional for all rows, conditional for the
           consistency rows), concatenated along the batch;
        2. one call with gradient: F(x_t, t, t) for FM rows, F(x_t, t, s) for consistency rows;
        3. one no-grad call at (x_l, l, s) for the consistency rows, under the random state of call 2.
        s and l of FM rows are ignored. Returns {'fm': (loss, mse, weight), 'cons': (...)} for non-empty parts.
        """
        self._check_inputs(samples, labels, augment_labels)
        if cfg_mask is not None and cfg_mask.shape != (samples.shape[0],):
            raise ValueError(f"cfg_mask must be shaped [{samples.shape[0]}], got {tuple(cfg_mask.shape)}")
        if noise is not None and noise.shape != samples.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != samples shape {tuple(samples.shape)}")
        guided = cfg_scale > 1
        if guided and (self.num_classes == 0 or labels is None):
            raise ValueError(f"cfg_scale={cfg_scale} > 1 needs a class-conditional model and labels")
        sch = self.scheduler
        B = samples.shape[0]
        fm, cons = slice(0, n_fm), slice(n_fm, B)
        x1 = torch.randn_like(samples) if noise is None else noise
        x_t, v_t = sch.add_noise(samples, x1, t)
        masked = self._masked_labels(labels, cfg_mask)
        aug = augment_labels

        def rows(x, part):
            return None if x is None else x[part]

        def cat(a, b):
            return None if a is None else torch.cat([a, b])

        if guided:
            with torch.no_grad():
                v = self.predict_velocity(cat(x_t, x_t[cons]), torch.cat([t, t[cons]]),
                                          torch.cat([self.null_labels(B, labels.device), labels[cons]]),
                                          cat(aug, rows(aug, cons)))
                v_uncond, v_cond = v[:B], v[B:]
                w_cfg = _bcast(self.get_cfg_decay_scale(t, cfg_decay_time), x_t)
                v_guided = v_t + w_cfg * (cfg_scale - 1) * (v_t - v_uncond)

        with shared_random_state(samples.device) as rewind:
            s_net = torch.cat([t[fm], s[cons]])
            F = self._F(x_t, t, s_net, masked, aug)

            pred = self._velocity(x_t[fm], t[fm], F[fm])
            target = v_t
            if guided:
                # The mix term: FM rows use their own (detached) prediction with the masked labels,
                # consistency rows the conditional velocity with the true labels.
                mixed = mix_ratio * v_guided + (1 - mix_ratio) * torch.cat([pred.detach(), v_cond])
                keep_plain = _bcast(cfg_mask, x_t) if cfg_mask is not None else torch.zeros_like(x_t, dtype=torch.bool)
                target = torch.where(keep_plain, v_t, mixed)

            out = {}
            if n_fm > 0:
                delta = pred - target[fm]
                mse = delta.square().flatten(1).mean(1)
                weight = 1 / (sch.db_ds(t[fm], t[fm]).abs() * (mse.detach() + eps) ** p)
                out["fm"] = ((weight * mse).mean(), mse.detach().mean(), weight.mean())

            if n_fm < B:
                tc, sc, lc = t[cons], s[cons], l[cons]
                x_tc = x_t[cons]
                with torch.no_grad():
                    x_l = x_tc + target[cons] * _bcast(lc - tc, x_tc)
                    rewind()
                    if self._stochastic() and n_fm > 0:
                        # Same batch layout as call 2 so that every row sees the same dropout mask.
                        F_l = self._F(torch.cat([x_t[fm], x_l]), torch.cat([t[fm], lc]), s_net, masked, aug)[cons]
                    else:
                        F_l = self._F(x_l, lc, sc, rows(masked, cons), rows(aug, cons))
                    f_l = _bcast(sch.a(lc, sc), x_l) * x_l + _bcast(sch.b(lc, sc), x_l) * F_l
                F_t = F[cons]
                f_t = _bcast(sch.a(tc, sc), x_tc) * x_tc + _bcast(sch.b(tc, sc), x_tc) * F_t
                Delta = (f_t.detach() - f_l) / _bcast(tc - lc, x_tc)
                mse = Delta.square().flatten(1).mean(1)
                weight = 1 / (mse + eps) ** p
                # Gradient = (t - l) / |b| times that of 0.5 * w * |Delta|^2, with no division through F.
                sign_b = _bcast(torch.sign(sch.b(tc, sc)), x_tc)
                surrogate = (sign_b * F_t * (Delta * _bcast(weight, Delta))).flatten(1).mean(1)
                out["cons"] = (surrogate.mean(), mse.mean(), weight.mean())
        return out

    def get_velocity_loss(self, samples, t, labels=None, cfg_mask=None, cfg_scale=1.0, cfg_decay_time=1.0,
                          p=1.0, eps=0.01, mix_ratio=1.0, augment_labels=None, noise=None):
        """Flow Matching loss with adaptive weight. Returns (loss, mean mse, mean weight)."""
        t = self._times(t, samples)
        return self._losses(samples, t, t, t, samples.shape[0], labels, cfg_mask, cfg_scale, cfg_decay_time,
                            p, eps, mix_ratio, augment_labels, noise)["fm"]

    def get_consistency_loss(self, samples, t, l, s, labels=None, cfg_mask=None, cfg_scale=1.0,
                             cfg_decay_time=1.0, p=1.0, eps=0.01, mix_ratio=1.0, augment_labels=None, noise=None):
        """JVP-free consistency loss between f(x_t, t, s) and the no-grad f(x_l, l, s), s < l < t.
        Returns (surrogate loss, mean |Delta|^2, mean weight)."""
        t, l, s = self._times(t, samples), self._times(l, samples), self._times(s, samples)
        return self._losses(samples, t, s, l, 0, labels, cfg_mask, cfg_scale, cfg_decay_time,
                            p, eps, mix_ratio, augment_labels, noise)["cons"]

    @staticmethod
    def logit_normal(n, mean, std, device, generator=None):
        return torch.sigmoid(torch.randn(n, device=device, generator=generator) * std + mean)

    def forward(self, samples, labels=None, augment_labels=None, *, objective: Objective, finished_steps=0,
                noise=None):
        """One training loss: the first int(velocity_loss_ratio * B) rows Flow Matching, the rest consistency.

        Returns (total loss, stats) with stats = detached Vel_MSE, Vel_Weight, Con_MSE, Con_Weight."""
        B, device = samples.shape[0], samples.device
        o = objective
        n_fm = int(o.velocity_loss_ratio * B)
        t_fm = self.logit_normal(n_fm, o.time_mean[0], o.time_std[0], device)
        tau1 = self.logit_normal(B - n_fm, o.time_mean[1], o.time_std[1], device)
        tau2 = self.logit_normal(B - n_fm, o.time_mean[2], o.time_std[2], device)
        t_c = tau2.clamp(min=MIN_TIME_GAP)
        s_c = torch.minimum(tau1, t_c - MIN_TIME_GAP)
        l_c = self.get_middle_time(t_c, s_c, finished_steps, o.total_steps, o.l_schedule,
                                   o.l_init_ratio, o.l_end_ratio)
        t, s, l = torch.cat([t_fm, t_c]), torch.cat([t_fm, s_c]), torch.cat([t_fm, l_c])
        cfg_mask = None
        if labels is not None and self.cfg_drop_rate > 0:
            cfg_mask = torch.rand(B, device=device) < self.cfg_drop_rate
        parts = self._losses(samples, t, s, l, n_fm, labels, cfg_mask, o.cfg_scale, o.cfg_decay_time, o.p, o.eps,
                             o.mix_ratio, augment_labels, noise)
        zero = samples.new_zeros(())
        fm_loss, fm_mse, fm_w = parts.get("fm", (zero, zero, zero))
        con_loss, con_mse, con_w = parts.get("cons", (zero, zero, zero))
        total = fm_loss * (n_fm / B) + con_loss * ((B - n_fm) / B)
        stats = {"Vel_MSE": fm_mse.detach(), "Vel_Weight": fm_w.detach(),
                 "Con_MSE": con_mse.detach(), "Con_Weight": con_w.detach()}
        return total, stats

    # ----------------------------------------------------------------------------------------------
    # Sampling
    @torch.no_grad()
    def sample(self, noise, labels=None, nfe=1, generator=None, renoise=None):
        """n-NFE sampling (SPEC section 4). `renoise` [nfe - 1, *noise.shape] fixes the re-noising draws;
        otherwise they come from `generator`."""
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        if renoise is not None and tuple(renoise.shape) != (nfe - 1, *noise.shape):
            raise ValueError(f"renoise must be shaped {(nfe - 1, *noise.shape)}, got {tuple(renoise.shape)}")
        times = [1 - i / nfe for i in range(nfe + 1)]
        x = noise
        for i in range(nfe):
            x0 = self.solution_operator(x, times[i], 0.0, labels)
            if i == nfe - 1:
                return x0
            eps = renoise[i] if renoise is not None else torch.randn(
                noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
            t_next = torch.tensor(times[i + 1], device=noise.device)
            x = self.scheduler.alpha(t_next) * x0 + self.scheduler.beta(t_next) * eps


def to_uint8(x):
    """[-1, 1] NCHW float -> uint8 NHWC as in the ADM sample files (grayscale repeated to 3 channels)."""
    x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu()
