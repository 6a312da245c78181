"""LDMLR (Han et al., CVPR 2024 W): feature diffusion on a frozen encoder, pseudo-features re-balance G.

Stage 1 is ``baselines.train_stage1``. Stage 2 trains a class-conditional ε_θ(z_t, t, y) on the
standardised features z = E(x); stage 3 samples labelled pseudo-features and fine-tunes G on real
and pseudo features together.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pfdiff import distributed
from pfdiff.config import DiffusionConfig, PseudoConfig, RunConfig
from pfdiff.diffusion import ClassifierFreeGuidance, DiffusionLoss, NoiseSchedule, generate
from pfdiff.longtail.common import seeded_init, train_classifier_on_features
from pfdiff.models import FeatureDenoiser, skip_for
from pfdiff.training import EMA, generator, optimizer_options, shuffled_batch, steps_per_epoch, train


@dataclass
class FeatureScaler:
    """Per-dimension standardisation, so the diffusion sees features of unit scale (as its prior assumes)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, z: torch.Tensor, eps: float = 1e-6) -> "FeatureScaler":
        return cls(z.mean(0), z.std(0).clamp_min(eps))

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.std + self.mean


def build_denoiser(cfg: RunConfig, feature_dim: int, num_classes: int) -> FeatureDenoiser:
    m = cfg.model
    return FeatureDenoiser(feature_dim, num_classes, m.denoiser_hidden, m.denoiser_depth, m.time_dim,
                           skip=skip_for(feature_dim, m.denoiser_skip))


def feature_loss(d: DiffusionConfig, schedule: NoiseSchedule, num_classes: int, **kwargs) -> DiffusionLoss:
    """The configured diffusion loss of the class-conditional feature denoiser (label ``num_classes`` = null,
    for CFG's label drop); ``kwargs`` (e.g. ``t_max``) go to ``DiffusionLoss``."""
    return DiffusionLoss(schedule, **d.loss_options(), cond_drop_prob=d.cond_drop_prob, null_label=num_classes,
                         **kwargs)


def train_feature_diffusion(u: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: RunConfig, seed: int,
                            checkpoint: Path | None, log: Callable[[dict], None] | None,
                            ) -> tuple[nn.Module, NoiseSchedule]:
    """Stage 2: fit ε_θ on standardised features ``u``; returns the EMA denoiser and its schedule.

    Under torchrun (``pfdiff.distributed``) every process takes its rows of the same batch through the
    DDP-wrapped denoiser, with the diffusion draws (t, ε, label drop) the whole batch gets from the step's
    generator; the averaged gradient is the whole batch's, so the weights equal a single process's up to float
    rounding. The logged loss is rank 0's part of the batch loss (×W)."""
    d = cfg.diffusion
    schedule = d.make_schedule().to(u.device)
    denoiser = seeded_init(seed, "denoiser", lambda: build_denoiser(cfg, u.shape[1], num_classes), u.device)
    loss_fn = feature_loss(d, schedule, num_classes)
    opt = torch.optim.Adam(denoiser.parameters(), lr=d.lr, **optimizer_options())
    ema = EMA(denoiser, d.ema_decay)

    world = distributed.world_size()
    distributed.check_batch_size(d.batch_size, "diffusion.batch_size")
    net = distributed.wrap(denoiser)  # DDP under torchrun; optimizer, EMA and checkpoint keep the denoiser

    def step_fn(step: int):
        idx = shuffled_batch(len(y), d.batch_size, step, seed).to(u.device)
        g = generator(u.device, seed, "ldm", step)
        if world == 1:
            return loss_fn(denoiser, u[idx], y[idx], generator=g).loss.mean(), {}
        rows = distributed.rows(len(idx))  # this process's rows, with the draws the whole batch gets from g
        out = loss_fn(net, u[idx[rows]], y[idx[rows]], generator=g, shard=(rows.start, len(idx)))
        return distributed.part(out.loss.sum(), len(idx)), {}

    train({"denoiser": denoiser}, opt, step_fn, d.steps, description=f"seed {seed} · stage 2: ε_θ",
          ema=ema, checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, log=log)
    return ema.module, schedule


def pseudo_counts(counts: np.ndarray, p: PseudoConfig) -> np.ndarray:
    """How many pseudo-features to generate per class (default: fill every class up to n_max).

    ``proportional`` is what LDMLR's released code does (max(round(0.2·n_c), 5) per class): augmentation
    that keeps the imbalance, so the stage-3 prior stays long-tailed and its logit-space correction (LSC)
    divides by the *real* training prior (:func:`stage3_prior`)."""
    counts = np.asarray(counts)
    if p.fill == "max":
        return counts.max() - counts
    if p.fill == "fixed":
        return np.full_like(counts, p.per_class)
    if p.fill == "proportional":
        return np.maximum(np.round(p.proportion * counts).astype(int), p.min_per_class) * (counts > 0)
    return np.maximum(0, np.round(p.ratio * counts.max()).astype(int) - counts)


