"""Prediction parameterisations ε, v and x0, and the conversions between them.

With a = √ᾱ_t, b = √(1−ᾱ_t) and z_t = a·z0 + b·ε (DDPM eq. 4):
  z0 = (z_t − b·ε)/a,  ε = (z_t − a·z0)/b,  v = a·ε − b·z0  (Salimans & Ho 2022, §4),
  and, since a² + b² = 1, from v: z0 = a·z_t − b·v and ε = b·z_t + a·v.
"""

from __future__ import annotations

import torch

from pfdiff.diffusion.schedules import NoiseSchedule

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {list(PREDICTIONS)}")
    return prediction


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor) -> torch.Tensor:
    """The estimate z̃0 = (z_t − √(1−ᾱ_t)·ε)/√ᾱ_t (DDPM eq. 15 / DDIM eq. 9)."""
    return (z_t - sqrt_1mab * eps) / sqrt_ab


def eps_from_x0(z_t: torch.Tensor, x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor) -> torch.Tensor:
    """ε = (z_t − √ᾱ_t·z0)/√(1−ᾱ_t)."""
    return (z_t - sqrt_ab * x0) / sqrt_1mab


def v_target(z0: torch.Tensor, eps: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·z0 (Salimans & Ho 2022, §4)."""
    return sqrt_ab * eps - sqrt_1mab * z0


def split_prediction(output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                     schedule: NoiseSchedule | torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Any parameterisation's network output → (ε̂, ẑ0).

    ``t`` are the integer timesteps [B] and ``schedule`` the NoiseSchedule. For callers that already
    hold the coefficients, ``split_prediction(output, z_t, sqrt_ab, sqrt_1mab, prediction)`` (broadcastable
    tensors in place of ``t, schedule``) is accepted too.
    """
    check_prediction(prediction)
    if isinstance(schedule, NoiseSchedule):
        a = schedule.sqrt_alpha_bar(t, z_t.ndim, z_t.dtype)
        b = schedule.sqrt_one_minus_alpha_bar(t, z_t.ndim, z_t.dtype)
    else:
        a, b = t, schedule
    if prediction == "eps":
        return output, x0_from_eps(z_t, output, a, b)
    if prediction == "x0":
        return eps_from_x0(z_t, output, a, b), output
    return b * z_t + a * output, a * z_t - b * output  # v (a² + b² = 1)


def training_target(prediction: str, z0: torch.Tensor, eps: torch.Tensor, sqrt_ab: torch.Tensor,
                    sqrt_1mab: torch.Tensor) -> torch.Tensor:
    """What the network regresses onto for the given parameterisation."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return z0
    return v_target(z0, eps, sqrt_ab, sqrt_1mab)
