"""End-to-end latent diffusion for long-tailed recognition: E, G and ε_θ trained jointly.

One iteration (research note 001):
1. real branch     z = E(x),  L_real = CE(G(z), y)   (balanced softmax with ``-bal``)
2. diffusion branch on u = standardise(z): L_LDM, z̃0, and the semantic terms
                   L_sem = L_LDM + η_p·L_proto + η_c·L_cov  (or η_r·L_rad)
3. generation      ẑ = DDIM_few(ε_θ) for tail-weighted classes, L_ge = CE(G(ẑ), ŷ)
4. L_total = L_real + λ_sem·L_sem + γ_ge·L_ge, one optimiser step over {E, G, θ}.

The **coupled** objective is the default, as the note minimises L_total over {E, G, θ} together
(:class:`Routing`): L_LDM^sem's gradient reaches E, L_ge's gradient flows back through the few-step
sampler into θ, and into E through the scaler's statistics of the real batch (ẑ = û·σ + μ with
straight-through batch μ, σ: the EMA values, the batch's gradient). ``-detached`` is the ablation with
all three cut (E then learns from CE alone, θ from L_sem alone).

Three schedules decide, per step, which terms are on: A synchronous (semantic weights warmed up),
B alternating (θ-steps: L_sem; E,G-steps: L_real + L_ge — with coupling each also moves what its
gradient reaches), C progressive (L_real → + L_sem → + L_ge, the pseudo share s of G's loss mass rising:
G's loss is (1 − s)·L_real + s·L_ge and the label mass books exactly those weights).

Method names: ``e2e-{A,B,C}`` followed by options in any order: a shape term ``-proto | -cov | -rad``
(default rad), a filter ``-aid`` (in distribution) or ``-bnd`` (in distribution and near G's boundary),
``-bal`` (G trained with balanced softmax on real + pseudo rows), ``-wide`` (sampler noise ×
``wide_temperature``), ``-detached`` (routings off), ``-ws1`` / ``-ws2`` (warm start from stage 1 /
stages 1 and 2).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pfdiff.config import E2EConfig, RunConfig
from pfdiff.diffusion import sample_ddim
from pfdiff.evaluation import frechet_distance
from pfdiff.longtail.common import LongTailSplit, augmenter, encode, init_encoder_classifier, seeded_init
from pfdiff.longtail.filtering import FilterResult, MahalanobisScorer, aid_filter, boundary_filter
from pfdiff.longtail.ldmlr import build_denoiser, feature_loss
from pfdiff.longtail.losses import balanced_softmax, log_prior
from pfdiff.longtail.semantic import PrototypeBank, covariance_loss, prototype_loss, radius_loss
from pfdiff.training import generator, make_scheduler, optimizer_options, shuffled_batch, steps_per_epoch, train

_METHOD = re.compile(r"^e2e-(?P<strategy>[ABC])(?P<options>(?:-[a-z0-9]+)*)$")
OPTIONS = {"proto": ("shape", "proto"), "cov": ("shape", "cov"), "rad": ("shape", "rad"),
           "aid": ("filter", "aid"), "bnd": ("filter", "bnd"), "bal": ("balanced", True), "wide": ("wide", True),
           "detached": ("detached", True), "ws1": ("warm", "stage1"), "ws2": ("warm", "stage2")}
TERMS = ("real", "ldm", "proto", "shape", "ge")  # the parts of L_total whose shares a run reports


@dataclass(frozen=True)
class E2EVariant:
    strategy: str  # "A" | "B" | "C"
    shape: str = "rad"  # "proto" (L_proto only) | "cov" (+ L_cov) | "rad" (+ L_rad)
    filter: str = "none"  # "none" | "aid" (AID/OOD filter) | "bnd" (AID + near G's decision boundary)
    balanced: bool = False  # G's loss on real and pseudo rows: balanced softmax instead of CE
    wide: bool = False  # sampler's initial noise × e2e.wide_temperature
    detached: bool = False  # the three coupled gradient routings off
    warm: str | None = None  # "stage1" | "stage2"; None: e2e.warm_start

    @property
    def aid(self) -> bool:
        return self.filter != "none"


def parse_e2e(name: str) -> E2EVariant | None:
    """``e2e-A``, ``e2e-B-cov``, ``e2e-C-rad-aid-bal`` … → a variant; None for other names (or an unknown or
    repeated option, which ``parse_method`` then reports with the grammar)."""
    m = _METHOD.match(name)
    if m is None:
        return None
    fields: dict[str, Any] = {}
    for option in m["options"].split("-")[1:]:
        if option not in OPTIONS or OPTIONS[option][0] in fields:
            return None
        key, value = OPTIONS[option]
        fields[key] = value
    return E2EVariant(m["strategy"], **fields)


@dataclass(frozen=True)
class Routing:
    """Which gradients of the coupled objective are on (see module docstring)."""

    ldm_to_encoder: bool
    ge_to_denoiser: bool
    ge_to_encoder: bool

    @classmethod
    def of(cls, e: E2EConfig, variant: E2EVariant) -> "Routing":
        if variant.detached:
            return cls(False, False, False)
        return cls(e.ldm_grad_to_encoder, e.ge_grad_to_denoiser, e.ge_grad_to_encoder)


def e2e_budget(cfg: RunConfig, n_train: int) -> tuple[int, int]:
    """(steps, batch size) of an E2E run: ``e2e.steps`` / ``e2e.batch_size``, else stage 1's — as many
    encoder steps (epochs × ⌈N/B⌉) at its batch size, so E2E and stage 1 are compared at equal encoder steps."""
    o, e = cfg.stage1, cfg.e2e
    steps = e.steps if e.steps is not None else o.epochs * steps_per_epoch(n_train, o.batch_size)
    return steps, e.batch_size if e.batch_size is not None else o.batch_size


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

    @torch.no_grad()
    def set(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Start from a fitted scaler (warm start from stage 2)."""
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.initialised.fill_(True)

    def coupled(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) with the EMA's values and the gradient of the batch's own statistics: the path by which
        a loss on ẑ = û·σ + μ reaches E (straight-through; the values the sampler's output is mapped with
        do not change)."""
        m, s = z.mean(0), z.std(0).clamp_min(1e-4)
        return self.mean + (m - m.detach()), self.std + (s - s.detach())

    def transform(self, z):
        return (z - self.mean) / self.std

    def inverse(self, u):
        return u * self.std + self.mean


class LabelMass(nn.Module):
    """Total G-loss weight each class received in training: the effective prior for post-hoc logit adjustment
    (a row of a loss term with weight w over n rows books w/n to its class)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("mass", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def add(self, y: torch.Tensor, weight: float) -> None:
        self.mass += weight * torch.bincount(y, minlength=len(self.mass)).to(self.mass)


class Totals(nn.Module):
    """Run totals kept as buffers (checkpointed, so a resumed run reports the same): pseudo-features generated
    and kept per class by the filter, filter calls, and Σ|term| of each part of L_total (``TERMS``)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("generated", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("kept", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("terms", torch.zeros(len(TERMS), dtype=torch.float64))
        self.register_buffer("term_steps", torch.zeros(len(TERMS), dtype=torch.long))

    @torch.no_grad()
    def add_filter(self, result: FilterResult) -> None:
        self.generated += torch.as_tensor(result.generated_per_class, device=self.generated.device)
        self.kept += torch.as_tensor(result.kept_per_class, device=self.kept.device)
        self.calls += 1

    @torch.no_grad()
    def add_term(self, name: str, value: torch.Tensor) -> None:
        i = TERMS.index(name)
        self.terms[i] += value.detach().abs().to(self.terms.dtype)  # stays on the device: no host sync per term
        self.term_steps[i] += 1

    def filter_summary(self) -> dict[str, Any]:
        gen, kept = self.generated.tolist(), self.kept.tolist()
        return {"generated_per_class": gen, "kept_per_class": kept,
                "kept_fraction_per_class": [k / g if g else None for k, g in zip(kept, gen)],
                "kept_fraction": sum(kept) / sum(gen) if sum(gen) else None, "filter_calls": int(self.calls),
                "no_generation": int(self.calls) > 0 and sum(kept) == 0}

    def loss_shares(self) -> dict[str, float]:
        """Each term's share of Σ over steps of |weighted term| (the weights λ, η, γ, warm-up included)."""
        total = float(self.terms.sum())
        return {k: float(v) / total if total > 0 else 0.0 for k, v in zip(TERMS, self.terms.tolist())}


@dataclass
class StepPlan:
    """What one step does: loss weights and which branch runs."""

    lambda_sem: float  # weight of L_sem (0: no diffusion loss this step)
    sem_warm: float  # 0→1 warm-up factor on the semantic terms η_p·L_proto + η·L_shape inside L_sem
    gamma_ge: float  # weight of L_ge in G's loss (C: the pseudo share s)
    pseudo_share: float  # C: share s of G's loss mass (and rows) on pseudo-features; A/B: 0 (fixed ge batch)
    update_theta: bool  # the diffusion branch runs (θ-step)
    update_eg: bool  # the real and generation branches run (E,G-step)
    real_weight: float = 1.0  # weight of L_real (C: 1 − s)


def plan_step(step: int, e: E2EConfig, strategy: str, steps: int | None = None) -> StepPlan:
    """The schedule of strategies A, B and C (see module docstring); ``steps``: the run's length (default
    ``e.steps``)."""
    total = steps if steps is not None else e.steps
    if total is None:
        raise ValueError("plan_step needs the run's number of steps (e2e.steps is None: see e2e_budget)")
    warmup = min(e.warmup_steps, total // 5)  # a short run still reaches its generation phase
    warm = min(1.0, step / max(1, warmup))
    if strategy == "A":
        ge = e.gamma_ge if step % e.ge_every == 0 and step >= warmup else 0.0
        return StepPlan(e.lambda_sem, warm, ge, 0.0, True, True)
    if strategy == "B":
        a, b = e.alternate
        theta_step = step % (a + b) < a
        ge = e.gamma_ge if (not theta_step and step >= warmup) else 0.0
        return StepPlan(e.lambda_sem if theta_step else 0.0, warm, ge, 0.0, theta_step, not theta_step)
    p1, p2 = (int(f * total) for f in e.progressive_phases)
    if step < p2 or e.gamma_ge == 0:
        return StepPlan(e.lambda_sem if step >= p1 else 0.0, 1.0, 0.0, 0.0, step >= p1, True)
    frac = (step - p2) / max(1, total - p2)
    share = e.pseudo_share[0] + frac * (e.pseudo_share[1] - e.pseudo_share[0])
    return StepPlan(e.lambda_sem, 1.0, share, share, True, True, real_weight=1.0 - share)


class EndToEnd:
    """State and step function of one end-to-end run (one seed, one variant). ``init``: warm-start modules
    (``encoder``, ``classifier``; with stage 2 also ``denoiser`` and ``scaler`` = (mean, std)), copied."""

    def __init__(self, split: LongTailSplit, cfg: RunConfig, variant: E2EVariant, seed: int, device: torch.device,
                 log: Callable[[dict], None] | None = None, name: str = "e2e", init: dict[str, Any] | None = None):
        self.cfg, self.e, self.variant, self.seed, self.device = cfg, cfg.e2e, variant, seed, device
        self.name = name
        self.log = log or (lambda record: None)
        self.routing = Routing.of(cfg.e2e, variant)
        self.steps, self.batch_size = e2e_budget(cfg, len(split.train.y))
        self.drift: list[dict] = []
        init = init or {}
        C = split.num_classes
        if "encoder" in init:
            self.encoder, self.classifier = copy.deepcopy(init["encoder"]), copy.deepcopy(init["classifier"])
        else:
            self.encoder, self.classifier = init_encoder_classifier(cfg, split.train.input_shape, C, seed, device)
        D = self.encoder.feature_dim
        self.denoiser = (copy.deepcopy(init["denoiser"]) if "denoiser" in init else
                         seeded_init(seed, "denoiser", lambda: build_denoiser(cfg, D, C), device))
        self.bank = PrototypeBank(C, D, self.e.proto_momentum).to(device)
        self.z0_bank = PrototypeBank(C, D, self.e.proto_momentum).to(device)  # EMA moments of z̃0 (L_cov)
        self.scaler = RunningScaler(D).to(device)
        if "scaler" in init:
            self.scaler.set(*init["scaler"])
        self.mass = LabelMass(C).to(device)
        self.totals = Totals(C).to(device)
        d = cfg.diffusion
        self.schedule = d.make_schedule().to(device)
        self.loss_fn = feature_loss(d, self.schedule, C)
        self.x = torch.as_tensor(split.train.x, device=device)
        self.y = torch.as_tensor(split.train.y, device=device)
        self.augment = augmenter(cfg.stage1, split.train.input_shape)  # stage 1's recipe: equal footing
        self.counts = torch.as_tensor(split.counts, device=device)
        self.num_classes = C
        tail = self.counts.double().clamp_min(1) ** -self.e.tail_power
        self.ge_class_probs = (tail / tail.sum()).float()
        self.scorer: MahalanobisScorer | None = None
        self.last_filter: dict | None = None
        self.last_samples: tuple[torch.Tensor, torch.Tensor] | None = None  # the last refresh's balanced samples

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "classifier": self.classifier, "denoiser": self.denoiser,
                "bank": self.bank, "z0_bank": self.z0_bank, "scaler": self.scaler, "mass": self.mass,
                "totals": self.totals}

    def param_groups(self) -> list[dict]:
        """E and G with stage 1's lr and weight decay, θ with e2e.lr and e2e.weight_decay (AdamW)."""
        o = self.cfg.stage1
        eg = [*self.encoder.parameters(), *self.classifier.parameters()]
        return [{"params": eg, "lr": o.lr, "weight_decay": o.weight_decay},
                {"params": list(self.denoiser.parameters()), "lr": self.e.lr, "weight_decay": self.e.weight_decay}]

    # --- G's loss ------------------------------------------------------------------------------------
    def g_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example loss of G: CE, or (``-bal``) balanced softmax with the label mass G has been trained on
        so far (the real counts before the first step) as its prior."""
        if not self.variant.balanced:
            return nn.functional.cross_entropy(logits, y, reduction="none")
        mass = self.mass.mass.float()
        counts = torch.as_tensor(self.counts, dtype=mass.dtype, device=mass.device)
        prior = torch.where(mass.sum() == 0, counts, mass)  # a device-side choice: no host sync per step
        return balanced_softmax(logits, y, log_prior(prior, logits.device))

    # --- the three branches -------------------------------------------------------------------
    def semantic_loss(self, u: torch.Tensor, y: torch.Tensor, step: int,
                      warm: float = 1.0) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        """L_LDM^sem on standardised features u (eq. of note 001); semantic rows weighted by ᾱ_t. Returns
        (loss, logged values, the weighted parts ldm / proto / shape)."""
        out = self.loss_fn(self.denoiser, u, y, noise_multiplicity=1,
                           generator=generator(self.device, self.seed, "e2e-ldm", step))
        z0_hat, t = out.z0_hat[:, 0], out.t[:, 0]
        # z̃0 is only a usable estimate where the signal survives: weight the pull by ᾱ_t (→ 0 at high noise).
        w = self.schedule.alpha_bar.to(self.device)[t].float()
        mean = self.bank.mean.float()
        l_proto = (w * prototype_loss(z0_hat, y, mean)).mean()
        l_ldm = out.loss.mean()
        parts = {"ldm": l_ldm, "proto": warm * self.e.eta_proto * l_proto}
        info = {"ldm": l_ldm.detach(), "proto": l_proto.detach()}  # read every log_every steps by run_steps
        if self.variant.shape == "rad":
            radius = self.bank.radius(self.e.radius_scale, self.counts).float()
            l_rad = (w * radius_loss(z0_hat, y, mean, radius)).mean()
            parts["shape"] = warm * self.e.eta_rad * l_rad
            info["rad"] = l_rad.detach()
        elif self.variant.shape == "cov":
            l_cov, matched = self.covariance_term(z0_hat, y, w)
            parts["shape"] = warm * self.e.eta_cov * l_cov
            info.update(cov=l_cov.detach(), cov_classes=matched)
        return sum(parts.values()), info, parts

    def covariance_term(self, z0_hat: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """L_cov on the low-noise rows (ᾱ_t > 0.5). With ``cov_shrink`` k > 0 the estimate borrows k rows of
        z̃0's EMA covariance about the prototype and the target is Σ_y shrunk towards the pooled covariance,
        so every class in the batch — tail included — is matched; with k = 0 the batch-only form."""
        keep = w > 0.5
        zk, yk = z0_hat[keep], y[keep]
        k = self.e.cov_shrink
        if k == 0:
            return covariance_loss(zk, yk, self.bank.covariance.float(), self.e.cov_min_count)
        target = self.bank.shrunk_covariance(self.counts, k).float()
        centre = self.bank.mean.float()
        running = torch.where(self.z0_bank.seen[:, None, None], self.z0_bank.scatter_about(self.bank.mean).float(),
                              target)
        loss = covariance_loss(zk, yk, target, centre=centre, running=running, shrink=k)
        self.z0_bank.update(zk, yk)
        return loss

    def sample(self, n: int, step: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n standardised pseudo-features û for tail-weighted classes (few-step DDIM) and their labels."""
        g = generator(self.device, self.seed, "e2e-ge", step)
        y = torch.multinomial(self.ge_class_probs, n, replacement=True, generator=g)
        noise = torch.randn(n, self.encoder.feature_dim, device=self.device, generator=g)
        if self.variant.wide:
            noise = noise * self.e.wide_temperature
        with torch.set_grad_enabled(grad):
            u = sample_ddim(self.cfg.diffusion.denoiser(self.denoiser, self.schedule), noise, y, self.e.ge_steps)
        return u, y

    def filtered(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The variant's filter (scorer refitted on the current encoder every ``drift_every`` steps)."""
        if self.variant.filter == "none" or self.scorer is None:
            return z, y
        e = self.e
        if self.variant.filter == "aid":
            result = aid_filter(self.scorer, z.detach(), y, self.num_classes, e.aid_quantile)
        else:
            result = boundary_filter(self.scorer, self.classifier, z.detach(), y, self.num_classes,
                                     e.aid_quantile, e.boundary_quantile)
        self.totals.add_filter(result)
        self.last_filter = result.summary()
        return z[result.keep], y[result.keep]

    def generation_loss(self, plan: StepPlan, n_real: int, step: int, info: dict,
                        z_real: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mean G-loss on the kept pseudo-features, their labels); (None, None) when the filter kept nothing.
        The gradient reaches θ through the sampler (``ge_to_denoiser``) and E through the scaler statistics of
        ``z_real`` (``ge_to_encoder``)."""
        share = plan.pseudo_share
        n = self.e.ge_batch if share == 0 else max(1, round(n_real * share / (1 - share)))
        r = self.routing
        u_hat, y_hat = self.sample(n, step, grad=r.ge_to_denoiser)
        if r.ge_to_encoder and z_real is not None and z_real.requires_grad:
            mean, std = self.scaler.coupled(z_real)
        else:
            mean, std = self.scaler.mean, self.scaler.std
        z_hat, y_hat = self.filtered(u_hat * std + mean, y_hat)
        if len(y_hat) == 0:
            return None, None
        self.bank.update(self.scaler.transform(z_hat.detach()), y_hat, weight=self.e.pseudo_proto_weight)
        l_ge = self.g_loss(self.classifier(z_hat), y_hat).mean()
        info["ge"] = l_ge.detach()
        return l_ge, y_hat

    def step(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if step % self.e.drift_every == 0:
            self.refresh(step)
        plan = plan_step(step, self.e, self.variant.strategy, self.steps)
        r = self.routing
        idx = shuffled_batch(len(self.y), self.batch_size, step, self.seed, self.device)
        x, y = self.x[idx], self.y[idx]
        if self.augment is not None:
            x = self.augment(x, self.seed, step)
        with torch.set_grad_enabled(plan.update_eg or (plan.update_theta and r.ldm_to_encoder)):
            z = self.encoder(x)
        self.scaler.update(z)
        if r.ldm_to_encoder and z.requires_grad:
            # standardised with straight-through batch statistics: L_LDM is then invariant (to first order) to
            # E's feature scale; with the detached EMA alone, shrinking every feature lowers L_LDM (less signal
            # to denoise) and the coupled encoder collapses its features (measured: CE 0.56 → 1.58 at step 200)
            mean, std = self.scaler.coupled(z)
            u = (z - mean) / std
        else:
            u = self.scaler.transform(z.detach())
        self.bank.update(u, y)
        total = z.new_zeros(())
        info: dict[str, float] = {}
        l_ge = y_hat = None
        if plan.update_eg and plan.gamma_ge > 0:
            l_ge, y_hat = self.generation_loss(plan, len(y), step, info, z)
        # C: G's loss is (1 − s)·L_real + s·L_ge; with nothing kept there is no pseudo share to give
        real_w = plan.real_weight if l_ge is not None else 1.0
        if plan.update_eg:
            l_real = real_w * self.g_loss(self.classifier(z), y).mean()
            total = total + l_real
            self.mass.add(y, real_w / len(y))
            self.totals.add_term("real", l_real)
            info["real"] = l_real.detach() / real_w
        if l_ge is not None:
            total = total + plan.gamma_ge * l_ge
            self.mass.add(y_hat, plan.gamma_ge / len(y_hat))
            self.totals.add_term("ge", plan.gamma_ge * l_ge)
        if plan.update_theta:
            l_sem, sem_info, parts = self.semantic_loss(u, y, step, plan.sem_warm)
            total = total + plan.lambda_sem * l_sem
            for k, v in parts.items():
                self.totals.add_term(k, plan.lambda_sem * v)
            info.update(sem_info)
        return total, info

    # --- periodic refresh: scorer for the filter, drift measurement --------------------------
    @torch.no_grad()
    def refresh(self, step: int) -> dict[str, Any]:
        """Refit the filter's scorer on the current real features and measure pseudo/real drift (mean
        per-class FD) on a class-balanced sample, kept for the coverage metric."""
        z = encode(self.encoder, self.x)
        self.encoder.train()
        self.scorer = MahalanobisScorer(z, self.y, self.num_classes)
        n = self.e.drift_per_class
        y_hat = torch.arange(self.num_classes, device=self.device).repeat_interleave(n)
        noise = torch.randn(len(y_hat), z.shape[1], device=self.device,
                            generator=generator(self.device, self.seed, "drift", step))
        if self.variant.wide:
            noise = noise * self.e.wide_temperature
        u = sample_ddim(self.cfg.diffusion.denoiser(self.denoiser, self.schedule), noise, y_hat, self.e.ge_steps)
        self.last_samples = (self.scaler.inverse(u), y_hat)
        record = {"event": "drift", "method": self.name, "step": step,
                  **drift_distances(z, self.y, self.last_samples[0], y_hat)}
        self.drift.append(record)
        self.log(record)
        return record

    def effective_prior(self) -> torch.Tensor:
        """Class mass G was trained on (real + weighted pseudo rows), for post-hoc logit adjustment."""
        return self.mass.mass.float().clamp_min(1e-12)

    def diagnostics(self) -> dict[str, Any]:
        """What a report shows of this run: routing, budget, loss shares, filter totals."""
        out = {"routing": {"ldm_to_encoder": self.routing.ldm_to_encoder,
                           "ge_to_denoiser": self.routing.ge_to_denoiser,
                           "ge_to_encoder": self.routing.ge_to_encoder},
               "steps": self.steps, "batch_size": self.batch_size, "loss_shares": self.totals.loss_shares()}
        if self.variant.filter != "none":
            out["filter"] = {"kind": self.variant.filter, **self.totals.filter_summary(), "last": self.last_filter}
        return out


def train_end_to_end(split: LongTailSplit, cfg: RunConfig, variant: E2EVariant, seed: int, device: torch.device,
                     checkpoint: Path | None, log: Callable[[dict], None] | None, name: str,
                     init: dict[str, Any] | None = None) -> EndToEnd:
    """Train one variant with stage 1's lr schedule (over the E2E steps); checkpoints fall on drift-refresh
    steps so a resumed run repeats its numbers."""
    e, o = cfg.e2e, cfg.stage1
    run = EndToEnd(split, cfg, variant, seed, device, log, name, init)
    opt = torch.optim.AdamW(run.param_groups(), **optimizer_options())
    per_epoch = steps_per_epoch(len(split.train.y), o.batch_size)
    scheduler = make_scheduler(opt, o.schedule, run.steps, round(o.warmup_epochs * per_epoch),
                               tuple(round(f * run.steps) for f in o.step_milestones), o.step_gamma)
    every = e.drift_every * max(1, round(cfg.checkpoint_every / e.drift_every))
    train(run.modules(), opt, run.step, run.steps, description=f"seed {seed} · {name}", checkpoint=checkpoint,
          checkpoint_every=every, log=log, scheduler=scheduler)
    run.refresh(run.steps)
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
