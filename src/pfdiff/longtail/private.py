"""DP-LDMLR: LDMLR's feature diffusion trained on *private* features with a differential-privacy guarantee.

What is released from the private examples, and how each release is covered (docs/privacy.md):
- the class counts, through a Gaussian mechanism (L2 sensitivity 1 under add/remove-one),
  or declared public when ``privacy.count_epsilon = 0``;
- the denoiser weights, trained either by DP-SGD (Opacus, noise multiplicity done right,
  ``privacy/dpsgd.py``) or by dp-promise (Wang et al. 2024): Phase I on t ∈ [S, T) with no
  clipping and no added noise, the forward noise being the Gaussian mechanism on features
  clipped to the L2 radius R; Phase II DP-SGD on t < S;
- the pseudo-features and the classifier G fine-tuned on public features + pseudo-features:
  post-processing, no extra cost.
The encoder, the feature scaler and the stage-1 classifier see only the declared public part.
Every ε comes from ``privacy/accounting.py``; the ledger of each seed is written every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pfdiff.config import PrivacyConfig, RunConfig
from pfdiff.diffusion import DiffusionLoss, NoiseSchedule, make_schedule
from pfdiff.longtail.common import init_encoder_classifier, seeded_init
from pfdiff.longtail.ldmlr import build_denoiser, feature_loss
from pfdiff.privacy.accounting import (GaussianEvent, PrivacyLedger, calibrate_noise, gaussian_sigma_for,
                                       phase1_noise_multiplier)
from pfdiff.privacy.dpsgd import DPSGD, poisson_batch
from pfdiff.training import EMA, derive_seed, generator, run_steps

COUNTS, PHASE1, DPSGD_EVENT = "class counts (Gaussian)", "denoiser dp-promise phase I", "denoiser DP-SGD"
ENCODER_EVENT = "encoder + stage-1 classifier DP-SGD"


def public_private_split(y: np.ndarray, num_classes: int, public_fraction: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``round(fraction·n_c)`` examples (at least one when n_c ≥ 2, never all) are declared
    public; the rest are private. Seeded, so every training seed sees the same split."""
    rng = np.random.default_rng(derive_seed(seed, "public-split"))
    public, private = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = 0 if len(idx) < 2 else int(np.clip(round(public_fraction * len(idx)), 1, len(idx) - 1))
        public.append(idx[:k])
        private.append(idx[k:])
    return np.sort(np.concatenate(public)), np.sort(np.concatenate(private))


