"""The audit *runs* of the DP feature-denoiser training: canaries, the private set, scores, ``run_audit``;
and the distinguishing test of dp-promise's published Phase I, ``run_phase1_audit``.

The bound itself (Steinke, Nasr & Jagielski 2023) is pure math in ``privacy/audit.py``; this module
trains (``longtail.private.train_private_denoiser``, the real DP path) and so lives with the pipelines.
See ``privacy/audit.py`` for the canary design, its power and its limits, and ``privacy/promise_attack.py``
for the Phase-I test (docs/privacy_audit_cases.md for what both measured).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pfdiff.config import RunConfig, load_config
from pfdiff.diffusion import DiffusionLoss
from pfdiff.longtail.common import seeded_init
from pfdiff.longtail.ldmlr import build_denoiser
from pfdiff.longtail.private import clip_rows, train_private_denoiser
from pfdiff.privacy.accounting import PrivacyLedger, phase1_mu
from pfdiff.privacy.audit import (AUDIT_DEFAULTS, AUDIT_FORMAT, DEFAULT_BACKGROUND, DEFAULT_CANARIES, PHASE1_TRIALS,
                                  audit_from_scores, score_t_range_for)
from pfdiff.privacy.promise_attack import PaperPhase1, distinguish, paper_phase1_claim, unit_canary
from pfdiff.runs import atomic_write_json
from pfdiff.training import derive_seed, resolve_device


# --------------------------------------------------------------------------------------------
# Canaries, data, scores
# --------------------------------------------------------------------------------------------

def make_canaries(m: int, dim: int, num_classes: int, radius: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m canaries: uniformly random directions in R^dim scaled to ``radius`` (the clip radius R), with
    uniformly random labels in 0..num_classes−1 (module docstring for why)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "audit-canaries"))
    x = torch.randn(m, dim, generator=g)
    x = radius * x / x.norm(dim=1, keepdim=True)
    return x, torch.randint(0, num_classes, (m,), generator=g)


def background_features(n: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic standardised features: class means N(0, ½I), within-class N(0, ½I) (unit marginal
    variance, like ``FeatureScaler`` output), labels uniform. The non-canary part of the private set."""
    g = torch.Generator().manual_seed(derive_seed(seed, "audit-background"))
    means = math.sqrt(0.5) * torch.randn(num_classes, dim, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return means[y] + math.sqrt(0.5) * torch.randn(n, dim, generator=g), y


@torch.no_grad()
def canary_scores(model: torch.nn.Module, schedule, cfg: RunConfig, x: torch.Tensor, y: torch.Tensor,
                  draws: int = 32, seed: int = 0, t_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """score_i = −(mean diffusion loss of canary i over ``draws`` (t, ε) pairs), the SAME pairs for every
    canary (common random numbers: differences in score come from the model, not from the draws); the
    config's parameterisation and weighting, labels never dropped, t uniform in ``t_range`` × T."""
    d = cfg.diffusion
    t_min, t_max = int(t_range[0] * d.T), max(int(t_range[0] * d.T) + 1, int(t_range[1] * d.T))
    loss = DiffusionLoss(schedule, **d.loss_options(), t_min=t_min, t_max=t_max)
    device = next(model.parameters()).device
    out = torch.empty(len(x))
    for i in range(len(x)):  # one call per canary with the same generator state: identical (t, ε) draws
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, "audit-score-draws"))
        out[i] = loss(model, x[i:i + 1].to(device), y[i:i + 1].to(device), noise_multiplicity=draws,
                      generator=g).loss[0].item()
    return -out


# --------------------------------------------------------------------------------------------
# The audit run
# --------------------------------------------------------------------------------------------

def audit_config(source: str | Path | None = "dp", overrides: Sequence[str] = ()) -> RunConfig:
    """The preset (default ``dp``) with :data:`AUDIT_DEFAULTS`, then the user's ``overrides``, applied."""
    return load_config(source or "dp", [*AUDIT_DEFAULTS, *overrides])


