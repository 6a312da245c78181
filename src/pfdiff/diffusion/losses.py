"""The diffusion training loss as a small callable returning an unreduced per-example vector (edm style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pfdiff.diffusion.schedules import NoiseSchedule
from pfdiff.diffusion.targets import check_prediction, split_prediction, training_target


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, weighting: str, prediction: str,
                gamma: float = 5.0) -> torch.Tensor:
    """Per-timestep weight of the regression loss.

    uniform: 1 (DDPM's L_simple). inv_sqrt: λ_t = 1/√(1−ᾱ_t). min_snr (Hang et al. 2023, eq. 7):
    min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v, min(SNR, γ) for x0.
    """
    if weighting == "uniform":
        return torch.ones_like(t, dtype=torch.float32)
    if weighting == "inv_sqrt":
        return (1.0 / (1.0 - schedule.alpha_bar.to(t.device)[t]).sqrt()).float()
    if weighting == "min_snr":
        snr = schedule.snr(t)
        clipped = snr.clamp(max=gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction].float()
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of ['inv_sqrt', 'min_snr', 'uniform']")


@dataclass
class DiffusionOutput:
    loss: torch.Tensor  # [B] per-example loss, averaged over the K noise draws
    z0_hat: torch.Tensor  # [B, K, ...] the model's estimate of z0 for every draw (differentiable)
    t: torch.Tensor  # [B, K] the sampled timesteps
    y_used: torch.Tensor  # [B, K] labels fed to the model (null label where dropped for CFG)


class DiffusionLoss:
    """‖target − model(z_t, t, y)‖², weighted per timestep, with noise multiplicity and CFG label drop."""

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, cond_drop_prob: float = 0.0, null_label: int | None = None,
                 t_min: int = 0, t_max: int | None = None):
        check_prediction(prediction)
        loss_weight(schedule, torch.zeros(1, dtype=torch.long), weighting, prediction)  # validates the name
        if cond_drop_prob > 0 and null_label is None:
            raise ValueError("cond_drop_prob > 0 needs a null_label (the unconditional class index)")
        t_max = schedule.T if t_max is None else t_max
        if not 0 <= t_min < t_max <= schedule.T:
            raise ValueError(f"need 0 ≤ t_min < t_max ≤ T={schedule.T}, got t_min={t_min}, t_max={t_max}")
        self.schedule, self.prediction, self.weighting = schedule, prediction, weighting
        self.gamma, self.cond_drop_prob, self.null_label = min_snr_gamma, cond_drop_prob, null_label
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, model, z0: torch.Tensor, y: torch.Tensor, noise_multiplicity: int = 1,
                 generator: torch.Generator | None = None) -> DiffusionOutput:
        B, K = len(z0), noise_multiplicity
        if K < 1:
            raise ValueError(f"noise_multiplicity must be ≥ 1, got {K}")
        # DPDM (Dockhorn et al. 2022): K draws of (t, ε) per example in one batched call; their losses
        # are averaged per example *before* any clipping, so K does not change the sensitivity.
        z0_rep = z0.repeat_interleave(K, dim=0)
        y_rep = y.repeat_interleave(K, dim=0)
        t = torch.randint(self.t_min, self.t_max, (B * K,), device=z0.device, generator=generator)
        eps = torch.randn(z0_rep.shape, device=z0.device, dtype=z0.dtype, generator=generator)
        if self.cond_drop_prob > 0:
            drop = torch.rand(B * K, device=z0.device, generator=generator) < self.cond_drop_prob
            y_rep = torch.where(drop, torch.full_like(y_rep, self.null_label), y_rep)
        a = self.schedule.sqrt_alpha_bar(t, z0.ndim)
        b = self.schedule.sqrt_one_minus_alpha_bar(t, z0.ndim)
        z_t = a * z0_rep + b * eps
        output = model(z_t, t, y_rep)
        target = training_target(self.prediction, z0_rep, eps, a, b)
        per_row = ((output - target) ** 2).flatten(1).mean(1)
        per_row = per_row * loss_weight(self.schedule, t, self.weighting, self.prediction, self.gamma)
        _, z0_hat = split_prediction(output, z_t, a, b, self.prediction)
        return DiffusionOutput(per_row.view(B, K).mean(1), z0_hat.view(B, K, *z0.shape[1:]),
                               t.view(B, K), y_rep.view(B, K))
