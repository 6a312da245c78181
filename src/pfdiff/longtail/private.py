"""DP-LDMLR: LDMLR's feature diffusion trained on *private* features with a differential-privacy guarantee.

What is released from the private examples, and how each release is covered (docs/privacy.md); every
guarantee is under one neighbouring relation, add/remove one private example, with Poisson sampling:
- the class counts, through a Gaussian mechanism (L2 sensitivity 1), or declared public when
  ``privacy.count_epsilon = 0``; released once per seed and reused (also as the logit-adjustment prior);
- the denoiser weights, trained by DP-SGD (Opacus, noise multiplicity done right, ``privacy/dpsgd.py``).
  ``mechanism: dp-promise`` keeps dp-promise's two phases (Wang et al. 2024) as a *curriculum*: Phase I
  on t ∈ [S, T) at its own batch size, Phase II on t < S, but both are clipped, noised DP-SGD with one σ
  calibrated over both. The paper's Phase I (no clipping, no noise, the forward noise taken as the
  Gaussian mechanism) is NOT DP as implemented: its loss target is computed from x, so one use separates
  x from −x almost surely (docs/privacy_audit_cases.md). Its claimed ε is shown as "claimed by the
  paper", never as a guarantee;
- the pseudo-features and the classifier G fine-tuned on public features + pseudo-features:
  post-processing, no extra cost.
The encoder, the feature scaler and the stage-1 classifier see only the declared public part (or are
trained by DP-SGD on the private part, ``privacy.encoder: dp``). The public part is a uniformly random
subset of round(f·N) examples, chosen without looking at labels or features; N and N_private are declared
public (the accountant's q = B/N needs N_private). All private noise comes from ``privacy/noise.py``
(OS entropy unless the run is marked NOT PRIVATE). Every ε comes from ``privacy/accounting.py``; the
ledger of each seed is written before every step's noise is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pfdiff.config import PrivacyConfig, RunConfig
from pfdiff.diffusion import NoiseSchedule
from pfdiff.longtail.common import init_encoder_classifier, seeded_init
from pfdiff.longtail.ldmlr import build_denoiser, feature_loss
from pfdiff.privacy.accounting import (BudgetError, GaussianEvent, PrivacyLedger, calibrate_noise,
                                       check_delta_for_size, epsilon, gaussian_sigma_for, phase1_noise_multiplier)
from pfdiff.privacy.dpsgd import DPSGD
from pfdiff.privacy.noise import NoiseSource
from pfdiff.training import EMA, checkpoint_step, derive_seed, run_steps

COUNTS, PHASE1, DPSGD_EVENT = "class counts (Gaussian)", "denoiser DP-SGD phase I (t ≥ S)", "denoiser DP-SGD"
ENCODER_EVENT = "encoder + stage-1 classifier DP-SGD"
PAPER_CLAIM = ("claimed by the paper (dp-promise's Phase I without clipping or noise, accounted as a Gaussian "
               "mechanism on the input): NOT a guarantee — see docs/privacy_audit_cases.md")


def public_size(n: int, public_fraction: float) -> int:
    """How many of ``n`` training examples are declared public: round(f·n), at least 1, never all."""
    return int(np.clip(round(public_fraction * n), 1, max(1, n - 1)))


def public_private_split(y: np.ndarray, num_classes: int, public_fraction: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random subset of ``public_size(N, f)`` examples is declared public, the rest private.

    Data-independent by construction: only N = len(y) and ``seed`` (``data.split_seed``) decide it — not
    the labels (a per-class round(f·n_c) would publish every private n_c through the public counts) and
    not the features. A class may then have no public example; that is the price of not looking."""
    n = len(y)
    rng = np.random.default_rng(derive_seed(seed, "public-split"))
    order = rng.permutation(n)
    k = public_size(n, public_fraction)
    return np.sort(order[:k]), np.sort(order[k:])


