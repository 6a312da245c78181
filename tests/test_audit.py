"""One-run privacy auditing (pfdiff.privacy.audit): the bound, the guessing, and the audit of the real DP
denoiser training, which must pass when the noise is on and catch the implementation when it is off; and
the distinguishing test (pfdiff.privacy.promise_attack), which must refute dp-promise's published Phase I
and raise no false alarm on a clipped, noised DP-SGD step (docs/privacy_audit_cases.md)."""

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


# --------------------------------------------------------------------------------------------
# dp-promise's published Phase I: the distinguishing test (privacy.promise_attack)
# --------------------------------------------------------------------------------------------

def _tiny_denoiser(seed: int = 0):
    """The project's FeatureDenoiser, small (15k parameters) so that thousands of runs take seconds."""
    from pfdiff.models.denoisers import FeatureDenoiser

    torch.manual_seed(seed)
    return FeatureDenoiser(64, 10, hidden=32, depth=1, time_dim=64)


def _schedule():
    from pfdiff.diffusion import make_schedule

    return make_schedule("linear", 1000)


def _loss(t_min: int = 900, t_max: int = 1000):
    """dp-promise Phase I's loss: v-prediction, uniform weight, t ∈ [t_min, t_max)."""
    from pfdiff.diffusion import DiffusionLoss

    return DiffusionLoss(_schedule(), "v", t_min=t_min, t_max=t_max)


def test_clopper_pearson_and_the_zero_error_bound():
    from pfdiff.privacy.promise_attack import clopper_pearson_upper, replace_one_lower_bound

    u = clopper_pearson_upper(0, 4000, 0.025)
    assert u == pytest.approx(1 - 0.025 ** (1 / 4000), rel=1e-9)  # closed form at 0 errors
    assert replace_one_lower_bound(u, u, 1e-5) == pytest.approx(6.988, abs=1e-3)  # 0/4000 each side
    assert clopper_pearson_upper(40, 4000, 0.025) > 0.01 and clopper_pearson_upper(4000, 4000, 0.025) == 1.0
    assert replace_one_lower_bound(0.5, 0.5, 1e-5) == 0.0  # chance concludes nothing


def test_add_remove_conversion_is_group_privacy_of_two():
    """A Gaussian mechanism with add/remove sensitivity 1 and parameter μ is tested on a replace-one pair
    (distance 2, parameter 2μ): the optimal test's rates Φ(−μ) must never refute its true add/remove ε,
    and the converted bound must sit exactly on e^{2ε}·FPR + FNR + (1 + e^ε)δ = 1."""
    from scipy.stats import norm

    from pfdiff.privacy.accounting import gdp_epsilon
    from pfdiff.privacy.promise_attack import add_remove_lower_bound, replace_one_lower_bound

    delta = 1e-5
    for mu in (0.25, 1.0, 3.0):
        rate = float(norm.cdf(-mu))
        ar = add_remove_lower_bound(rate, rate, delta)
        assert 0 < ar <= gdp_epsilon(mu, delta)
        assert replace_one_lower_bound(rate, rate, delta) <= gdp_epsilon(2 * mu, delta)
        assert math.exp(2 * ar) * rate + rate + (1 + math.exp(ar)) * delta == pytest.approx(1.0, abs=1e-6)
        assert ar < 0.5 * replace_one_lower_bound(rate, rate, delta) + 1e-9  # the δ growth only lowers it


def test_promise_attack_refuses_bad_input():
    from pfdiff.privacy.promise_attack import (ClippedNoisyStep, PaperPhase1, clopper_pearson_upper, distinguish,
                                               replace_one_lower_bound, unit_canary)

    with pytest.raises(ValueError, match="errors"):
        clopper_pearson_upper(5, 4, 0.05)
    with pytest.raises(ValueError, match="FPR"):
        replace_one_lower_bound(0.0, 0.1, 1e-5)
    with pytest.raises(ValueError, match="t_min"):
        PaperPhase1(_loss(900, 1001), 10)
    with pytest.raises(ValueError, match="optimizer"):
        PaperPhase1(_loss(), 10, optimizer="lbfgs")
    with pytest.raises(ValueError, match=">= 1"):
        distinguish(_tiny_denoiser(), PaperPhase1(_loss(), 10), unit_canary(64, 8.0, 0), trials=0)
    with pytest.raises(ValueError, match="noise"):
        ClippedNoisyStep(_loss(), 10).gradients(None, {}, None, True, None)


