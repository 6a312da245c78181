"""Prediction parameterisations ε, v and x0, and conversions between them.

With a = √ᾱ_t, b = √(1−ᾱ_t) and z_t = a·z0 + b·ε:
  z0 = (z_t − b·ε)/a,  ε = (z_t − a·z0)/b,  v = a·ε − b·z0  (Salimans & Ho 2022, §4),
  and from v: z0 = a·z_t − b·v, ε = b·z_t + a·v.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {list(PREDICTIONS)}")


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The estimate z̃0 = (z_t − √(1−ᾱ_t)·ε)/√ᾱ_t."""
    return (z_t - b * eps) / a


def eps_from_x0(z_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (z_t - a * x0) / b


def v_target(z0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * eps - b * z0


def split_prediction(output: torch.Tensor, z_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Any parameterisation's network output → (ε̂, ẑ0)."""
    if prediction == "eps":
        return output, x0_from_eps(z_t, output, a, b)
    if prediction == "x0":
        return eps_from_x0(z_t, output, a, b), output
    if prediction == "v":
        return b * z_t + a * output, a * z_t - b * output
    check_prediction(prediction)
    raise AssertionError


def training_target(prediction: str, z0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """What the network regresses onto for the given parameterisation."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return z0
    return v_target(z0, eps, a, b)
