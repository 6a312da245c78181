"""Issue 19: the class-aware auxiliary pool (quotas, stratified held-out slice, class-balanced correction) and the
score sources of the gate (the clients' own features with and without DP, the public part)."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, RecordDict  # noqa: E402

from pfdiff.config import load_config  # noqa: E402
from pfdiff.federated import task  # noqa: E402
from pfdiff.federated.aux_pool import AuxPool, client_share, pool_quotas, stratified_split  # noqa: E402
from pfdiff.federated.correction import class_balanced_indices, correct_on_pool, pool_score  # noqa: E402
from pfdiff.privacy.accounting import BudgetError, epsilon  # noqa: E402

from test_federated import TINY, _send, tiny  # noqa: E402

COUNTS = np.array([300, 200, 100, 50, 30, 20, 10, 8, 6, 0])


# ---------------------------------------------------------------- quotas


@pytest.mark.parametrize("budget", [1000, 997, 37])
def test_quotas_sum_to_the_budget_and_follow_the_rule(budget):
    held = COUNTS > 0
    for rule, weight in (("histogram", COUNTS.astype(float)), ("balanced", held.astype(float)),
                         ("tail", np.where(held, np.maximum(COUNTS, 1) ** -0.5, 0.0))):
        q = pool_quotas(COUNTS, budget, rule)
        assert q.sum() == budget and q.dtype.kind == "i" and q[~held].sum() == 0
        assert np.all(np.abs(q - budget * weight / weight.sum()) < 1.0), rule  # largest remainder: within 1
    bal = pool_quotas(COUNTS, budget, "balanced")[held]
    assert bal.max() - bal.min() <= 1
    tail = pool_quotas(COUNTS, 1000, "tail")[held]
    assert np.all(np.diff(tail) > 0)  # fewer real examples, more pool samples
    with pytest.raises(ValueError, match="unknown pool quota"):
        pool_quotas(COUNTS, 10, "uniform")
    with pytest.raises(ValueError, match="positive count"):
        pool_quotas(np.zeros(3), 10, "balanced")


def test_client_shares_add_up_to_the_quotas_and_a_class_not_held_costs_nothing():
    own = np.array([[200, 0, 60, 50, 0, 20, 10, 0, 6, 0], [100, 200, 40, 0, 30, 0, 0, 8, 0, 0]])
    glob = own.sum(0)
    q = pool_quotas(glob, 1000, "balanced")
    shares = np.stack([client_share(q, glob, o) for o in own])
    assert np.all(shares[own == 0] == 0)
    assert np.all(np.abs(shares.sum(0) - q) <= len(own) / 2)  # per-client rounding only
    assert shares[0, 8] == q[8]  # the only holder of class 8 generates all of its quota


# ---------------------------------------------------------------- stratified held-out slice


def test_stratified_slice_holds_every_class_with_two_or_more_samples():
    y = torch.tensor([0] * 50 + [1] * 20 + [2] * 2 + [3] * 3 + [4] * 1)
    for seed in range(20):  # unstratified, class 2 (2 of 76) would be missing from a 20 % slice most of the time
        val, rest = stratified_split(y, 0.2, torch.Generator().manual_seed(seed))
        assert sorted(torch.cat([val, rest]).tolist()) == list(range(len(y)))  # disjoint, complete
        assert set(y[val].tolist()) == {0, 1, 2, 3}  # class 4 has one sample: it trains
        assert set(y[rest].tolist()) == {0, 1, 2, 3, 4}  # every class keeps a training sample
        assert torch.bincount(y[val], minlength=5).tolist() == [10, 4, 1, 1, 0]
    a, _ = stratified_split(y, 0.2, torch.Generator().manual_seed(0))
    b, _ = stratified_split(y, 0.2, torch.Generator().manual_seed(1))
    assert a.tolist() != b.tolist() and len(set(y[a[:5]].tolist())) > 1  # seeded, classes interleaved


# ---------------------------------------------------------------- class-weighted correction


def test_class_balanced_correction_draws_classes_evenly():
    y = torch.tensor([0] * 1000 + [1] * 100 + [2] * 10)
    idx = class_balanced_indices(y, 30_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(y[idx], minlength=3).double() / len(idx)
    assert torch.all((freq - 1 / 3).abs() < 0.015)  # the pool is 90 % class 0; the batches are not

    cfg = tiny()
    loss_fn = task.make_loss(cfg, 10)
    g = torch.Generator().manual_seed(0)
    yp = torch.cat([torch.zeros(240, dtype=torch.long), torch.full((16,), 7)])
    u = torch.randn(256, cfg.model.feature_dim, generator=g) * 0.3 + torch.nn.functional.one_hot(yp, 64) * 2
    pool = AuxPool(u, yp, torch.zeros(256, dtype=torch.long), torch.zeros(256))
    tail_u, tail_y = u[yp == 7], yp[yp == 7]
    gains = {}
    for weight in ("none", "balanced"):
        model = task.build_global_denoiser(cfg)
        before = pool_score(model, tail_u, tail_y, loss_fn, 0)
        assert correct_on_pool(model, pool, loss_fn, 40, 0.02, 64, 0, ("t",), weight).steps == 40
        gains[weight] = before - pool_score(model, tail_u, tail_y, loss_fn, 0)
    assert gains["balanced"] > gains["none"] > 0  # the tail class gains more from balanced batches
    with pytest.raises(ValueError, match="correction weight"):
        correct_on_pool(task.build_global_denoiser(cfg), pool, loss_fn, 1, 0.01, 8, 0, ("t",), "inverse")


# ---------------------------------------------------------------- the clients' score


def _ctx(pid=0):
    return Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 3},
                   state=RecordDict(), run_config={})


SCALER = {"scaler-mean": [0.0] * 64, "scaler-std": [1.0] * 64}


def _client_with_features(cfg):
    from pfdiff.federated.client_app import app
    from pfdiff.longtail.common import encode

    c = _ctx()
    enc = task.build_encoder_classifier(cfg)
    _send(app, cfg, "stats", ArrayRecord(enc.state_dict()), c)
    data = task.load_client_data(cfg, 0, 3)
    return app, c, encode(enc["encoder"], data.x), data.y


def test_client_score_is_the_direct_loss_sum_and_each_example_moves_it_by_its_own_loss():
    cfg = tiny("fed.score_source=clients")
    app, c, u, y = _client_with_features(cfg)
    model = task.build_global_denoiser(cfg)
    reply = _send(app, cfg, "score", ArrayRecord(model.state_dict()), c, **SCALER)
    m = reply.content["metrics"]
    loss_fn = task.make_loss(cfg, 10)
    losses = task.example_score_losses(model, u, y, loss_fn, cfg.seeds[0])
    assert m["num-examples"] == len(y) and math.isclose(m["loss-sum"], float(losses.double().sum()), rel_tol=1e-6)
    # direct: one example at a time, its draws from its own key (the same K draws in every round)
    i = 3
    g = task.generator("cpu", cfg.seeds[0], "fed-client-score", task._row_key(u[i], y[i]))
    direct = loss_fn(model.eval(), u[i:i + 1], y[i:i + 1], noise_multiplicity=4, generator=g).loss
    assert torch.allclose(losses[i], direct[0])
    # batched forwards (chunks of any size) give each example the loss of its own direct forward
    assert torch.allclose(task.example_score_losses(model, u, y, loss_fn, cfg.seeds[0], chunk=3), losses, atol=1e-6)
    # sensitivity: removing an example (or reordering the rest) changes the sum by exactly its own loss
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    keep = keep[keep != i]
    loo = task.example_score_losses(model, u[keep], y[keep], loss_fn, cfg.seeds[0]).double().sum()
    assert math.isclose(float(losses.double().sum() - loo), float(losses[i]), rel_tol=1e-5, abs_tol=1e-6)
    again = _send(app, cfg, "score", ArrayRecord(model.state_dict()), c, **SCALER)
    assert again.content["metrics"]["loss-sum"] == m["loss-sum"]  # fixed draws: rounds compare


def test_dp_client_score_is_clipped_and_noised_and_its_epsilon_is_in_the_plan():
    extra = ("fed.dp=example", "fed.encoder=public", "fed.methods=[progressive]", "privacy.target_epsilon=5")
    cfg = tiny(*extra, "fed.score_source=clients", "fed.score_clip=0.5")
    app, c, u, y = _client_with_features(cfg)
    model = task.build_global_denoiser(cfg)
    exact = float(task.example_score_losses(model, u, y, task.make_loss(cfg, 10), 0).double().clamp(0, 0.5).sum())
    sums = [_send(app, cfg, "score", ArrayRecord(model.state_dict()), c, **SCALER).content["metrics"]["loss-sum"]
            for _ in range(2)]
    assert sums[0] != sums[1] and all(s != exact for s in sums)  # OS-entropy noise: a new draw every call

    plan, plain = task.client_dp_plan(cfg, len(y)), task.client_dp_plan(tiny(*extra), len(y))
    f = cfg.fed
    assert plan.score_releases == f.rounds and plan.score_sigma > 0 and plain.score_sigma is None
    assert plan.sigma > plain.sigma  # the score releases spend part of the budget: DP-SGD gets more noise
    total, delta = plan.total_steps, cfg.privacy.delta
    with_scores = epsilon(plan.events(total, scores=f.rounds), delta)
    assert with_scores <= 5 + 1e-6 and with_scores > epsilon(plan.events(total), delta)
    assert epsilon(plan.events(0, counts=False, scores=f.rounds), delta) <= f.score_epsilon + 1e-6

    from pfdiff.federated.server_app import _client_events

    ev0, _, _ = _client_events(plan, f.rounds, True, {})
    ev2, _, _ = _client_events(plan, f.rounds, True, {}, scores=2)
    assert epsilon(ev2, delta) > epsilon(ev0, delta)  # the ledger counts the executed score releases
    with pytest.raises(ValueError, match="no client-score releases"):
        plain.events(10, scores=1)
    # impossible plans are still refused: the counts and the score releases alone exceed the target
    with pytest.raises(BudgetError, match="fixed releases alone"):
        task.client_dp_plan(tiny(*extra, "fed.score_source=clients", "fed.score_epsilon=5"), len(y))


def test_warmup_reuses_the_released_noisy_counts_and_generates_its_quota_share():
    from pfdiff.federated.client_app import app

    cfg = tiny("fed.dp=example", "fed.encoder=public", "privacy.count_epsilon=0.1", "fed.warmup_upload=model")
    c = _ctx()
    released = _send(app, cfg, "stats", ArrayRecord(task.build_encoder_classifier(cfg).state_dict()), c)
    den = ArrayRecord(task.build_global_denoiser(cfg).state_dict())
    warm = _send(app, cfg, "warmup", den, c, **SCALER, **{"n-total": 1000})
    # σ for ε = 0.1 is ≈ 40: a fresh draw would differ; the released counts are not released a second time
    assert warm.content["metrics"]["counts"] == released.content["metrics"]["counts"]

    cfg = tiny("fed.pool_quota=balanced")
    c = _ctx()
    own = np.asarray(_send(app, cfg, "stats", ArrayRecord(task.build_encoder_classifier(cfg).state_dict()),
                           c).content["metrics"]["counts"])
    glob, quotas = own * 3, np.full(10, 20)
    out = _send(app, cfg, "warmup", den, c, **SCALER, **{"n-total": int(glob.sum()), "class-quotas": quotas.tolist(),
                                                          "class-counts": glob.tolist()})
    got = np.bincount(out.content["arrays"]["y"].numpy(), minlength=10)
    assert got.tolist() == client_share(quotas, glob, own).tolist() and np.all(got[own == 0] == 0)


def test_score_sources_are_checked_before_anything_is_sent():
    from pfdiff.federated.server_app import check_plan

    with pytest.raises(ValueError, match="score_source='public'"):
        check_plan(tiny("fed.score_source=public"))
    check_plan(tiny("fed.score_source=public", "fed.encoder=public"))
    # a client score is planned only where a method decides on it
    assert task.score_releases_planned(tiny("fed.score_source=clients", "fed.methods=[fedavg,fedddpm]")) == 0
    assert task.score_releases_planned(tiny("fed.score_source=clients")) == tiny().fed.rounds


def test_the_gate_reads_only_the_source_the_docs_declare(monkeypatch):
    """fed.score_source = clients: the clients' released loss sums only (not the pool slice); public: the
    declared public part's features only; the methods that do not decide on the score keep the free pool record."""
    from types import SimpleNamespace

    from pfdiff.federated import server_app as sa

    read = []
    monkeypatch.setattr(sa, "pool_score", lambda model, u, y, loss_fn, seed: read.append(u) or 1.0)
    monkeypatch.setattr(sa, "client_score", lambda srv, method, model, r: 2.0)
    u_val, y_val = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)
    pub = (torch.ones(5, 4), torch.zeros(5, dtype=torch.long))
    srv = SimpleNamespace(cfg=tiny("fed.score_source=clients"), loss_fn=None, seed=0, public_score_data=pub)
    for m in task.SCORED_METHODS:
        assert sa.round_score(srv, m, None, u_val, y_val, 1) == (2.0, "clients") and read == []
    assert sa.round_score(srv, "fedddpm", None, u_val, y_val, 1) == (1.0, "pool") and read[-1] is u_val
    srv.cfg = tiny("fed.score_source=public", "fed.encoder=public")
    assert sa.round_score(srv, "progressive", None, u_val, y_val, 1) == (1.0, "public") and read[-1] is pub[0]

    # the public score data: the encoder sees the declared public rows of the training set, and nothing else
    cfg = srv.cfg
    seen = []
    monkeypatch.setattr(sa, "encode", lambda encoder, x: seen.append(x) or torch.zeros(len(x), 4))
    split = task.split_of(cfg)
    srv = SimpleNamespace(cfg=cfg, split=split, tensor=torch.as_tensor)
    scaler = SimpleNamespace(transform=lambda z: z)
    sa.public_score_data(srv, {"encoder": None}, scaler)
    pub_idx, priv_idx = task.public_private_indices(cfg)
    assert len(priv_idx) > 0 and torch.equal(seen[0], torch.as_tensor(split.train.x[pub_idx]))


