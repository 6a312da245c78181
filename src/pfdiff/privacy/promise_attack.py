"""A distinguishing test of a few training steps: does the update tell x from −x? (dp-promise's Phase I).

Why: dp-promise (Wang et al., USENIX Security 2024) accounts one Phase-I use of an example as the release
of z_t = √ᾱ_t·x + √(1−ᾱ_t)·ε on t ≥ S, a Gaussian mechanism with μ_S = 2R√ᾱ_S/√(1−ᾱ_S) under replace-one
(‖x − x'‖ ≤ 2R): ε ≈ 0.99 per use at δ = 1e-5 for S = 900 of T = 1000, R = 8 (``phase1_noise_multiplier``).
But what Phase I releases is not z_t: it is a weight update, the gradient of ‖f(z_t) − target‖², and the
target is computed from x itself (the v target √ᾱ·ε − √(1−ᾱ)·x ≈ −x at high noise), with no
clipping and no added noise. The update therefore carries x almost in the clear. This module measures
that with the simplest possible test, so the claim can be refuted by numbers rather than argument:

1. Two neighbouring datasets under **replace-one**: D₊ = B ∪ {x}, D₋ = B ∪ {−x}, with x at the clip radius
   R (‖x − (−x)‖ = 2R: the paper's worst case, exactly the pair its μ_S is computed for) and B an optional
   public background. Both start from the same public initial weights θ₀.
2. A *mechanism* (:class:`PaperPhase1` as published, or :class:`ClippedNoisyStep`, DP-SGD on the same
   loss) runs ``steps`` updates; the release is the final weights θ (one trial = one fresh run).
3. Statistic: s = ⟨θ − θ₀, d⟩ with d = mean(θ − θ₀ | D₊) − mean(θ − θ₀ | D₋) estimated on ``calibration``
   trials per side, threshold τ = the midpoint of the two calibration means of s. Direction and threshold
   are fixed before the ``trials`` fresh test trials per side, so the test errors are binomial with the
   test's true FPR/FNR.
4. Bound: if the mechanism is (ε, δ)-DP for this pair, every test has FPR + e^ε·FNR ≥ 1 − δ and
   FNR + e^ε·FPR ≥ 1 − δ (Kairouz et al. 2015; Jagielski et al. 2020, "Auditing DP-SGD"). With
   Clopper–Pearson upper bounds on FPR and FNR, each at level β/2 (both hold w.p. ≥ 1 − β),
       ε ≥ max(log((1 − δ − FNR⁺)/FPR⁺), log((1 − δ − FPR⁺)/FNR⁺))   at confidence 1 − β.
   0/4000 errors per side gives FPR⁺ = FNR⁺ = 9.2e-4 and ε ≥ 6.99 at δ = 1e-5 (the ceiling of 4000 trials).

Neighbouring relation: the test is **replace-one** (x → −x), the relation of the paper's 2R sensitivity,
so its bound is compared with the paper's figure as is. The project's ledger speaks add/remove; a
replace-one pair is two add/remove steps (D₊ → B → D₋), so (ε, δ)-DP under add/remove implies
(2ε, (1 + e^ε)δ)-DP under replace-one (group privacy, k = 2). The add/remove lower bound is therefore the
largest ε with e^{2ε}·FPR⁺ + FNR⁺ + (1 + e^ε)δ < 1 (or FPR⁺ and FNR⁺ swapped): :func:`add_remove_lower_bound`,
about half the replace-one bound. The claims compared with it must be in the same relation: for DP-SGD
on a fixed batch (q = 1) the replace-one sensitivity is 2C, i.e. noise multiplier σ/2 in the accountant
(:func:`dpsgd_replace_claim`).

Speed: every trial is an independent tiny training run; the trials are batched with ``torch.func``
(``vmap`` of ``grad`` through ``functional_call``), ``chunk`` runs at a time, with the (t, ε) draws, the
Poisson masks and the DP noise drawn outside the vmap from seeded generators. The seeds are the audit's
own (an audit must be reproducible; it releases nothing private).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from scipy.stats import beta as beta_dist
from torch import nn
from torch.func import functional_call, grad, vmap

from pfdiff.diffusion import DiffusionLoss
from pfdiff.privacy.accounting import GaussianEvent, epsilon, phase1_noise_multiplier
from pfdiff.privacy.dpsgd import clip_factors
from pfdiff.training import derive_seed

__all__ = ["ClippedNoisyStep", "PaperPhase1", "add_remove_lower_bound", "clopper_pearson_upper", "distinguish",
           "dpsgd_replace_claim", "paper_phase1_claim", "replace_one_lower_bound", "unit_canary"]

Params = dict[str, torch.Tensor]
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam(W)'s defaults, as the project's Phase I uses


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------

def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson upper bound on a binomial rate: exact, never below the truth
    w.p. ≥ 1 − α, and > 0 even at 0 errors (0/n gives 1 − α^{1/n})."""
    if not (isinstance(trials, int) and trials >= 1 and isinstance(errors, int) and 0 <= errors <= trials):
        raise ValueError(f"need integers 0 <= errors <= trials, trials >= 1; got errors={errors!r}, trials={trials!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    return 1.0 if errors == trials else float(beta_dist.ppf(1.0 - alpha, errors + 1, trials - errors))


def _log_ratio(num: float, den: float) -> float:
    return math.log(num / den) if num > 0 else 0.0


def replace_one_lower_bound(fpr_upper: float, fnr_upper: float, delta: float) -> float:
    """ε refuted for the tested pair: max(log((1−δ−FNR⁺)/FPR⁺), log((1−δ−FPR⁺)/FNR⁺), 0) (module doc, step 4)."""
    _check_rates(fpr_upper, fnr_upper, delta)
    return max(0.0, _log_ratio(1.0 - delta - fnr_upper, fpr_upper), _log_ratio(1.0 - delta - fpr_upper, fnr_upper))


def add_remove_lower_bound(fpr_upper: float, fnr_upper: float, delta: float, tol: float = 1e-9) -> float:
    """The add/remove ε refuted by a replace-one test: the largest ε with e^{2ε}·FPR⁺ + FNR⁺ + (1 + e^ε)·δ < 1
    (or the rates swapped), since (ε, δ) add/remove ⇒ (2ε, (1 + e^ε)δ) replace-one (group privacy, k = 2)."""
    _check_rates(fpr_upper, fnr_upper, delta)

    def violated(eps: float) -> bool:  # the test's rates are impossible for an (eps, δ) add/remove mechanism
        grow = (1.0 + math.exp(eps)) * delta
        return min(math.exp(2 * eps) * fpr_upper + fnr_upper, math.exp(2 * eps) * fnr_upper + fpr_upper) + grow < 1.0

    if not violated(0.0):
        return 0.0
    lo, hi = 0.0, 0.5 * replace_one_lower_bound(fpr_upper, fnr_upper, 0.0) + 1.0  # violated(hi) is False
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if violated(mid) else (lo, mid)
    return lo


def _check_rates(fpr: float, fnr: float, delta: float) -> None:
    if not (0 < fpr <= 1 and 0 < fnr <= 1):
        raise ValueError(f"error-rate upper bounds must lie in (0, 1], got FPR⁺={fpr!r}, FNR⁺={fnr!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}")


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------

def paper_phase1_claim(radius: float, alpha_bar_S: float, delta: float, steps: int = 1,
                       sample_rate: float = 1.0) -> float:
    """ε *claimed by the paper* for ``steps`` Phase-I uses: the ledger's PLD arithmetic on noise multiplier
    1/μ_S (``phase1_noise_multiplier``). Replace-one at q = 1 (2R is a replace-one sensitivity); with q < 1
    it is the ledger's figure, which composes that sensitivity with add/remove subsampling (issue 13)."""
    return epsilon([GaussianEvent(phase1_noise_multiplier(radius, alpha_bar_S), sample_rate, steps)], delta, "pld")


def dpsgd_replace_claim(sigma: float, delta: float, steps: int = 1) -> float:
    """The accountant's ε of ``steps`` full-batch DP-SGD steps (clip C, noise σC) for a replace-one pair:
    the clipped sums differ by ≤ 2C, so it is the Gaussian mechanism with noise multiplier σ/2."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    return epsilon([GaussianEvent(sigma / 2.0, 1.0, steps)], delta, "pld")


# --------------------------------------------------------------------------------------------
# Mechanisms: one update of a batch of independent runs, as functions of stacked parameters
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rows:
    """One step's rows of every trial: data z0 [n, d] and labels [n] (shared), per-trial draws
    t [N, n], a = √ᾱ_t, b = √(1−ᾱ_t), w = λ_t [N, n], ε [N, n, d], Poisson inclusion mask [N, n]."""

    z0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    eps: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class _DiffusionStep:
    """The loss both mechanisms share: ``loss``'s λ_t·mean_d (model(z_t, t, y) − target)² with t uniform in its
    [t_min, t_max), one (t, ε) draw per row per step, rows in the batch w.p. ``sample_rate`` (1: fixed batch,
    all rows). ``loss`` (a ``DiffusionLoss``) supplies the schedule, the t range, the target and λ_t."""

    loss: DiffusionLoss
    null_label: int
    lr: float = 1e-4
    optimizer: str = "adam"
    sample_rate: float = 1.0

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not (0 < self.sample_rate <= 1 and self.lr > 0):
            raise ValueError(f"need 0 < sample_rate <= 1 and lr > 0, got {self.sample_rate!r} and {self.lr!r}")

    def draw(self, z0: torch.Tensor, trials: int, g: torch.Generator) -> Rows:
        """The step's randomness for ``trials`` runs on the rows ``z0`` (all labels null: Phase I is unconditional)."""
        n, ab = len(z0), self.loss.schedule.alpha_bar
        t = torch.randint(self.loss.t_min, self.loss.t_max, (trials, n), generator=g)
        eps = torch.randn(trials, n, z0.shape[1], generator=g)
        mask = (torch.rand(trials, n, generator=g) < self.sample_rate).float() if self.sample_rate < 1 else \
            torch.ones(trials, n)
        a, b = ab[t].sqrt().float(), (1.0 - ab[t]).sqrt().float()
        w = self.loss.weight(t.flatten()).view(trials, n)
        return Rows(z0, torch.full((n,), self.null_label, dtype=torch.long), t, a, b, w, eps, mask)

    def row_losses(self, model: nn.Module, params: Params, z0, y, t, a, b, w, eps) -> torch.Tensor:
        """Per-row loss of one run (rows [n, …]); what DiffusionLoss computes, from given draws."""
        z_t = a[:, None] * z0 + b[:, None] * eps
        out = functional_call(model, params, (z_t, t, y))
        return ((out - self.loss.target(z0, eps, a[:, None], b[:, None])) ** 2).mean(1) * w

    def gradients(self, model: nn.Module, params: Params, rows: Rows, shared: bool,
                  noise: Params | None) -> tuple[Params, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class PaperPhase1(_DiffusionStep):
    """dp-promise Phase I **as published**: the batch-mean loss on t ∈ [S, T), null labels, one forward-noise
    draw per example, and a plain optimiser step on its gradient: no clipping, no added noise. An empty
    Poisson batch takes no step (as the project's ``phase1_stepper`` did)."""

    def gradients(self, model, params, rows, shared, noise=None):
        def batch_loss(p, t, a, b, w, eps, mask):
            per_row = self.row_losses(model, p, rows.z0, rows.y, t, a, b, w, eps)
            return (per_row * mask).sum() / mask.sum().clamp(min=1.0)

        g = vmap(grad(batch_loss), in_dims=(None if shared else 0, 0, 0, 0, 0, 0, 0))(
            params, rows.t, rows.a, rows.b, rows.w, rows.eps, rows.mask)
        return g, rows.mask.sum(1) > 0


@dataclass(frozen=True)
class ClippedNoisyStep(_DiffusionStep):
    """DP-SGD on the same loss (the sanity check that the test raises no false alarm): each row's gradient
    clipped to L2 norm C = ``clip``, the masked sum plus N(0, σ²C²) per coordinate, divided by the expected
    batch size q·n; a step is taken even when the Poisson batch is empty (noise only, as Opacus)."""

    clip: float = 1.0
    sigma: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (self.clip > 0 and self.sigma >= 0):
            raise ValueError(f"need clip > 0 and sigma >= 0, got clip={self.clip!r}, sigma={self.sigma!r}")

    def gradients(self, model, params, rows, shared, noise=None):
        if noise is None:
            raise ValueError("ClippedNoisyStep needs its Gaussian noise (one standard normal per parameter)")

        def one_run(p, t, a, b, w, eps, mask, z):
            def row_loss(q, z0, y, t1, a1, b1, w1, e1):
                return self.row_losses(model, q, z0[None], y[None], t1[None], a1[None], b1[None], w1[None],
                                       e1[None])[0]

            per_row = vmap(grad(row_loss), in_dims=(None, 0, 0, 0, 0, 0, 0, 0))(
                p, rows.z0, rows.y, t, a, b, w, eps)
            norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in per_row.values()))
            coef = mask * clip_factors(norms, self.clip)
            scale = self.sample_rate * len(rows.z0)
            return {k: (torch.einsum("n,n...->...", coef, v) + self.sigma * self.clip * z[k]) / scale
                    for k, v in per_row.items()}

        g = vmap(one_run, in_dims=(None if shared else 0, 0, 0, 0, 0, 0, 0, 0))(
            params, rows.t, rows.a, rows.b, rows.w, rows.eps, rows.mask, noise)
        return g, torch.ones(len(rows.t), dtype=torch.bool)


