"""Noise schedules β_t and the forward process q(z_t | z_0) (DDPM, Ho et al. 2020)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class NoiseSchedule:
    """β_1..β_T (0-indexed t ∈ {0..T−1}, as in diffusers) with ᾱ_t = Π_{s≤t} (1 − β_s)."""

    betas: torch.Tensor  # float64 [T]
    name: str = "custom"
    alphas: torch.Tensor = field(init=False)
    alpha_bar: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.betas = self.betas.double()
        if self.betas.ndim != 1 or not ((self.betas > 0) & (self.betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        return NoiseSchedule(self.betas.to(device), self.name)

    def _gather(self, values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        out = values.to(t.device)[t].float()
        return out.reshape(out.shape + (1,) * (ndim - out.ndim))

    def sqrt_alpha_bar(self, t: torch.Tensor, ndim: int = 1) -> torch.Tensor:
        """√ᾱ_t, broadcast to ``ndim`` dims (batch first)."""
        return self._gather(self.alpha_bar.sqrt(), t, ndim)

    def sqrt_one_minus_alpha_bar(self, t: torch.Tensor, ndim: int = 1) -> torch.Tensor:
        return self._gather((1.0 - self.alpha_bar).sqrt(), t, ndim)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε  (DDPM eq. 4)."""
        return self.sqrt_alpha_bar(t, z0.ndim) * z0 + self.sqrt_one_minus_alpha_bar(t, z0.ndim) * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t)."""
        ab = self.alpha_bar.to(t.device)[t]
        return ab / (1.0 - ab)

    def ou_time(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Forward Ornstein–Uhlenbeck time s = −½·log ᾱ_t (ᾱ = e^{−2s}; Biroli et al. 2024)."""
        ab = self.alpha_bar if t is None else self.alpha_bar.to(t.device)[t]
        return -0.5 * torch.log(ab)

    def sigma(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """σ_t = √((1−ᾱ_t)/ᾱ_t): the noise level of the scaled variable z_t/√ᾱ_t (EDM's VE view)."""
        ab = self.alpha_bar if t is None else self.alpha_bar.to(t.device)[t]
        return ((1.0 - ab) / ab).sqrt()


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """DDPM's linear β schedule (Ho et al. 2020, §4)."""
    return NoiseSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear")


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Cosine schedule, ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2) (Nichol & Dhariwal 2021, eq. 17)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return NoiseSchedule(torch.tensor(betas, dtype=torch.float64), "cosine")


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_schedule(name: str, T: int = 1000, **kwargs) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if T < 2:
        raise ValueError(f"a schedule needs T ≥ 2 steps, got {T}")
    return SCHEDULES[name](T, **kwargs)
