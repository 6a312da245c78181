"""One-run privacy auditing of the DP feature-denoiser training (Steinke, Nasr & Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run", arXiv:2305.08846).

The accountant (``privacy/accounting.py``) gives an *upper* bound on ε. An audit gives an empirical *lower*
bound: if the lower bound exceeds the claimed ε, the implementation (clipping, noise, sampling) or the
accounting is broken. One training run suffices:

1. m canaries are drawn; each is included in the private training set independently with probability ½
   (S_i ∈ {−1, +1}, seeded and never shown to the training code).
2. The REAL training path (``longtail.private.train_private_denoiser`` via ``longtail.private_audit.run_audit``, with its Opacus DP-SGD engine and a
   fresh ``PrivacyLedger``) trains the denoiser; the claimed ε is read from that ledger (PLD).
3. Every canary gets a score (higher = "looks trained on"), here the negative diffusion loss of the final
   model at (t, ε) draws shared by all canaries. The auditor guesses IN for the k₊ highest scores and OUT
   for the k₋ lowest, abstains on the rest: r = k₊ + k₋ guesses, W of them correct.
4. If the algorithm is (ε, δ)-DP with respect to each canary (add/remove one, the accountant's adjacency),
   W is stochastically dominated as in the paper's main theorem (Thm. 3.1; for δ > 0 its §5, Cor. 5.4,
   computed by ``p_value_DP_audit`` of its Appendix D; arXiv v1 numbering), with q = e^ε / (1 + e^ε):

       P[W ≥ v] ≤ P[Binomial(r, q) ≥ v] + 2mδ · max_{i = 1..v} P[v > Binomial(r, q) ≥ v − i] / i.

   With δ = 0 the second term vanishes (pure ε-DP, Thm. 3.1). The lower bound at confidence 1 − β is the
   smallest ε at which this p-value reaches β; every ε below it is rejected (:func:`epsilon_lower_bound`).
   :func:`p_value` reproduces the paper's worked examples (App. D: m = 1000, r = 100, v = 75, δ = 1e-4,
   β = 0.05 → 0.673; §7: m = 10⁵, r = 1510, v = 1439, δ = 1e-5 → 2.675; ``tests/test_audit.py``).

Several (k₊, k₋) are tried, as in the paper's experiments; here the choice is corrected for by Bonferroni:
each k is tested at β / |grid|, so the maximum over the grid is still a (1 − β)-confidence lower bound.

Power (measured, ``privacy.target_epsilon=1``, 200 canaries, seeds 0–4): the correct training gives a lower
bound of 0 every time; with the noise switched off (accountant unchanged) 2.8–3.2, far above the claim;
with the noise merely divided by 10 (true ε far above 1) only 0.08–0.12. This is a black-box audit of the
final model with input-space canaries, which is loose (as the paper finds for that setting): it refutes
gross failures such as missing noise, not a mis-scaled σ, and a pass is no proof of the claimed ε.

Canaries and data (:func:`make_canaries`, :func:`background_features`): the audit does not load a data
set or train an encoder (minutes); the private set is a modest synthetic stand-in for standardised
features (a Gaussian class mixture with unit marginal variance, as ``FeatureScaler`` output) plus the
included canaries. Canaries are uniformly random directions at the clip radius R = ``privacy.feature_radius``
(``clip_rows`` leaves them intact: the largest input any example can be) with uniformly random labels:
in 64 dimensions a random direction is nearly orthogonal to every other canary and far from its label's
class mean, so nothing but the canary itself explains it and a model that memorises it lowers its loss
only there. The audit therefore tests the training code and its accounting, not the leakage of real
digits features. Only the weights are released here (no noisy counts, no public warm start: ``fixed=[]``).

Adjacency note: ``train_private_denoiser`` sets q = B / N with N the realised private-set size, which
depends on how many canaries are in. Both the batch-size law (≈ Poisson(B) for every N) and σ change
negligibly with N (±√m / 2 rows of N), and the claimed ε is the ledger's at the realised q.

The deliberate bug used to check that the auditor can fail (noise off, accountant unchanged) lives in the
tests only (``tests/test_audit.py`` monkeypatches ``DPSGD.__init__``); DP training has no such option.

Timesteps (:data:`TIMESTEP_MODES`, ``pfdiff audit --timesteps``): the default scores only t < 0.2·T, the
band where memorisation shows best, so by construction it cannot see a leak confined to high-noise steps
such as dp-promise's Phase I (t ≥ S); "all" scores over every t ∈ [0, T), "phase1" over [S, T) only.
A leak in the *weights' update* that the final model's loss does not reveal is out of reach of any
black-box score: for dp-promise's published Phase I, ``pfdiff audit --phase1-paper`` runs the white-box
distinguishing test of ``privacy/promise_attack.py`` instead (docs/privacy_audit_cases.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import binom

__all__ = ["AUDIT_DEFAULTS", "DEFAULT_CANARIES", "PHASE1_TRIALS", "SCORE_T_RANGE", "TIMESTEP_MODES",
           "audit_from_scores", "default_k_grid", "epsilon_lower_bound", "p_value", "score_t_range_for"]

AUDIT_FORMAT = "pfdiff-audit/1"
DEFAULT_CANARIES = 200
DEFAULT_BACKGROUND = 200
#: Scores average the loss over t ∈ [0, 0.2·T): the low-noise band, where the denoiser can only be exact for
#: a point it has memorised (at high noise z_t says little about which point it came from). Measured with
#: the noise switched off (the deliberate bug of tests/test_audit.py, 200 canaries, 2 seeds): AUC 0.986 and
#: 0.986 on [0, 0.2·T) against 0.868 and 0.811 on all t.
SCORE_T_RANGE = (0.0, 0.2)
#: ``--timesteps`` choices: the score's t band, as fractions of T ("phase1" = [S/T, 1), dp-promise's Phase I).
TIMESTEP_MODES = ("default", "all", "phase1")
#: Trials per side of the Phase-I distinguishing test: 0/4000 errors certify ε ≥ 6.99 at δ = 1e-5, β = 0.05.
PHASE1_TRIALS = 4000
EPS_SEARCH_MAX = 60.0  # q = expit(60) is 1 − 1e-26: no count of guesses below ~10²⁴ rejects ε beyond that

#: ``--set`` overrides the audit applies to its preset before the user's own (``audit_config``): a short DP
#: training that runs in well under two minutes on two CPU cores. B = 64 of N ≈ 300 rows (q ≈ 0.21) for
#: 400 steps: every canary is in ≈ 85 batches. lr 1e-3 instead of the preset's 1e-4: the preset's small lr
#: is for noise-dominated steps from a public warm start, which the audit has not; the claimed ε does not
#: depend on the learning rate. One torch thread: the denoiser is tiny, and on a busy 2-core machine the
#: default `pfdiff audit` took 99 s with torch's 2 threads against 7.5 s with 1 (`--set threads=…` to change).
AUDIT_DEFAULTS: tuple[str, ...] = (
    "threads=1",
    "privacy.steps=400",
    "privacy.expected_batch_size=64",
    "privacy.lr=1e-3",
    "privacy.noise_multiplicity=8",
)


def score_t_range_for(timesteps: str, promise_S: int, T: int) -> tuple[float, float]:
    """The canary scores' t band for a ``--timesteps`` mode: why each exists is in the module docstring."""
    if timesteps not in TIMESTEP_MODES:
        raise ValueError(f"timesteps must be one of {list(TIMESTEP_MODES)}, got {timesteps!r}")
    if timesteps == "phase1" and not 0 < promise_S < T:
        raise ValueError(f"timesteps=phase1 needs 0 < privacy.promise_S < T={T}, got {promise_S}")
    return {"default": SCORE_T_RANGE, "all": (0.0, 1.0), "phase1": (promise_S / T, 1.0)}[timesteps]