def _optimizer_step(params: Params, grads: Params, state: dict[str, Any], active: torch.Tensor,
                    lr: float, kind: str) -> Params:
    """SGD or Adam (torch's update, bias-corrected, weight decay 0) of every run at once; runs whose
    ``active`` is False keep their weights and optimiser state (no step was taken)."""
    new = {}
    for k, p in params.items():
        g = grads[k]
        on = active.view(-1, *([1] * (g.ndim - 1)))
        if kind == "sgd":
            new[k] = p - lr * g * on
            continue
        m = torch.where(on, ADAM_BETAS[0] * state["m"][k] + (1 - ADAM_BETAS[0]) * g, state["m"][k])
        v = torch.where(on, ADAM_BETAS[1] * state["v"][k] + (1 - ADAM_BETAS[1]) * g * g, state["v"][k])
        state["m"][k], state["v"][k] = m, v
        count = (state["count"] + active.float()).clamp(min=1.0).view_as(on)
        m_hat = m / (1 - ADAM_BETAS[0] ** count)
        v_hat = v / (1 - ADAM_BETAS[1] ** count)
        new[k] = p - lr * on * m_hat / (v_hat.sqrt() + ADAM_EPS)
    if kind == "adam":
        state["count"] = state["count"] + active.float()
    return new


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------