def audit_set(m: int, dim: int, num_classes: int, radius: float, background: int, seed: int):
    """The audit's private set: ``background`` synthetic features + the included ones of ``m`` canaries (each
    in w.p. ½), shuffled together; returns (canaries, their labels, inclusion mask, set, set labels)."""
    x_can, y_can = make_canaries(m, dim, num_classes, radius, seed)
    g = torch.Generator().manual_seed(derive_seed(seed, "audit-inclusion"))
    included = torch.rand(m, generator=g) < 0.5
    u_bg, y_bg = background_features(background, dim, num_classes, seed)
    u = torch.cat([u_bg, x_can[included]])
    y = torch.cat([y_bg, y_can[included]])
    perm = torch.randperm(len(u), generator=g)  # position in the set carries no information on S
    return x_can, y_can, included, u[perm], y[perm]


def run_audit(cfg: RunConfig, m: int = DEFAULT_CANARIES, seed: int = 0, out_dir: Path | None = None, *,
              num_classes: int = 10, background: int = DEFAULT_BACKGROUND,
              k_grid: Sequence[int | tuple[int, int]] | None = None, beta: float = 0.05, score_draws: int = 32,
              score_t_range: tuple[float, float] | None = None, timesteps: str = "default",
              phase1_paper: bool = False, phase1_options: dict[str, Any] | None = None,
              log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """One-run audit of ``train_private_denoiser`` under ``cfg`` (its ``privacy`` section, denoiser and
    diffusion settings); returns and, with ``out_dir``, writes ``audit.json`` (atomically; the run's privacy
    ledger goes next to it, else to a temporary folder).

    Private set: ``background`` synthetic standardised features + the included ones of ``m`` canaries
    (each in w.p. ½, seeded by ``seed``), shuffled together. The claimed ε is the ledger's PLD ε after
    training at the config's δ; ``epsilon_lower`` the audited bound (:func:`audit_from_scores`).

    ``timesteps``: which t the canary scores average over (``privacy.audit.TIMESTEP_MODES``: the low-noise
    default, "all", or dp-promise's "phase1" band [S, T)); an explicit ``score_t_range`` wins.
    ``phase1_paper``: run :func:`run_phase1_audit` (the distinguishing test of dp-promise's published
    Phase I, with ``phase1_options``) instead; it writes the same ``audit.json`` keys that matter
    (``epsilon_claimed``, ``epsilon_lower``, ``delta``, ``beta``).
    """
    # Over 60 lines only through the docstring and the flat result record (one key a line would hide less).
    if phase1_paper:
        return run_phase1_audit(cfg, seed, out_dir, beta=beta, **(phase1_options or {}))
    if m < 2:
        raise ValueError(f"need at least 2 canaries, got {m}")
    if score_t_range is None:
        score_t_range = score_t_range_for(timesteps, cfg.privacy.promise_S, cfg.diffusion.T)
    else:
        timesteps = "custom"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    p, dim = cfg.privacy, cfg.model.feature_dim
    device = resolve_device(cfg.device)
    x_can, y_can, included, u, y = audit_set(m, dim, num_classes, p.feature_radius, background, seed)
    u, y = u.to(device), y.to(device)

    with tempfile.TemporaryDirectory(prefix="pfdiff-audit-") as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        ledger_path = folder / f"audit-ledger-seed{seed}.json"
        ledger_path.unlink(missing_ok=True)  # an audit is one fresh run: never resume another's spending
        ledger = PrivacyLedger(ledger_path, p.target_epsilon, p.delta)
        t0 = time.perf_counter()
        model, schedule, info = train_private_denoiser(u, y, num_classes, cfg, seed, ledger, [], None, log)
        train_seconds = time.perf_counter() - t0
        claimed = ledger.spent()
    scores = canary_scores(model, schedule, cfg, x_can, y_can, score_draws, seed, score_t_range)
    audit = audit_from_scores(scores, included, k_grid, p.delta, beta)
    result = {
        "format": AUDIT_FORMAT,
        "epsilon_claimed": claimed,
        "epsilon_target": p.target_epsilon,
        "epsilon_lower": audit["epsilon_lower"],
        "delta": p.delta,
        "beta": beta,
        "canaries": m,
        "canaries_included": int(included.sum()),
        "background": background,
        "dataset_size": len(u),
        **{k: audit[k] for k in ("k_plus", "k_minus", "guesses", "correct", "epsilon_ceiling", "correction",
                                 "beta_per_test", "per_k")},
        "mechanism": p.mechanism, "accountant": "pld", "sigma": info["sigma"], "sample_rate": info["sample_rate"],
        "steps": p.steps, "seed": seed, "score": "-diffusion loss", "score_draws": score_draws,
        "score_t_range": list(score_t_range), "timesteps": timesteps,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "audit.json", result)
    return result


# --------------------------------------------------------------------------------------------
# dp-promise's published Phase I: the distinguishing test
# --------------------------------------------------------------------------------------------

def phase1_mechanism(cfg: RunConfig, num_classes: int, sample_rate: float = 1.0) -> PaperPhase1:
    """The paper's Phase-I update under ``cfg``: t ∈ [``privacy.promise_S``, T), the config's schedule,
    parameterisation and weighting, null label ``num_classes``, Adam (the project's AdamW, weight decay 0) at
    ``privacy.lr``, no clipping and no noise."""
    d, p = cfg.diffusion, cfg.privacy
    if not 0 < p.promise_S < d.T:
        raise ValueError(f"privacy.promise_S must lie in (0, T={d.T}), got {p.promise_S}")
    loss = DiffusionLoss(d.make_schedule(), **d.loss_options(), t_min=p.promise_S, t_max=d.T)
    return PaperPhase1(loss, num_classes, p.lr, "adam", sample_rate)


def run_phase1_audit(cfg: RunConfig, seed: int = 0, out_dir: Path | None = None, *, trials: int = PHASE1_TRIALS,
                     calibration: int | None = None, uses: int = 1, background: int = 0, num_classes: int = 10,
                     beta: float = 0.05, chunk: int | None = None) -> dict[str, Any]:
    """Replace-one distinguishing test (``privacy.promise_attack``) of ``uses`` Phase-I steps as published,
    on the config's denoiser from its public seeded initialisation: x at the clip radius R vs −x, alone in a
    fixed batch or with ``background`` synthetic rows (all in every batch). Returns and, with ``out_dir``,
    writes ``audit.json``: ``epsilon_lower`` (replace-one, the paper's relation) against
    ``epsilon_claimed`` = the paper's ε for ``uses`` uses (PLD, noise multiplier 1/μ_S, q = 1), labelled
    "claimed by the paper"; ``epsilon_lower_add_remove`` is what the test implies under add/remove."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    p, dim = cfg.privacy, cfg.model.feature_dim
    mech = phase1_mechanism(cfg, num_classes)
    alpha_bar_S = float(mech.loss.schedule.alpha_bar[p.promise_S - 1])  # as the ledger: index S − 1 (conservative)
    # CPU-only on purpose, whatever cfg.device says: ``promise_attack.distinguish`` runs every trial on the CPU in
    # float32 (it moves the model there) with CPU generators, so the audit's error counts replay exactly on any
    # machine; the model is built there directly
    model = seeded_init(seed, "dp-denoiser", lambda: build_denoiser(cfg, dim, num_classes), torch.device("cpu"))
    bg = clip_rows(background_features(background, dim, num_classes, seed)[0], p.feature_radius) if background else None
    test = distinguish(model, mech, unit_canary(dim, p.feature_radius, seed), background=bg, steps=uses,
                       trials=trials, calibration=calibration or max(1, trials // 4), delta=p.delta, beta=beta,
                       seed=seed, chunk=chunk)
    result = {
        "format": AUDIT_FORMAT, "mode": "phase1-paper",
        "epsilon_claimed": paper_phase1_claim(p.feature_radius, alpha_bar_S, p.delta, uses),
        "epsilon_claimed_by": "the paper (dp-promise, Wang et al. 2024): one Phase-I use = Gaussian mechanism "
                              "with mu_S = 2R sqrt(abar_S)/sqrt(1 - abar_S), replace-one, PLD",
        "mu_S": phase1_mu(p.feature_radius, alpha_bar_S),
        **test,
        "promise_S": p.promise_S, "T": cfg.diffusion.T, "feature_radius": p.feature_radius,
        **cfg.diffusion.loss_options(), "lr": p.lr,
        "optimizer": "adam", "denoiser_hidden": cfg.model.denoiser_hidden, "denoiser_depth": cfg.model.denoiser_depth,
        "seed": seed,
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "audit.json", result)
    return result