# --------------------------------------------------------------------------------------------
# The bound
# --------------------------------------------------------------------------------------------

def _check_counts(correct: int, guesses: int, canaries: int | None, delta: float, beta: float) -> None:
    for name, x in (("correct", correct), ("guesses", guesses)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {x!r}")
    if correct > guesses:
        raise ValueError(f"correct ({correct}) cannot exceed guesses ({guesses})")
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must lie in (0, 1), got {beta!r}")
    if delta > 0:
        if canaries is None:
            raise ValueError("with delta > 0 the bound needs the number of canaries m (its 2mδ term)")
        if isinstance(canaries, bool) or not isinstance(canaries, (int, np.integer)) or canaries < guesses:
            raise ValueError(f"canaries must be an integer >= guesses ({guesses}), got {canaries!r}")


def p_value(correct: int, guesses: int, epsilon: float, delta: float = 0.0, canaries: int | None = None) -> float:
    """P-value of ``correct`` right guesses out of ``guesses`` under the null "(ε, δ)-DP" (module docstring).

    P[Bin(r, q) ≥ v] + 2mδ · max_{1≤i≤v} P[v > Bin(r, q) ≥ v − i] / i, q = e^ε/(1 + e^ε), capped at 1;
    Steinke, Nasr & Jagielski 2023, Thm. 3.1 (δ = 0) and Cor. 5.4 / App. D (δ > 0). m = ``canaries``.
    """
    _check_counts(correct, guesses, canaries, delta, 0.5)
    v, r = int(correct), int(guesses)
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) ≥ v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    band = binom.cdf(v - 1, r, q) - binom.cdf(v - 1 - i, r, q)  # P[v > Bin(r, q) ≥ v − i]
    return min(1.0, tail + 2.0 * int(canaries) * delta * float(np.max(band / i)))


