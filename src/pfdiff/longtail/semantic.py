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


def covariance_loss(z0_hat: torch.Tensor, y: torch.Tensor, cov: torch.Tensor,
                    min_count: int = 4) -> tuple[torch.Tensor, int]:
    """L_cov = Σ_y ‖Σ̂_y(z̃0) − Σ_y‖_F / D over classes with at least ``min_count`` rows in the batch.

    A covariance estimated from fewer rows is mostly noise (rank < min_count), so such classes are
    skipped rather than matched; returns (loss, number of classes matched). Couples the batch:
    it cannot be clipped per example (DP runs must use ``radius_loss``).
    """
    total = z0_hat.new_zeros(())
    matched = 0
    for c in torch.unique(y).tolist():
        zc = z0_hat[y == c]
        if len(zc) < min_count:
            continue
        centred = zc - zc.mean(0)
        est = centred.T @ centred / (len(zc) - 1)
        total = total + torch.linalg.matrix_norm(est - cov[c].to(est.dtype), ord="fro") / zc.shape[-1]
        matched += 1
    return total, matched
