"""CReFF as a federated baseline (Shang et al. 2022): matching loss, federated features, the client's gradient
release (exact and DP), the privacy ledger of counts and gradients, and a tiny Ray simulation with resume."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import copy  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("flwr")
pytest.importorskip("flwr_datasets")

from flwr.app import ArrayRecord, Context, RecordDict  # noqa: E402

from pfdiff.config import load_config  # noqa: E402
from pfdiff.federated import task  # noqa: E402
from pfdiff.federated.creff import (GradientMatch, aggregate_gradients, match_features,  # noqa: E402
                                    retrain_classifier, synthetic_gradients)
from pfdiff.privacy.accounting import epsilon  # noqa: E402

TINY = ["fed.num_clients=3", "fed.rounds=2", "fed.local_steps=3", "fed.encoder_rounds=2", "fed.encoder_local_steps=5",
        "fed.warmup_steps=10", "fed.reweight_rounds=1", "fed.aux_size=200", "fed.repair_epochs=2",
        "fed.repair_per_class=20", "fed.creff_features_per_class=10", "fed.creff_match_steps=10",
        "fed.creff_retrain_epochs=5"]


def tiny(*extra):
    return load_config("federated", [*TINY, *extra])


def _separable(n_per_class: int, seed: int, C: int = 4, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, d, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(C).repeat_interleave(n_per_class)
    return means[y] + torch.randn(len(y), d, generator=g), y


def _real_gradients(phi, z, y, C):
    return aggregate_gradients([task.class_gradient_sums(phi, z, y, C)], [np.bincount(y.numpy(), minlength=C)])


def test_matching_loss_is_zero_for_the_real_gradient_and_grows_with_the_mismatch():
    g = torch.Generator().manual_seed(0)
    real = {"weight": torch.randn(3, 5, 4, generator=g), "bias": torch.randn(3, 5, generator=g)}
    match = GradientMatch()
    assert match(real, real).shape == (3,) and match(real, real).abs().max() < 1e-5
    scaled = {k: 7.0 * v for k, v in real.items()}  # the distance is a cosine: the scale does not matter
    assert match(scaled, real).abs().max() < 1e-5
    opposite = {k: -v for k, v in real.items()}
    assert torch.allclose(match(opposite, real), torch.full((3,), 2.0 * (5 + 1)), atol=1e-4)  # 5 rows + the bias
    other = {k: torch.randn(v.shape, generator=g) for k, v in real.items()}
    assert (match(other, real) > 0.5).all()


def test_class_gradient_sums_are_the_per_class_ce_gradients_and_clipping_bounds_each_example():
    z, y = _separable(6, 0)
    phi = nn.Linear(8, 4)
    sums = task.class_gradient_sums(phi, z, y, 4, chunk=5)  # chunks must not change the sums
    for c in range(4):
        phi.zero_grad()
        nn.functional.cross_entropy(phi(z[y == c]), y[y == c], reduction="sum").backward()
        assert torch.allclose(sums["weight"][c], phi.weight.grad, atol=1e-5)
        assert torch.allclose(sums["bias"][c], phi.bias.grad, atol=1e-5)
    clipped = task.class_gradient_sums(phi, z, y, 4, clip=0.01)
    without_one = task.class_gradient_sums(phi, z[1:], y[1:], 4, clip=0.01)
    flat = lambda s: torch.cat([v.flatten() for v in s.values()])  # noqa: E731
    assert 0 < (flat(clipped) - flat(without_one)).norm() <= 0.01 + 1e-6  # L2 sensitivity = the clip


def test_federated_features_match_the_real_gradient_and_retrain_a_classifier_above_chance():
    C = 4
    z, y = _separable(50, 0)
    z_test, y_test = _separable(100, 1)
    torch.manual_seed(0)
    phi0 = nn.Linear(8, C)
    phi, feats = copy.deepcopy(phi0), torch.randn(C, 20, 8, generator=torch.Generator().manual_seed(2))
    losses = []
    for r in range(3):  # CReFF's server: match at φ, then re-train a copy of the initial classifier
        g_real, valid = _real_gradients(phi, z, y, C)
        feats, loss = match_features(phi, feats, g_real, valid, steps=100, lr=0.1)
        losses.append(loss)
        phi = retrain_classifier(copy.deepcopy(phi0), feats, epochs=50, lr=0.01, batch_size=32, seed=0, tag=(r,))
    assert losses[0][1] < 0.2 * losses[0][0] and losses[-1][1] < losses[0][1]  # optimisation lowers the distance
    assert float(GradientMatch()(synthetic_gradients(phi, feats), _real_gradients(phi, z, y, C)[0]).sum()) >= 0
    acc = (phi(z_test).argmax(1) == y_test).float().mean().item()
    assert acc > 0.5  # chance is 0.25
    chance = (phi0(z_test).argmax(1) == y_test).float().mean().item()
    assert acc > chance + 0.2


def test_aggregation_weights_clients_by_their_class_counts_and_skips_empty_classes():
    s1 = {"b": torch.tensor([[2.0], [0.0], [0.0]])}  # client 1: 2 examples of class 0, gradient 1 each
    s2 = {"b": torch.tensor([[6.0], [3.0], [0.0]])}  # client 2: 2 of class 0 (gradient 3), 1 of class 1
    g, valid = aggregate_gradients([s1, s2], [np.array([2, 0, 0]), np.array([2, 1, 0])])
    assert g["b"][:, 0].tolist() == [2.0, 3.0, 0.0] and valid.tolist() == [True, True, False]


# ---------------------------------------------------------------- the client's handler

from test_federated import _send  # noqa: E402 (the handler helper of the federated tests, one copy)


def _creff_arrays(cfg):
    clf = task.build_encoder_classifier(cfg)["classifier"]
    return ArrayRecord({**{f"g.{k}": v for k, v in clf.state_dict().items()},
                        **{f"phi.{k}": v for k, v in clf.state_dict().items()}})


@pytest.mark.parametrize("dp", ["none", "example"])
def test_creff_client_returns_gradient_sums_counts_and_g_only_without_dp(dp):
    from pfdiff.federated.client_app import app

    extra = ["fed.encoder=public", "privacy.count_epsilon=0.5"] if dp == "example" else []
    cfg = tiny(f"fed.dp={dp}", *extra)
    c = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                run_config={})
    stats = _send(app, cfg, "stats", ArrayRecord(task.build_encoder_classifier(cfg).state_dict()), c)
    out = _send(app, cfg, "creff", _creff_arrays(cfg), c)
    arrays, m = out.content["arrays"].to_torch_state_dict(), out.content["metrics"]
    assert list(m["counts"]) == list(stats.content["metrics"]["counts"])  # the released counts, not re-noised
    z, y = c.state["features"]["z"].numpy(), c.state["features"]["y"].numpy()
    exact = task.class_gradient_sums(task.build_encoder_classifier(cfg)["classifier"], torch.as_tensor(z),
                                     torch.as_tensor(y), 10)
    close = all(torch.allclose(arrays[f"grad.{k}"], v, atol=1e-4) for k, v in exact.items())
    if dp == "none":
        assert close and "train_loss" in m and {"g.weight", "g.bias"} <= set(arrays)
        assert not torch.equal(arrays["g.weight"], _creff_arrays(cfg).to_torch_state_dict()["g.weight"])
    else:  # noisy sums on every class, no G steps, no loss
        assert not close and "train_loss" not in m and not any(k.startswith("g.") for k in arrays)
        absent = np.bincount(y, minlength=10) == 0
        if absent.any():
            assert arrays["grad.bias"][torch.as_tensor(absent)].abs().sum() > 0


# ---------------------------------------------------------------- privacy ledger


def test_noisy_counts_and_creff_gradients_are_in_each_clients_ledger():
    from pfdiff.federated.server_app import _client_events, la_prior

    cfg = tiny("fed.dp=example", "fed.encoder=public", "privacy.target_epsilon=4", "privacy.count_epsilon=0.5")
    plan = task.client_dp_plan(cfg, 150)
    events, _, _ = _client_events(plan, 2, False, {"stats": 1})
    assert any(e.name == "noisy counts" for e in events)
    no_counts = [e for e in events if e.name != "noisy counts"]
    assert epsilon(events, cfg.privacy.delta) > epsilon(no_counts, cfg.privacy.delta)
    twice, _, _ = _client_events(plan, 2, False, {"stats": 2})  # a re-run statistics phase is a second release
    assert sum(e.name == "noisy counts" for e in twice) == 2
    assert la_prior(cfg)["private"] and "noisy counts" in la_prior(cfg)["privacy"]
    assert not la_prior(tiny())["private"] and "non-private" in la_prior(tiny())["privacy"]

    ev = task.creff_events(cfg, cfg.fed.rounds)
    assert [e.name for e in ev] == ["noisy counts", "CReFF per-class gradient sums"]
    assert 3.6 < epsilon(ev, cfg.privacy.delta) <= 4.0 + 1e-6  # σ calibrated to the target with the counts
    assert epsilon(task.creff_events(cfg, 1), cfg.privacy.delta) < epsilon(ev, cfg.privacy.delta)


def test_creff_is_checked_and_skipped_where_it_has_no_privacy_story():
    from pfdiff.federated.creff import skip_reasons
    from pfdiff.federated.server_app import check_plan

    with pytest.raises(ValueError, match="unknown federated baseline"):
        check_plan(tiny("fed.baselines=[fedprox]"))
    assert "client-level" in skip_reasons(tiny("fed.dp=client", "fed.encoder=public"))["creff"]
    assert skip_reasons(tiny("fed.baselines=[creff]")) == {"fedavg-reweight": "not in fed.baselines"}
    assert skip_reasons(tiny()) == {}


# ---------------------------------------------------------------- a tiny Ray simulation


def test_simulation_runs_creff_with_bytes_and_resumes_without_repeating_rounds(tmp_path):
    from pfdiff.federated.report import comparison_section
    from pfdiff.federated.simulation import simulate

    res = simulate(tiny("fed.methods=[fedavg]", "fed.baselines=[creff]"), tmp_path)
    row = res["baselines"]["creff"]
    assert 0 <= row["top1"] <= 1 and {"few", "medium", "many"} <= set(row) and row["rounds"] == 2
    wire = res["bytes"]
    assert row["bytes"] == wire["sent"]["creff"] + wire["received"]["creff"] > 0
    assert row["upload_bytes"] == wire["received"]["creff"] > 0
    assert res["skipped_baselines"] == {"fedavg-reweight": "not in fed.baselines"}
    assert res["la_prior"]["private"] is False
    # coverage of held-out features (evaluation only) by CReFF's federated features and by the repair's samples
    for cov in (row["coverage"], res["methods"]["fedavg"]["coverage"]):
        assert cov["reference"] == "held-out pool" and len(cov["recall"]) == len(cov["recall_train"]) == 10
        assert all(r is None or 0 <= r <= 1 for r in cov["recall"]) and sum(cov["reference_per_class"]) > 0
    assert row["coverage"]["generated"] == [10] * 10  # fed.creff_features_per_class per class
    hist = json.loads((tmp_path / "results.json").read_text())["baselines"]["creff"]
    assert hist["rounds"] == 2
    md = "\n".join(comparison_section({"IID": res}))
    assert "| creff |" in md and "`creff`: 2 rounds" in md and "`fedavg-ce+la` prior: exact" in md

    from pfdiff.runs import load_state
    h1 = load_state(tmp_path / "creff" / "checkpoint.safetensors")["state"]["history"]["1"]
    res2 = simulate(tiny("fed.methods=[fedavg]", "fed.baselines=[creff]", "fed.rounds=3"), tmp_path)
    state = load_state(tmp_path / "creff" / "checkpoint.safetensors")["state"]
    assert sorted(state["history"]) == ["1", "2", "3"] and state["history"]["1"] == h1  # round 1 not re-run
    assert res2["baselines"]["creff"]["rounds"] == 3
    # the wire's totals add up every execution of the run (wire.json): the first two rounds and the resumed one
    up = [h["upload_bytes"] for _, h in sorted(state["history"].items())]
    assert res["bytes"]["received"]["creff"] == sum(up[:2]) and res2["bytes"]["received"]["creff"] == sum(up)
    assert res2["baselines"]["creff"]["upload_bytes"] == sum(up)
    # the kept round: the best validation balanced accuracy (the earliest among equals), and it is what is scored
    scores = {int(r): h["val_balanced"] for r, h in state["history"].items()}
    chosen = min(r for r, v in scores.items() if v == max(scores.values()))
    row2 = res2["baselines"]["creff"]
    assert state["chosen_round"] == row2["chosen_round"] == chosen and state["chosen_score"] == scores[chosen]
    assert row2["validation"]["balanced"] == pytest.approx(scores[chosen])
    assert row2["val_per_round"] == {r: h["val_balanced"] for r, h in state["history"].items()}  # for the plot


def test_creff_releases_compose_with_the_other_methods_of_a_client():
    from types import SimpleNamespace

    from pfdiff.federated.server_app import _composed_over_methods

    cfg = tiny("fed.dp=example", "fed.encoder=public", "privacy.target_epsilon=4")
    srv = SimpleNamespace(cfg=cfg, sends=lambda: {"stats": 1})
    stats = {"n_per_client": {0: 150, 1: 60}}
    alone = _composed_over_methods(srv, stats, {"fedavg": {"rounds_started": 2}})
    both = _composed_over_methods(srv, stats, {"fedavg": {"rounds_started": 2}, "creff": {"rounds_started": 2}})
    creff_only = epsilon(task.creff_events(cfg, 2), cfg.privacy.delta)
    assert all(both[c] > max(alone[c], creff_only) for c in ("0", "1"))


def test_an_impossible_creff_or_score_budget_is_refused_before_any_message():
    """CReFF's σ and the client score's σ do not depend on a client's size: check_plan calibrates them, so an
    impossible budget fails before the run (not in every client's first CReFF round, after the encoder)."""
    from pfdiff.config import load_config
    from pfdiff.federated.server_app import check_plan
    from pfdiff.privacy.accounting import BudgetError

    dp = ["fed.dp=example", "fed.encoder=public", "fed.rounds=3"]
    check_plan(load_config("federated", dp))  # the default budget is feasible
    with pytest.raises(BudgetError):  # the noisy counts alone spend more than the target
        check_plan(load_config("federated", [*dp, "privacy.count_epsilon=1", "privacy.target_epsilon=0.5"]))
    with pytest.raises(BudgetError):  # a score budget above the target
        check_plan(load_config("federated", [*dp, "fed.baselines=[]", "fed.score_source=clients",
                                             "fed.score_epsilon=50", "privacy.target_epsilon=5"]))
