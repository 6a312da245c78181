"""End-to-end E, G, ε_θ training: method grammar, schedules A/B/C, gradient routing, a tiny run."""

import pytest
import torch

from pfdiff.config import load_config
from pfdiff.longtail.common import make_split
from pfdiff.longtail.end_to_end import E2EVariant, EndToEnd, parse_e2e, plan_step, train_end_to_end
from pfdiff.longtail.methods import parse_method

TINY = ["e2e.steps=40", "e2e.warmup_steps=10", "e2e.drift_every=20", "e2e.drift_per_class=5", "e2e.ge_batch=16",
        "model.width=8", "model.denoiser_hidden=32", "diffusion.T=100", "e2e.ge_steps=3", "e2e.ge_every=2"]


@pytest.fixture(scope="module")
def split():
    return make_split(load_config(None, TINY))


def test_method_grammar():
    assert parse_e2e("e2e-A") == E2EVariant("A", "rad", False)
    assert parse_e2e("e2e-C-cov-aid") == E2EVariant("C", "cov", True)
    assert parse_e2e("e2e-D") is None and parse_e2e("ldmlr") is None
    m = parse_method("e2e-B-proto+la")
    assert m.base == "e2e-B-proto" and m.adjust and "alternating" in m.description
    assert parse_method("logit_adjust").base == "ce" and parse_method("logit_adjust").adjust
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("e2e-A+xx")


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
    assert c[2].gamma_ge > 0 and c[2].pseudo_share == pytest.approx(0.1 + 0.2 * 10 / 50)
    assert c[3].pseudo_share == pytest.approx(0.1 + 0.2 * 49 / 50)


@pytest.mark.parametrize("through_sampler", [False, True])
def test_generation_gradient_routing(split, through_sampler):
    cfg = load_config(None, TINY + [f"e2e.ge_grad_to_denoiser={str(through_sampler).lower()}"])
    run = EndToEnd(split, cfg, E2EVariant("A", "rad", False), 0, torch.device("cpu"))
    plan = plan_step(20, cfg.e2e, "A")
    run.generation_loss(plan, 64, 20, {}).backward()
    den = [p.grad for p in run.denoiser.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in den) == through_sampler
    assert all(p.grad is not None for p in run.classifier.parameters())


@pytest.mark.parametrize("to_encoder", [False, True])
def test_diffusion_gradient_into_encoder_is_a_choice(split, to_encoder):
    cfg = load_config(None, TINY + [f"e2e.ldm_grad_to_encoder={str(to_encoder).lower()}", "e2e.gamma_ge=0"])
    run = EndToEnd(split, cfg, E2EVariant("A", "proto", False), 0, torch.device("cpu"))
    z = run.encoder(run.x[:32])
    run.scaler.update(z)
    u = run.scaler.transform(z if to_encoder else z.detach())
    run.bank.update(u, run.y[:32])
    loss, info = run.semantic_loss(u, run.y[:32], 0)
    loss.backward()
    enc = [p.grad for p in run.encoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in enc) == to_encoder
    assert info["ldm"] > 0 and "proto" in info


@pytest.mark.parametrize("strategy,shape,aid", [("A", "rad", False), ("B", "cov", False), ("C", "proto", True), ("A", "proto", True)])
def test_tiny_runs_train_and_measure_drift(split, strategy, shape, aid, tmp_path):
    cfg = load_config(None, TINY)
    logs = []
    run = train_end_to_end(split, cfg, E2EVariant(strategy, shape, aid), 0, torch.device("cpu"),
                           tmp_path / "ck.safetensors", logs.append, f"e2e-{strategy}")
    drift = [r for r in logs if r.get("event") == "drift"]
    assert [r["step"] for r in drift] == [0, 20, 40]
    assert all(r["frechet"] > 0 for r in drift)
    mass = run.effective_prior()
    assert (mass > 0).all()
    if not aid:
        # pseudo rows are drawn ∝ 1/n_c: the tail's share of G's training mass exceeds its share of real data
        real_share = torch.as_tensor(split.counts, dtype=torch.float32)
        real_share /= real_share.sum()
        assert (mass / mass.sum())[-1] >= real_share[-1]
    if aid:
        assert run.filter_stats and 0 <= sum(run.filter_stats[-1]["kept_per_class"]) <= 64