def epsilon_lower_bound(correct: int, guesses: int, delta: float, beta: float = 0.05,
                        canaries: int | None = None, tol: float = 1e-6) -> float:
    """The ε that ``correct`` of ``guesses`` membership guesses certify at confidence 1 − β: every ε' below
    it has p-value < β (so the algorithm is not (ε', δ)-DP unless an event of probability ≤ β happened).
    0 when nothing can be concluded. ``canaries`` (m, ≥ ``guesses``) is needed when δ > 0.

    The search is a scan (step 0.05) for the first ε whose p-value reaches β, then bisection to ``tol``;
    the lower end is returned. (The p-value increases with ε in every case we checked, but the first
    crossing is the valid answer either way: it is at most the true ε unless p(ε_true) < β.)
    """
    _check_counts(correct, guesses, canaries, delta, beta)
    if guesses == 0 or p_value(correct, guesses, 0.0, delta, canaries) >= beta:
        return 0.0
    lo, step = 0.0, 0.05
    hi = lo + step
    while p_value(correct, guesses, hi, delta, canaries) < beta:
        lo, hi = hi, hi + step
        if hi > EPS_SEARCH_MAX:
            return EPS_SEARCH_MAX
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(correct, guesses, mid, delta, canaries) < beta else (lo, mid)
    return lo


def default_k_grid(m: int) -> tuple[int, ...]:
    """Guesses per side k (k₊ = k₋ = k) tried by default: 5 %, 10 %, 20 %, 30 % and 50 % of m (all guessed)."""
    ks = {max(1, round(f * m)) for f in (0.05, 0.1, 0.2, 0.3, 0.5)}
    return tuple(sorted(k for k in ks if 2 * k <= m))


def audit_from_scores(scores: Sequence[float] | np.ndarray | torch.Tensor,
                      included: Sequence[bool] | np.ndarray | torch.Tensor,
                      k_grid: Sequence[int | tuple[int, int]] | None = None, delta: float = 0.0,
                      beta: float = 0.05) -> dict[str, Any]:
    """Guess, count and bound. Higher score = guessed IN. For each entry of ``k_grid`` (k, meaning k₊ = k₋ = k,
    or a pair (k₊, k₋)): IN for the k₊ highest scores, OUT for the k₋ lowest (ties broken by canary index,
    which does not depend on the inclusion bits), abstain on the rest; r = k₊ + k₋, W = correct guesses.
    Each grid entry is tested at β / |grid| (Bonferroni), so the returned maximum is a (1 − β) lower bound.

    Returns ``epsilon_lower`` (the maximum), the chosen ``k_plus``/``k_minus``, its ``guesses``/``correct``,
    ``per_k`` (every entry's counts and bound), ``m``, ``delta``, ``beta``, ``beta_per_test`` and
    ``correction`` ("bonferroni"), and ``epsilon_ceiling``: the bound had every guess been right (what
    this m and grid could certify at best).
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    inc = np.asarray(included.detach().cpu() if isinstance(included, torch.Tensor) else included).astype(bool)
    if s.ndim != 1 or s.shape != inc.shape or len(s) < 2:
        raise ValueError(f"scores and included must be 1-D of the same length >= 2, got {s.shape} and {inc.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    m = len(s)
    grid = [(int(k), int(k)) if np.isscalar(k) else (int(k[0]), int(k[1]))
            for k in (k_grid if k_grid is not None else default_k_grid(m))]
    if not grid:
        raise ValueError("k_grid is empty")
    for kp, km in grid:
        if kp < 0 or km < 0 or kp + km < 1 or kp + km > m:
            raise ValueError(f"need k₊, k₋ >= 0 with 1 <= k₊ + k₋ <= m = {m}, got ({kp}, {km})")
    beta_test = beta / len(grid)
    order = np.argsort(-s, kind="stable")  # highest score first; equal scores keep canary order
    per_k = []
    for kp, km in grid:
        guess_in, guess_out = order[:kp], order[m - km:] if km else order[:0]
        correct = int(inc[guess_in].sum() + (~inc[guess_out]).sum())
        r = kp + km
        per_k.append({"k_plus": kp, "k_minus": km, "guesses": r, "correct": correct,
                      "epsilon_lower": epsilon_lower_bound(correct, r, delta, beta_test, canaries=m),
                      "epsilon_ceiling": epsilon_lower_bound(r, r, delta, beta_test, canaries=m)})
    best = max(per_k, key=lambda row: row["epsilon_lower"])
    return {"epsilon_lower": best["epsilon_lower"], "k_plus": best["k_plus"], "k_minus": best["k_minus"],
            "guesses": best["guesses"], "correct": best["correct"], "m": m, "included": int(inc.sum()),
            "delta": delta, "beta": beta, "beta_per_test": beta_test, "correction": "bonferroni",
            "epsilon_ceiling": max(row["epsilon_ceiling"] for row in per_k), "per_k": per_k}
