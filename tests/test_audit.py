"""One-run privacy auditing (pfdiff.privacy.audit): the bound, the guessing, and the audit of the real DP
denoiser training, which must pass when the noise is on and catch the implementation when it is off."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import pfdiff.privacy.dpsgd as dpsgd
from pfdiff.longtail.private_audit import audit_config, run_audit
from pfdiff.privacy.audit import audit_from_scores, default_k_grid, epsilon_lower_bound, p_value

# --------------------------------------------------------------------------------------------
# The bound
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, r, v, delta, published", [
    (1000, 100, 75, 1e-4, 0.673),  # Steinke, Nasr & Jagielski 2023, App. D's worked example
    (100_000, 1510, 1439, 1e-5, 2.675),  # ibid., §7 (CIFAR-10 white-box audit)
])
def test_bound_reproduces_the_papers_examples(m, r, v, delta, published):
    assert epsilon_lower_bound(v, r, delta, 0.05, canaries=m) == pytest.approx(published, abs=2e-3)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_no_better_than_chance_concludes_nothing(r):
    assert epsilon_lower_bound(r // 2, r, 0.0) == 0.0
    assert epsilon_lower_bound(r // 2, r, 1e-5, canaries=2 * r) == 0.0
    assert epsilon_lower_bound(0, r, 0.0) == 0.0
    assert epsilon_lower_bound(0, 0, 0.0) == 0.0


def test_bound_grows_with_correct_guesses():
    bounds = [epsilon_lower_bound(v, 100, 1e-5, canaries=200) for v in range(50, 101, 5)]
    assert bounds[0] == 0.0
    assert all(b2 > b1 for b1, b2 in zip(bounds[2:], bounds[3:]))  # strictly once above chance
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("r", [10, 100, 1000, 10_000])
def test_all_correct_pure_bound_is_the_closed_form(r):
    # P[Bin(r, q) >= r] = q^r = beta  <=>  q = beta^(1/r), eps = log(q / (1 - q))
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_bound_is_monotone_in_beta_and_delta_and_m():
    betas = [0.2, 0.1, 0.05, 0.01, 0.001]
    pure = [epsilon_lower_bound(180, 200, 0.0, b) for b in betas]
    assert all(b2 < b1 for b1, b2 in zip(pure, pure[1:]))  # more confidence, smaller bound
    for beta, eps0 in zip(betas, pure):
        with_delta = epsilon_lower_bound(180, 200, 1e-5, beta, canaries=1000)
        assert with_delta <= eps0
        assert epsilon_lower_bound(180, 200, 1e-3, beta, canaries=1000) < with_delta  # δ term costs
    assert epsilon_lower_bound(180, 200, 1e-4, canaries=10_000) < epsilon_lower_bound(180, 200, 1e-4, canaries=200)


def test_p_value_is_valid_for_randomised_response():
    # ε-randomised response on each of r canaries is exactly ε-DP: W ~ Bin(r, e^ε/(1+e^ε)), so the
    # p-value at the true ε must be super-uniform: P[p <= 0.05] <= 0.05.
    rng = np.random.default_rng(0)
    eps, r = 1.0, 200
    w = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=2000)
    p = np.array([p_value(int(v), r, eps) for v in w])
    assert np.mean(p <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / len(w))
    lower = np.array([epsilon_lower_bound(int(v), r, 0.0) for v in w[:300]])
    assert np.mean(lower > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)


def test_bound_refuses_bad_input():
    with pytest.raises(ValueError, match="canaries"):
        epsilon_lower_bound(8, 10, 1e-5)  # the δ term needs m
    with pytest.raises(ValueError, match="exceed"):
        epsilon_lower_bound(11, 10, 0.0)
    with pytest.raises(ValueError, match="canaries"):
        epsilon_lower_bound(8, 10, 1e-5, canaries=5)
    with pytest.raises(ValueError, match="beta"):
        epsilon_lower_bound(8, 10, 0.0, beta=1.0)


# --------------------------------------------------------------------------------------------
# Guessing from scores
# --------------------------------------------------------------------------------------------

def test_audit_from_scores_guesses_top_and_bottom_with_bonferroni():
    rng = np.random.default_rng(1)
    included = rng.random(200) < 0.5
    perfect = audit_from_scores(included + 0.01 * rng.random(200), included, k_grid=(10, 40, 60), delta=1e-5)
    assert perfect["correction"] == "bonferroni" and perfect["beta_per_test"] == pytest.approx(0.05 / 3)
    assert all(row["correct"] == row["guesses"] for row in perfect["per_k"])
    assert perfect["k_plus"] == perfect["k_minus"] == 60 and perfect["guesses"] == 120
    assert perfect["epsilon_lower"] == perfect["epsilon_ceiling"] == pytest.approx(
        epsilon_lower_bound(120, 120, 1e-5, 0.05 / 3, canaries=200))
    # the uncorrected bound at the best k would be larger: the correction is applied
    assert perfect["epsilon_lower"] < epsilon_lower_bound(120, 120, 1e-5, 0.05, canaries=200)

    wrong = audit_from_scores(-included.astype(float), included, k_grid=(10, (20, 0), (0, 20)))
    assert wrong["epsilon_lower"] == 0.0 and all(row["correct"] == 0 for row in wrong["per_k"])

    chance = audit_from_scores(rng.random(200), included)
    assert chance["epsilon_lower"] < 0.5 and [row["k_plus"] for row in chance["per_k"]] == list(default_k_grid(200))

    # asymmetric guesses: only the top 5 (all in) are guessed
    scores = np.arange(200.0)
    inc = np.zeros(200, bool)
    inc[-5:] = True
    row = audit_from_scores(scores, inc, k_grid=[(5, 0)])["per_k"][0]
    assert (row["guesses"], row["correct"]) == (5, 5)


def test_audit_from_scores_refuses_bad_input():
    with pytest.raises(ValueError, match="same length"):
        audit_from_scores(np.zeros(10), np.zeros(9, bool))
    with pytest.raises(ValueError, match="k₊"):
        audit_from_scores(np.zeros(10), np.zeros(10, bool), k_grid=(6,))
    with pytest.raises(ValueError, match="finite"):
        audit_from_scores(np.array([0.0, np.nan]), np.array([True, False]))


# --------------------------------------------------------------------------------------------
# Auditing the real DP training
# --------------------------------------------------------------------------------------------

CLAIM = 1.0  # small enough that a memorising (noise-free) model can be caught with 200 canaries


@pytest.fixture(scope="module")
def dp_audit(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = audit_config("dp", [f"privacy.target_epsilon={CLAIM}"])
    out = tmp_path_factory.mktemp("audit")
    return run_audit(cfg, m=200, seed=0, out_dir=out), out


def test_correct_dp_training_passes_the_audit(dp_audit):
    result, out = dp_audit
    assert result["epsilon_claimed"] <= CLAIM + 1e-9 and result["epsilon_claimed"] > 0.9 * CLAIM
    assert result["epsilon_lower"] <= result["epsilon_claimed"]
    assert result["epsilon_ceiling"] > 2 * CLAIM  # the audit could have caught a violation
    assert result["canaries"] == 200 and 0 < result["canaries_included"] < 200
    assert result["seconds"] < 60
    assert json.loads((out / "audit.json").read_text()) == result


def test_audit_catches_dp_training_without_noise(monkeypatch, tmp_path):
    """The deliberate bug: DP-SGD steps with the noise switched off after construction, so clipping and the
    accountant still run and the ledger still claims the calibrated ε. The auditor must refute that claim."""
    torch.set_num_threads(1)
    real_init, calls = dpsgd.DPSGD.__init__, []

    def init_without_noise(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        calls.append(self.optimizer.noise_multiplier)
        self.optimizer.noise_multiplier = 0.0

    monkeypatch.setattr(dpsgd.DPSGD, "__init__", init_without_noise)
    result = run_audit(audit_config("dp", [f"privacy.target_epsilon={CLAIM}"]), m=200, seed=0, out_dir=tmp_path)
    assert calls and calls[0] > 1.0  # the bug was injected into a noisy engine
    assert result["epsilon_claimed"] == pytest.approx(CLAIM, abs=0.01)  # the accountant does not notice
    assert result["epsilon_lower"] > result["epsilon_claimed"] + 1.0  # the auditor does (3.2 measured)


def test_cli_audit_prints_claim_and_bound(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    res = CliRunner().invoke(app, ["audit", "--set", "privacy.steps=5", "--set", "privacy.target_epsilon=2",
                                   "--canaries", "20", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "claimed ε" in res.output and "lower bound" in res.output
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["canaries"] == 20 and written["steps"] == 5 and written["epsilon_claimed"] <= 2.0


def test_cli_audit_exits_1_on_a_violation(monkeypatch):
    from typer.testing import CliRunner

    import pfdiff.longtail.private_audit as audit
    from pfdiff.cli import app

    fake = {"epsilon_claimed": 1.0, "epsilon_lower": 3.2, "delta": 1e-5, "beta": 0.05, "correct": 120,
            "guesses": 120, "k_plus": 60, "k_minus": 60, "canaries": 200, "epsilon_ceiling": 3.75, "seconds": 1.0}
    monkeypatch.setattr(audit, "run_audit", lambda *args, **kwargs: fake)
    res = CliRunner().invoke(app, ["audit"])
    assert res.exit_code == 1 and "VIOLATION" in res.output
