"""Noise schedules β_t and the forward process q(z_t | z_0) (DDPM, Ho et al. 2020)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class NoiseSchedule:
    """β_0..β_{T−1} (0-indexed t ∈ {0..T−1}, as in diffusers) with ᾱ_t = Π_{s≤t} (1 − β_s).

    The tensors stay float64 on the device they were built on; every accessor moves what it needs
    to the device of its ``t`` argument, so one schedule serves any device.
    """

    betas: torch.Tensor  # float64 [T]
    name: str = "custom"
    alphas: torch.Tensor = field(init=False, repr=False)
    alpha_bar: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.betas = torch.as_tensor(self.betas).double()
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

    def to(self, device: torch.device | str) -> NoiseSchedule:
        return NoiseSchedule(self.betas.to(device), self.name)

    def _at(self, values: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """values[t] on t's device, float64 (all T values when t is None)."""
        return values if t is None else values.to(t.device)[t]

    def _broadcast(self, values: torch.Tensor, t: torch.Tensor, ndim: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self._at(values, t).to(dtype)
        return out.reshape(out.shape + (1,) * (ndim - out.ndim))

    def sqrt_alpha_bar(self, t: torch.Tensor, ndim: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """√ᾱ_t as a [B, 1, …] tensor of ``ndim`` dims (batch first)."""
        return self._broadcast(self.alpha_bar.sqrt(), t, ndim, dtype)

    def sqrt_one_minus_alpha_bar(self, t: torch.Tensor, ndim: int = 1,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """√(1−ᾱ_t) as a [B, 1, …] tensor of ``ndim`` dims (batch first)."""
        return self._broadcast((1.0 - self.alpha_bar).sqrt(), t, ndim, dtype)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε, a draw of q(z_t | z_0) (DDPM eq. 4)."""
        a = self.sqrt_alpha_bar(t, z0.ndim, z0.dtype)
        b = self.sqrt_one_minus_alpha_bar(t, z0.ndim, z0.dtype)
        return a * z0 + b * noise

    def snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (float64)."""
        ab = self._at(self.alpha_bar, t)
        return ab / (1.0 - ab)

    def ou_time(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Forward Ornstein–Uhlenbeck time s = −½·log ᾱ_t, i.e. ᾱ_t = e^{−2s} (float64)."""
        return -0.5 * torch.log(self._at(self.alpha_bar, t))

    def sigma(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """σ_t = √((1−ᾱ_t)/ᾱ_t): noise level of the scaled variable z_t/√ᾱ_t (EDM's VE view; float64)."""
        ab = self._at(self.alpha_bar, t)
        return ((1.0 - ab) / ab).sqrt()


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """DDPM's linear β schedule (Ho et al. 2020, §4)."""
    return NoiseSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear")


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """ᾱ(u) = cos²((u + s)/(1 + s)·π/2), β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), max_beta) (Nichol & Dhariwal 2021, eq. 17)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return NoiseSchedule(torch.tensor(betas, dtype=torch.float64), "cosine")


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_schedule(name: str, T: int = 1000, **kwargs) -> NoiseSchedule:
    """A schedule from the ``SCHEDULES`` registry by name."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if T < 2:
        raise ValueError(f"a schedule needs T ≥ 2 steps, got {T}")
    return SCHEDULES[name](T, **kwargs)