def unit_canary(dim: int, radius: float, seed: int) -> torch.Tensor:
    """A public, seeded direction at norm ``radius`` (the clip radius R: the largest input any example can be)."""
    x = torch.randn(dim, generator=torch.Generator().manual_seed(derive_seed(seed, "phase1-canary")))
    return radius * x / x.norm()


def _release(model: nn.Module, theta0: Params, mech: _DiffusionStep, data: torch.Tensor, trials: int,
             steps: int, g: torch.Generator) -> torch.Tensor:
    """θ − θ₀ [trials, P] of ``trials`` independent runs of ``steps`` updates of ``mech`` on ``data`` from θ₀."""
    params: Params = dict(theta0)
    state: dict[str, Any] = {"count": torch.zeros(trials)}
    if mech.optimizer == "adam":
        state.update(m={k: torch.zeros(trials, *v.shape) for k, v in theta0.items()},
                     v={k: torch.zeros(trials, *v.shape) for k, v in theta0.items()})
    for s in range(steps):
        rows = mech.draw(data, trials, g)
        noise = ({k: torch.randn(trials, *v.shape, generator=g) for k, v in theta0.items()}
                 if isinstance(mech, ClippedNoisyStep) else None)
        grads, active = mech.gradients(model, params, rows, shared=s == 0, noise=noise)
        if s == 0:
            params = {k: v.expand(trials, *v.shape) for k, v in theta0.items()}
        params = _optimizer_step(params, grads, state, active, mech.lr, mech.optimizer)
    return torch.cat([(params[k] - theta0[k]).reshape(trials, -1) for k in theta0], dim=1)