def clip_rows(u: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each row down to L2 norm ≤ radius (the bound dp-promise's Phase I sensitivity needs)."""
    norms = u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return u * (radius / norms).clamp(max=1.0)


def noisy_counts(counts: np.ndarray, p: PrivacyConfig, seed: int) -> tuple[np.ndarray, GaussianEvent | None]:
    """Class counts + N(0, σ²) (add/remove one example changes one count by 1: L2 sensitivity 1),
    rounded and clamped to ≥ 1 (post-processing). ``count_epsilon = 0``: counts declared public."""
    if p.count_epsilon == 0:
        return np.asarray(counts), None
    sigma = gaussian_sigma_for(p.count_epsilon, p.delta, sensitivity=1.0)
    g = torch.Generator().manual_seed(derive_seed(seed, "noisy-counts"))
    noise = torch.randn(len(counts), generator=g, dtype=torch.float64).numpy() * sigma
    return np.maximum(1, np.round(np.asarray(counts) + noise)).astype(int), GaussianEvent(sigma, 1.0, 1, COUNTS)


@dataclass
class PrivatePlan:
    """The denoiser's privacy plan: the calibrated σ and every event the seed will spend."""

    sigma: float
    sample_rate: float
    phase1_steps: int
    phase1_rate: float
    phase1_multiplier: float | None
    events: list[GaussianEvent]


def plan_denoiser(p: PrivacyConfig, n_private: int, schedule: NoiseSchedule,
                  fixed: list[GaussianEvent]) -> PrivatePlan:
    """Events of the denoiser's training, with σ calibrated so that fixed + denoiser ≤ target ε."""
    q = min(1.0, p.expected_batch_size / n_private)
    phase1: list[GaussianEvent] = []
    n1, q1, mult1 = 0, 0.0, None
    if p.mechanism == "dp-promise":
        if not 0 < p.promise_S < schedule.T:
            raise ValueError(f"privacy.promise_S must lie in (0, T={schedule.T}), got {p.promise_S}")
        n1, q1 = p.promise_phase1_steps, min(1.0, p.promise_phase1_batch / n_private)
        # μ_S = 2R√ᾱ_S/√(1−ᾱ_S) at the smallest Phase-I timestep (largest signal), index S−1 as the paper's code
        mult1 = phase1_noise_multiplier(p.feature_radius, float(schedule.alpha_bar[p.promise_S - 1]))
        if n1:
            phase1 = [GaussianEvent(mult1, q1, n1, PHASE1)]
    sigma = p.noise_multiplier or calibrate_noise(p.target_epsilon, p.delta, q, p.steps, p.accountant,
                                                  fixed_events=[*fixed, *phase1])
    events = [*fixed, *phase1, GaussianEvent(sigma, q, p.steps, DPSGD_EVENT)]
    return PrivatePlan(sigma, q, n1, q1, mult1, events)


class PhasedLabels(nn.Module):
    """dp-promise sampling: the label is withheld (null) on t ≥ S, where Phase I trained unconditionally."""

    def __init__(self, model: nn.Module, S: int, null_label: int):
        super().__init__()
        self.model, self.S, self.null_label = model, S, null_label
        self.dim = model.dim

    def forward(self, z_t, t, y):
        return self.model(z_t, t, torch.where(t >= self.S, torch.full_like(y, self.null_label), y))


def sampling_view(model: nn.Module, p: PrivacyConfig, num_classes: int) -> nn.Module:
    """A DP denoiser as it must be sampled (and attacked): under dp-promise with label-free Phase I the
    label is withheld on t ≥ S, where it was never trained with one."""
    if p.mechanism == "dp-promise" and not p.promise_conditional_phase1:
        return PhasedLabels(model, p.promise_S, num_classes)
    return model


def train_private_denoiser(u: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RunConfig, seed: int,
                           ledger: PrivacyLedger, fixed: list[GaussianEvent], checkpoint: Path | None,
                           log: Callable[[dict], None] | None, init: Callable[[], nn.Module] | None = None,
                           ) -> tuple[nn.Module, NoiseSchedule, dict[str, Any]]:
    """Fit ε_θ on private standardised features ``u`` under DP; returns the EMA denoiser (wrapped for
    dp-promise sampling), its schedule and the plan. Refuses to start when the plan exceeds the budget.
    ``init``: builds a denoiser from public data only (called after the budget check), whose weights
    start the DP training (free)."""
    p, d, device = cfg.privacy, cfg.diffusion, u.device
    u = clip_rows(u, p.feature_radius)
    schedule = make_schedule(d.schedule, d.T).to(device)
    plan = plan_denoiser(p, len(u), schedule, fixed)
    planned_eps = ledger.check_final(plan.events)
    for e in fixed:
        ledger.record_progress(e.name, e.noise_multiplier, e.sample_rate, e.steps)
    denoiser = seeded_init(seed, "dp-denoiser", lambda: build_denoiser(cfg, u.shape[1], num_classes), device)
    if init is not None:
        denoiser.load_state_dict(init().state_dict())
    ema = EMA(denoiser, d.ema_decay)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=p.lr, weight_decay=0.0)
    S = p.promise_S if p.mechanism == "dp-promise" else d.T
    engine = DPSGD(denoiser, opt, noise_multiplier=plan.sigma, max_grad_norm=p.max_grad_norm,
                   dataset_size=len(u), sample_rate=plan.sample_rate,
                   max_physical_batch_size=p.max_physical_batch_size, seed=seed, ema=ema)
    phase2_loss = feature_loss(d, schedule, num_classes, t_max=S)

    def per_example_loss(model, z, labels):  # K draws averaged per example *before* clipping (DPDM)
        return phase2_loss(model, z, labels, noise_multiplicity=p.noise_multiplicity).loss

    phase1_step = (phase1_stepper(denoiser, opt, ema, u, y, num_classes, schedule, cfg, seed, plan)
                   if plan.phase1_steps else None)

    def update(step: int) -> dict[str, float]:
        if step < plan.phase1_steps:
            info = phase1_step(step)
            ledger.record_progress(PHASE1, plan.phase1_multiplier, plan.phase1_rate, step + 1)
            return info
        s2 = step - plan.phase1_steps
        torch.manual_seed(derive_seed(seed, "dp-draws", s2))  # the per-example loss draws (t, ε) from it
        info = engine.step(per_example_loss, (u, y), s2)
        ledger.record_progress(DPSGD_EVENT, plan.sigma, plan.sample_rate, s2 + 1)
        return info

    run_steps({"denoiser": denoiser}, engine.optimizer, update, plan.phase1_steps + p.steps,
              description=f"seed {seed} · DP stage 2: ε_θ ({p.mechanism}, σ={plan.sigma:.3f})", ema=ema,
              checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, log=log, log_every=100,
              log_metrics=False)  # losses, norms, clip fractions, batch sizes: private, no guarantee
    model = sampling_view(ema.module.eval(), p, num_classes)
    info = {"sigma": plan.sigma, "sample_rate": plan.sample_rate, "planned_epsilon": planned_eps,
            "phase1_steps": plan.phase1_steps, "phase1_noise_multiplier": plan.phase1_multiplier,
            "labels_unprotected_in_phase1": p.mechanism == "dp-promise" and p.promise_conditional_phase1,
            "events": [e.__dict__ for e in plan.events]}
    return model, schedule, info


def phase1_stepper(denoiser, opt, ema, u, y, num_classes, schedule, cfg: RunConfig, seed: int, plan: PrivatePlan):
    """dp-promise Phase I: plain (non-clipped, non-noised) steps on t ∈ [S, T) with Poisson batches, one
    noise draw per example per step (each use is one Gaussian mechanism), null labels unless opted in."""
    p, d = cfg.privacy, cfg.diffusion
    loss_fn = DiffusionLoss(schedule, prediction=d.prediction, weighting=d.weighting, t_min=p.promise_S)
    labels = y if p.promise_conditional_phase1 else torch.full_like(y, num_classes)

    def step_fn(step: int) -> dict[str, float]:
        idx = poisson_batch(len(u), plan.phase1_rate, torch.Generator().manual_seed(derive_seed(seed, "p1", step)))
        idx = idx.to(u.device)
        if len(idx) == 0:
            return {"loss": 0.0}
        loss = loss_fn(denoiser, u[idx], labels[idx], generator=generator(u.device, seed, "p1-draws", step)).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()
        return {"loss": loss.item()}

    return step_fn


def train_private_stage1(x: torch.Tensor, y: torch.Tensor, num_classes: int, input_shape: tuple[int, ...],
                         cfg: RunConfig, seed: int, ledger: PrivacyLedger, checkpoint: Path | None,
                         log: Callable[[dict], None] | None) -> tuple[nn.Module, nn.Module, GaussianEvent]:
    """``privacy.encoder: dp`` — E and G trained with DP-SGD (per-example cross-entropy, vmap clipping) on
    the private part, σ calibrated to ``encoder_epsilon_share``·target; the rest of the budget is left to
    the counts and the denoiser (their calibration composes this event)."""
    p, device = cfg.privacy, x.device
    encoder, classifier = init_encoder_classifier(cfg, input_shape, num_classes, seed, device, prefix="dp-")
    net = nn.Sequential(encoder, classifier)
    q = min(1.0, p.encoder_batch_size / len(y))
    sigma = calibrate_noise(p.encoder_epsilon_share * p.target_epsilon, p.delta, q, p.encoder_steps, p.accountant)
    event = GaussianEvent(sigma, q, p.encoder_steps, ENCODER_EVENT)
    ledger.check_final([event])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.stage1.lr, weight_decay=0.0)
    engine = DPSGD(net, opt, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm, dataset_size=len(y),
                   sample_rate=q, max_physical_batch_size=p.max_physical_batch_size, seed=seed, method="vmap")

    def per_example_ce(model, xb, yb):
        return nn.functional.cross_entropy(model(xb), yb, reduction="none")

    def update(step: int) -> dict[str, float]:
        info = engine.step(per_example_ce, (x, y), step)
        ledger.record_progress(ENCODER_EVENT, sigma, q, step + 1)
        return info

    run_steps({"net": net}, engine.optimizer, update, p.encoder_steps,
              description=f"seed {seed} · DP stage 1: E+G (σ={sigma:.3f})", checkpoint=checkpoint,
              checkpoint_every=cfg.checkpoint_every, log=log, log_every=100, log_metrics=False)
    return encoder, classifier, event
