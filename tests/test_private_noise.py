"""Attacks on predictable or reused DP noise, written as tests: each succeeds against noise derived from the
published run seed (the debug switch, i.e. the code before the fix) and fails against the default source.

1. Counts inversion: the seed is in config.yaml; re-drawing the count noise from it and subtracting it from
   the released noisy counts gives the exact private counts.
2. Two-release cancellation: two one-step DP-SGD releases (two target ε, as `pfdiff dpdm` trains ε = 1 and
   ε = 10 from one seed) share the standard-normal draw z; from u_i = g + σ_i·c·z the noise-free clipped
   gradient is g = (σ₂u₁ − σ₁u₂)/(σ₂ − σ₁).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.longtail.private import noisy_counts
from pfdiff.privacy.dpsgd import DPSGD
from pfdiff.privacy.noise import NoiseSource

PUBLISHED_SEED = 7


def invert_counts(released: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The attacker's guess: re-draw the count noise from the published seed and subtract it."""
    redrawn = NoiseSource(reproducible=True, seed=seed).gaussian(len(released), sigma, "noisy-counts").numpy()
    return np.round(released - redrawn).astype(int)


def test_counts_inversion_works_on_seeded_noise_and_fails_on_secure_noise():
    p = RunConfig().privacy.model_copy(update={"count_epsilon": 0.5})
    exact = np.array([69, 44, 29, 18, 12, 8, 5, 3, 2, 2]) + 20  # away from the clamp at 1
    seeded, event = noisy_counts(exact, p, NoiseSource(reproducible=True, seed=PUBLISHED_SEED))
    assert np.array_equal(invert_counts(seeded, event.noise_multiplier, PUBLISHED_SEED), exact)  # the attack works
    secure, _ = noisy_counts(exact, p, NoiseSource())
    guess = invert_counts(secure, event.noise_multiplier, PUBLISHED_SEED)
    # σ ≈ 7: each guess is off by the whole noise (right with probability ≈ 0.06); ≥ 6 of 10 right: < 1e-5
    assert (guess != exact).sum() >= 5


def _release(noise: NoiseSource, sigma: float, clip: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP-SGD step (q = 1, lr = 1, SGD) from fixed weights on fixed data: returns −Δw (the noisy mean
    clipped gradient, the released quantity) and the initial weights."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    w0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 1, generator=g)
    engine = DPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                   dataset_size=32, sample_rate=1.0, noise=noise, method="vmap", track_norms=False)
    engine.step(lambda m, xb, yb: ((m(xb) - yb) ** 2).sum(1), (x, y), step=0)
    w1 = torch.cat([p.detach().flatten() for p in model.parameters()])
    return w0 - w1, w0


def _cancel(u1: torch.Tensor, u2: torch.Tensor, s1: float, s2: float) -> torch.Tensor:
    return (s2 * u1 - s1 * u2) / (s2 - s1)


def test_two_release_cancellation_works_on_shared_noise_and_fails_on_independent_noise():
    s1, s2 = 8.0, 2.0  # a low-ε and a high-ε release of the same data
    truth, _ = _release(NoiseSource(), 0.0)  # σ = 0: the noise-free clipped mean gradient
    shared = [_release(NoiseSource(reproducible=True, seed=PUBLISHED_SEED), s)[0] for s in (s1, s2)]
    err_shared = (_cancel(*shared, s1, s2) - truth).norm() / truth.norm()
    assert err_shared < 1e-4  # the noise cancels exactly: the attack recovers the private gradient
    independent = [_release(NoiseSource(), s)[0] for s in (s1, s2)]
    err_independent = (_cancel(*independent, s1, s2) - truth).norm() / truth.norm()
    # independent draws: the combination keeps noise of std ≈ σ₁σ₂√2/|σ₂ − σ₁|·C/B per coordinate
    assert err_independent > 0.1
