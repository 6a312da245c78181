"""Dynamical regimes of diffusion (Biroli, Bonnaire, de Bortoli & Mézard 2024, "Dynamical regimes of
diffusion models", arXiv:2402.18491): theory, measurement with a trained model, and what they imply here.

Time is the forward Ornstein–Uhlenbeck time t of the paper (dx = −x dt + √2 dB, x(t) = e^{−t} a +
√Δ_t ξ, Δ_t = 1 − e^{−2t}), i.e. ᾱ = e^{−2t}: discrete step k of any schedule sits at
t_k = −½ log ᾱ_k (``NoiseSchedule.ou_time``). Backward generation crosses, from pure noise,

1. **speciation** at t_S = ½ log Λ, Λ the largest eigenvalue of the covariance of the data (the
   paper's eq. for t_S, §"Speciation": the direction of largest variance, which for well separated
   classes is the one that splits them, becomes unstable when e^{−2t}Λ ≈ 1). It is the covariance
   of the *whole* distribution that is being generated: for unconditional generation, the whole
   dataset; for generation conditioned on a class, that class (its own sub-structure speciates at
   ½ log Λ_c). :func:`speciation_time` reports all three (whole data, between-class, per class).
2. **collapse** at t_C, where the trajectories are attracted to single training points. The paper's
   criterion (§"Collapse"): the *excess entropy density* f^e(t) = s^sep(t) − s(t) vanishes, with
   s(t) the entropy density of the noised data distribution P_t and s^sep(t) = ½ log(2πeΔ_t) + (log n)/d
   that of n separated Gaussians of variance Δ_t (the empirical distribution once its components no
   longer overlap). f^e(t) is the (1/d-scaled) log-ratio between the weight of all other training
   points and that of the point a trajectory came from, in the empirical posterior: f^e > 0 (t > t_C)
   many points contribute, f^e < 0 (t < t_C) one point dominates (the REM condensation). Sign
   convention: f^e → (log n)/d > 0 (≈ 0 for large d) as t → ∞ and f^e → −∞ as t → 0. For one
   Gaussian class of variance σ² per dimension, s(t) = ½ log(2πe(Δ_t + σ²e^{−2t})), which gives the
   large-d formula t_C = ½ log(1 + σ²/(n^{2/d} − 1)) (:func:`collapse_time_formula`).
   :func:`excess_entropy` is the estimator for any dataset: a Monte Carlo over noised training points,
   s(t) estimated with the leave-one-out empirical density (:func:`excess_entropy` docstring).

Measurement with a trained model ``model(z_t, t, y)`` (any parameterisation) uses the project's
samplers: :func:`cloning_curve` (speciation by cloning, the paper's "cloning" experiment) and
:func:`collapse_curve` (share of trajectories that end on a training point). The validation model
:class:`GaussianMixtureDenoiser` returns the exact (ε̂, ẑ0) of an isotropic Gaussian mixture, and
:func:`two_gaussian_cloning_theory` the exact cloning probability of the symmetric two-class mixture.
The "use it" analyses: :func:`promise_S_table` (dp-promise's S against t_S),
:func:`speciation_timesteps` (DDIM steps placed around t_S).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pfdiff.diffusion.samplers import make_timesteps, sample_ddim
from pfdiff.diffusion.schedules import NoiseSchedule
from pfdiff.diffusion.denoiser import Denoiser
from pfdiff.training import derive_seed

# ---------------------------------------------------------------------------------------------------
# OU time ↔ discrete steps
# ---------------------------------------------------------------------------------------------------


def ou_times(schedule: NoiseSchedule) -> np.ndarray:
    """t_k = −½ log ᾱ_k for every step k = 0..T−1 (strictly increasing; float64)."""
    return schedule.ou_time().cpu().numpy()


def step_at_ou_time(schedule: NoiseSchedule, t: float | Sequence[float] | np.ndarray) -> int | np.ndarray:
    """The discrete step whose OU time is nearest to ``t`` (clamped to [0, T−1]); inverse of ``ou_time``.

    Round trip: ``step_at_ou_time(s, s.ou_time(k)) == k`` for every k of any schedule with β > 0.
    """
    grid = ou_times(schedule)
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64))
    hi = np.clip(np.searchsorted(grid, ts), 1, len(grid) - 1)
    lo = hi - 1
    k = np.where(np.abs(grid[lo] - ts) <= np.abs(grid[hi] - ts), lo, hi)
    return int(k[0]) if np.ndim(t) == 0 else k.astype(int)


def ou_grid_steps(schedule: NoiseSchedule, points: int, t_min: float = 0.05, t_max: float | None = None) -> list[int]:
    """Distinct steps at ``points`` OU times equally spaced in [t_min, t_max] (default: the last step's t)."""
    grid = ou_times(schedule)
    t_max = float(grid[-1]) if t_max is None else min(float(t_max), float(grid[-1]))
    t_min = max(float(t_min), float(grid[0]))
    return sorted({int(k) for k in step_at_ou_time(schedule, np.linspace(t_min, t_max, points))})


# ---------------------------------------------------------------------------------------------------
# theory: speciation
# ---------------------------------------------------------------------------------------------------


def _flat(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    return a.reshape(len(a), -1)


def covariance_spectrum(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of the sample covariance of ``x`` [N, ...] flattened to [N, d]."""
    a = _flat(x)
    if len(a) < 2:
        raise ValueError("need at least 2 samples for a covariance")
    return np.sort(np.linalg.eigvalsh(np.atleast_2d(np.cov(a, rowvar=False))))[::-1]


def ou_time_of_variance(lam: float) -> float:
    """½ log λ: the OU time at which a direction of variance λ has signal e^{−2t}λ equal to the noise."""
    return 0.5 * math.log(lam) if lam > 0 else -math.inf


@dataclass
class Speciation:
    """Speciation times t = ½ log Λ from covariance spectra (Biroli et al. 2024, §"Speciation")."""

    Lambda: float  # top eigenvalue of the covariance of the whole data: the paper's Λ
    t_S: float  # ½ log Λ: the speciation time of unconditional generation (the class is decided)
    d: int
    Lambda_between: float | None = None  # top eigenvalue of Σ_c π_c (μ_c − μ)(μ_c − μ)ᵀ: the class split alone
    t_S_between: float | None = None
    Lambda_within: dict[str, float] = field(default_factory=dict)  # per class: top eigenvalue of its covariance
    t_S_within: dict[str, float] = field(default_factory=dict)  # ½ log Λ_c: sub-class speciation, given the class
    top_eigenvalues: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def speciation_time(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | None = None,
                    top: int = 5) -> Speciation:
    """t_S = ½ log Λ of data ``x`` [N, ...] (flattened), with, given labels, the between-class and per-class
    values. The paper's t_S uses Λ of the whole data covariance; for classes separated along the top
    direction it is ≈ Λ_between + (within-class variance along it)."""
    a = _flat(x)
    ev = covariance_spectrum(a)
    out = Speciation(float(ev[0]), ou_time_of_variance(float(ev[0])), a.shape[1], top_eigenvalues=ev[:top].tolist())
    if y is None:
        return out
    yy = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
    classes = np.unique(yy)
    mu = a.mean(0)
    pi = np.array([np.mean(yy == c) for c in classes])
    dm = np.stack([a[yy == c].mean(0) - mu for c in classes])
    between = (dm * pi[:, None]).T @ dm
    out.Lambda_between = float(np.linalg.eigvalsh(between)[-1])
    out.t_S_between = ou_time_of_variance(out.Lambda_between)
    for c in classes:
        if (yy == c).sum() >= 2:
            lam = float(covariance_spectrum(a[yy == c])[0])
            out.Lambda_within[str(c)], out.t_S_within[str(c)] = lam, ou_time_of_variance(lam)
    return out


# ---------------------------------------------------------------------------------------------------
# theory: collapse
# ---------------------------------------------------------------------------------------------------


def collapse_time_formula(n: float, d: int, sigma2: float) -> float:
    """Large-d collapse time of one Gaussian class of variance σ² per dimension with n training points:
    t_C = ½ log(1 + σ²/(n^{2/d} − 1)) (Biroli et al. 2024, from f^e(t_C) = 0 with Gaussian s(t)).
    Increases as n falls (∞ at n = 1: a single point is collapsed onto at every time) and as d grows."""
    if n <= 1:
        return math.inf
    return 0.5 * math.log1p(sigma2 / math.expm1(2.0 * math.log(n) / d))


def excess_entropy_gaussian(t: float | np.ndarray, n: float, d: int, sigma2: float) -> np.ndarray:
    """f^e(t) = (log n)/d − ½ log(1 + σ² e^{−2t}/Δ_t) for one Gaussian class (large d; zero at t_C)."""
    t = np.asarray(t, dtype=np.float64)
    return math.log(n) / d - 0.5 * np.log1p(sigma2 * np.exp(-2 * t) / -np.expm1(-2 * t))


def _logsumexp_rest(logits: torch.Tensor, self_idx: torch.Tensor) -> torch.Tensor:
    """log Σ_{μ ≠ self} exp(logits[i, μ]) per row (float64)."""
    logits = logits.clone()
    logits[torch.arange(len(logits)), self_idx] = -math.inf
    return torch.logsumexp(logits, dim=1)


@torch.no_grad()
def excess_entropy(x: torch.Tensor | np.ndarray, ou_t: Sequence[float] | np.ndarray, queries: int = 512,
                   seed: int = 0, chunk: int = 256) -> np.ndarray:
    """f^e(t) = s^sep(t) − s(t) of a training set ``x`` [n, ...] at each OU time (Monte Carlo; entropy per dim).

    s^sep(t) = ½ log(2πeΔ_t) + (log n)/d exactly; s(t) = −(1/d) E log P_t(x) is estimated over noised
    training points x = e^{−t} a_{μ0} + √Δ_t ξ with the *leave-one-out* empirical density
    P_{−μ0}(x) = 1/(n−1) Σ_{μ≠μ0} N(x; e^{−t} a_μ, Δ_t I), a stand-in for the population density at a point
    it was not built from. With E‖ξ‖²/2 = d/2 written inside the expectation (paired, lower variance):
        f^e(t) = (1/d)·E[log Σ_{μ≠μ0} exp(−‖x − e^{−t}a_μ‖²/(2Δ_t)) − log exp(−‖ξ‖²/2)] + (1/d)·log(n/(n−1)),
    the log-ratio of the other points' weight to the point of origin's in the empirical posterior:
    positive while other points share it, negative once the point of origin dominates (collapse); zero
    crossing t_C. ``queries`` (point, noise) draws in all, spread evenly over the n points.
    """
    a = torch.as_tensor(_flat(x))
    n, d = a.shape
    if n < 2:
        raise ValueError("the excess entropy needs at least 2 training points")
    g = torch.Generator().manual_seed(derive_seed(seed, "excess-entropy"))
    reps = max(1, -(-queries // n))
    idx = torch.randperm(n, generator=g).repeat(reps)[:queries]
    noise = torch.randn((len(idx), d), generator=g, dtype=torch.float64)
    self_term = 0.5 * (noise * noise).sum(1)  # −log Z_self = ‖ξ‖²/2
    out = []
    for t in np.asarray(ou_t, dtype=np.float64):
        s, var = math.exp(-t), -math.expm1(-2 * t)
        ref = s * a
        total = 0.0
        for lo in range(0, len(idx), chunk):
            i = idx[lo:lo + chunk]
            q = ref[i] + math.sqrt(var) * noise[lo:lo + chunk]
            d2 = (q * q).sum(1, keepdim=True) + (ref * ref).sum(1)[None, :] - 2 * q @ ref.T
            total += float((_logsumexp_rest(-d2.clamp_min(0) / (2 * var), i) + self_term[lo:lo + chunk]).sum())
        out.append(math.log(n / (n - 1)) / d + total / (len(idx) * d))
    return np.array(out)


def zero_crossing(t: Sequence[float] | np.ndarray, f: Sequence[float] | np.ndarray) -> float:
    """The largest t where f changes sign from ≥ 0 (above) to < 0 (below), linearly interpolated; ``nan``
    when f ≥ 0 on the whole grid (the crossing lies below it), +∞ when f < 0 everywhere (for f^e: collapsed
    at every t of the grid)."""
    t, f = np.asarray(t, dtype=np.float64), np.asarray(f, dtype=np.float64)
    order = np.argsort(t)
    t, f = t[order], f[order]
    if (f < 0).all():
        return math.inf
    if (f >= 0).all():
        return math.nan
    for i in range(len(t) - 1, 0, -1):
        if f[i] >= 0 > f[i - 1]:
            return float(t[i - 1] + (t[i] - t[i - 1]) * (0 - f[i - 1]) / (f[i] - f[i - 1]))
    return math.nan


def collapse_times(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | None, ou_t: Sequence[float],
                   queries: int = 512, seed: int = 0) -> dict[str, Any]:
    """t_C of the whole set and of every class (collapse *within* a class is what a class-conditional model
    meets): n, σ² = tr(C)/d, the large-d formula, and the Monte Carlo f^e(t) with its zero crossing."""
    a = _flat(x)
    groups = {"all": np.arange(len(a))}
    if y is not None:
        yy = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
        groups.update({int(c): np.flatnonzero(yy == c) for c in np.unique(yy)})
    out: dict[str, Any] = {"ou_t": [float(v) for v in ou_t], "d": a.shape[1], "groups": {}}
    for name, idx in groups.items():
        n = len(idx)
        entry: dict[str, Any] = {"n": n}
        if n >= 2:
            sigma2 = float(np.trace(np.atleast_2d(np.cov(a[idx], rowvar=False))) / a.shape[1])
            f = excess_entropy(a[idx], ou_t, queries, derive_seed(seed, str(name)))
            entry.update(sigma2=sigma2, t_C_formula=collapse_time_formula(n, a.shape[1], sigma2),
                         excess_entropy=f.tolist(), t_C=zero_crossing(ou_t, f))
        out["groups"][str(name)] = entry
    return out


# ---------------------------------------------------------------------------------------------------
# measurement with a trained model
# ---------------------------------------------------------------------------------------------------


def backward_steps(k: int, sampler_steps: int) -> list[int]:
    """Descending timesteps from k to 0 (at most ``sampler_steps`` of them, equally spaced in index)."""
    return sorted({int(round(v)) for v in np.linspace(k, 0, max(1, min(sampler_steps, k + 1)))}, reverse=True)


def denoise_from(denoiser: Denoiser, z_k: torch.Tensor, k: int, y: torch.Tensor, sampler_steps: int = 40,
                 eta: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the backward process from step k to data: ``sample_ddim`` over ``backward_steps(k)`` with η = 1
    (DDPM's variance; consecutive steps are exactly ancestral DDPM), so two calls from the same z_k are
    independent trajectories."""
    return sample_ddim(denoiser, z_k, y, backward_steps(k, sampler_steps), eta=eta, generator=generator)


def _noised(schedule: NoiseSchedule, x0: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
    return schedule.q_sample(x0, torch.full((len(x0),), k, dtype=torch.long, device=x0.device), noise)


@torch.no_grad()
def cloning_curve(denoiser: Denoiser, x0: torch.Tensor, steps: Sequence[int],
                  classify: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, *, clones: int = 4,
                  sampler_steps: int = 40, seed: int = 0,
                  batch_size: int = 4096) -> dict[str, list[float]]:
    """Speciation by cloning (Biroli et al. 2024, the "cloning" experiment): noise each data point of ``x0``
    to step k, run ``clones`` independent backward trajectories from that same point (labels ``y``: the
    null label for unconditional generation), let ``classify`` label the endpoints, and estimate
    φ(t_k) = P(two clones end in the same class) = mean over points of Σ_c m_c(m_c − 1)/(K(K − 1))
    (unbiased over the K(K−1) ordered pairs). φ falls from 1 (t ≪ t_S) to Σ_c π_c² (t ≫ t_S)."""
    schedule = denoiser.schedule
    if clones < 2:
        raise ValueError("cloning needs at least 2 clones per point")
    K = clones
    per = max(1, batch_size // K)
    rows: dict[str, list[float]] = {"step": [], "t": [], "phi": [], "se": []}
    for k in sorted(int(s) for s in steps):
        g = torch.Generator().manual_seed(derive_seed(seed, "cloning", k))
        phis = []
        for lo in range(0, len(x0), per):
            xb, yb = x0[lo:lo + per], y[lo:lo + per]
            z = _noised(schedule, xb, k, g).repeat_interleave(K, 0)
            end = denoise_from(denoiser, z, k, yb.repeat_interleave(K, 0), sampler_steps, generator=g)
            lab = classify(end).reshape(len(xb), K).cpu()
            same = (lab[:, :, None] == lab[:, None, :]).sum((1, 2)) - K  # ordered pairs i ≠ j agreeing
            phis.append(same.double() / (K * (K - 1)))
        p = torch.cat(phis)
        rows["step"].append(k)
        rows["t"].append(float(schedule.ou_time(torch.tensor(k))))
        rows["phi"].append(float(p.mean()))
        rows["se"].append(float(p.std() / math.sqrt(len(p))) if len(p) > 1 else math.nan)
    return rows


def speciation_from_cloning(t: Sequence[float], phi: Sequence[float], low: float | None = None,
                            high: float | None = None) -> dict[str, float]:
    """Measured t_S: the largest t at which φ(t) reaches the midpoint between its plateaus, low (t → ∞:
    Σ_c π_c²; default φ at the largest t measured) and high (t → 0: 1; default φ at the smallest t),
    linearly interpolated. For the symmetric two-Gaussian mixture this midpoint time is ½ log Λ + O(0.1)
    (:func:`two_gaussian_cloning_theory`). Also the edges of the speciation window: upper, where φ has
    risen by 10 % of the span (above it the class is not yet decided), and lower, 90 % (below it the
    class is decided)."""
    t, phi = np.asarray(t, dtype=np.float64), np.asarray(phi, dtype=np.float64)
    order = np.argsort(t)
    t, phi = t[order], phi[order]
    low = float(phi[-1]) if low is None else float(low)
    high = float(phi[0]) if high is None else float(high)

    def crossing(share: float) -> float:
        # last sign change of level − φ going up in t: φ above the level below, under it above
        return zero_crossing(t, low + share * (high - low) - phi) if high > low else math.nan

    return {"t_S": crossing(0.5), "t_S_upper": crossing(0.1), "t_S_lower": crossing(0.9), "low": low, "high": high}


@torch.no_grad()
def collapse_curve(denoiser: Denoiser, probes: torch.Tensor, probes_y: torch.Tensor, steps: Sequence[int],
                   members: torch.Tensor, members_y: torch.Tensor, references: torch.Tensor,
                   references_y: torch.Tensor, *, sampler_steps: int = 40, seed: int = 0,
                   copy_ratio: float = 0.5, batch_size: int = 4096) -> dict[str, list[float]]:
    """Collapse as a function of t: noise held-out ``probes`` (never trained on) to step k, run the backward
    process conditioned on their labels, and record the share of endpoints whose nearest training point
    (``members``) is much closer than any held-out ``references`` point of the same class:
    r = d_member/d_reference < ``copy_ratio`` (``mia.nearest_neighbour_check``; references and probes
    must be disjoint). A generalising model returns a probe noised to small t near the probe (r ≈ 1); a
    model that follows the empirical score below its collapse time is pulled onto a training point (r ≈ 0)
    from any start. At the largest t the endpoints are ordinary samples: their copy share is the model's."""
    from pfdiff.evaluation.mia import nearest_neighbour_check

    schedule = denoiser.schedule
    rows: dict[str, list[float]] = {"step": [], "t": [], "copy_share": [], "median_ratio": []}
    for k in sorted(int(s) for s in steps):
        g = torch.Generator().manual_seed(derive_seed(seed, "collapse", k))
        ends = [denoise_from(denoiser, _noised(schedule, probes[lo:lo + batch_size], k, g), k,
                             probes_y[lo:lo + batch_size], sampler_steps, generator=g)
                for lo in range(0, len(probes), batch_size)]
        check = nearest_neighbour_check(torch.cat(ends), probes_y, members, members_y, references, references_y,
                                        seed=seed, copy_ratio=copy_ratio)
        rows["step"].append(k)
        rows["t"].append(float(schedule.ou_time(torch.tensor(k))))
        rows["copy_share"].append(check["copy_fraction"])
        rows["median_ratio"].append(check["median_ratio"])
    return rows


# ---------------------------------------------------------------------------------------------------
# validation: a Gaussian mixture with its exact score
# ---------------------------------------------------------------------------------------------------


class GaussianMixtureDenoiser(Denoiser):
    """The exact denoiser of p(a) = Σ_k π_k N(a; μ_k, σ_k² I): ``(z_t, t, y) -> (ε̂, ẑ0)`` for the samplers.

    With z_t = √ᾱ a + √(1−ᾱ) ε, z_t | k ~ N(√ᾱ μ_k, v_k I), v_k = ᾱσ_k² + 1 − ᾱ, so
    E[a | z_t] = Σ_k w_k(z_t)·(μ_k + √ᾱ σ_k²/v_k·(z_t − √ᾱ μ_k)), w_k ∝ π_k N(z_t; √ᾱ μ_k, v_k I)
    (Bayes' rule), and ε̂ = (z_t − √ᾱ E[a|z_t])/√(1−ᾱ) is the exact score up to −1/√(1−ᾱ). Labels y < K
    condition on component y; the null label K (or any y ≥ K) uses the whole mixture.
    """

    def __init__(self, means: torch.Tensor, sigma2: float | torch.Tensor, schedule: NoiseSchedule,
                 weights: torch.Tensor | None = None):
        super().__init__(None, schedule)  # no network: the posterior mean is computed exactly
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, self.dim = self.means.shape
        self.sigma2 = torch.as_tensor(sigma2, dtype=torch.float64).expand(K).clone()
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        self.log_weights = torch.log(w / w.sum())

    @property
    def num_classes(self) -> int:
        return len(self.means)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _log_post(self, z: torch.Tensor, a: torch.Tensor, v: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """log w_k(z) [B, K]: log π_k + log N(z; a μ_k, v_k I), masked to component y where y < K."""
        d2 = ((z[:, None, :] - a[:, None, None] * self.means[None]) ** 2).sum(-1)
        logp = self.log_weights[None] - d2 / (2 * v) - 0.5 * self.dim * torch.log(v)
        if y is not None:
            fixed = y < self.num_classes
            mask = torch.zeros_like(logp, dtype=torch.bool)
            mask[fixed] = True
            mask[fixed, y[fixed]] = False
            logp = logp.masked_fill(mask, -math.inf)
        return logp - torch.logsumexp(logp, 1, keepdim=True)

    def posterior_mean(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[a | z_t, y] (float64 [B, d])."""
        z = z_t.double().reshape(len(z_t), -1)
        ab = self.schedule.alpha_bar.to(z.device)[t.long()].double()
        a = ab.sqrt()
        v = ab[:, None] * self.sigma2[None] + (1 - ab)[:, None]  # [B, K]
        w = self._log_post(z, a, v, y).exp()
        comp = self.means[None] + (a[:, None, None] * self.sigma2[None, :, None] / v[..., None]) * (
            z[:, None, :] - a[:, None, None] * self.means[None])
        return (w[..., None] * comp).sum(1)

    def describe(self) -> str:
        return "exact Gaussian-mixture denoiser"

    def __call__(self, z_t: torch.Tensor, t: int | torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(t, torch.Tensor):
            t = torch.full((len(z_t),), int(t), dtype=torch.long, device=z_t.device)
        x0 = self.posterior_mean(z_t, t, y)
        ab = self.schedule.alpha_bar.to(z_t.device)[t.long()].double()[:, None]
        eps = (z_t.double().reshape(len(z_t), -1) - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps.to(z_t.dtype).reshape(z_t.shape), x0.to(z_t.dtype).reshape(z_t.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws (float32 [n, d]) and their components."""
        y = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return (self.means[y] + self.sigma2[y, None].sqrt() * eps).float(), y

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The Bayes classifier of clean points: argmax_k of the posterior at ᾱ = 1."""
        z = x.double().reshape(len(x), -1)
        one = torch.ones(len(z), dtype=torch.float64)
        return self._log_post(z, one, self.sigma2[None].expand(len(z), -1), None).argmax(1)


def _phi_of_lambda(lam: np.ndarray, nodes: int = 80) -> np.ndarray:
    """E[p² + (1 − p)²], p = sigmoid(A), A ~ N(2λ, 4λ) (Gauss–Hermite), for an array of λ ≥ 0."""
    from scipy.special import expit

    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    lam = np.asarray(lam, dtype=np.float64)
    p = expit(2 * lam[..., None] + 2 * np.sqrt(lam)[..., None] * x)
    return (w / w.sum() * (p ** 2 + (1 - p) ** 2)).sum(-1)


def two_gaussian_cloning_theory(ou_t: float | np.ndarray, m2: float, sigma2: float = 1.0) -> np.ndarray:
    """Exact φ(t) for p = ½N(m, σ²I) + ½N(−m, σ²I) with ‖m‖² = m2, exact backward dynamics.

    From x_t the exact backward process samples the posterior, whose class is + with probability
    p = sigmoid(A), A = 2 e^{−t} m·x_t/Γ_t, Γ_t = e^{−2t}σ² + Δ_t. Over x_t, A ~ N(±2λ, 4λ) with
    λ = e^{−2t}‖m‖²/Γ_t, so φ = E[p² + (1 − p)²] (Gauss–Hermite). φ(λ) = ¾ at λ* ≈ 0.85, i.e.
    t = ½ log(‖m‖²/(0.85Γ)) ≈ ½ log Λ + 0.08 for Λ = ‖m‖² + σ² large: the midpoint is t_S.
    """
    t = np.asarray(ou_t, dtype=np.float64)
    e2 = np.exp(-2 * t)
    return _phi_of_lambda(e2 * m2 / (e2 * sigma2 + 1 - e2))


def cloning_window_offset(level: float = 0.1) -> float:
    """t − t_S at which the two-Gaussian cloning probability has risen by ``level`` of its span above its
    t → ∞ plateau, in the large-Λ limit λ = e^{−2(t − t_S)}: 0.1 → ≈ +1.13, 0.5 → ≈ +0.08."""
    from scipy.optimize import brentq

    log_lam = brentq(lambda v: (_phi_of_lambda(np.exp(v)) - 0.5) / 0.5 - level, -30.0, 10.0)
    return -0.5 * log_lam


# ---------------------------------------------------------------------------------------------------
# use it: dp-promise's S, DDIM steps around t_S
# ---------------------------------------------------------------------------------------------------


def _binding_constraint(rows: list[dict[str, Any]], rec: dict[str, Any] | None) -> str | None:
    """Which constraint the next candidate below the recommended S fails ("speciation", "privacy", both)."""
    below = [r for r in rows if rec is not None and r["S"] < rec["S"]]
    if not below:
        return None
    nxt = max(below, key=lambda r: r["S"])
    return " and ".join(name for name, good in (("speciation", nxt["label_free_ok"]),
                                                 ("privacy", nxt["privacy_ok"])) if not good)


def promise_S_table(privacy, n_private: int, schedule: NoiseSchedule, candidates: Sequence[int], t_S_upper: float,
                    fixed_events: Sequence = (), eps_share: float = 0.1, calibrate: bool = True) -> dict[str, Any]:
    """dp-promise's Phase I trains without labels on steps [S, T); for each candidate S: the OU time of
    its smallest Phase-I step (S − 1, as ``plan_denoiser``), its distance to the speciation window, the ε
    of Phase I alone, and the total ε of fixed events + Phase I + the Phase II that the configured S's
    plan calibrates (``plan_denoiser``; same σ₂ for every row, so the rows show what moving S costs).

    ``privacy`` is a ``PrivacyConfig``; ``t_S_upper`` the upper edge of the speciation window (above it the
    class is not yet decided; :func:`speciation_from_cloning`). Rule: recommend the *smallest* S (the
    widest label-free, clip-free Phase I) with (a) t(S−1) ≥ t_S_upper, so withholding labels on [S, T)
    loses no class information (sampling uses the null label there, ``PhasedLabels``), and (b) Phase-I
    ε ≤ ``eps_share``·target, so Phase II keeps most of the budget; its own σ₂ is calibrated too. ε of
    Phase I decreases with S (μ_S = 2R√ᾱ_S/√(1−ᾱ_S) shrinks with ᾱ_S). Phase-I noise multipliers below
    the accountant's SIGMA_MIN (0.1) are not accounted (PLD is very slow there): ε = ∞, far over any
    budget. ``calibrate=False`` skips every calibration (fast).
    """
    from pfdiff.longtail.private import plan_denoiser
    from pfdiff.privacy.accounting import SIGMA_MIN, BudgetError, GaussianEvent, epsilon, phase1_noise_multiplier

    p = privacy.model_copy(update={"mechanism": "dp-promise"})
    q1 = min(1.0, p.promise_phase1_batch / n_private)
    fixed = list(fixed_events)

    def plan(S: int) -> dict[str, Any]:
        try:
            pl = plan_denoiser(p.model_copy(update={"promise_S": S}), n_private, schedule, fixed)
            return {"S": S, "phase2_sigma": pl.sigma, "phase2_sample_rate": pl.sample_rate,
                    "total_epsilon": epsilon(pl.events, p.delta, p.accountant)}
        except (BudgetError, ValueError) as e:
            return {"S": S, "infeasible": str(e)}

    base = plan(p.promise_S) if calibrate else None
    rows = []
    for S in sorted(int(s) for s in candidates):
        if not 0 < S < schedule.T:
            raise ValueError(f"candidate S={S} outside (0, T={schedule.T})")
        ab = float(schedule.alpha_bar[S - 1])
        mult = phase1_noise_multiplier(p.feature_radius, ab)
        phase1 = GaussianEvent(mult, q1, p.promise_phase1_steps, "phase 1")
        eps1 = epsilon([phase1], p.delta, p.accountant) if mult >= SIGMA_MIN else math.inf
        t = float(schedule.ou_time(torch.tensor(S - 1)))
        row = {"S": S, "ou_t": t, "t_minus_t_S_upper": t - t_S_upper, "alpha_bar": ab,
               "phase1_noise_multiplier": mult, "phase1_epsilon": eps1, "total_epsilon_at_base_sigma2": None,
               "label_free_ok": t >= t_S_upper, "privacy_ok": eps1 <= eps_share * p.target_epsilon}
        if base is not None and "phase2_sigma" in base and eps1 < p.target_epsilon:
            phase2 = GaussianEvent(base["phase2_sigma"], base["phase2_sample_rate"], p.steps, "phase 2")
            row["total_epsilon_at_base_sigma2"] = epsilon([*fixed, phase1, phase2], p.delta, p.accountant)
        rows.append(row)
    ok = [r for r in rows if r["label_free_ok"] and r["privacy_ok"]]
    rec = min(ok, key=lambda r: r["S"]) if ok else None
    binding = _binding_constraint(rows, rec)
    free = [r["S"] for r in rows if r["label_free_ok"]]
    return {"rule": f"smallest S with t(S−1) ≥ upper edge of the speciation window ({t_S_upper:.3f}) and "
                    f"Phase-I ε ≤ {eps_share:g}·target ε ({p.target_epsilon:g})",
            "rows": rows, "recommended_S": rec["S"] if rec else None, "binding_constraint": binding,
            "smallest_label_free_S": min(free) if free else None,
            "configured_S_plan": base, "recommended_S_plan": plan(rec["S"]) if calibrate and rec else None,
            "target_epsilon": p.target_epsilon, "delta": p.delta, "n_private": n_private, "phase1_sample_rate": q1,
            "phase1_steps": p.promise_phase1_steps, "feature_radius": p.feature_radius, "t_S_upper": t_S_upper}


def speciation_timesteps(schedule: NoiseSchedule, steps: int, t_S: float, width: float = 0.5,
                         share: float = 0.5) -> list[int]:
    """A ``steps``-step descending DDIM grid with ``round(share·steps)`` steps equally spaced in OU time over
    the speciation window [t_S − width, t_S + width] and the rest uniform in index ("trailing", so the
    first step is T − 1). Collisions are refilled from a finer uniform grid; surplus uniform steps nearest
    to t_S are dropped, so exactly ``steps`` distinct steps come back (for steps ≤ T)."""
    if not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must lie in [1, T={schedule.T}], got {steps}")
    n_in = min(int(round(share * steps)), steps - 1)
    inside = {int(k) for k in step_at_ou_time(schedule, np.linspace(t_S - width, t_S + width, n_in))} if n_in else set()
    for m in range(max(1, steps - len(inside)), schedule.T + 1):
        ts = inside | set(make_timesteps(schedule.T, m, "trailing"))
        if len(ts) >= steps:
            break
    grid = ou_times(schedule)
    extra = sorted(ts - inside - {schedule.T - 1}, key=lambda k: abs(grid[k] - t_S))
    ts -= set(extra[:len(ts) - steps])
    return sorted(ts, reverse=True)


def ou_uniform_timesteps(schedule: NoiseSchedule, steps: int, t_min: float = 0.02, t_cap: float = 4.0) -> list[int]:
    """``steps`` descending steps equally spaced in OU time over [t_min, min(t_last, t_cap)], the first one
    moved to T − 1 (sampling starts from pure noise). The cap keeps the cosine schedule's long tail
    (t_last ≈ 9.9, ᾱ ≈ 0) from taking the grid: at t = 4, ᾱ = e^{−8} ≈ 3·10⁻⁴ is already noise."""
    grid = ou_times(schedule)
    ks = step_at_ou_time(schedule, np.linspace(min(float(grid[-1]), t_cap), max(t_min, float(grid[0])), steps))
    return sorted({schedule.T - 1, *(int(k) for k in ks[1:])}, reverse=True)


def placement_timesteps(schedule: NoiseSchedule, steps: int, t_S: float, width: float = 0.5) -> dict[str, list[int]]:
    """The few-step grids compared in the DDIM experiment: uniform in index (leading, trailing), uniform in
    OU time, and half the steps around t_S (:func:`speciation_timesteps`)."""
    return {"leading": make_timesteps(schedule.T, steps, "leading"),
            "trailing": make_timesteps(schedule.T, steps, "trailing"),
            "ou-uniform": ou_uniform_timesteps(schedule, steps),
            "around-t_S": speciation_timesteps(schedule, steps, t_S, width)}

