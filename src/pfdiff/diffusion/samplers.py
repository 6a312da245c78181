"""Samplers as pure functions with one signature, batched over the whole request.

``sampler(denoiser, x, y, steps, *, spacing, eta, generator, callback)``: ``denoiser(z_t, t, y) -> (ε̂, ẑ0)``
is the preconditioning wrapper (``pfdiff.diffusion.denoiser.Denoiser``), so no sampler sees the network's
parameterisation; the schedule is the denoiser's. Options a sampler has no use for are accepted and
ignored (DDPM always runs all T steps; only DDIM uses η; Heun is deterministic), so any sampler can be
called the same way. They do not switch gradients off: wrap them in ``torch.no_grad()`` (``generate``
does) unless a loss must flow back through sampling. ``callback(i, t, z_t, x0_hat)``, if given, sees every
step's input state and the denoiser's ẑ0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pfdiff.diffusion.denoiser import Denoiser
from pfdiff.diffusion.schedules import NoiseSchedule

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
SPACINGS = ("leading", "trailing", "linspace")


def make_timesteps(T: int, steps: int, spacing: str = "leading") -> list[int]:
    """Descending timesteps of a ``steps``-step sampler, as diffusers' DDIMScheduler.set_timesteps
    (steps_offset=0); duplicates, possible with "linspace", are dropped."""
    if not 1 <= steps <= T:
        raise ValueError(f"sampler steps must lie in [1, T={T}], got {steps}")
    if spacing == "leading":
        ts = np.arange(0, steps) * (T // steps)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")
    return sorted({int(t) for t in ts}, reverse=True)


def _timesteps(schedule: NoiseSchedule, steps: int | Sequence[int], spacing: str) -> list[int]:
    """An int number of steps → make_timesteps; a sequence → checked to be descending in [0, T)."""
    if isinstance(steps, int):
        return make_timesteps(schedule.T, steps, spacing)
    ts = [int(t) for t in steps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] >= schedule.T or ts[-1] < 0:
        raise ValueError(f"timesteps must be strictly descending in [0, T={schedule.T}), got {ts}")
    return ts


def _alpha_bar(schedule: NoiseSchedule, t: int, device) -> torch.Tensor:
    """ᾱ_t as a float64 scalar on ``device``; t = −1 means ᾱ = 1 (DDIM's set_alpha_to_one)."""
    return schedule.alpha_bar[t].to(device) if t >= 0 else torch.ones((), dtype=torch.float64, device=device)


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


def ddpm_step(x0: torch.Tensor, t: int, z_t: torch.Tensor, schedule: NoiseSchedule,
              noise: torch.Tensor | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """One ancestral step z_t → z_{t−1} from the denoiser's ẑ0 (Ho et al. 2020, eqs. 6–7 and 11).

    Posterior mean μ̃(z_t, ẑ0) = √ᾱ_{t−1}β_t/(1−ᾱ_t)·ẑ0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·z_t plus √β̃_t·noise,
    β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t ("fixed_small"); no noise at t = 0 or when ``noise`` is None.
    """
    dt = z_t.dtype
    ab, ab_prev = _alpha_bar(schedule, t, z_t.device), _alpha_bar(schedule, t - 1, z_t.device)
    alpha_t, beta_t = ab / ab_prev, 1 - ab / ab_prev
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = (ab_prev.sqrt() * beta_t / (1 - ab)).to(dt) * x0 + (alpha_t.sqrt() * (1 - ab_prev) / (1 - ab)).to(dt) * z_t
    if t == 0 or noise is None:
        return mean
    var = ((1 - ab_prev) / (1 - ab) * beta_t).clamp_min(1e-20)
    return mean + var.sqrt().to(dt) * noise


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, steps: int | Sequence[int] | None = None, *,
                spacing: str = "leading", eta: float = 1.0, generator: torch.Generator | None = None,
                callback: Callback | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps from x = z_{T−1} ~ N(0, I) (Ho et al. 2020, Alg. 2).
    ``steps``, ``spacing`` and ``eta`` are ignored (fewer steps: DDIM with η = 1)."""
    schedule = denoiser.schedule
    for i, t in enumerate(range(schedule.T - 1, -1, -1)):
        _, x0 = denoiser(x, t, y)
        if callback is not None:
            callback(i, t, x, x0)
        x = ddpm_step(x0, t, x, schedule, _randn(x, generator) if t > 0 else None, clip_x0)
    return x


def ddim_step(eps: torch.Tensor, x0: torch.Tensor, t: int, t_prev: int, z_t: torch.Tensor, schedule: NoiseSchedule,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z_t → z_{t_prev} from the denoiser's (ε̂, ẑ0) (Song et al. 2021, eq. 12 with σ_t(η) of eq. 16);
    t_prev = −1 means ᾱ_prev = 1.

    z_prev = √ᾱ_prev·ẑ0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·noise; η = 0 is deterministic, η = 1 has DDPM's variance.
    """
    dt = z_t.dtype
    ab, ab_prev = _alpha_bar(schedule, t, z_t.device), _alpha_bar(schedule, t_prev, z_t.device)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    z_prev = ab_prev.sqrt().to(dt) * x0 + (1 - ab_prev - sigma**2).clamp_min(0).sqrt().to(dt) * eps
    if eta > 0 and noise is not None:
        z_prev = z_prev + sigma.to(dt) * noise
    return z_prev


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, steps: int | Sequence[int] = 50, *,
                spacing: str = "leading", eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM over a subsequence of timesteps (an int number of steps, or the descending list itself)."""
    schedule = denoiser.schedule
    ts = _timesteps(schedule, steps, spacing)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0 = denoiser(x, t, y)
        if callback is not None:
            callback(i, t, x, x0)
        x = ddim_step(eps, x0, t, t_prev, x, schedule, eta, _randn(x, generator) if eta > 0 else None)
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, steps: int | Sequence[int] = 25, *,
                spacing: str = "leading", eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Probability-flow ODE with Heun steps (Karras et al. 2022, Alg. 1 without churn).

    In x̃ = z/√ᾱ with σ = √((1−ᾱ)/ᾱ) the ODE is dx̃/dσ = ε̂(z, t). The discrete model is evaluated
    only at the chosen timesteps (σ grid: their σ_t, then 0); the last step, to σ = 0, is Euler.
    Deterministic: ``eta`` and ``generator`` are accepted for the uniform signature and unused.
    """
    schedule = denoiser.schedule
    ts = _timesteps(schedule, steps, spacing)
    sigma_t = schedule.sigma()
    sigmas = [float(sigma_t[t]) for t in ts] + [0.0]

    def denoise(x_tilde: torch.Tensor, i: int):
        z = x_tilde / (1 + sigmas[i] ** 2) ** 0.5  # z = √ᾱ·x̃ and 1 + σ² = 1/ᾱ
        return denoiser(z, ts[i], y)

    xt = x * (1 + sigmas[0] ** 2) ** 0.5  # x̃ at the first timestep
    for i, t in enumerate(ts):
        d, x0 = denoise(xt, i)
        if callback is not None:
            callback(i, t, xt / (1 + sigmas[i] ** 2) ** 0.5, x0)
        # Euler step, then the 2nd-order correction with the slope at σ_{i+1} (EDM Alg. 1, lines 5–8)
        x_next = xt + (sigmas[i + 1] - sigmas[i]) * d
        if sigmas[i + 1] > 0:
            x_next = xt + (sigmas[i + 1] - sigmas[i]) * 0.5 * (d + denoise(x_next, i + 1)[0])
        xt = x_next
    return xt


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "heun": sample_heun}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


@torch.no_grad()
def generate(sampler: str, denoiser: Denoiser, shape_or_noise: torch.Tensor | Sequence[int], y: torch.Tensor,
             steps: int | Sequence[int] = 50, *, eta: float = 0.0, spacing: str = "leading",
             generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Sample with a named sampler, gradients off.

    ``shape_or_noise``: the initial noise itself, or a shape whose N(0, I) noise is drawn first from
    ``generator`` on y's device.
    """
    fn = get_sampler(sampler)
    if isinstance(shape_or_noise, torch.Tensor):
        noise = shape_or_noise
    else:
        noise = torch.randn(tuple(shape_or_noise), device=y.device, generator=generator)
    return fn(denoiser, noise, y, steps, spacing=spacing, eta=eta, generator=generator, callback=callback)