def clip_rows(u: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each row down to L2 norm ≤ radius (bounded inputs; DP-SGD's guarantee does not need it)."""
    norms = u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return u * (radius / norms).clamp(max=1.0)


def count_event(p: PrivacyConfig) -> GaussianEvent | None:
    """The noisy-count release's event (L2 sensitivity 1 under add/remove one), None when declared public."""
    if p.count_epsilon == 0:
        return None
    return GaussianEvent(gaussian_sigma_for(p.count_epsilon, p.delta, sensitivity=1.0), 1.0, 1, COUNTS)


def noisy_counts(counts: np.ndarray, p: PrivacyConfig, noise: NoiseSource) -> tuple[np.ndarray, GaussianEvent | None]:
    """Class counts + N(0, σ²) from the private noise source, rounded and clamped to ≥ 1 (post-processing).
    ``count_epsilon = 0``: counts declared public (returned as they are)."""
    event = count_event(p)
    if event is None:
        return np.asarray(counts), None
    draw = noise.gaussian(len(counts), event.noise_multiplier, "noisy-counts").numpy()
    return np.maximum(1, np.round(np.asarray(counts) + draw)).astype(int), event


@dataclass
class PrivatePlan:
    """The denoiser's privacy plan: the calibrated σ and every event the seed will spend."""

    sigma: float
    sample_rate: float
    phase1_steps: int
    phase1_rate: float
    events: list[GaussianEvent]
    paper_claim: float | None = None  # dp-promise: the paper's accounting of its own Phase I (not a guarantee)


def plan_denoiser(p: PrivacyConfig, n_private: int, schedule: NoiseSchedule,
                  fixed: list[GaussianEvent]) -> PrivatePlan:
    """Events of the denoiser's training, with σ calibrated so that fixed + denoiser ≤ target ε; refuses
    (BudgetError) δ ≥ 1/N_private and a plan above the target, before anything is trained."""
    check_delta_for_size(p.delta, n_private, "the private part")
    q = min(1.0, p.expected_batch_size / n_private)
    n1, q1 = 0, 0.0
    if p.mechanism == "dp-promise":
        if not 0 < p.promise_S < schedule.T:
            raise ValueError(f"privacy.promise_S must lie in (0, T={schedule.T}), got {p.promise_S}")
        n1, q1 = p.promise_phase1_steps, min(1.0, p.promise_phase1_batch / n_private)
    shared = [(q1, n1)] if n1 else []
    sigma = p.noise_multiplier or calibrate_noise(p.target_epsilon, p.delta, q, p.steps, p.accountant,
                                                  fixed_events=fixed, shared=shared)
    phase1 = [GaussianEvent(sigma, q1, n1, PHASE1)] if n1 else []
    events = [*fixed, *phase1, GaussianEvent(sigma, q, p.steps, DPSGD_EVENT)]
    planned = epsilon(events, p.delta, p.accountant)
    if planned > p.target_epsilon * (1 + 1e-9):
        raise BudgetError(f"the plan costs epsilon {planned:.4g} > privacy.target_epsilon={p.target_epsilon:g} at "
                          f"delta {p.delta:g} (noise multiplier {sigma:g}); raise the noise or lower the steps")
    claim = None
    if p.mechanism == "dp-promise" and n1:
        mult = phase1_noise_multiplier(p.feature_radius, float(schedule.alpha_bar[p.promise_S - 1]))
        claim = epsilon([*fixed, GaussianEvent(mult, q1, n1), GaussianEvent(sigma, q, p.steps)], p.delta)
    return PrivatePlan(sigma, q, n1, q1, events, claim)


def encoder_plan(p: PrivacyConfig, n_private: int) -> GaussianEvent:
    """``privacy.encoder: dp`` — the DP-SGD event of E + G, σ calibrated to ``encoder_epsilon_share``·target."""
    check_delta_for_size(p.delta, n_private, "the private part")
    q = min(1.0, p.encoder_batch_size / n_private)
    sigma = calibrate_noise(p.encoder_epsilon_share * p.target_epsilon, p.delta, q, p.encoder_steps, p.accountant)
    return GaussianEvent(sigma, q, p.encoder_steps, ENCODER_EVENT)


def preflight(cfg: RunConfig, n_train: int) -> dict[str, Any]:
    """Every privacy check a private run makes, from the config and N alone, before any work: δ < 1/N_private,
    σ reachable, the whole plan (encoder, counts, denoiser) within the target. Raises BudgetError/ValueError.
    Returns N_private, σ, the planned ε (PLD) and every event the seed will spend (``pfdiff check`` prints them)."""
    p = cfg.privacy
    n_private = n_train - public_size(n_train, p.public_fraction)
    fixed = [e for e in ((encoder_plan(p, n_private) if p.encoder == "dp" else None), count_event(p)) if e]
    plan = plan_denoiser(p, n_private, cfg.diffusion.make_schedule(), fixed)
    return {"n_private": n_private, "sigma": plan.sigma, "planned_epsilon": epsilon(plan.events, p.delta),
            "events": plan.events, "paper_claim": plan.paper_claim}


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
                           noise: NoiseSource | None = None) -> tuple[nn.Module, NoiseSchedule, dict[str, Any]]:
    """Fit ε_θ on private standardised features ``u`` under DP; returns the EMA denoiser (wrapped for
    dp-promise sampling), its schedule and the plan. Refuses to start when the plan (with what the ledger
    already spent, on a resume) exceeds the budget. ``fixed``: events already released (they must be in
    the ledger). ``init``: builds a denoiser from public data only (called after the budget check), whose
    weights start the DP training (free). ``noise``: the private noise source (default: OS entropy)."""
    p, d, device = cfg.privacy, cfg.diffusion, u.device
    noise = noise or NoiseSource()
    u = clip_rows(u, p.feature_radius)
    schedule = d.make_schedule().to(device)
    plan = plan_denoiser(p, len(u), schedule, fixed)
    done = checkpoint_step(checkpoint)
    planned_eps = ledger.check_resume(plan.events, {PHASE1: min(done, plan.phase1_steps),
                                                    DPSGD_EVENT: max(0, done - plan.phase1_steps)})
    denoiser = seeded_init(seed, "dp-denoiser", lambda: build_denoiser(cfg, u.shape[1], num_classes), device)
    if init is not None:
        denoiser.load_state_dict(init().state_dict())
    ema = EMA(denoiser, d.ema_decay)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=p.lr, weight_decay=0.0)
    S = p.promise_S if p.mechanism == "dp-promise" else d.T

    def engine(rate: float) -> DPSGD:
        return DPSGD(denoiser, opt, noise_multiplier=plan.sigma, max_grad_norm=p.max_grad_norm, dataset_size=len(u),
                     sample_rate=rate, max_physical_batch_size=p.max_physical_batch_size, noise=noise, ema=ema,
                     secure_mode=p.secure_mode, track_norms=False, tune_allocator=True)

    phase2, phase2_loss = engine(plan.sample_rate), feature_loss(d, schedule, num_classes, t_max=S)
    phase1 = engine(plan.phase1_rate) if plan.phase1_steps else None
    # Phase I: label-free unless opted in (sampling withholds the label on t ≥ S, see ``sampling_view``)
    y1 = y if p.promise_conditional_phase1 else torch.full_like(y, num_classes)
    phase1_loss = feature_loss(d, schedule, num_classes, t_min=S) if phase1 else None

    def update(step: int) -> dict[str, float]:
        draws = derive_seed(seed, "dp-draws", step)  # the loss's (t, ε): used only with reproducible noise (DPSGD.diffusion_step)
        if step < plan.phase1_steps:
            ledger.record_progress(PHASE1, plan.sigma, plan.phase1_rate, step + 1)  # before the draw
            return phase1.diffusion_step(phase1_loss, p.noise_multiplicity, (u, y1), step, draws)
        s2 = step - plan.phase1_steps
        ledger.record_progress(DPSGD_EVENT, plan.sigma, plan.sample_rate, s2 + 1)
        return phase2.diffusion_step(phase2_loss, p.noise_multiplicity, (u, y), s2, draws)

    run_steps({"denoiser": denoiser}, phase2.optimizer, update, plan.phase1_steps + p.steps,
              description=f"seed {seed} · DP stage 2: ε_θ ({p.mechanism}, σ={plan.sigma:.3f})", ema=ema,
              checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, log=log, log_every=100,
              log_metrics=False)  # losses, norms, clip fractions, batch sizes: private, no guarantee
    model = sampling_view(ema.module.eval(), p, num_classes)
    info = {"sigma": plan.sigma, "sample_rate": plan.sample_rate, "planned_epsilon": planned_eps,
            "phase1_steps": plan.phase1_steps, "phase1_sample_rate": plan.phase1_rate,
            "events": [e.__dict__ for e in plan.events]}
    if plan.paper_claim is not None:
        info["paper_claimed_epsilon"] = {"epsilon": plan.paper_claim, "label": PAPER_CLAIM}
    return model, schedule, info


