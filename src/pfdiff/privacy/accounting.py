"""Privacy accounting: the only place in pfdiff that computes ε.

Every private release in pfdiff is a composition of (Poisson-subsampled) Gaussian mechanisms,
described by :class:`GaussianEvent`. ε is computed by established accountants, never by hand:

- ``"pld"`` (primary): privacy loss distributions, Google's ``dp_accounting.pld.PLDAccountant``
  (Meiser & Mohammadi 2018; Koskela et al. 2020; Doroshenko et al. 2022, "Connect the dots").
  Pessimistic discretisation, so the value is an upper bound.
- ``"rdp"``: Rényi DP, ``dp_accounting.rdp.RdpAccountant`` (Mironov 2017; Mironov, Talwar &
  Zhang 2019, subsampled Gaussian). A looser upper bound, kept as a cross-check.
- ``"prv"``: privacy random variables, ``opacus.accountants.PRVAccountant`` (Gopi, Lee & Wutschitz
  2021), an independent numerical implementation used to cross-check PLD.

All three use the add/remove-one neighbouring relation and assume Poisson subsampling with rate q.
The ``noise_multiplier`` of an event is noise std / L2 sensitivity.

dp-promise (Wang et al., USENIX Security 2024) is accounted as an exact PLD composition of its two
phases (:func:`dp_promise_events`); :func:`clt_epsilon` reproduces the central-limit μ-GDP
approximation used by that paper's code, which understates ε.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant
from scipy import optimize
from scipy.stats import norm

from pfdiff.runs import atomic_write_json

__all__ = [
    "ACCOUNTANTS", "BudgetError", "GaussianEvent", "LedgerError", "PrivacyLedger",
    "calibrate_noise", "clt_epsilon", "dp_promise_events", "epsilon", "epsilon_all",
    "check_delta_for_size", "gaussian_sigma_for", "gdp_delta", "gdp_epsilon", "phase1_mu", "phase1_noise_multiplier",
]

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp", "prv")

# PLD discretisation of the privacy-loss axis. 1e-3 keeps one evaluation at tens of milliseconds
# (732 steps: ε = 9.992 vs 9.992 at 1e-4, 0.04 s vs 0.4 s). The pessimistic rounding adds an
# absolute error of a few 1e-3 to a few 1e-2 after thousands of steps, which matters only when ε
# itself is small, so results below PLD_REFINE_BELOW are recomputed at the finer interval.
PLD_VALUE_DISCRETIZATION = 1e-3
PLD_FINE_DISCRETIZATION = 1e-4
PLD_REFINE_BELOW = 1.0
PRV_EPS_ERROR = 0.01  # opacus' default: the PRV value is an upper bound within 0.01 of the estimate

SIGMA_MIN, SIGMA_MAX = 0.1, 1e4  # search range of calibrate_noise (PLD gets slow below σ ≈ 0.1)
LEDGER_FORMAT = "pfdiff-privacy-ledger/1"


class BudgetError(ValueError):
    """A privacy budget cannot be met or would be exceeded."""


class LedgerError(ValueError):
    """A ledger file is unreadable or belongs to a different budget."""


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------

def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism (Abadi et al. 2016).

    noise_multiplier: σ = noise std / L2 sensitivity. sample_rate: Poisson sampling rate q;
    q = 1.0 means no subsampling (e.g. a one-off Gaussian release of prototypes or counts).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    name: str = ""

    def __post_init__(self) -> None:
        sigma, q, what = self.noise_multiplier, self.sample_rate, f"GaussianEvent {self.name!r}"
        if not (_is_real(sigma) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"{what}: noise_multiplier must be a finite number > 0, got {sigma!r}")
        if not (_is_real(q) and 0 < q <= 1):
            raise ValueError(f"{what}: sample_rate must be in (0, 1], got {q!r}")
        if not (_is_int(self.steps) and self.steps >= 0):
            raise ValueError(f"{what}: steps must be an integer >= 0, got {self.steps!r}")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(self.steps))


def _check_events(events: Sequence[GaussianEvent]) -> tuple[GaussianEvent, ...]:
    """The events that spend privacy (steps > 0), as a hashable tuple."""
    for e in events:
        if not isinstance(e, GaussianEvent):
            raise TypeError(f"expected GaussianEvent, got {type(e).__name__}: {e!r}")
    return tuple(e for e in events if e.steps > 0)


def _check_delta(delta: float) -> None:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


def _dp_event(e: GaussianEvent) -> dp_accounting.DpEvent:
    """dp_accounting's event for ``e``: SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)."""
    mechanism: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(e.noise_multiplier)
    if e.sample_rate < 1.0:
        mechanism = dp_accounting.PoissonSampledDpEvent(e.sample_rate, mechanism)
    return dp_accounting.SelfComposedDpEvent(mechanism, e.steps)


