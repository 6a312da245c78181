"""The one preconditioning wrapper: a raw network in any parameterisation (ε, v or x0) as a denoiser.

Samplers, attacks and analyses see only ``Denoiser(z_t, t, y) -> (ε̂, ẑ0)`` (NVlabs/edm's ``EDMPrecond``
and k-diffusion's ``external.py`` wrappers play the same part); the parameterisation lives here, in the
config and in the training loss (``DiffusionLoss``), nowhere else.

With a = √ᾱ_t, b = √(1−ᾱ_t) and z_t = a·z0 + b·ε (DDPM eq. 4):
  z0 = (z_t − b·ε)/a,  ε = (z_t − a·z0)/b,  v = a·ε − b·z0  (Salimans & Ho 2022, §4),
  and, since a² + b² = 1, from v: z0 = a·z_t − b·v and ε = b·z_t + a·v.
"""

from __future__ import annotations

from collections.abc import Callable

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


class Denoiser:
    """``Denoiser(net, schedule, prediction)(z_t, t, y) -> (ε̂, ẑ0)`` for a raw ``net(z_t, t, y)``.

    ``t``: an int (one timestep for the whole batch, as samplers use it) or integer timesteps [B]. The
    coefficients √ᾱ_t, √(1−ᾱ_t) are taken in float64 and cast to z_t's dtype either way, so both forms give
    identical numbers. Not an ``nn.Module``: it owns no parameters, so wrapping never changes a state dict,
    and the DP engine's per-example proxies can be wrapped the same way (``with_net``).
    """

    def __init__(self, net: Callable[..., torch.Tensor], schedule: NoiseSchedule, prediction: str = "eps"):
        self.net, self.schedule, self.prediction = net, schedule, check_prediction(prediction)

    def coefficients(self, t: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) broadcastable against z_t, in its dtype."""
        return (self.schedule.sqrt_alpha_bar(t, z_t.ndim, z_t.dtype),
                self.schedule.sqrt_one_minus_alpha_bar(t, z_t.ndim, z_t.dtype))

    def __call__(self, z_t: torch.Tensor, t: int | torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(t, torch.Tensor):
            t = torch.full((len(z_t),), int(t), device=z_t.device, dtype=torch.long)
        a, b = self.coefficients(t, z_t)
        return split_prediction(self.net(z_t, t, y), z_t, a, b, self.prediction)

    def describe(self) -> str:
        return f"{self.prediction}-prediction network"

    def with_net(self, net: Callable[..., torch.Tensor]) -> Denoiser:
        """The same schedule and parameterisation around another network (an EMA copy, a guided model)."""
        return Denoiser(net, self.schedule, self.prediction)
