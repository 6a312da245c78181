"""Tables of docs/privacy_accounting.md, printed as markdown (all ε from pfdiff.privacy.accounting).

1. calibration check: σ for ε = 10 at q = 4096/60000, 732 steps, δ = 1e-5, per accountant;
2. dp-promise's MNIST/FMNIST settings: its CLT approximation vs exact PLD (RDP, PRV cross-checks);
3. Phase-I ε in feature space vs image space at the same S.

Run: .venv/bin/python benchmarks/privacy_tables.py   (≈ 10 s on 2 CPU cores, plus imports)
"""

from __future__ import annotations

import math
import time

from pfdiff.diffusion.schedules import linear_schedule
from pfdiff.privacy.accounting import (
    ACCOUNTANTS, GaussianEvent, calibrate_noise, clt_epsilon, dp_promise_events, epsilon, epsilon_all,
    phase1_mu,
)

DELTA = 1e-5
N_MNIST = 60000
# dp-promise's MNIST (and identical FMNIST) configs, github.com/deabfc/dp-promise
# configs/dp_promise/{mnist,fmnist}_28/eps*/config.yaml: (claimed ε, Phase-I epochs, σ2)
DP_PROMISE_RUNS = [(0.2, 2, 38.4), (1.0, 3, 7.00), (10.0, 3, 1.13)]
BATCH1, BATCH2, EPOCHS2, S_PAPER = 32, 4096, 50, 900
S_VALUES = (600, 700, 800, 900)
RADII = {"features R=1 (unit ball)": 1.0, "features R=8 (=√64, standardized)": 8.0,
         "MNIST image R=28 (=√784)": 28.0}


def alpha_bar_S(S: int) -> float:
    """ᾱ_S = Π_{s=1..S}(1−β_s) of the linear schedule, i.e. pfdiff's 0-indexed alpha_bar[S−1].

    dp-promise's code uses alphas_cumprod[S−1] while Phase I draws t ∈ {S..T−1} (0-indexed), one
    step more conservative than needed; kept so that the numbers reproduce its code.
    """
    return float(linear_schedule(1000, 1e-4, 0.02).alpha_bar[S - 1])


def calibration_table() -> None:
    q, steps = 4096 / N_MNIST, 732
    print(f"## Calibration: ε = 10, δ = {DELTA:g}, q = 4096/60000, {steps} steps\n")
    print("| accountant | σ (tol 1e-3, rounded up) | time (s) | ε of PLD's σ by this accountant |")
    print("|---|---|---|---|")
    sigmas, seconds = {}, {}
    for name in ACCOUNTANTS:
        t0 = time.perf_counter()
        sigmas[name] = calibrate_noise(10.0, DELTA, q, steps, accountant=name)
        seconds[name] = time.perf_counter() - t0
    for name in ACCOUNTANTS:
        eps = epsilon([GaussianEvent(sigmas["pld"], q, steps)], DELTA, name)
        print(f"| {name} | {sigmas[name]:.4f} | {seconds[name]:.1f} | {eps:.3f} |")
    print()


def dp_promise_table() -> None:
    a = alpha_bar_S(S_PAPER)
    loader1, loader2 = math.ceil(N_MNIST / BATCH1), math.ceil(N_MNIST / BATCH2)
    print(f"## dp-promise MNIST/FMNIST: S = {S_PAPER}, ᾱ_S = {a:.3e}, R = 28, "
          f"μ_S = {phase1_mu(28.0, a):.4f}, δ = {DELTA:g}\n")
    print(f"Phase I: q = 1/{loader1}, {loader1} steps/epoch; Phase II: q = 1/{loader2}, "
          f"{EPOCHS2 * loader2} steps.\n")
    print("| config ε | Phase-I epochs | σ2 | CLT (paper's code) | PLD | RDP | PRV "
          "| PLD Phase I only | PLD Phase II only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for claimed, epochs1, sigma2 in DP_PROMISE_RUNS:
        events = dp_promise_events(28.0, a, 1 / loader1, epochs1 * loader1, sigma2, 1 / loader2, EPOCHS2 * loader2)
        eps = epsilon_all(events, DELTA)
        p1, p2 = (epsilon([e], DELTA) for e in events)
        print(f"| {claimed:g} | {epochs1} | {sigma2:g} | {clt_epsilon(events, DELTA):.3f} | {eps['pld']:.3f} | "
              f"{eps['rdp']:.3f} | {eps['prv']:.3f} | {p1:.3f} | {p2:.3f} |")
    print()


def phase1_table() -> None:
    loader1 = math.ceil(N_MNIST / BATCH1)
    q, steps = 1 / loader1, 3 * loader1
    print(f"## Phase I only: q = 1/{loader1}, {steps} steps (dp-promise's MNIST Phase I), δ = {DELTA:g}\n")
    print("Each cell: μ_S / noise multiplier 1/μ_S / PLD ε (CLT ε).\n")
    print("| S | ᾱ_S | " + " | ".join(RADII) + " |")
    print("|---|---|" + "---|" * len(RADII))
    for S in S_VALUES:
        a = alpha_bar_S(S)
        cells = []
        for radius in RADII.values():
            mu = phase1_mu(radius, a)
            event = [GaussianEvent(1 / mu, q, steps)]
            cells.append(f"{mu:.3f} / {1 / mu:.3f} / {epsilon(event, DELTA):.3g} ({clt_epsilon(event, DELTA):.3g})")
        print(f"| {S} | {a:.3e} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    t0 = time.perf_counter()
    calibration_table()
    dp_promise_table()
    phase1_table()
    print(f"(computed in {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
