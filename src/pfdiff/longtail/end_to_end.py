"""End-to-end latent diffusion for long-tailed recognition: E, G and ε_θ trained jointly.

One iteration (research note 001):
1. real branch     z = E(x),  L_real = CE(G(z), y)
2. diffusion branch on u = standardise(z): L_LDM, z̃0, and the semantic terms
                   L_sem = L_LDM + η_p·L_proto + η_c·L_cov  (or η_r·L_rad)
3. generation      ẑ = DDIM_few(ε_θ) for tail-weighted classes, L_ge = CE(G(ẑ), ŷ)
4. L_total = L_real + λ_sem·L_sem + γ_ge·L_ge, one optimiser step over {E, G, θ}.

Three schedules decide, per step, which terms are on and which parameters move:
A synchronous (semantic weights warmed up), B alternating (θ-steps and E,G-steps),
C progressive (L_real → + L_sem → + L_ge with a rising pseudo share).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pfdiff.config import E2EConfig, RunConfig
from pfdiff.diffusion import make_schedule, sample_ddim
from pfdiff.evaluation import frechet_distance
from pfdiff.longtail.common import LongTailSplit, encode, init_encoder_classifier, seeded_init
from pfdiff.longtail.filtering import MahalanobisScorer, aid_filter
from pfdiff.longtail.ldmlr import build_denoiser, feature_loss
from pfdiff.longtail.semantic import PrototypeBank, covariance_loss, prototype_loss, radius_loss
from pfdiff.training import generator, shuffled_batch, train

_METHOD = re.compile(r"^e2e-(?P<strategy>[ABC])(?:-(?P<shape>proto|cov|rad))?(?P<aid>-aid)?$")


@dataclass(frozen=True)
class E2EVariant:
    strategy: str  # "A" | "B" | "C"
    shape: str  # "proto" (L_proto only) | "cov" (+ L_cov) | "rad" (+ L_rad)
    aid: bool  # AID/OOD-filter the pseudo-features before L_ge


def parse_e2e(name: str) -> E2EVariant | None:
    """``e2e-A``, ``e2e-B-cov``, ``e2e-C-rad-aid`` … → a variant; None for other method names."""
    m = _METHOD.match(name)
    if m is None:
        return None
    return E2EVariant(m["strategy"], m["shape"] or "rad", bool(m["aid"]))


class RunningScaler(nn.Module):
    """EMA per-dimension mean/std of the moving features (detached), so ε_θ always sees unit scale."""

    def __init__(self, dim: int, momentum: float = 0.05):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        rate = self.momentum if self.initialised else 1.0
        self.mean.lerp_(z.mean(0), rate)
        self.std.lerp_(z.std(0).clamp_min(1e-4), rate)
        self.initialised.fill_(True)

    def transform(self, z):
        return (z - self.mean) / self.std

    def inverse(self, u):
        return u * self.std + self.mean


class LabelMass(nn.Module):
    """Total CE weight each class received in training: the effective prior for post-hoc logit adjustment."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("mass", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def add(self, y: torch.Tensor, weight: float) -> None:
        self.mass += weight * torch.bincount(y, minlength=len(self.mass)).to(self.mass)


@dataclass
class StepPlan:
    """What one step does: loss weights and which branch moves."""

    lambda_sem: float  # weight of L_sem (0: θ gets no diffusion loss this step)
    sem_warm: float  # 0→1 warm-up factor on the semantic terms η_p·L_proto + η·L_shape inside L_sem
    gamma_ge: float
    pseudo_share: float  # C: share of pseudo rows in G's batch; A/B: ignored (fixed ge batch)
    update_theta: bool
    update_eg: bool


def plan_step(step: int, e: E2EConfig, strategy: str) -> StepPlan:
    """The schedule of strategies A, B and C (see module docstring)."""
    warm = min(1.0, step / max(1, e.warmup_steps))
    if strategy == "A":
        ge = e.gamma_ge if step % e.ge_every == 0 and step >= e.warmup_steps else 0.0
        return StepPlan(e.lambda_sem, warm, ge, 0.0, True, True)
    if strategy == "B":
        a, b = e.alternate
        theta_step = step % (a + b) < a
        ge = e.gamma_ge if (not theta_step and step >= e.warmup_steps) else 0.0
        return StepPlan(e.lambda_sem if theta_step else 0.0, warm, ge, 0.0, theta_step, not theta_step)
    p1, p2 = (int(f * e.steps) for f in e.progressive_phases)
    if step < p2:
        return StepPlan(e.lambda_sem if step >= p1 else 0.0, 1.0, 0.0, 0.0, step >= p1, True)
    frac = (step - p2) / max(1, e.steps - p2)
    share = e.pseudo_share[0] + frac * (e.pseudo_share[1] - e.pseudo_share[0])
    return StepPlan(e.lambda_sem, 1.0, e.gamma_ge, share, True, True)


