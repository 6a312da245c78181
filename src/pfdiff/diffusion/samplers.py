"""Samplers as pure functions of (model, x, schedule, y, …), batched over the whole request.

They do not switch gradients off: wrap them in ``torch.no_grad()`` (``generate`` does) unless a
loss must flow back through sampling. ``model(z_t, t, y)`` returns the chosen parameterisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pfdiff.diffusion.schedules import NoiseSchedule
from pfdiff.diffusion.targets import check_prediction, split_prediction

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def make_timesteps(T: int, steps: int, spacing: str = "leading") -> list[int]:
    """Descending timesteps of a ``steps``-step sampler, as diffusers' DDIMScheduler.set_timesteps."""
    if not 1 <= steps <= T:
        raise ValueError(f"sampler steps must lie in [1, T={T}], got {steps}")
    if spacing == "leading":
        ts = np.arange(0, steps) * (T // steps)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of ['leading', 'linspace', 'trailing']")
    return sorted({int(t) for t in ts}, reverse=True)


def _alpha_bar(schedule: NoiseSchedule, t: int, device) -> torch.Tensor:
    """ᾱ_t as a float64 scalar; t = −1 means ᾱ = 1 (DDIM's set_alpha_to_one)."""
    return schedule.alpha_bar[t].to(device) if t >= 0 else torch.ones((), dtype=torch.float64, device=device)


def _model_split(model, z_t, t: int, y, schedule: NoiseSchedule, prediction: str):
    tt = torch.full((len(z_t),), t, device=z_t.device, dtype=torch.long)
    ab = _alpha_bar(schedule, t, z_t.device).to(z_t.dtype)
    return split_prediction(model(z_t, tt, y), z_t, ab.sqrt(), (1 - ab).sqrt(), prediction)


def ddpm_step(output: torch.Tensor, t: int, z_t: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps",
              noise: torch.Tensor | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """One ancestral step z_t → z_{t−1}: posterior mean (DDPM eq. 7) plus √β̃_t noise (fixed_small)."""
    dt = z_t.dtype
    ab, ab_prev = _alpha_bar(schedule, t, z_t.device), _alpha_bar(schedule, t - 1, z_t.device)
    alpha_t, beta_t = ab / ab_prev, 1 - ab / ab_prev
    _, x0 = split_prediction(output, z_t, ab.sqrt().to(dt), (1 - ab).sqrt().to(dt), prediction)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = (ab_prev.sqrt() * beta_t / (1 - ab)).to(dt) * x0 + (alpha_t.sqrt() * (1 - ab_prev) / (1 - ab)).to(dt) * z_t
    if t == 0 or noise is None:
        return mean
    var = ((1 - ab_prev) / (1 - ab) * beta_t).clamp_min(1e-20)
    return mean + var.sqrt().to(dt) * noise


def sample_ddpm(model, x: torch.Tensor, schedule: NoiseSchedule, y: torch.Tensor, prediction: str = "eps",
                generator: torch.Generator | None = None, callback: Callback | None = None,
                clip_x0: float | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps (Ho et al. 2020, Alg. 2)."""
    check_prediction(prediction)
    for i, t in enumerate(range(schedule.T - 1, -1, -1)):
        out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long), y)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) if t > 0 else None
        x_next = ddpm_step(out, t, x, schedule, prediction, noise, clip_x0)
        if callback is not None:
            callback(i, t, x_next, x_next)
        x = x_next
    return x


def ddim_step(output: torch.Tensor, t: int, t_prev: int, z_t: torch.Tensor, schedule: NoiseSchedule,
              prediction: str = "eps", eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z_t → z_{t_prev} (Song et al. 2021, eq. 12); η = 0 is deterministic, η = 1 matches DDPM's variance."""
    dt = z_t.dtype
    ab, ab_prev = _alpha_bar(schedule, t, z_t.device), _alpha_bar(schedule, t_prev, z_t.device)
    eps, x0 = split_prediction(output, z_t, ab.sqrt().to(dt), (1 - ab).sqrt().to(dt), prediction)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    z_prev = ab_prev.sqrt().to(dt) * x0 + (1 - ab_prev - sigma**2).clamp_min(0).sqrt().to(dt) * eps
    if eta > 0 and noise is not None:
        z_prev = z_prev + sigma.to(dt) * noise
    return z_prev


def sample_ddim(model, x: torch.Tensor, schedule: NoiseSchedule, y: torch.Tensor, steps: int | Sequence[int] = 50,
                eta: float = 0.0, spacing: str = "leading", prediction: str = "eps",
                generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DDIM over a subsequence of timesteps (an int number of steps, or the descending list itself)."""
    check_prediction(prediction)
    ts = make_timesteps(schedule.T, steps, spacing) if isinstance(steps, int) else list(steps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long), y)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) if eta > 0 else None
        x_next = ddim_step(out, t, t_prev, x, schedule, prediction, eta, noise)
        if callback is not None:
            callback(i, t, x, x_next)
        x = x_next
    return x


def sample_heun(model, x: torch.Tensor, schedule: NoiseSchedule, y: torch.Tensor, steps: int | Sequence[int] = 25,
                spacing: str = "leading", prediction: str = "eps", generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Probability-flow ODE with Heun steps (Karras et al. 2022, Alg. 1 without churn).

    In x̃ = z/√ᾱ with σ = √((1−ᾱ)/ᾱ) the ODE is dx̃/dσ = ε̂(z, t). The discrete model is evaluated
    only at the chosen timesteps; the last step (to σ = 0) is an Euler step.
    """
    check_prediction(prediction)
    ts = make_timesteps(schedule.T, steps, spacing) if isinstance(steps, int) else list(steps)
    sigmas = [float(schedule.sigma()[t]) for t in ts] + [0.0]
    xt = x * (1 + sigmas[0] ** 2) ** 0.5  # z_T/√ᾱ_T

    def eps_at(x_tilde, i):
        z = x_tilde / (1 + sigmas[i] ** 2) ** 0.5
        return _model_split(model, z, ts[i], y, schedule, prediction)[0]

    for i in range(len(ts)):
        d = eps_at(xt, i)
        x_next = xt + (sigmas[i + 1] - sigmas[i]) * d
        if sigmas[i + 1] > 0:
            x_next = xt + (sigmas[i + 1] - sigmas[i]) * 0.5 * (d + eps_at(x_next, i + 1))
        if callback is not None:
            callback(i, ts[i], xt, x_next)
        xt = x_next
    return xt


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "heun": sample_heun}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


@torch.no_grad()
def generate(sampler: str, model, noise: torch.Tensor, schedule: NoiseSchedule, y: torch.Tensor, steps: int = 50,
             eta: float = 0.0, prediction: str = "eps", generator: torch.Generator | None = None,
             spacing: str = "leading") -> torch.Tensor:
    """Sample from ``noise`` with a named sampler, gradients off (DDPM ignores ``steps``: it uses all T)."""
    fn = get_sampler(sampler)
    if sampler == "ddpm":
        return fn(model, noise, schedule, y, prediction=prediction, generator=generator)
    if sampler == "ddim":
        return fn(model, noise, schedule, y, steps=steps, eta=eta, spacing=spacing, prediction=prediction,
                  generator=generator)
    return fn(model, noise, schedule, y, steps=steps, spacing=spacing, prediction=prediction)
