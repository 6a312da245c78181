"""Server-side steps on the auxiliary pool: FedDDPM's correction, FedDDPM+'s QUICK-TEST, the progressive
pool's score and regeneration. Pure functions of (model, pool, …); the server app decides when.

Score (progressive pool and QUICK-TEST): the diffusion loss of the global model on a fixed held-out
slice of the warm-up pool, with fixed draws of (t, ε). Why this one: it is the training objective (a
bound on the negative log-likelihood), so it measures what the correction should improve; it needs
no private data (the slice is pseudo-features the clients released under their privacy plan); fixed
draws make successive rounds comparable; and the slice never enters the correction, so it is not the
training loss of the server steps.

Everything runs on the device of the pool and the model (the server's ``task.device_of(cfg)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.diffusion import DiffusionLoss, NoiseSchedule
from pfdiff.federated.aux_pool import AuxPool
from pfdiff.federated.task import adam_steps, train_denoiser_local
from pfdiff.longtail.filtering import MahalanobisScorer, aid_filter
from pfdiff.longtail.ldmlr import sample_features
from pfdiff.training import generator


@dataclass
class ServerCompute:
    """Server work spent on the pool: optimiser steps, sampled pseudo-features, seconds."""

    steps: int = 0
    generated: int = 0
    seconds: float = 0.0

    def add(self, other: "ServerCompute") -> None:
        self.steps += other.steps
        self.generated += other.generated
        self.seconds += other.seconds


def correct_on_pool(model: nn.Module, pool: AuxPool, loss_fn: DiffusionLoss, steps: int, lr: float,
                    batch_size: int, seed: int, tag: tuple, weight: str = "none") -> ServerCompute:
    """FedDDPM's server correction (Peng et al. 2025): ``steps`` optimiser steps of the diffusion loss on the
    pool, starting from the aggregated model, in place — the clients' local step (Adam, fresh state) on
    the pool's pseudo-features, so the correction moves the weights on the scale of one client's round.
    ``weight="balanced"`` (``fed.correction_weight``): batches drawn class-balanced (:func:`class_balanced_indices`),
    so a tail class weighs as much as a head class in every step."""
    start = time.perf_counter()
    if weight == "none":
        train_denoiser_local(model, pool.u, pool.y, loss_fn, steps, lr, batch_size, seed, tag, stream="fed-server")
    elif weight == "balanced":
        def loss_at(s: int) -> torch.Tensor:
            g = generator(pool.u.device, seed, "fed-server-balanced", *tag, s)
            idx = class_balanced_indices(pool.y, min(batch_size, len(pool)), g)
            return loss_fn(model, pool.u[idx], pool.y[idx], generator=g).loss.mean()

        adam_steps(model, lr, steps, loss_at, description="federated server correction (class-balanced)")
    else:
        raise ValueError(f"unknown correction weight {weight!r}; choose from ['balanced', 'none']")
    return ServerCompute(steps=steps, seconds=time.perf_counter() - start)


def class_balanced_indices(y: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` indices drawn with replacement with probability ∝ 1 / (size of the sample's class): every class
    present is drawn with probability 1 / (number of classes present)."""
    counts = torch.bincount(y)
    w = 1.0 / counts[y].double()
    return torch.multinomial(w, n, replacement=True, generator=g)


@torch.no_grad()
def pool_score(model: nn.Module, u_val: torch.Tensor, y_val: torch.Tensor, loss_fn: DiffusionLoss, seed: int,
               multiplicity: int = 4) -> float:
    """Diffusion loss on the held-out slice with fixed (t, ε) draws (lower is better; see module doc)."""
    model.eval()
    g = generator(u_val.device, seed, "fed-score")
    return float(loss_fn(model, u_val, y_val, noise_multiplicity=multiplicity, generator=g).loss.mean())


def relative_gain(previous: float, current: float) -> float:
    return (previous - current) / max(abs(previous), 1e-12)


@dataclass
class QuickTest:
    """FedDDPM+'s QUICK-TEST: stop when the relative gain of the score stays below ``threshold`` for
    ``patience`` rounds in a row (the global model has stopped learning much from the clients)."""

    threshold: float
    patience: int = 1
    previous: float | None = None
    slow_rounds: int = 0
    gains: list[float] = field(default_factory=list)

    def update(self, score: float) -> bool:
        if self.previous is not None:
            gain = relative_gain(self.previous, score)
            self.gains.append(gain)
            self.slow_rounds = self.slow_rounds + 1 if gain < self.threshold else 0
        self.previous = score
        return self.slow_rounds >= self.patience

    def state(self) -> dict:
        return {"previous": self.previous, "slow_rounds": self.slow_rounds, "gains": list(self.gains)}


def accepted(gain: float, cfg: RunConfig) -> bool:
    """The progressive pool's band: regenerate only after a correction whose score gain lies in it."""
    return cfg.fed.accept_min_gain <= gain <= cfg.fed.accept_max_gain


def regenerate(model: nn.Module, schedule: NoiseSchedule, pool: AuxPool, scorer: MahalanobisScorer,
               cfg: RunConfig, num_classes: int, round_: int, seed: int,
               per_class: np.ndarray | None = None) -> tuple[dict, ServerCompute]:
    """Progressive pool (ours): sample ``regen_share`` of the pool from the corrected model — ``per_class``
    (the pool quotas, ``aux_pool.pool_quotas``) or, by default, with the pool's class histogram —, keep the
    in-distribution ones (AID), replace the stalest / worst of their class. The info says, per class, what was
    generated, kept and put in place of (evicted) old samples."""
    start = time.perf_counter()
    f = cfg.fed
    if per_class is None:
        share = pool.class_counts(num_classes).double() / len(pool)
        per_class = np.round(share.cpu().numpy() * f.regen_share * len(pool)).astype(int)
    model.eval()
    u, y = sample_features(model, schedule, np.asarray(per_class), cfg.diffusion, seed, pool.u.device,
                           tag=f"fed-regen-{round_}")
    result = aid_filter(scorer, u, y, num_classes, cfg.e2e.aid_quantile)
    info = pool.replace(u[result.keep], y[result.keep], result.scores[result.keep], round_, f.evict)
    replaced = info.pop("replaced_per_class")
    info.update(generated=int(len(y)), kept=int(result.keep.sum()),
                generated_per_class=[int(k) for k in np.asarray(per_class)],
                kept_per_class=torch.bincount(y[result.keep], minlength=num_classes).tolist(),
                replaced_per_class=[int(replaced.get(c, 0)) for c in range(num_classes)])
    return info, ServerCompute(generated=int(len(y)), seconds=time.perf_counter() - start)
