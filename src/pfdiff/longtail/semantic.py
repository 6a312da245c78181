"""Semantic terms of the end-to-end objective: EMA class prototypes, L_proto, L_cov, L_rad.

All per-example terms return an unreduced vector ``[B]`` (the caller reduces), so they stay
usable under DP-SGD; ``covariance_loss`` couples the batch and returns a scalar.
"""

from __future__ import annotations

import torch
from torch import nn


class PrototypeBank(nn.Module):
    """EMA of each class's first and second feature moments: μ_y and Σ_y = E[zzᵀ] − μ_y μ_yᵀ.

    μ_y ← (1−λw)·μ_y + λw·mean_batch(z | y) (research note 001); ``w`` down-weights pseudo-features
    (default 0.3). The first update of a class copies the batch moments. Moments are kept in float64
    as buffers, so the bank is checkpointed and resumed with the models.
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.1):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"prototype momentum must lie in (0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("second", torch.zeros(num_classes, dim, dim, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, z: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        z = z.detach().to(self.mean.dtype)
        for c in torch.unique(y).tolist():
            zc = z[y == c]
            m1, m2 = zc.mean(0), zc.T @ zc / len(zc)
            rate = 1.0 if not self.seen[c] else self.momentum * weight
            self.mean[c].lerp_(m1, rate)
            self.second[c].lerp_(m2, rate)
            self.seen[c] = True

    @torch.no_grad()
    def fit(self, z: torch.Tensor, y: torch.Tensor) -> "PrototypeBank":
        """Set every seen class's moments exactly from (z, y): the starting point before EMA updates."""
        self.seen.zero_()
        self.update(z, y)
        return self

    @property
    def covariance(self) -> torch.Tensor:
        cov = self.second - self.mean[:, :, None] * self.mean[:, None, :]
        return 0.5 * (cov + cov.transpose(1, 2))

    def scatter_about(self, centre: torch.Tensor) -> torch.Tensor:
        """E[(z − c)(z − c)ᵀ] per class about other centres c (e.g. the real prototypes), from the moments."""
        c, m = centre.to(self.mean.dtype), self.mean
        out = self.second - c[:, :, None] * m[:, None, :] - m[:, :, None] * c[:, None, :] + c[:, :, None] * c[:, None, :]
        return 0.5 * (out + out.transpose(1, 2))

    def shrunk_covariance(self, counts: torch.Tensor, prior_strength: float = 4.0) -> torch.Tensor:
        """Σ_y shrunk towards the pooled covariance of the seen classes, (n_y·Σ_y + k·Σ̄)/(n_y + k): the
        target a tail class with a handful of examples can be matched to (its own Σ_y has rank < n_y)."""
        cov = self.covariance
        pooled = cov[self.seen].mean(0) if self.seen.any() else torch.zeros_like(cov[0])
        n = torch.as_tensor(counts, dtype=cov.dtype, device=cov.device)[:, None, None]
        return (n * cov + prior_strength * pooled) / (n + prior_strength)

    def radius(self, scale: float = 1.0, counts: torch.Tensor | None = None, prior_strength: float = 4.0):
        """r_y = scale·√tr(Σ_y): for a Gaussian class, E‖z − μ_y‖ ≈ √tr(Σ_y) in high dimension.

        With ``counts`` (training examples per class) the trace is shrunk towards the mean trace of
        the seen classes, (n_y·tr_y + k·tr̄)/(n_y + k): a tail class with 2 examples has no spread
        of its own worth matching.
        """
        trace = torch.diagonal(self.covariance, dim1=1, dim2=2).sum(-1).clamp_min(0)
        if counts is not None:
            n = torch.as_tensor(counts, dtype=trace.dtype, device=trace.device)
            pooled = trace[self.seen].mean() if self.seen.any() else trace.new_zeros(())
            trace = (n * trace + prior_strength * pooled) / (n + prior_strength)
        return scale * trace.sqrt()


def prototype_loss(z0_hat: torch.Tensor, y: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """L_proto = ‖z̃0 − μ_y‖² per example, divided by D so η_p compares with L_LDM's per-dimension mean."""
    mu = mean[y].to(z0_hat.dtype)
    return ((z0_hat - mu) ** 2).mean(-1)


def radius_loss(z0_hat: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """L_rad = (‖z̃0 − μ_y‖ − r_y)² per example, divided by D (equal-radius shape term)."""
    dist = (z0_hat - mean[y].to(z0_hat.dtype)).norm(dim=-1)
    return (dist - radius[y].to(z0_hat.dtype)) ** 2 / z0_hat.shape[-1]


def covariance_loss(z0_hat: torch.Tensor, y: torch.Tensor, cov: torch.Tensor, min_count: int = 4, *,
                    centre: torch.Tensor | None = None, running: torch.Tensor | None = None,
                    shrink: float = 0.0) -> tuple[torch.Tensor, int]:
    """L_cov = Σ_y ‖Σ̂_y(z̃0) − Σ_y‖_F / D over the classes present in the batch.

    Batch-only (``running`` None): Σ̂_y is the unbiased batch covariance of the class's rows, and classes with
    fewer than ``min_count`` rows are skipped (rank < min_count: mostly noise). A tail class then never
    appears, since it rarely has 4 rows in a batch.

    Accumulated (``running`` = the detached EMA covariance of z̃0 per class, ``centre`` = the class
    prototypes): Σ̂_y = (m·S_y + k·R_y)/(m + k) with S_y = mean of (z̃0 − μ_y)(z̃0 − μ_y)ᵀ over the m rows of
    the batch and k = ``shrink``. Every class with at least one row is matched — its estimate borrows the
    steps before it — while the gradient still reaches the rows of this batch. Returns (loss, classes
    matched). Couples the batch: it cannot be clipped per example (DP runs must use ``radius_loss``).
    """
    total = z0_hat.new_zeros(())
    matched = 0
    for c in torch.unique(y).tolist():
        zc = z0_hat[y == c]
        m = len(zc)
        if running is None and m < min_count:
            continue
        if centre is None:
            centred = zc - zc.mean(0)
            est = centred.T @ centred / max(1, m - 1)
        else:
            centred = zc - centre[c].to(zc.dtype)
            est = centred.T @ centred / m
        if running is not None:
            est = (m * est + shrink * running[c].to(est.dtype)) / (m + shrink)
        total = total + torch.linalg.matrix_norm(est - cov[c].to(est.dtype), ord="fro") / zc.shape[-1]
        matched += 1
    return total, matched