def stage3_prior(counts: np.ndarray, generated: np.ndarray, p: PseudoConfig) -> np.ndarray:
    """The prior post-hoc logit adjustment divides by after stage 3.

    Proportional fill (LDMLR's LSC): the *real* training prior — the authors divide the stage-3 probabilities
    by it. Otherwise the effective class mass G was fine-tuned on (real + weighted pseudo-features); after
    fill-to-max that is flat, so +la then changes nothing unless τ (chosen on validation) says otherwise."""
    counts = np.asarray(counts, dtype=float)
    if p.fill == "proportional":
        return counts
    return counts + p.pseudo_weight * np.asarray(generated, dtype=float)


def sample_features(denoiser: nn.Module, schedule: NoiseSchedule, per_class: np.ndarray, d: DiffusionConfig,
                    seed: int, device: torch.device, tag: str = "pseudo") -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled pseudo-features of every class, in sampler calls of at most ``d.sample_batch`` rows.

    The initial noise of all rows is drawn first (one generator), so the chunking does not change the samples
    of a deterministic sampler (DDIM with η = 0, Heun); a stochastic one (η > 0, DDPM) draws its step noise
    per chunk from one generator in chunk order."""
    y = torch.repeat_interleave(torch.arange(len(per_class), device=device), torch.as_tensor(per_class, device=device))
    if len(y) == 0:
        return torch.empty(0, denoiser.dim, device=device), y
    net = denoiser
    if d.guidance_scale != 1.0:
        net = ClassifierFreeGuidance(denoiser, null_label=len(per_class), scale=d.guidance_scale)
    noise = torch.randn(len(y), denoiser.dim, device=device, generator=generator(device, seed, tag))
    den, steps_gen = d.denoiser(net, schedule), generator(device, seed, tag, "steps")
    u = torch.empty_like(noise)  # filled chunk by chunk: no second copy of the request
    for i in range(0, len(y), d.sample_batch):
        u[i:i + d.sample_batch] = generate(d.sampler, den, noise[i:i + d.sample_batch], y[i:i + d.sample_batch],
                                           d.sample_steps, eta=d.eta, generator=steps_gen)
    return u, y


def finetune_with_pseudo(classifier: nn.Module, z: torch.Tensor, y: torch.Tensor, z_pseudo: torch.Tensor,
                         y_pseudo: torch.Tensor, cfg: RunConfig, seed: int, checkpoint: Path | None,
                         log: Callable[[dict], None] | None, name: str = "LDMLR") -> nn.Module:
    """Stage 3: fine-tune a copy of G on real + pseudo features (pseudo terms weighted by pseudo_weight)."""
    p = cfg.pseudo
    g = copy.deepcopy(classifier)
    z_all, y_all = torch.cat([z, z_pseudo]), torch.cat([y, y_pseudo])
    w = torch.cat([torch.ones(len(y), device=z.device), torch.full((len(y_pseudo),), p.pseudo_weight, device=z.device)])
    batch = p.finetune_batch_size or cfg.stage1.batch_size
    wd = cfg.stage1.weight_decay if p.finetune_weight_decay is None else p.finetune_weight_decay
    return train_classifier_on_features(
        g, z_all, y_all, epochs=p.finetune_epochs, batch_size=batch, lr=p.finetune_lr,
        weight_decay=wd, seed=seed, description=f"seed {seed} · stage 3: {name} G",
        weights=w, checkpoint=checkpoint, log=log)


def finetune_encoder_with_pseudo(encoder: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                 z_pseudo: torch.Tensor, y_pseudo: torch.Tensor, cfg: RunConfig, seed: int,
                                 checkpoint: Path | None, log: Callable[[dict], None] | None,
                                 drift: Callable[[nn.Module, int], None]) -> tuple[nn.Module, nn.Module]:
    """LDMLR with E fine-tuned in stage 3 on real images + the *fixed* pseudo-features.

    The pseudo-features were sampled for the stage-1 encoder; as E moves they go stale. ``drift(E, step)``
    is called every ``e2e.drift_every`` steps to measure that (the seed hypothesis of the E2E issue).
    """
    p = cfg.pseudo
    enc, g = copy.deepcopy(encoder), copy.deepcopy(classifier)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(g.parameters()), lr=p.finetune_lr,
                           weight_decay=cfg.stage1.weight_decay, **optimizer_options())
    bs = cfg.stage1.batch_size
    steps = p.finetune_epochs * steps_per_epoch(len(y), bs)

    def step_fn(step: int):
        if step % cfg.e2e.drift_every == 0:
            drift(enc, step)
        idx = shuffled_batch(len(y), bs, step, seed).to(x.device)
        loss = nn.functional.cross_entropy(g(enc(x[idx])), y[idx])
        if len(y_pseudo):
            jdx = shuffled_batch(len(y_pseudo), bs, step, seed + 1).to(x.device)
            loss = loss + p.pseudo_weight * nn.functional.cross_entropy(g(z_pseudo[jdx]), y_pseudo[jdx])
        return loss, {}

    train({"encoder": enc, "classifier": g}, opt, step_fn, steps, description=f"seed {seed} · stage 3: LDMLR-ft E+G",
          checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, log=log)
    drift(enc, steps)
    return enc, g