class EndToEnd:
    """State and step function of one end-to-end run (one seed, one variant)."""

    def __init__(self, split: LongTailSplit, cfg: RunConfig, variant: E2EVariant, seed: int, device: torch.device,
                 log: Callable[[dict], None] | None = None, name: str = "e2e"):
        self.cfg, self.e, self.variant, self.seed, self.device = cfg, cfg.e2e, variant, seed, device
        self.name = name
        self.log = log or (lambda record: None)
        self.drift: list[dict] = []
        C = split.num_classes
        self.encoder, self.classifier = init_encoder_classifier(cfg, split.train.input_shape, C, seed, device)
        D = self.encoder.feature_dim
        self.denoiser = seeded_init(seed, "denoiser", lambda: build_denoiser(cfg, D, C), device)
        self.bank = PrototypeBank(C, D, self.e.proto_momentum).to(device)
        self.scaler = RunningScaler(D).to(device)
        self.mass = LabelMass(C).to(device)
        d = cfg.diffusion
        self.schedule = make_schedule(d.schedule, d.T).to(device)
        self.loss_fn = feature_loss(d, self.schedule, C)
        self.x = torch.as_tensor(split.train.x, device=device)
        self.y = torch.as_tensor(split.train.y, device=device)
        self.counts = torch.as_tensor(split.counts, device=device)
        self.num_classes = C
        tail = self.counts.double() ** -self.e.tail_power
        self.ge_class_probs = (tail / tail.sum()).float()
        self.scorer: MahalanobisScorer | None = None
        self.filter_stats: list[dict] = []

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "classifier": self.classifier, "denoiser": self.denoiser,
                "bank": self.bank, "scaler": self.scaler, "mass": self.mass}

    def parameters(self) -> list[nn.Parameter]:
        return [p for k in ("encoder", "classifier", "denoiser") for p in self.modules()[k].parameters()]

    # --- the three branches -------------------------------------------------------------------
    def semantic_loss(self, u: torch.Tensor, y: torch.Tensor, step: int,
                      warm: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """L_LDM^sem on standardised features u (eq. of note 001); semantic rows weighted by ᾱ_t."""
        out = self.loss_fn(self.denoiser, u, y, noise_multiplicity=1,
                           generator=generator(self.device, self.seed, "e2e-ldm", step))
        z0_hat, t = out.z0_hat[:, 0], out.t[:, 0]
        # z̃0 is only a usable estimate where the signal survives: weight the pull by ᾱ_t (→ 0 at high noise).
        w = self.schedule.alpha_bar.to(self.device)[t].float()
        mean = self.bank.mean.float()
        l_proto = (w * prototype_loss(z0_hat, y, mean)).mean()
        sem = self.e.eta_proto * l_proto
        info = {"ldm": out.loss.mean().item(), "proto": l_proto.item()}
        if self.variant.shape == "rad":
            radius = self.bank.radius(self.e.radius_scale, self.counts).float()
            l_rad = (w * radius_loss(z0_hat, y, mean, radius)).mean()
            sem = sem + self.e.eta_rad * l_rad
            info["rad"] = l_rad.item()
        elif self.variant.shape == "cov":
            keep = w > 0.5  # covariance of z̃0 is only meaningful on low-noise rows
            l_cov, matched = covariance_loss(z0_hat[keep], y[keep], self.bank.covariance.float(), self.e.cov_min_count)
            sem = sem + self.e.eta_cov * l_cov
            info.update(cov=float(l_cov.detach()), cov_classes=matched)
        return out.loss.mean() + warm * sem, info

    def generate(self, n: int, step: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n pseudo-features (raw feature space) for tail-weighted classes, few-step DDIM."""
        g = generator(self.device, self.seed, "e2e-ge", step)
        y = torch.multinomial(self.ge_class_probs, n, replacement=True, generator=g)
        noise = torch.randn(n, self.encoder.feature_dim, device=self.device, generator=g)
        with torch.set_grad_enabled(grad):
            u = sample_ddim(self.denoiser, noise, self.schedule, y, steps=self.e.ge_steps,
                            prediction=self.cfg.diffusion.prediction)
        z = self.scaler.inverse(u)
        if self.variant.aid and self.scorer is not None:
            result = aid_filter(self.scorer, z.detach(), y, self.num_classes, self.e.aid_quantile)
            self.filter_stats.append(result.summary())
            z, y = z[result.keep], y[result.keep]
        return z, y

    def step(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if step % self.e.drift_every == 0:
            self.refresh(step)
        plan = plan_step(step, self.e, self.variant.strategy)
        idx = shuffled_batch(len(self.y), self.e.batch_size, step, self.seed).to(self.device)
        x, y = self.x[idx], self.y[idx]
        with torch.set_grad_enabled(plan.update_eg):
            z = self.encoder(x)
        self.scaler.update(z)
        u = self.scaler.transform(z if self.e.ldm_grad_to_encoder and plan.update_eg else z.detach())
        self.bank.update(u, y)
        total = z.new_zeros(())
        info: dict[str, float] = {}
        if plan.update_eg:
            l_real = nn.functional.cross_entropy(self.classifier(z), y)
            total = total + l_real
            self.mass.add(y, 1.0 / len(y))
            info["real"] = l_real.item()
        if plan.update_theta:
            l_sem, sem_info = self.semantic_loss(u, y, step, plan.sem_warm)
            total = total + plan.lambda_sem * l_sem
            info.update(sem_info)
        if plan.update_eg and plan.gamma_ge > 0:
            total = total + plan.gamma_ge * self.generation_loss(plan, len(y), step, info)
        return total, info

    def generation_loss(self, plan: StepPlan, n_real: int, step: int, info: dict) -> torch.Tensor:
        n = self.e.ge_batch if plan.pseudo_share == 0 else max(1, round(n_real * plan.pseudo_share / (1 - plan.pseudo_share)))
        through_sampler = self.e.ge_grad_to_denoiser and plan.update_theta
        z_hat, y_hat = self.generate(n, step, grad=through_sampler)
        if len(y_hat) == 0:
            return z_hat.new_zeros(())
        self.bank.update(self.scaler.transform(z_hat.detach()), y_hat, weight=self.e.pseudo_proto_weight)
        l_ge = nn.functional.cross_entropy(self.classifier(z_hat if through_sampler else z_hat.detach()), y_hat)
        self.mass.add(y_hat, plan.gamma_ge / n_real)
        info["ge"] = l_ge.item()
        return l_ge

    # --- periodic refresh: scorer for the AID filter, drift measurement --------------------------
    @torch.no_grad()
    def refresh(self, step: int) -> dict[str, Any]:
        """Refit the AID scorer on current real features and measure pseudo/real drift (mean per-class FD)."""
        z = encode(self.encoder, self.x)
        self.encoder.train()
        self.scorer = MahalanobisScorer(z, self.y, self.num_classes)
        n = self.e.drift_per_class
        y_hat = torch.arange(self.num_classes, device=self.device).repeat_interleave(n)
        noise = torch.randn(len(y_hat), z.shape[1], device=self.device,
                            generator=generator(self.device, self.seed, "drift", step))
        u = sample_ddim(self.denoiser, noise, self.schedule, y_hat, steps=self.e.ge_steps,
                        prediction=self.cfg.diffusion.prediction)
        record = {"event": "drift", "method": self.name, "step": step,
                  **drift_distances(z, self.y, self.scaler.inverse(u), y_hat)}
        self.drift.append(record)
        self.log(record)
        return record

    def effective_prior(self) -> torch.Tensor:
        """Class mass G was trained on (real + weighted pseudo rows), for post-hoc logit adjustment."""
        return self.mass.mass.float().clamp_min(1e-12)


def train_end_to_end(split: LongTailSplit, cfg: RunConfig, variant: E2EVariant, seed: int, device: torch.device,
                     checkpoint: Path | None, log: Callable[[dict], None] | None, name: str) -> EndToEnd:
    """Train one variant; checkpoints fall on drift-refresh steps so a resumed run repeats its numbers."""
    e = cfg.e2e
    run = EndToEnd(split, cfg, variant, seed, device, log, name)
    opt = torch.optim.AdamW(run.parameters(), lr=e.lr, weight_decay=e.weight_decay)
    every = e.drift_every * max(1, round(cfg.checkpoint_every / e.drift_every))
    train(run.modules(), opt, run.step, e.steps, description=f"seed {seed} · {name}", checkpoint=checkpoint,
          checkpoint_every=every, log=log)
    run.refresh(e.steps)
    return run


def per_class_frechet(z, y, z_hat, y_hat) -> list[float | None]:
    """FD between each class's pseudo-features and its real features (None: fewer than 2 on a side)."""
    out: list[float | None] = []
    for c in range(int(y.max()) + 1):
        real, fake = z[y == c].cpu().numpy(), z_hat[y_hat == c].cpu().numpy()
        out.append(frechet_distance(real, fake) if len(real) >= 2 and len(fake) >= 2 else None)
    return out


def class_mean_frechet(z, y, z_hat, y_hat) -> float:
    """Mean over classes (with ≥ 2 real and pseudo samples) of the Fréchet distance of pseudo to real."""
    values = [v for v in per_class_frechet(z, y, z_hat, y_hat) if v is not None]
    return float(np.mean(values)) if values else float("nan")


def drift_distances(z, y, z_hat, y_hat) -> dict[str, float]:
    """Mean per-class FD of pseudo- to real features, raw and relative to the real features' total
    variance tr Cov(z): FD scales with the square of the feature scale, and every encoder (frozen,
    fine-tuned, end-to-end) has its own, so only the relative value compares across methods."""
    fd = class_mean_frechet(z, y, z_hat, y_hat)
    total_variance = float(torch.var(z.double(), dim=0).sum())
    return {"frechet": fd, "frechet_rel": fd / total_variance if total_variance > 0 else float("nan")}
