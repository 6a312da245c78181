"""End-to-end E, G, ε_θ training: method grammar, schedules A/B/C, the coupled gradient routings, C's loss share,
tail-matched L_cov, filters, warm starts and a tiny run per strategy."""

import pytest
import torch

from pfdiff.config import load_config
from pfdiff.longtail.common import make_split
from pfdiff.longtail.end_to_end import (E2EVariant, EndToEnd, Routing, e2e_budget, parse_e2e, plan_step,
                                        train_end_to_end)
from pfdiff.longtail.methods import parse_method
from pfdiff.training import shuffled_batch

TINY = ["e2e.steps=40", "e2e.warmup_steps=10", "e2e.drift_every=20", "e2e.drift_per_class=5", "e2e.ge_batch=16",
        "e2e.batch_size=64", "model.width=8", "model.denoiser_hidden=32", "diffusion.T=100", "e2e.ge_steps=3",
        "e2e.ge_every=2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split():
    return make_split(load_config(None, TINY))


def test_method_grammar():
    assert parse_e2e("e2e-A") == E2EVariant("A", "rad")
    assert parse_e2e("e2e-C-cov-aid") == E2EVariant("C", "cov", "aid")
    assert parse_e2e("e2e-B-bnd-bal-wide-detached-ws2") == E2EVariant("B", "rad", "bnd", True, True, True, "stage2")
    assert parse_e2e("e2e-A-aid-bnd") is None and parse_e2e("e2e-A-xyz") is None  # two filters; unknown option
    assert parse_e2e("e2e-D") is None and parse_e2e("ldmlr") is None
    m = parse_method("e2e-B-proto+la")
    assert m.base == "e2e-B-proto" and m.adjust and "alternating" in m.description
    assert parse_method("logit_adjust").base == "ce" and parse_method("logit_adjust").adjust
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("e2e-A+xx")
    with pytest.raises(ValueError, match="detached"):  # the grammar in the message names the options
        parse_method("e2e-A-nope")


def test_schedules():
    e = load_config(None, ["e2e.steps=100", "e2e.warmup_steps=10", "e2e.ge_every=5"]).e2e
    a0, a5, a20 = (plan_step(s, e, "A") for s in (0, 5, 20))
    assert a0.sem_warm == 0 and a5.sem_warm == 0.5 and a20.sem_warm == 1
    assert a5.gamma_ge == 0 and a20.gamma_ge == e.gamma_ge and plan_step(21, e, "A").gamma_ge == 0
    assert a0.update_theta and a0.update_eg
    b0, b1 = plan_step(20, e, "B"), plan_step(21, e, "B")
    assert (b0.update_theta, b0.update_eg) == (True, False) and (b1.update_theta, b1.update_eg) == (False, True)
    assert b0.gamma_ge == 0 and b1.lambda_sem == 0 and b1.gamma_ge > 0
    c = [plan_step(s, e, "C") for s in (0, 35, 60, 99)]
    assert not c[0].update_theta and c[0].gamma_ge == 0  # L_real only
    assert c[1].update_theta and c[1].lambda_sem > 0 and c[1].gamma_ge == 0  # + L_sem
    share = 0.1 + 0.2 * 10 / 50
    assert c[2].pseudo_share == pytest.approx(share) and c[2].gamma_ge == pytest.approx(share)
    assert c[2].real_weight == pytest.approx(1 - share)  # G's loss: (1 − s)·L_real + s·L_ge
    assert c[3].pseudo_share == pytest.approx(0.1 + 0.2 * 49 / 50)


def test_budget_defaults_to_stage1():
    cfg = load_config(None, ["stage1.epochs=3", "stage1.batch_size=50"])
    assert e2e_budget(cfg, 120) == (3 * 3, 50)  # equal encoder steps and batch size
    assert e2e_budget(load_config(None, ["e2e.steps=7", "e2e.batch_size=9"]), 120) == (7, 9)


def _grads(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def _one_step(split, strategy, step, switches, variant_kw=None):
    sets = [f"e2e.{k}={str(v).lower()}" for k, v in switches.items()]
    cfg = load_config(None, TINY + sets)
    run = EndToEnd(split, cfg, E2EVariant(strategy, **(variant_kw or {})), 0, CPU)
    run.refresh(0)
    loss, info = run.step(step)
    loss.backward()
    return run, info


ROUTINGS = [dict(ldm_grad_to_encoder=a, ge_grad_to_denoiser=b, ge_grad_to_encoder=c)
            for a in (False, True) for b in (False, True) for c in (False, True)]


@pytest.mark.parametrize("switches", ROUTINGS)
def test_routings_reach_exactly_what_they_name(split, switches):
    """Each path isolated: L_sem alone (B's θ-step), then L_ge alone (the generation branch on a real batch)."""
    run, _ = _one_step(split, "B", 20, switches)  # θ-step: only L_sem
    assert _grads(run.denoiser)
    assert _grads(run.encoder) == switches["ldm_grad_to_encoder"]
    assert not _grads(run.classifier)
    cfg = load_config(None, TINY + [f"e2e.{k}={str(v).lower()}" for k, v in switches.items()])
    run = EndToEnd(split, cfg, E2EVariant("A"), 0, CPU)
    run.refresh(0)
    z = run.encoder(run.x[:32])
    run.scaler.update(z)
    l_ge, _ = run.generation_loss(plan_step(20, cfg.e2e, "A", run.steps), 32, 20, {}, z)
    l_ge.backward()
    assert _grads(run.classifier)
    assert _grads(run.denoiser) == switches["ge_grad_to_denoiser"]
    assert _grads(run.encoder) == switches["ge_grad_to_encoder"]


def test_detached_suffix_turns_every_routing_off(split):
    cfg = load_config(None, TINY)
    assert Routing.of(cfg.e2e, E2EVariant("A")) == Routing(True, True, True)  # coupled is the default
    assert Routing.of(cfg.e2e, E2EVariant("A", detached=True)) == Routing(False, False, False)
    run, _ = _one_step(split, "B", 21, {}, {"detached": True})  # E,G-step: L_real + L_ge, θ untouched
    assert _grads(run.encoder) and _grads(run.classifier) and not _grads(run.denoiser)
    run, _ = _one_step(split, "B", 21, {})  # coupled: the E,G-step's L_ge also moves θ
    assert _grads(run.denoiser)


def test_strategy_c_books_its_pseudo_share(split):
    cfg = load_config(None, TINY)
    run = EndToEnd(split, cfg, E2EVariant("C"), 0, CPU)
    run.refresh(0)
    for step in (25, 39):  # inside C's generation phase (from 50 % of 40 steps)
        plan = plan_step(step, cfg.e2e, "C", run.steps)
        before = run.mass.mass.clone()
        loss, info = run.step(step)
        added = run.mass.mass - before
        # real rows book (1 − s), pseudo rows s: the pseudo share of G's loss mass is the schedule's s
        assert float(added.sum()) == pytest.approx(1.0)
        assert "ge" in info
        idx = shuffled_batch(len(run.y), run.batch_size, step, run.seed)  # the real part, rebuilt from the batch
        real = torch.bincount(run.y[idx], minlength=len(added)).double() * (1 - plan.pseudo_share) / run.batch_size
        assert float((added - real).sum()) == pytest.approx(plan.pseudo_share)


def test_cov_term_matches_a_tail_class(split):
    """A tail class with one low-noise row in the batch still gets a non-zero L_cov with gradient into its row."""
    cfg = load_config(None, TINY)
    run = EndToEnd(split, cfg, E2EVariant("A", "cov"), 0, CPU)
    tail = int(torch.as_tensor(split.counts).argmin())
    with torch.no_grad():
        u = run.scaler.transform(run.encoder(run.x))
    run.bank.fit(u, run.y)
    z0 = torch.randn(1, u.shape[1], requires_grad=True)
    loss, matched = run.covariance_term(z0, torch.tensor([tail]), torch.ones(1))
    assert matched == 1 and float(loss.detach()) > 0
    loss.backward()
    assert z0.grad.abs().sum() > 0
    # the batch-only form (cov_shrink = 0) skips the same class: the failure the accumulated form fixes
    run0 = EndToEnd(split, load_config(None, TINY + ["e2e.cov_shrink=0"]), E2EVariant("A", "cov"), 0, CPU)
    run0.bank.fit(u, run.y)
    assert run0.covariance_term(z0.detach(), torch.tensor([tail]), torch.ones(1))[1] == 0


def test_warm_start_copies_the_given_modules(split):
    cfg = load_config(None, TINY)
    ref = EndToEnd(split, cfg, E2EVariant("A"), 1, CPU)
    run = EndToEnd(split, cfg, E2EVariant("A", warm="stage2"), 0, CPU,
                   init={"encoder": ref.encoder, "classifier": ref.classifier, "denoiser": ref.denoiser,
                         "scaler": (torch.full((ref.encoder.feature_dim,), 2.0), torch.full((ref.encoder.feature_dim,), 3.0))})
    for a, b in zip(run.encoder.parameters(), ref.encoder.parameters()):
        assert torch.equal(a, b) and a is not b  # a copy: training it leaves stage 1 untouched
    assert torch.equal(next(run.denoiser.parameters()), next(ref.denoiser.parameters()))
    assert float(run.scaler.mean[0]) == 2.0 and float(run.scaler.std[0]) == 3.0


@pytest.mark.parametrize("strategy,shape,filt", [("A", "rad", "none"), ("B", "cov", "none"), ("C", "proto", "aid"),
                                                  ("A", "proto", "bnd")])
def test_tiny_runs_train_and_measure_drift(split, strategy, shape, filt, tmp_path):
    cfg = load_config(None, TINY)
    logs = []
    run = train_end_to_end(split, cfg, E2EVariant(strategy, shape, filt), 0, CPU,
                           tmp_path / "ck.safetensors", logs.append, f"e2e-{strategy}")
    drift = [r for r in logs if r.get("event") == "drift"]
    assert [r["step"] for r in drift] == [0, 20, 40]
    assert all(r["frechet"] > 0 for r in drift)
    mass = run.effective_prior()
    assert (mass > 0).all()
    diag = run.diagnostics()
    shares = diag["loss_shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["real"] > 0 and shares["ldm"] > 0
    assert (shares["shape"] > 0) == (shape != "proto")
    if filt == "none":
        # pseudo rows are drawn ∝ 1/n_c: the tail's share of G's training mass exceeds its share of real data
        real_share = torch.as_tensor(split.counts, dtype=torch.float32)
        real_share /= real_share.sum()
        assert (mass / mass.sum())[-1] >= real_share[-1]
        assert "filter" not in diag
    else:
        f = diag["filter"]
        assert f["filter_calls"] > 0 and sum(f["generated_per_class"]) >= sum(f["kept_per_class"])
        assert f["no_generation"] == (sum(f["kept_per_class"]) == 0)