def _separation(plus: torch.Tensor, minus: torch.Tensor) -> float:
    """(mean s₊ − mean s₋) / pooled std of the test statistic: how far apart the two sides are, in standard
    deviations (a Gaussian mechanism with parameter μ, tested optimally, gives μ)."""
    pooled = math.sqrt(0.5 * (float(plus.var()) + float(minus.var())))
    gap = float(plus.mean() - minus.mean())
    return gap / pooled if pooled > 0 else (math.inf if gap > 0 else 0.0)


def _chunks(total: int, chunk: int):
    done = 0
    while done < total:
        yield min(chunk, total - done)
        done += chunk


def distinguish(model: nn.Module, mech: _DiffusionStep, x: torch.Tensor, *, background: torch.Tensor | None = None,
                steps: int = 1, trials: int = 4000, calibration: int = 1000, delta: float = 1e-5,
                beta: float = 0.05, seed: int = 0, chunk: int | None = None,
                calibrate_with: _DiffusionStep | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The replace-one distinguishing test of ``mech`` on D₊ = background ∪ {x} vs D₋ = background ∪ {−x}
    (module docstring): returns the error counts, their Clopper–Pearson bounds, ``epsilon_lower`` (replace-one)
    and ``epsilon_lower_add_remove`` at confidence 1 − ``beta``, and ``epsilon_ceiling`` (0 errors' bound).

    ``calibrate_with``: the mechanism whose runs estimate the direction and threshold (default ``mech``).
    Any choice fixed before the test trials keeps the bound valid; for DP-SGD the noise-free copy
    (σ = 0) estimates the mean update difference without drowning it in σC·√P of noise, which is what
    gives the test its power there (the auditor knows the algorithm; only the test trials use the noise)."""
    if steps < 1 or trials < 1 or calibration < 1:
        raise ValueError(f"steps, trials and calibration must be >= 1, got {steps}, {trials}, {calibration}")
    if x.ndim != 1 or (background is not None and (background.ndim != 2 or background.shape[1] != len(x))):
        raise ValueError("x must be a vector and background a [n, len(x)] matrix")
    start = time.perf_counter()
    model = model.cpu().float()
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    size = sum(v.numel() for v in theta0.values())
    chunk = chunk or max(1, min(1000, (1 << 23) // size))  # ≈ 32 MB per [chunk, P] tensor; ~8 live at once
    bg = background if background is not None else torch.zeros(0, len(x))
    sides = {"+": torch.cat([bg, x[None]]).float(), "-": torch.cat([bg, -x[None]]).float()}

    def runs(side: str, n: int, phase: str, m: _DiffusionStep):
        g = torch.Generator().manual_seed(derive_seed(seed, "phase1-attack", phase, side))
        for k in _chunks(n, chunk):
            with torch.no_grad():
                yield _release(model, theta0, m, sides[side], k, steps, g)

    cal = calibrate_with or mech
    mean = {s: sum(d.sum(0) for d in runs(s, calibration, "calibration", cal)) / calibration for s in sides}
    direction = mean["+"] - mean["-"]
    threshold = 0.5 * float((mean["+"] + mean["-"]) @ direction)
    stats = {s: torch.cat([d @ direction for d in runs(s, trials, "test", mech)]).double() for s in sides}
    fn, fp = int((stats["+"] <= threshold).sum()), int((stats["-"] > threshold).sum())
    fnr_u, fpr_u = (clopper_pearson_upper(e, trials, beta / 2) for e in (fn, fp))
    ceiling = clopper_pearson_upper(0, trials, beta / 2)
    result = {
        "relation": "replace-one (x -> -x, ||x|| = R)",
        "steps": steps, "trials": trials, "calibration": calibration, "background": len(bg),
        "parameters": size, "false_negatives": fn, "false_positives": fp,
        "fnr_upper": fnr_u, "fpr_upper": fpr_u, "delta": delta, "beta": beta,
        "epsilon_lower": replace_one_lower_bound(fpr_u, fnr_u, delta),
        "epsilon_lower_add_remove": add_remove_lower_bound(fpr_u, fnr_u, delta),
        "epsilon_ceiling": replace_one_lower_bound(ceiling, ceiling, delta),
        "separation": _separation(stats["+"], stats["-"]),
        "statistic": "<theta - theta0, d>, d = calibration mean difference, threshold at the midpoint",
        "seconds": time.perf_counter() - start,
    }
    if log:
        log(f"distinguishing test: {fp} FP, {fn} FN of {trials} per side; ε ≥ {result['epsilon_lower']:.3f}")
    return result
