"""DP-LDMLR plumbing: public/private split, feature clipping, noisy counts, the denoiser's privacy plan,
budget refusal, and a ledger that an interrupted + resumed run continues exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfdiff.config import RunConfig
from pfdiff.diffusion import make_schedule
from pfdiff.longtail import private
from pfdiff.longtail.private import (PHASE1, clip_rows, noisy_counts, plan_denoiser, public_private_split,
                                     train_private_denoiser)
from pfdiff.privacy.accounting import BudgetError, PrivacyLedger, epsilon, gaussian_sigma_for, phase1_noise_multiplier


def test_public_private_split_is_disjoint_and_keeps_each_class_on_both_sides():
    y = np.repeat(np.arange(4), [10, 5, 2, 1])
    pub, priv = public_private_split(y, 4, 0.5, seed=0)
    assert len(np.intersect1d(pub, priv)) == 0 and len(pub) + len(priv) == len(y)
    for c, n in enumerate([10, 5, 2]):
        assert (y[pub] == c).sum() >= 1 and (y[priv] == c).sum() >= 1
    assert (y[pub] == 3).sum() == 0  # a class with one example stays private
    assert np.array_equal(pub, public_private_split(y, 4, 0.5, seed=0)[0])


def test_clip_rows_bounds_norms_and_leaves_small_rows():
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_rows(u, 1.0)
    assert torch.allclose(out.norm(dim=1), torch.tensor([1.0, 0.5]))
    assert torch.equal(out[1], u[1])


def test_noisy_counts_event_and_public_counts():
    cfg = RunConfig()
    counts = np.array([50, 5, 1])
    noisy, event = noisy_counts(counts, cfg.privacy.model_copy(update={"count_epsilon": 0.5}), seed=0)
    assert event.sample_rate == 1.0 and event.steps == 1
    assert event.noise_multiplier == pytest.approx(gaussian_sigma_for(0.5, cfg.privacy.delta))
    assert (noisy >= 1).all() and noisy.dtype.kind == "i"
    same, none = noisy_counts(counts, cfg.privacy.model_copy(update={"count_epsilon": 0.0}), seed=0)
    assert none is None and np.array_equal(same, counts)


@pytest.mark.parametrize("mechanism", ["dpsgd", "dp-promise"])
def test_plan_meets_the_target_with_every_release(mechanism):
    p = RunConfig().privacy.model_copy(update={"mechanism": mechanism, "steps": 200, "target_epsilon": 5.0})
    schedule = make_schedule("linear", 1000)
    _, count_event = noisy_counts(np.array([5, 5]), p, 0)
    plan = plan_denoiser(p, 200, schedule, [count_event])
    eps = epsilon(plan.events, p.delta)
    assert 4.9 < eps <= 5.0  # calibrated: uses the budget, never exceeds it
    names = [e.name for e in plan.events]
    assert (PHASE1 in names) == (mechanism == "dp-promise")
    if mechanism == "dp-promise":
        mult = phase1_noise_multiplier(p.feature_radius, float(schedule.alpha_bar[p.promise_S - 1]))
        assert plan.events[1].noise_multiplier == pytest.approx(mult)


def _tiny(steps=4, **privacy):
    cfg = RunConfig()
    cfg = cfg.model_copy(update={
        "checkpoint_every": 2,
        "model": cfg.model.model_copy(update={"denoiser_hidden": 16, "denoiser_depth": 1, "time_dim": 8}),
        "privacy": cfg.privacy.model_copy(update={"steps": steps, "expected_batch_size": 8, "noise_multiplicity": 2,
                                                   "promise_phase1_steps": 3, "promise_phase1_batch": 8, **privacy})})
    g = torch.Generator().manual_seed(0)
    return cfg, torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)


def test_a_plan_over_budget_is_refused_before_training(tmp_path):
    cfg, u, y = _tiny(noise_multiplier=0.3, target_epsilon=1.0)
    ledger = PrivacyLedger(tmp_path / "ledger.json", 1.0, cfg.privacy.delta)
    with pytest.raises(BudgetError, match="exceeds the target"):
        train_private_denoiser(u, y, 3, cfg, 0, ledger, [], tmp_path / "ck.safetensors", None,
                               init=lambda: pytest.fail("public warm start trained before the budget check"))
    assert not (tmp_path / "ck.safetensors").exists() and ledger.entries == ()


@pytest.mark.parametrize("mechanism", ["dpsgd", "dp-promise"])
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path, monkeypatch, mechanism):
    cfg, u, y = _tiny(mechanism=mechanism)
    p = cfg.privacy

    def run(folder):
        ledger = PrivacyLedger(folder / "ledger.json", p.target_epsilon, p.delta)
        model, _, info = train_private_denoiser(u, y, 3, cfg, 0, ledger, [], folder / "ck.safetensors", None)
        return model, ledger

    ref_model, ref_ledger = run(tmp_path / "a")
    crash = {"armed": True}
    real_step = private.DPSGD.step

    def crashing_step(self, fn, data, step):
        if step == 3 and crash["armed"]:
            crash["armed"] = False
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, fn, data, step)

    monkeypatch.setattr(private.DPSGD, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    model, ledger = run(tmp_path / "b")
    assert ledger.spent() == pytest.approx(ref_ledger.spent())
    assert [e.steps for e in ledger.entries] == [e.steps for e in ref_ledger.entries]
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