def train_private_stage1(x: torch.Tensor, y: torch.Tensor, num_classes: int, input_shape: tuple[int, ...],
                         cfg: RunConfig, seed: int, ledger: PrivacyLedger, checkpoint: Path | None,
                         log: Callable[[dict], None] | None, noise: NoiseSource | None = None,
                         ) -> tuple[nn.Module, nn.Module, GaussianEvent]:
    """``privacy.encoder: dp`` — E and G trained with DP-SGD (per-example cross-entropy, vmap clipping) on
    the private part, σ calibrated to ``encoder_epsilon_share``·target; the rest of the budget is left to
    the counts and the denoiser (their calibration composes this event)."""
    p, device = cfg.privacy, x.device
    noise = noise or NoiseSource()
    encoder, classifier = init_encoder_classifier(cfg, input_shape, num_classes, seed, device, prefix="dp-")
    net = nn.Sequential(encoder, classifier)
    event = encoder_plan(p, len(y))
    ledger.check_resume([event], {ENCODER_EVENT: checkpoint_step(checkpoint)})
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.stage1.lr, weight_decay=0.0)
    engine = DPSGD(net, opt, noise_multiplier=event.noise_multiplier, max_grad_norm=p.max_grad_norm,
                   dataset_size=len(y), sample_rate=event.sample_rate, max_physical_batch_size=p.max_physical_batch_size,
                   noise=noise, secure_mode=p.secure_mode, method="vmap", track_norms=False,
                   tune_allocator=True)

    def per_example_ce(model, xb, yb):
        return nn.functional.cross_entropy(model(xb), yb, reduction="none")

    def update(step: int) -> dict[str, float]:
        ledger.record_progress(ENCODER_EVENT, event.noise_multiplier, event.sample_rate, step + 1)
        return engine.step(per_example_ce, (x, y), step)

    run_steps({"net": net}, engine.optimizer, update, p.encoder_steps,
              description=f"seed {seed} · DP stage 1: E+G (σ={event.noise_multiplier:.3f})", checkpoint=checkpoint,
              checkpoint_every=cfg.checkpoint_every, log=log, log_every=100, log_metrics=False)
    return encoder, classifier, event