def _composed(events: tuple[GaussianEvent, ...]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([_dp_event(e) for e in events])


# --------------------------------------------------------------------------------------------
# ε of a composition
# --------------------------------------------------------------------------------------------

class _RefinedPLDAccountant(PLDAccountant):
    """The "pld" accountant as a dp_accounting ``PrivacyAccountant`` (so that :func:`epsilon` and
    ``calibrate_dp_mechanism`` compute the same ε): PLD at PLD_VALUE_DISCRETIZATION, recomputed from
    the ledger at PLD_FINE_DISCRETIZATION when the coarse value is below PLD_REFINE_BELOW."""

    def __init__(self) -> None:
        super().__init__(value_discretization_interval=PLD_VALUE_DISCRETIZATION)

    def get_epsilon(self, target_delta: float) -> float:
        eps = float(super().get_epsilon(target_delta))
        if eps < PLD_REFINE_BELOW:
            fine = PLDAccountant(value_discretization_interval=PLD_FINE_DISCRETIZATION)
            eps = float(fine.compose(self.ledger).get_epsilon(target_delta))
        return eps


# the dp_accounting accountant behind each accountant name (opacus' PRV is not one)
_DP_ACCOUNTANTS: dict[str, Callable[[], dp_accounting.PrivacyAccountant]] = {
    "pld": _RefinedPLDAccountant, "rdp": RdpAccountant}


@contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp_accounting's RDP logs (via absl) a warning for each fractional order whose series does not
    # converge and drops that order; the minimum over the remaining orders is still a valid bound.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _epsilon_dp_accounting(events: tuple[GaussianEvent, ...], delta: float, accountant: str) -> float:
    with _quiet_absl(), warnings.catch_warnings():
        # benign: at the small σ a calibration tries, the PLD's mass below the loss grid underflows and its
        # ε(δ) divides by it (pld_pmf.py): the overflow gives ε = inf for that σ, which is the right answer
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        return float(_DP_ACCOUNTANTS[accountant]().compose(_composed(events)).get_epsilon(delta))


def _epsilon_prv(events: tuple[GaussianEvent, ...], delta: float) -> float:
    acc = PRVAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # benign: opacus' RDP-based domain bound warns about its order range; q = 1 takes log(0)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


@lru_cache(maxsize=512)
def _epsilon_cached(events: tuple[GaussianEvent, ...], delta: float, accountant: str) -> float:
    if not events:
        return 0.0
    if accountant == "prv":
        return _epsilon_prv(events, delta)
    return _epsilon_dp_accounting(events, delta, accountant)


def epsilon(events: Sequence[GaussianEvent], delta: float, accountant: str = "pld") -> float:
    """ε at ``delta`` of the composition of ``events`` (add/remove-one adjacency).

    accountant: "pld" (primary, tight upper bound), "rdp" or "prv" (cross-checks); see module doc.
    Events with 0 steps spend nothing; an empty composition has ε = 0.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    return _epsilon_cached(_check_events(events), float(delta), accountant)


def epsilon_all(events: Sequence[GaussianEvent], delta: float) -> dict[str, float]:
    """ε of ``events`` from every accountant: {"pld": …, "rdp": …, "prv": …}."""
    return {name: epsilon(events, delta, name) for name in ACCOUNTANTS}


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

def _check_budget(target_epsilon: float, delta: float) -> None:
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise BudgetError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}: "
                          "no Gaussian noise level reaches it")
    if not (_is_real(delta) and 0 < delta < 1):
        raise BudgetError(f"delta must be in (0, 1), got {delta!r}")


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "pld", tol: float = 1e-3,
                    fixed_events: Sequence[GaussianEvent] = (),
                    shared: Sequence[tuple[float, int]] = ()) -> float:
    """Smallest noise multiplier σ (within ``tol``, rounded up) with ε(σ) ≤ ``target_epsilon``.

    ``fixed_events`` are composed with the calibrated steps (e.g. a noisy-count release or a DP
    encoder), so the whole plan meets the target. ``shared``: further (sample_rate, steps) phases
    that use the *same* σ (dp-promise's Phase I at its own batch size), calibrated jointly.

    ε(σ) of ``steps`` Poisson-subsampled Gaussian steps is decreasing in σ, so σ is bracketed by
    doubling/halving from 1 and then found by ``dp_accounting.calibrate_dp_mechanism`` (Brent's
    method on the accountant's own ε; PRV: bisection); the returned σ always meets the target. σ is
    searched in [SIGMA_MIN, SIGMA_MAX]: if even SIGMA_MIN meets the target, SIGMA_MIN is returned.
    Raises BudgetError when the target is invalid or unreachable with σ ≤ SIGMA_MAX.
    """
    _check_budget(target_epsilon, delta)
    _check_accountant(accountant)
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to calibrate noise, got {steps!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    GaussianEvent(1.0, sample_rate, steps)  # validates sample_rate and steps
    for q2, n2 in shared:
        GaussianEvent(1.0, q2, n2)

    fixed = tuple(_check_events(fixed_events))
    if fixed and epsilon(fixed, delta, accountant) >= target_epsilon:
        raise BudgetError(f"the fixed releases alone cost epsilon {epsilon(fixed, delta, accountant):.4g} "
                          f">= target {target_epsilon:g} at delta {delta:g}; nothing is left for training")

    def events_at(sigma: float) -> tuple[GaussianEvent, ...]:
        phases = [GaussianEvent(sigma, q2, n2) for q2, n2 in ((sample_rate, steps), *shared)]
        return _check_events([*fixed, *phases])

    def eps_at(sigma: float) -> float:
        return epsilon(events_at(sigma), delta, accountant)

    # our own bracket: calibrate_dp_mechanism's search starts at its lower end (σ = SIGMA_MIN is slow with
    # PLD) and knows neither SIGMA_MIN's floor nor SIGMA_MAX's BudgetError
    lo, hi = _bracket(eps_at, target_epsilon, delta)
    if lo == hi:
        return hi
    if accountant not in _DP_ACCOUNTANTS:
        # opacus' PRVAccountant is no dp_accounting PrivacyAccountant, so calibrate_dp_mechanism cannot drive it
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if eps_at(mid) <= target_epsilon else (mid, hi)
        return hi
    # dp_accounting.calibrate_dp_mechanism: Brent's method on ε(σ) − target in [lo, hi], with the accountant
    # epsilon() uses; it returns a σ within tol of the optimum whose ε is ≤ the target (its safe side)
    with _quiet_absl():
        sigma = float(dp_accounting.calibrate_dp_mechanism(
            _DP_ACCOUNTANTS[accountant], lambda s: _composed(events_at(s)), target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol))
    if eps_at(sigma) > target_epsilon:  # cannot happen (see above); re-checked with the ledger's ε, then cached
        raise RuntimeError(f"calibrate_dp_mechanism returned noise multiplier {sigma!r} with epsilon "
                           f"{eps_at(sigma)!r} > target {target_epsilon!r}")
    return sigma


def _bracket(eps_at: Callable[[float], float], target: float, delta: float) -> tuple[float, float]:
    """(lo, hi) with ε(lo) > target ≥ ε(hi), or (hi, hi) when hi = SIGMA_MIN already meets it."""
    hi = 1.0
    while eps_at(hi) > target:
        if hi >= SIGMA_MAX:
            raise BudgetError(f"target epsilon {target} at delta {delta} is unreachable: even noise "
                              f"multiplier {SIGMA_MAX:g} gives epsilon {eps_at(hi):.4g} (a target below "
                              "the accountant's resolution cannot be certified)")
        hi = min(2.0 * hi, SIGMA_MAX)
    lo = hi / 2.0
    while eps_at(lo) <= target:
        if lo <= SIGMA_MIN:
            return SIGMA_MIN, SIGMA_MIN
        hi, lo = lo, max(lo / 2.0, SIGMA_MIN)
    return lo, hi


def check_delta_for_size(delta: float, n: int, what: str = "the private data") -> None:
    """Refuse δ ≥ 1/N: with δ that large, releasing one example in the clear is (0, δ)-DP (each example
    leaks with probability δ ≥ 1/N, i.e. about one example in expectation), so "ε" promises nothing.
    N itself is treated as public (the accountant's q = B/N needs it); the report says so."""
    if not (_is_int(n) and n >= 1):
        raise BudgetError(f"{what}: need at least one example to plan a private release, got N={n!r}")
    if delta >= 1.0 / n:
        raise BudgetError(f"privacy.delta={delta:g} is not below 1/N = 1/{n} for {what}: a guarantee with δ ≥ 1/N "
                          f"allows leaking about one example outright; use delta < {1.0 / n:.3g} (e.g. {_suggest_delta(n):g})")


def _suggest_delta(n: int) -> float:
    return 10.0 ** math.floor(math.log10(0.1 / n))


def gaussian_sigma_for(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Noise std for a single (ε, δ) Gaussian release of a query with L2 ``sensitivity``.

    Calibrated with PLD at sample_rate = 1, steps = 1 (agrees with the analytic Gaussian
    mechanism of Balle & Wang 2018, Thm. 8). Account for the release as
    ``GaussianEvent(sigma / sensitivity, 1.0, 1)``.
    """
    if not (_is_real(sensitivity) and math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be a finite number > 0, got {sensitivity!r}")
    # not dp_accounting.get_sigma_gaussian: its exact σ has a PLD ε (what the ledger composes) ~1e-12 above ε
    return sensitivity * calibrate_noise(epsilon, delta, 1.0, 1, "pld", tol=1e-4)


# --------------------------------------------------------------------------------------------
# Gaussian DP and the central-limit approximation
# --------------------------------------------------------------------------------------------

def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth & Su 2022, Cor. 2.13)."""
    with np.errstate(over="ignore"):  # e^ε·Φ(·) → inf only far above any root; δ < 0 there is harmless
        return float(norm.cdf(-eps / mu + mu / 2) - np.exp(eps + norm.logcdf(-eps / mu - mu / 2)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ(ε) ≤ ``delta`` for a μ-GDP mechanism, solved with scipy's brentq."""
    _check_delta(delta)
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu!r}")
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-10))


def _clt_mu_squared(e: GaussianEvent) -> float:
    """μ² of one event: q²·T·(e^{1/σ²} − 1) (Bu et al. 2020, Thm. 5), exactly T/σ² when q = 1."""
    inv_var = 1.0 / e.noise_multiplier ** 2
    if e.sample_rate == 1.0:
        return e.steps * inv_var  # no subsampling: T Gaussian mechanisms are exactly √T/σ-GDP
    if inv_var > 700.0:
        return math.inf
    return e.sample_rate ** 2 * e.steps * math.expm1(inv_var)


def clt_epsilon(events: Sequence[GaussianEvent], delta: float) -> float:
    """ε from the central-limit μ-GDP approximation (Bu et al. 2020; Dong, Roth & Su 2022, Thm. 3.5).

    μ_total = sqrt(Σ_events q²·steps·(exp(1/σ²) − 1)), then ε from :func:`gdp_epsilon`.
    This is what dp-promise's own code reports; it is an asymptotic approximation, NOT an upper
    bound, and it understates ε at practical settings. Use :func:`epsilon` for guarantees.
    Unsubsampled events (q = 1) enter exactly as steps/σ².
    """
    _check_delta(delta)
    mu_sq = sum(_clt_mu_squared(e) for e in _check_events(events))
    return gdp_epsilon(math.sqrt(mu_sq), delta)


# --------------------------------------------------------------------------------------------
# dp-promise in feature space
# --------------------------------------------------------------------------------------------

def phase1_mu(radius: float, alpha_bar_S: float) -> float:
    """μ_S = 2R√ᾱ_S / √(1 − ᾱ_S): GDP parameter of one Phase-I use of an example.

    dp-promise Phase I (Wang et al. 2024, §4) trains only on t ≥ S, without clipping or added
    noise. Inputs lie in an L2 ball of radius R, so one noisy input √ᾱ_t x + √(1−ᾱ_t) ε is a
    Gaussian mechanism with sensitivity 2R√ᾱ_t and noise std √(1−ᾱ_t); μ_t is largest at t = S.
    ``alpha_bar_S`` must be the largest ᾱ of any timestep Phase I trains on.
    """
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    if not 0 < alpha_bar_S < 1:
        raise ValueError(f"alpha_bar_S must be in (0, 1), got {alpha_bar_S!r}")
    return 2.0 * radius * math.sqrt(alpha_bar_S) / math.sqrt(1.0 - alpha_bar_S)


def phase1_noise_multiplier(radius: float, alpha_bar_S: float) -> float:
    """Noise multiplier 1/μ_S of one Phase-I use of an example (see :func:`phase1_mu`)."""
    return 1.0 / phase1_mu(radius, alpha_bar_S)


def dp_promise_events(radius: float, alpha_bar_S: float, phase1_sample_rate: float, phase1_steps: int,
                      sigma2: float, phase2_sample_rate: float, phase2_steps: int) -> list[GaussianEvent]:
    """The two phases of dp-promise as events, to compose exactly with :func:`epsilon`.

    Phase I: ``phase1_steps`` sampled Gaussian events with noise multiplier 1/μ_S.
    Phase II: DP-SGD on t < S with noise multiplier ``sigma2`` (Wang et al. 2024, Alg. 1).
    """
    return [
        GaussianEvent(phase1_noise_multiplier(radius, alpha_bar_S), phase1_sample_rate, phase1_steps,
                      "dp_promise_phase1"),
        GaussianEvent(sigma2, phase2_sample_rate, phase2_steps, "dp_promise_phase2"),
    ]


# --------------------------------------------------------------------------------------------
# Budget ledger
# --------------------------------------------------------------------------------------------

def _merge(entries: tuple[GaussianEvent, ...], event: GaussianEvent) -> tuple[GaussianEvent, ...]:
    """``entries`` + ``event``, folding it into the last entry when name, σ and q are identical."""
    if entries:
        last = entries[-1]
        if (last.name, last.noise_multiplier, last.sample_rate) == (
                event.name, event.noise_multiplier, event.sample_rate):
            return entries[:-1] + (replace(last, steps=last.steps + event.steps),)
    return entries + (event,)


class PrivacyLedger:
    """Privacy spending of one run, persisted as JSON at ``path`` after every :meth:`record`.

    A new ledger on an existing file resumes it exactly (same entries, same ε); the file's δ and
    target must match. A new file is written at once, so the budget is pinned from the start.
    Spending is composed with :func:`epsilon` (PLD unless stated).

    ``private``: whether the noise came from OS entropy (``privacy/noise.py``). A ledger that was ever
    written by a run with reproducible (seed-derived) noise stays marked NOT PRIVATE, whatever later
    resumes it: its ε is arithmetic about noise anyone can re-draw, not a guarantee.
    """

    RELATION = "add/remove one example (Poisson subsampling)"

    def __init__(self, path: Path | str, target_epsilon: float, delta: float, private: bool = True) -> None:
        _check_budget(target_epsilon, delta)
        self.path = Path(path)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.private = bool(private)
        self._entries: tuple[GaussianEvent, ...] = ()
        if self.path.exists():
            self._entries = self._load()
        self._save({"pld": self.spent() if self._entries else 0.0})

    @property
    def noise(self) -> str:
        from pfdiff.privacy.noise import NOT_PRIVATE, SECURE  # noise imports training, which is heavier
        return SECURE if self.private else NOT_PRIVATE

    # -- persistence --------------------------------------------------------------------------
    def _load(self) -> tuple[GaussianEvent, ...]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is not readable JSON ({err}); "
                              "refusing to guess the privacy already spent") from err
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"privacy ledger {self.path} is not a {LEDGER_FORMAT} file")
        for key, mine in (("delta", self.delta), ("target_epsilon", self.target_epsilon)):
            theirs = data.get(key)
            if not _is_real(theirs) or not math.isclose(theirs, mine, rel_tol=1e-12):
                raise LedgerError(f"privacy ledger {self.path} has {key}={theirs!r} but this run asks "
                                  f"for {key}={mine!r}; use the original budget or a new ledger file")
        self.private = self.private and data.get("private", True) is True
        try:
            return tuple(GaussianEvent(**entry) for entry in data["entries"])
        except (KeyError, TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger {self.path} has malformed entries: {err}") from err

    def _state(self, eps: dict[str, float]) -> dict[str, Any]:
        return {"delta": self.delta, "target_epsilon": self.target_epsilon, "neighbouring_relation": self.RELATION,
                "noise": self.noise, "private": self.private, "entries": [asdict(e) for e in self._entries],
                "epsilon": eps}

    def _save(self, eps: dict[str, float]) -> None:
        atomic_write_json(self.path, {"format": LEDGER_FORMAT, **self._state(eps)})

    # -- queries ------------------------------------------------------------------------------
    @property
    def entries(self) -> tuple[GaussianEvent, ...]:
        """Recorded spending, consecutive identical events merged."""
        return self._entries

    def spent(self, accountant: str = "pld") -> float:
        """ε spent so far at the ledger's δ."""
        return epsilon(self._entries, self.delta, accountant)

    def remaining(self) -> float:
        """target ε − spent PLD ε (negative when over budget)."""
        return self.target_epsilon - self.spent()

    def exhausted(self) -> bool:
        """True when the spent PLD ε has reached the target."""
        return self.spent() >= self.target_epsilon

    def would_exceed(self, next_event: GaussianEvent) -> bool:
        """True when recording ``next_event`` would take the PLD ε above the target."""
        _check_events([next_event])
        return epsilon(_merge(self._entries, next_event), self.delta) > self.target_epsilon

    def check_plan(self, events: Sequence[GaussianEvent]) -> float:
        """Planned ε (spent so far + ``events``); raises BudgetError if it exceeds the target."""
        planned = self._entries
        for e in _check_events(events):
            planned = _merge(planned, e)
        eps = epsilon(planned, self.delta)
        if eps > self.target_epsilon:
            raise BudgetError(f"planned epsilon {eps:.4f} exceeds the target epsilon {self.target_epsilon:g} "
                              f"at delta {self.delta:g} (ledger {self.path})")
        return eps

    def check_final(self, events: Sequence[GaussianEvent]) -> float:
        """ε of the run once ``events`` are complete, where an event whose name is already in the
        ledger *continues* it (the steps of :meth:`record_progress`, not added twice): the check a
        resumed run makes. Raises BudgetError above the target; returns the planned PLD ε."""
        planned = {e.name: e for e in self._entries}
        for e in _check_events(events):
            old = planned.get(e.name)
            planned[e.name] = e if old is None or not e.name else replace(e, steps=max(e.steps, old.steps))
        eps = epsilon(tuple(planned.values()), self.delta)
        if eps > self.target_epsilon:
            raise BudgetError(f"planned epsilon {eps:.4f} exceeds the target epsilon {self.target_epsilon:g} "
                              f"at delta {self.delta:g} (ledger {self.path}); lower the steps or raise the noise")
        return eps

    # -- spending -----------------------------------------------------------------------------
    def record(self, event_name: str, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Append spending, write the ledger atomically and return the spent PLD ε.

        Never refuses: the noise was already drawn. Ask :meth:`would_exceed` before spending.
        Each call costs one PLD evaluation (tens of ms); record several steps at once if needed.
        """
        if not (_is_int(steps) and steps >= 1):
            raise ValueError(f"record: steps must be an integer >= 1, got {steps!r}")
        event = GaussianEvent(noise_multiplier, sample_rate, steps, event_name)
        self._entries = _merge(self._entries, event)
        eps = self.spent()
        self._save({"pld": eps})
        return eps

    def record_progress(self, event_name: str, noise_multiplier: float, sample_rate: float, steps_done: int) -> None:
        """Account for step ``steps_done`` of the training event ``event_name`` (1-based), writing the ledger
        atomically without an ε evaluation (cheap enough for every logical step). Call it *before* the
        step's noise is drawn, so a crash can never leave a draw unaccounted.

        Private (OS-entropy) noise: every call is a new draw and adds one step, so steps a resumed run
        repeats after its last checkpoint are charged again. Reproducible noise (NOT PRIVATE): a repeated
        step re-computes the same draw, so the count is set to ``steps_done`` (never lowered).
        """
        if not (_is_int(steps_done) and steps_done >= 1):
            raise ValueError(f"record_progress: steps_done must be an integer >= 1, got {steps_done!r}")
        entries = list(self._entries)
        for i, e in enumerate(entries):
            if e.name == event_name:
                if (e.noise_multiplier, e.sample_rate) != (noise_multiplier, sample_rate):
                    raise LedgerError(f"ledger {self.path}: event {event_name!r} was recorded with noise multiplier "
                                      f"{e.noise_multiplier} and sample rate {e.sample_rate}, not {noise_multiplier} "
                                      f"and {sample_rate}")
                entries[i] = replace(e, steps=e.steps + 1 if self.private else max(e.steps, steps_done))
                break
        else:
            entries.append(GaussianEvent(noise_multiplier, sample_rate, 1 if self.private else steps_done,
                                         event_name))
        self._entries = tuple(entries)
        self._save({"pld": None})

    def check_resume(self, events: Sequence[GaussianEvent], done: dict[str, int] | None = None) -> float:
        """The budget check before (re)starting training: ``events`` are the whole plan, ``done`` the steps
        of each training event that a checkpoint already holds (a resume continues from there). Private
        noise: what the ledger already spent plus every step still to execute (steps re-executed after
        the checkpoint are new draws); an event already in the ledger and absent from ``done`` (a one-off
        release such as the noisy counts) is composed once, from the ledger. Reproducible noise:
        :meth:`check_final`. Raises BudgetError above the target; returns the planned PLD ε."""
        if not self.private:
            return self.check_final(events)
        done = done or {}
        recorded = {e.name for e in self._entries}
        todo = []
        for e in _check_events(events):
            if e.name in done:
                todo.append(replace(e, steps=max(0, e.steps - done[e.name])))
            elif not (e.name and e.name in recorded):
                todo.append(e)
        eps = epsilon(_check_events([*self._entries, *todo]), self.delta)
        if eps > self.target_epsilon:
            raise BudgetError(f"planned epsilon {eps:.4f} (spent so far + the steps still to run) exceeds the target "
                              f"epsilon {self.target_epsilon:g} at delta {self.delta:g} (ledger {self.path}); "
                              "a resumed run with private noise pays again for the steps it repeats")
        return eps

    def record_release(self, event: GaussianEvent) -> None:
        """Record a one-off release (e.g. the noisy counts) once; a release already in the ledger under the
        same name is the same release, reused (it was saved), not drawn again."""
        if any(e.name == event.name for e in self._entries):
            return
        self._entries = (*self._entries, event)
        self._save({"pld": None})

    def summary(self, cross_check: bool = True, save: bool = True) -> dict[str, Any]:
        """δ, target, entries and ε (PLD; with RDP and PRV when ``cross_check``), also saved to the file."""
        eps = epsilon_all(self._entries, self.delta) if cross_check else {"pld": self.spent()}
        if save:
            self._save(eps)
        return {**self._state(eps), "remaining_pld": self.target_epsilon - eps["pld"]}