def test_functional_phase1_matches_torch_adam_with_empty_poisson_batches():
    """The batched runs are the paper's step as the project implemented it (``phase1_stepper``): batch-mean
    loss of the drawn rows, torch's Adam, and no step at all on an empty Poisson batch."""
    import copy

    from pfdiff.privacy.promise_attack import PaperPhase1, _release

    model, data = _tiny_denoiser(), 4.0 * torch.randn(2, 64)
    mech = PaperPhase1(_loss(), 10, lr=1e-2, sample_rate=0.5)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    got = _release(model, theta0, mech, data, trials=3, steps=4, g=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    draws = [mech.draw(data, 3, g) for _ in range(4)]
    assert any(float(d.mask[i].sum()) == 0 for d in draws for i in range(3))  # the skip path is exercised
    for i in range(3):
        net = copy.deepcopy(model)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
        for d in draws:
            if float(d.mask[i].sum()) == 0:
                continue
            per_row = mech.row_losses(net, dict(net.named_parameters()), d.z0, d.y, d.t[i], d.a[i], d.b[i], d.w[i],
                                      d.eps[i])
            opt.zero_grad()
            ((per_row * d.mask[i]).sum() / d.mask[i].sum()).backward()
            opt.step()
        want = torch.cat([(p.detach() - theta0[k]).flatten() for k, p in net.named_parameters()])
        # float32 Adam divides by √v̂ + 1e-8, so near-zero gradients differ in the last bits: 1 % of lr at worst
        assert torch.allclose(got[i], want, atol=1e-4) and (got[i] - want).abs().mean() < 1e-6


def test_noise_free_unclipped_dpsgd_step_is_the_phase1_step():
    """With σ = 0 and a clip no gradient reaches, DP-SGD's Σ grads / n equals Phase I's batch mean: the
    two mechanisms of the test differ only by clipping and noise (one step: same seed, same rows)."""
    from pfdiff.privacy.promise_attack import ClippedNoisyStep, PaperPhase1, _release

    model, data = _tiny_denoiser(), 4.0 * torch.randn(3, 64)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    kw = dict(lr=1e-2, optimizer="sgd")
    paper = _release(model, theta0, PaperPhase1(_loss(), 10, **kw), data, 4, 1,
                     torch.Generator().manual_seed(3))
    dp = _release(model, theta0, ClippedNoisyStep(_loss(), 10, **kw, clip=1e9, sigma=0.0), data, 4, 1,
                  torch.Generator().manual_seed(3))
    assert torch.allclose(paper, dp, atol=1e-7) and paper.abs().max() > 0


def test_paper_phase1_is_refuted_by_the_distinguishing_test():
    """The counter-example of issue 13, item 3: one Phase-I use as published (t ≥ S = 900, v-prediction,
    R = 8, no clipping, no noise) separates x from −x; the bound must exceed the paper's claimed ε
    (0.99 per use), even after conversion to add/remove (group size 2). Measured: 0/4000 errors per side,
    ε ≥ 6.99 (replace-one), ≥ 3.49 (add/remove), against 0.99 claimed by the paper."""
    torch.set_num_threads(1)
    from pfdiff.privacy.promise_attack import PaperPhase1, distinguish, paper_phase1_claim, unit_canary

    schedule = _schedule()
    claim = paper_phase1_claim(8.0, float(schedule.alpha_bar[899]), 1e-5)
    assert claim == pytest.approx(0.989, abs=2e-3)
    r = distinguish(_tiny_denoiser(), PaperPhase1(_loss(), 10), unit_canary(64, 8.0, 0), trials=4000, calibration=250,
                    delta=1e-5)
    assert r["epsilon_lower"] > claim + 3.0
    assert r["epsilon_lower_add_remove"] > claim
    assert r["epsilon_lower"] <= r["epsilon_ceiling"] and r["relation"].startswith("replace-one")
    assert r["seconds"] < 30


@pytest.mark.parametrize("sigma, expect", [(2.0, "pass"), (0.5, "pass"), (0.02, "caught")])
def test_dpsgd_step_under_the_same_test(sigma, expect):
    """No false alarm: the same test on a clipped (C = 1) and noised (σ) step of the same loss gives a bound
    below the accountant's ε for that pair (replace-one: noise multiplier σ/2; add/remove: σ), and above 0
    when σ is small (the test has power). And it can fail: a step with σ = 0.02 checked against the claim
    of σ = 2 (a deliberately mis-scaled noise) is caught."""
    torch.set_num_threads(1)
    import dataclasses

    from pfdiff.privacy.accounting import GaussianEvent, epsilon
    from pfdiff.privacy.promise_attack import ClippedNoisyStep, distinguish, dpsgd_replace_claim, unit_canary

    mech = ClippedNoisyStep(_loss(), 10, optimizer="sgd", clip=1.0, sigma=sigma)
    r = distinguish(_tiny_denoiser(), mech, unit_canary(64, 8.0, 0), trials=2000, calibration=500, delta=1e-5,
                    calibrate_with=dataclasses.replace(mech, sigma=0.0))
    claimed_sigma = 2.0 if expect == "caught" else sigma
    claim_replace = dpsgd_replace_claim(claimed_sigma, 1e-5)
    claim_add_remove = epsilon([GaussianEvent(claimed_sigma, 1.0, 1)], 1e-5)
    if claim_replace < 6:
        assert r["epsilon_ceiling"] > claim_replace  # a violation would have been visible
    if expect == "pass":
        assert r["epsilon_lower"] <= claim_replace and r["epsilon_lower_add_remove"] <= claim_add_remove
        if sigma < 1:
            assert r["epsilon_lower"] > 0
    else:
        assert r["epsilon_lower"] > claim_replace and r["epsilon_lower_add_remove"] > claim_add_remove


def test_score_t_range_modes():
    from pfdiff.privacy.audit import SCORE_T_RANGE, score_t_range_for

    assert score_t_range_for("default", 900, 1000) == SCORE_T_RANGE
    assert score_t_range_for("all", 900, 1000) == (0.0, 1.0)
    assert score_t_range_for("phase1", 900, 1000) == (0.9, 1.0)
    with pytest.raises(ValueError, match="timesteps"):
        score_t_range_for("high", 900, 1000)


def test_cli_audit_scores_all_timesteps(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    res = CliRunner().invoke(app, ["audit", "--set", "privacy.steps=5", "--canaries", "20", "--timesteps", "all",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["score_t_range"] == [0.0, 1.0] and written["timesteps"] == "all"


def test_cli_audit_phase1_paper_exits_1_with_the_papers_claim(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    res = CliRunner().invoke(app, ["audit", "--phase1-paper", "--trials", "500", "--set", "model.denoiser_hidden=32",
                                   "--set", "model.denoiser_depth=1", "--out", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "claimed by the paper" in res.output and "VIOLATION" in res.output
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["mode"] == "phase1-paper" and written["epsilon_claimed"] == pytest.approx(0.989, abs=2e-3)
    assert written["epsilon_lower"] > written["epsilon_claimed"] and written["trials"] == 500


@pytest.mark.slow
def test_phase1_audit_on_the_dp_preset_denoiser(tmp_path):
    """The same counter-example on the dp preset's own denoiser (147k parameters, 4000 trials per side, the
    CLI's default; ≈ 40–70 s on one core): 0/4000 errors per side measured, ε ≥ 6.99 against 0.99."""
    torch.set_num_threads(1)
    from pfdiff.longtail.private_audit import run_phase1_audit

    r = run_phase1_audit(audit_config("dp"), seed=0, out_dir=tmp_path)
    assert r["parameters"] > 100_000 and r["trials"] == 4000
    assert r["epsilon_lower"] > r["epsilon_claimed"] + 3.0 and r["epsilon_lower_add_remove"] > r["epsilon_claimed"]
    assert json.loads((tmp_path / "audit.json").read_text())["mode"] == "phase1-paper"
