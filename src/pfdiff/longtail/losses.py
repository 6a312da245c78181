"""Stage-1 losses of the long-tail field, as small per-example callables, and the one object stage 1 uses.

A method selects its stage-1 loss with ``BASE@LOSS`` (``ldmlr@bsce``, ``resample@ldam-drw``; see
``longtail/methods.py``). Every function here returns one loss per example; :class:`Stage1Loss` turns them
into the scalar stage 1 minimises (a weighted mean, as ``F.cross_entropy(weight=…)`` computes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pfdiff.config import OptimConfig

STAGE1_LOSSES = {
    "ce": "cross-entropy",
    "la-loss": "logit-adjusted loss, CE on f(x) + τ·log π (Menon et al. 2021)",
    "bsce": "Balanced Softmax, CE on f(x) + log π (Ren et al. 2020)",
    "ldam-drw": "LDAM margins ∝ n_c^(-1/4) with deferred re-weighting (Cao et al. 2019)",
}


def log_prior(counts, device: torch.device | str = "cpu") -> torch.Tensor:
    """log π_c of class counts. A class with no training example gets the prior of one example: with π_c = 0
    logit adjustment would add +∞ to it and predict it everywhere (seen when a data-independent public split
    left a tail class without a public example)."""
    counts = torch.as_tensor(counts, dtype=torch.float32, device=device).clamp_min(1.0)
    return torch.log(counts / counts.sum())


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy −log softmax(f(x))_y."""
    return F.cross_entropy(logits, y, reduction="none")


def logit_adjusted_loss(logits: torch.Tensor, y: torch.Tensor, log_pi: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted loss (Menon et al. 2021, "Long-tail learning via logit adjustment", eq. 10):
    CE on f(x) + τ·log π. The model f itself is then used unadjusted at test time."""
    return F.cross_entropy(logits + tau * log_pi, y, reduction="none")


def balanced_softmax(logits: torch.Tensor, y: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax (Ren et al. 2020, "Balanced Meta-Softmax for long-tailed visual recognition", eq. 4):
    softmax with n_j·exp(f_j), i.e. CE on f(x) + log π (the constant log N cancels). It is the logit-adjusted
    loss at τ = 1."""
    return F.cross_entropy(logits + log_pi, y, reduction="none")


def ldam_margins(counts, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM's per-class margins (Cao et al. 2019, "Learning imbalanced datasets with label-distribution-aware
    margin loss", eq. 12): Δ_c ∝ n_c^(−1/4), scaled so that the rarest class gets ``max_margin``."""
    m = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1) ** -0.25
    return (m * (max_margin / m.max())).float()


def ldam_loss(logits: torch.Tensor, y: torch.Tensor, margins: torch.Tensor, scale: float) -> torch.Tensor:
    """LDAM (Cao et al. 2019, eq. 13, as their code runs it): the logits are s·cos(z, w_c) of a normalised
    classifier; the true class's cosine is lowered by its margin before scaling: CE(s·(cos − Δ_y·1_y))."""
    shift = torch.zeros_like(logits).scatter_(1, y[:, None], (scale * margins.to(logits.device)[y])[:, None])
    return F.cross_entropy(logits - shift, y, reduction="none")


def effective_number_weights(counts, beta: float = 0.9999) -> torch.Tensor:
    """Class weights (1 − β)/(1 − β^n_c) of the effective number of samples (Cui et al. 2019), normalised to sum
    to C: the deferred re-weighting (DRW) of Cao et al. 2019."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - beta ** n)
    return (w / w.sum() * len(w)).float()


@dataclass
class Stage1Loss:
    """The stage-1 objective: ``loss(logits, y, step)`` is the weighted mean Σ w_i ℓ_i / Σ w_i of a per-example
    loss ℓ (weights w = 1, or DRW's class weights from ``drw_step`` on)."""

    name: str
    counts: torch.Tensor  # training examples per class (the prior of la-loss / bsce, LDAM's margins, DRW)
    tau: float = 1.0
    max_margin: float = 0.5
    scale: float = 30.0
    drw_step: int | None = None  # first optimiser step of deferred re-weighting (ldam-drw)
    beta: float = 0.9999

    def __post_init__(self) -> None:
        if self.name not in STAGE1_LOSSES:
            raise ValueError(f"unknown stage-1 loss {self.name!r}; choose from {sorted(STAGE1_LOSSES)}")
        self.counts = torch.as_tensor(self.counts, dtype=torch.float32)
        self._log_pi = log_prior(self.counts)
        self._margins = ldam_margins(self.counts, self.max_margin)
        self._drw = effective_number_weights(self.counts, self.beta)

    def per_example(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_pi = self._log_pi.to(logits.device)
        if self.name == "ce":
            return cross_entropy(logits, y)
        if self.name == "la-loss":
            return logit_adjusted_loss(logits, y, log_pi, self.tau)
        if self.name == "bsce":
            return balanced_softmax(logits, y, log_pi)
        return ldam_loss(logits, y, self._margins, self.scale)

    def weights(self, y: torch.Tensor, step: int) -> torch.Tensor | None:
        """Per-example weights at ``step`` (None: uniform)."""
        if self.name != "ldam-drw" or self.drw_step is None or step < self.drw_step:
            return None
        return self._drw.to(y.device)[y]

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        loss = self.per_example(logits, y)
        w = self.weights(y, step)
        return loss.mean() if w is None else (w * loss).sum() / w.sum()

    def shard_terms(self, logits: torch.Tensor, y_batch: torch.Tensor, rows: slice, step: int
                    ) -> tuple[torch.Tensor, torch.Tensor | int]:
        """A batch split across processes (``pfdiff.distributed``): (Σ_rows w_i ℓ_i, Σ_batch w_i) for the rows
        ``rows`` of the batch with labels ``y_batch`` (``logits``: of those rows only). The first summed over the
        processes' rows, divided by the second, is this loss of the whole batch."""
        loss = self.per_example(logits, y_batch[rows])
        w = self.weights(y_batch, step)
        if w is None:
            return loss.sum(), len(y_batch)
        return (w[rows] * loss).sum(), w.sum()


def stage1_loss(name: str, counts: np.ndarray | torch.Tensor, o: OptimConfig, steps_per_epoch: int) -> Stage1Loss:
    """The configured stage-1 loss ``name`` for a training set with ``counts`` per class. DRW starts at epoch
    round(drw_start·epochs) (LDAM: 160 of 200), scaled to ``stage1.epochs``."""
    drw_step = round(o.drw_start * o.epochs) * steps_per_epoch if name == "ldam-drw" else None
    return Stage1Loss(name, torch.as_tensor(counts), tau=o.la_tau, max_margin=o.ldam_max_margin, scale=o.ldam_scale,
                      drw_step=drw_step, beta=o.drw_beta)