# ---------------------------------------------------------------- one tiny simulation


def test_simulation_with_a_balanced_pool_and_client_scores_logs_every_decision(tmp_path):
    from pfdiff.federated.simulation import simulate

    cfg = load_config("federated", [*TINY, "fed.methods=[fedddpm+,progressive]", "fed.pool_quota=balanced",
                                    "fed.score_source=clients", "fed.correction_weight=balanced",
                                    "fed.quick_test_patience=5", "fed.accept_min_gain=-1"])
    run = tmp_path / "alpha-0.5"
    res = simulate(cfg, run)
    w = res["warmup"]
    assert w["pool_quota"] == "balanced" and sum(w["quotas"]) == cfg.fed.aux_size
    assert abs(w["pool_size"] - cfg.fed.aux_size) <= 3 * 10  # per-client rounding of each class's share
    assert all(v > 0 for v, p in zip(w["val_per_class"], w["pool_per_class"]) if p >= 2)
    for m in ("fedddpm+", "progressive"):
        rows = res["methods"][m]["history"]
        assert sorted(rows) == ["1", "2"] and all(r["score_source"] == "clients" for r in rows.values())
        assert all(0 < r["score"] < 10 for r in rows.values())
    rows = res["methods"]["progressive"]["history"]
    assert all(r["gate"] == "accepted" for r in rows.values())  # accept_min_gain = -1: every round
    for r in rows.values():
        regen = r["regenerated"]
        assert len(regen["replaced_per_class"]) == 10 and sum(regen["replaced_per_class"]) == regen["replaced"]
        assert sum(regen["kept_per_class"]) == regen["kept"] and sum(regen["generated_per_class"]) == regen["generated"]
    assert any(k.startswith("score/") for k in res["bytes"]["sent"])
    for m in ("fedddpm+", "progressive"):  # a method's uploads, summed over its rounds' history, are the wire's
        assert res["methods"][m]["upload_bytes"] == res["bytes"]["received"][f"diffusion/{m}"] > 0
    assert "declared non-private release" in res["privacy"]["claim"]
    from pfdiff.federated.report import load_results, write_report

    text = write_report(tmp_path, load_results(tmp_path)).read_text()
    assert "## Auxiliary pool" in text and "| 1 | clients |" in text and "Pool quota `balanced`" in text
