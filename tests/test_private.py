"""DP-LDMLR plumbing: public/private split, feature clipping, noisy counts, the denoiser's privacy plan,
budget refusal, and a ledger that an interrupted + resumed run continues exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pfdiff.config import RunConfig
from pfdiff.diffusion import make_schedule
from pfdiff.longtail import private
from pfdiff.longtail.private import (PHASE1, clip_rows, noisy_counts, plan_denoiser, public_private_split,
                                     train_private_denoiser)
from pfdiff.privacy.accounting import (BudgetError, GaussianEvent, PrivacyLedger, epsilon, gaussian_sigma_for,
                                      phase1_noise_multiplier)
from pfdiff.privacy.noise import NoiseSource


def test_public_split_is_data_independent_and_of_fixed_size():
    """The public part depends only on N and the seed: relabelling the data (any other private data set of the
    same size) gives the same indices, so the split reveals nothing about labels or per-class counts."""
    y = np.repeat(np.arange(4), [10, 5, 2, 1])
    pub, priv = public_private_split(y, 4, 0.5, seed=0)
    assert len(np.intersect1d(pub, priv)) == 0 and len(pub) + len(priv) == len(y)
    assert len(pub) == private.public_size(len(y), 0.5) == 9
    other = np.random.default_rng(1).integers(0, 4, len(y))
    assert np.array_equal(pub, public_private_split(other, 4, 0.5, seed=0)[0])
    assert not np.array_equal(pub, public_private_split(y, 4, 0.5, seed=1)[0])


def test_clip_rows_bounds_norms_and_leaves_small_rows():
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_rows(u, 1.0)
    assert torch.allclose(out.norm(dim=1), torch.tensor([1.0, 0.5]))
    assert torch.equal(out[1], u[1])


def test_noisy_counts_event_public_counts_and_fresh_noise():
    cfg = RunConfig()
    counts = np.array([50, 5, 1, 30, 7])
    p = cfg.privacy.model_copy(update={"count_epsilon": 0.5})
    noisy, event = noisy_counts(counts, p, NoiseSource())
    assert event.sample_rate == 1.0 and event.steps == 1
    assert event.noise_multiplier == pytest.approx(gaussian_sigma_for(0.5, cfg.privacy.delta))
    assert (noisy >= 1).all() and noisy.dtype.kind == "i"
    again, _ = noisy_counts(counts, p, NoiseSource())
    assert not np.array_equal(noisy, again)  # σ ≈ 7: two releases of 5 counts coincide with probability ~1e-7
    debug = [noisy_counts(counts, p, NoiseSource(reproducible=True, seed=3))[0] for _ in range(2)]
    assert np.array_equal(*debug)
    same, none = noisy_counts(counts, cfg.privacy.model_copy(update={"count_epsilon": 0.0}), NoiseSource())
    assert none is None and np.array_equal(same, counts)


@pytest.mark.parametrize("mechanism", ["dpsgd", "dp-promise"])
def test_plan_meets_the_target_with_every_release(mechanism):
    p = RunConfig().privacy.model_copy(update={"mechanism": mechanism, "steps": 200, "target_epsilon": 5.0})
    schedule = make_schedule("linear", 1000)
    _, count_event = noisy_counts(np.array([5, 5]), p, NoiseSource())
    plan = plan_denoiser(p, 200, schedule, [count_event])
    eps = epsilon(plan.events, p.delta)
    assert 4.9 < eps <= 5.0  # calibrated: uses the budget, never exceeds it
    names = [e.name for e in plan.events]
    assert (PHASE1 in names) == (mechanism == "dp-promise")
    if mechanism == "dp-promise":  # Phase I is DP-SGD too: the same σ at its own rate, calibrated jointly
        phase1 = plan.events[1]
        assert phase1.noise_multiplier == plan.sigma and phase1.sample_rate == pytest.approx(p.promise_phase1_batch / 200)
        mult = phase1_noise_multiplier(p.feature_radius, float(schedule.alpha_bar[p.promise_S - 1]))
        claim = epsilon([count_event, GaussianEvent(mult, phase1.sample_rate, phase1.steps),
                         GaussianEvent(plan.sigma, plan.sample_rate, p.steps)], p.delta)
        assert plan.paper_claim == pytest.approx(claim)  # shown as "claimed by the paper", never as the guarantee
    else:
        assert plan.paper_claim is None


def test_delta_at_or_above_one_over_n_is_refused():
    p = RunConfig().privacy.model_copy(update={"delta": 0.01})
    with pytest.raises(BudgetError, match=r"not below 1/N = 1/100"):
        plan_denoiser(p, 100, make_schedule("linear", 1000), [])
    plan_denoiser(p.model_copy(update={"delta": 0.009}), 100, make_schedule("linear", 1000), [])


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
    with pytest.raises(BudgetError, match="target_epsilon=1"):
        train_private_denoiser(u, y, 3, cfg, 0, ledger, [], tmp_path / "ck.safetensors", None,
                               init=lambda: pytest.fail("public warm start trained before the budget check"))
    assert not (tmp_path / "ck.safetensors").exists() and ledger.entries == ()


def _crash_then_resume(tmp_path, monkeypatch, cfg, u, y, folder, crash_at=3):
    p = cfg.privacy

    def run():
        ledger = PrivacyLedger(folder / "ledger.json", p.target_epsilon, p.delta, private=not p.reproducible_noise)
        noise = NoiseSource(p.reproducible_noise, 0)
        model, _, info = train_private_denoiser(u, y, 3, cfg, 0, ledger, [], folder / "ck.safetensors", None,
                                                noise=noise)
        return model, ledger

    crash = {"armed": True}
    real_step = private.DPSGD.step

    def crashing_step(self, fn, data, step):
        if step == crash_at and crash["armed"]:
            crash["armed"] = False
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, fn, data, step)

    with monkeypatch.context() as m:
        m.setattr(private.DPSGD, "step", crashing_step)
        with pytest.raises(KeyboardInterrupt):
            run()
    return run()


@pytest.mark.parametrize("mechanism", ["dpsgd", "dp-promise"])
def test_debug_noise_resumed_run_matches_the_uninterrupted_one(tmp_path, monkeypatch, mechanism):
    """With ``reproducible_noise`` (NOT PRIVATE) a resumed run replays the same draws: same weights, same ledger."""
    cfg, u, y = _tiny(mechanism=mechanism, reproducible_noise=True)
    p = cfg.privacy
    ref_ledger = PrivacyLedger(tmp_path / "a" / "ledger.json", p.target_epsilon, p.delta, private=False)
    ref_model, _, _ = train_private_denoiser(u, y, 3, cfg, 0, ref_ledger, [], tmp_path / "a" / "ck.safetensors",
                                             None, noise=NoiseSource(True, 0))
    model, ledger = _crash_then_resume(tmp_path, monkeypatch, cfg, u, y, tmp_path / "b")
    assert ledger.spent() == pytest.approx(ref_ledger.spent())
    assert [e.steps for e in ledger.entries] == [e.steps for e in ref_ledger.entries]
    assert not ledger.private and "NOT PRIVATE" in json.loads((tmp_path / "b" / "ledger.json").read_text())["noise"]
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_private_resumed_run_is_charged_for_every_executed_step(tmp_path, monkeypatch):
    """Secure noise cannot be replayed: the steps a resumed run repeats after its checkpoint are new releases.
    Crash at step 3 with checkpoints every 2 steps: steps 2 and 3 are charged twice (3 before its draw).
    σ is fixed above the calibrated one, leaving room in the budget for the repeated steps."""
    cfg, u, y = _tiny(noise_multiplier=2.0)
    model, ledger = _crash_then_resume(tmp_path, monkeypatch, cfg, u, y, tmp_path / "b")
    (event,) = ledger.entries
    assert ledger.private and event.name == private.DPSGD_EVENT
    assert event.steps == cfg.privacy.steps + 2
    ref = epsilon([private.GaussianEvent(event.noise_multiplier, event.sample_rate, cfg.privacy.steps)],
                  cfg.privacy.delta)
    assert ledger.spent() > ref


def test_a_resume_that_would_exceed_the_budget_is_refused(tmp_path):
    """The ledger already spent the whole plan (a run that repeated many steps): resuming is refused."""
    cfg, u, y = _tiny()
    p = cfg.privacy
    plan = plan_denoiser(p, len(u), make_schedule("linear", 1000), [])
    ledger = PrivacyLedger(tmp_path / "ledger.json", p.target_epsilon, p.delta)
    for s in range(3 * p.steps):  # as if three runs had executed every step
        ledger.record_progress(private.DPSGD_EVENT, plan.sigma, plan.sample_rate, s % p.steps + 1)
    with pytest.raises(BudgetError, match="pays again"):
        train_private_denoiser(u, y, 3, cfg, 0, ledger, [], tmp_path / "ck.safetensors", None)


def test_two_runs_with_the_same_seed_release_different_models(tmp_path):
    cfg, u, y = _tiny()
    p = cfg.privacy
    models = []
    for i in range(2):
        ledger = PrivacyLedger(tmp_path / f"{i}.json", p.target_epsilon, p.delta)
        models.append(train_private_denoiser(u, y, 3, cfg, 0, ledger, [], None, None)[0])
    assert not all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
