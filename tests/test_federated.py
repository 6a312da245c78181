"""Federated feature diffusion on Flower: partitions, pool, server steps, bytes, DP plans, handlers, and a
Ray simulation with a failing client that is then resumed."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("flwr")
pytest.importorskip("flwr_datasets")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict  # noqa: E402

from pfdiff.config import load_config  # noqa: E402
from pfdiff.federated import task  # noqa: E402
from pfdiff.federated.aux_pool import AuxPool  # noqa: E402
from pfdiff.federated.correction import QuickTest, correct_on_pool, pool_score  # noqa: E402
from pfdiff.privacy.accounting import epsilon  # noqa: E402

TINY = ["fed.num_clients=3", "fed.rounds=2", "fed.local_steps=3", "fed.encoder_rounds=2", "fed.encoder_local_steps=5",
        "fed.warmup_steps=10", "fed.reweight_rounds=1", "fed.aux_size=200", "fed.plus_steps=5", "fed.server_steps=2",
        "fed.repair_epochs=2", "fed.repair_per_class=20"]


def tiny(*extra):
    return load_config("federated", [*TINY, *extra])


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_partition_covers_every_example_exactly_once(alpha):
    y = np.repeat(np.arange(10), 30)
    parts = task.partition_indices(y, 4, alpha, 0)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and np.array_equal(np.sort(allidx), np.arange(len(y)))
    assert all(len(p) >= 5 for p in parts)
    assert [p.tolist() for p in task.partition_indices(y, 4, alpha, 0)] == [p.tolist() for p in parts]  # seeded


def test_dirichlet_skew_makes_client_label_histograms_differ():
    y = np.repeat(np.arange(10), 400)

    def tv(alpha):  # total-variation distance of each client's label distribution from the pooled one
        h = np.stack([np.bincount(y[p], minlength=10) for p in task.partition_indices(y, 4, alpha, 0)]).astype(float)
        return 0.5 * np.abs(h / h.sum(1, keepdims=True) - 0.1).sum(1)

    assert tv(0.3).min() > 0.15 and tv(0.0).max() < 0.1


def test_clients_partition_the_private_part_only_with_a_public_encoder():
    cfg = tiny("fed.encoder=public")
    pub, priv = task.public_private_indices(cfg)
    clients = np.concatenate(task.client_indices(cfg, 3))
    assert len(np.intersect1d(pub, clients)) == 0 and np.array_equal(np.sort(clients), np.sort(priv))


def _pool():
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    age = torch.tensor([0, 2, 1, 0, 3, 3])
    score = torch.tensor([1.0, 5.0, 2.0, 9.0, 1.0, 3.0])
    return AuxPool(torch.zeros(6, 2), y, age, score)


def test_pool_replaces_the_stalest_of_the_same_class():
    pool = _pool()
    info = pool.replace(torch.ones(2, 2), torch.tensor([0, 0]), torch.tensor([0.5, 0.7]), 4, "stalest")
    assert info["replaced"] == 2 and pool.class_counts(2).tolist() == [3, 3]
    assert pool.age.tolist() == [4, 2, 4, 0, 3, 3]  # the ages 0 and 1 of class 0 went; class 1 untouched
    assert pool.u[[0, 2]].eq(1).all() and pool.u[[1, 3, 4, 5]].eq(0).all()


def test_pool_replaces_the_worst_scored_and_keeps_its_best_new_samples():
    pool = _pool()
    pool.replace(torch.arange(6.).view(3, 2), torch.tensor([1, 1, 1]), torch.tensor([4.0, 0.1, 0.2]), 5, "worst")
    assert pool.age.tolist() == [0, 2, 1, 5, 5, 5]
    pool2 = _pool()
    pool2.replace(torch.arange(6.).view(3, 2), torch.tensor([1, 1, 1]), torch.tensor([4.0, 0.1, 0.2]), 5, "worst")
    pool3 = _pool()
    info = pool3.replace(torch.arange(4.).view(2, 2), torch.tensor([1, 1]), torch.tensor([4.0, 0.1]), 5, "worst")
    assert info["replaced"] == 2 and pool3.age[3] == 5  # score 9.0 was the worst of class 1
    with pytest.raises(ValueError, match="evict"):
        pool3.replace(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0.0]), 6, "random")


def test_pool_rejects_inconsistent_or_non_finite_samples():
    with pytest.raises(ValueError, match="disagree"):
        AuxPool(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        AuxPool(torch.full((2, 2), float("nan")), torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2))


def test_quick_test_stops_only_after_patience_slow_rounds():
    q = QuickTest(threshold=0.05, patience=2)
    assert not q.update(1.0) and not q.update(0.8)  # first gain 0.2: fast
    assert not q.update(0.79)  # slow once
    assert q.update(0.785)  # slow twice in a row
    q2 = QuickTest(threshold=0.05, patience=2)
    assert [q2.update(s) for s in (1.0, 0.99, 0.5, 0.49)] == [False, False, False, False]  # a fast round resets


def test_server_correction_lowers_the_pool_loss():
    cfg = tiny()
    model = task.build_global_denoiser(cfg)
    loss_fn = task.make_loss(cfg, 10)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (256,), generator=g)
    u = torch.randn(256, cfg.model.feature_dim, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 64)[:, :64] * 2
    pool = AuxPool(u, y, torch.zeros(256, dtype=torch.long), torch.zeros(256))
    before = pool_score(model, u, y, loss_fn, 0)
    compute = correct_on_pool(model, pool, loss_fn, steps=60, lr=0.05, batch_size=128, seed=0, tag=("t",))
    assert compute.steps == 60 and pool_score(model, u, y, loss_fn, 0) < 0.9 * before


def test_bytes_of_pseudo_features_grow_linearly_and_crossover_is_consistent():
    from pfdiff.federated.server_app import _per_feature_bytes, warmup_summary
    from pfdiff.federated.wire import record_bytes

    fb = _per_feature_bytes(64)
    assert 64 * 4 <= fb["per_feature"] <= 64 * 4 + 16
    n500 = record_bytes(ArrayRecord({"u": torch.zeros(500, 64), "y": torch.zeros(500, dtype=torch.long)}))
    assert abs(n500 - (fb["fixed"] + 500 * fb["per_feature"])) <= 8
    warm = {"feature_bytes": fb, "model_bytes": 10 * n500, "upload_bytes": [1], "y": torch.zeros(3), "n_val": 1}
    s = warmup_summary(warm, tiny())
    assert abs(s["crossover_n"] * fb["per_feature"] + fb["fixed"] - s["model_bytes"]) <= fb["per_feature"]


def test_client_dp_plan_meets_the_target_with_counts_and_every_step():
    cfg = tiny("fed.dp=example", "fed.encoder=public", "privacy.target_epsilon=4")
    plan = task.client_dp_plan(cfg, 150)
    total = cfg.fed.warmup_steps + cfg.fed.rounds * cfg.fed.local_steps
    eps = epsilon(plan.events(total), cfg.privacy.delta)
    assert plan.total_steps == total and 3.6 < eps <= 4.0 + 1e-6
    assert epsilon(plan.events(total // 2), cfg.privacy.delta) < eps
    assert task.client_dp_plan(cfg, 60).sigma > plan.sigma  # fewer examples: larger q, more noise


def test_plans_without_a_privacy_story_are_refused():
    from pfdiff.federated.server_app import check_plan

    with pytest.raises(ValueError, match="public"):
        check_plan(tiny("fed.dp=example"))
    with pytest.raises(ValueError, match="client-level"):
        check_plan(tiny("fed.dp=client", "fed.encoder=public"))
    with pytest.raises(ValueError, match="unknown federated method"):
        check_plan(tiny("fed.methods=[fedsgd]"))
    check_plan(tiny("fed.dp=client", "fed.encoder=public", "fed.methods=[fedavg]"))


# ---------------------------------------------------------------- client handlers without a simulation


def _message(content: RecordDict, message_type: str) -> Message:
    # explicit Metadata: a plain instruction Message needs the runtime's TaskIdentity, unset outside a run
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=3600.0, message_type=message_type)
    return Message(content, metadata=meta)


def _send(app, cfg, phase, arrays, context, **extra):
    from pfdiff.federated.wire import MESSAGE_TYPES

    config = ConfigRecord({"run-config": task.config_to_text(cfg), "phase": phase, "server-round": 1, **extra})
    return app(_message(RecordDict({"arrays": arrays, "config": config}), MESSAGE_TYPES[phase]), context)


def test_every_phase_has_its_own_client_action_and_untyped_messages_are_refused():
    from pfdiff.federated.client_app import app
    from pfdiff.federated.wire import MESSAGE_TYPES

    assert set(app._registered_funcs) == set(MESSAGE_TYPES.values())  # one handler per phase, nothing else
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    config = ConfigRecord({"run-config": task.config_to_text(tiny()), "phase": "stats"})
    with pytest.raises(ValueError, match="No train function registered"):  # plain "train": no default handler
        app(_message(RecordDict({"config": config}), MessageType.TRAIN), ctx)


def test_client_phases_cache_features_train_and_fail_on_request():
    from pfdiff.federated.client_app import InjectedFault, app

    cfg = tiny("fed.fail_partitions=[2]")
    ctx = lambda pid: Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 3},
                              state=RecordDict(), run_config={})
    c0 = ctx(0)
    enc = ArrayRecord(task.build_encoder_classifier(cfg).state_dict())
    den = ArrayRecord(task.build_global_denoiser(cfg).state_dict())
    scaler = {"scaler-mean": [0.0] * 64, "scaler-std": [1.0] * 64}
    with pytest.raises(RuntimeError, match="'stats' phase first"):  # no cached features yet: a clear error
        _send(app, cfg, "diffusion", den, c0, **scaler)

    stats = _send(app, cfg, "stats", enc, c0)
    n = int(stats.content["metrics"]["num-examples"])
    assert sum(stats.content["metrics"]["counts"]) == n and "features" in c0.state
    assert len(stats.content["metrics"]["sum"]) == cfg.model.feature_dim

    out = _send(app, cfg, "diffusion", den, c0, **scaler)
    assert not out.has_error() and math.isfinite(out.content["metrics"]["train_loss"])
    assert any(not np.array_equal(out.content["arrays"][k].numpy(), den[k].numpy()) for k in den)

    c2 = ctx(2)
    _send(app, cfg, "stats", enc, c2)
    with pytest.raises(InjectedFault, match="injected fault"):
        _send(app, cfg, "diffusion", den, c2, **scaler)


def test_dp_clients_release_noisy_counts_and_no_feature_sums():
    from pfdiff.federated.client_app import app

    cfg = tiny("fed.dp=example", "fed.encoder=public", "privacy.count_epsilon=0.1")
    c = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                run_config={})
    stats = _send(app, cfg, "stats", ArrayRecord(task.build_encoder_classifier(cfg).state_dict()), c)
    m = stats.content["metrics"]
    true = np.bincount(task.load_client_data(cfg, 0, 3).y.numpy(), minlength=10)
    assert "sum" not in m and "sumsq" not in m and not np.array_equal(np.asarray(m["counts"]), true)
    # a resumed server sends back what the client released: it is re-sent as it was, no new noise is drawn
    fresh = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                    run_config={})
    again = _send(app, cfg, "stats", ArrayRecord(task.build_encoder_classifier(cfg).state_dict()), fresh,
                  **{"released-counts": list(m["counts"])})
    assert list(again.content["metrics"]["counts"]) == list(m["counts"]) and "features" in fresh.state


# ---------------------------------------------------------------- the Ray simulation


def test_simulation_survives_a_failing_client_and_resumes_without_repeating_rounds(tmp_path):
    from pfdiff.federated.simulation import simulate

    cfg = tiny("fed.fail_partitions=[1]", "fed.methods=[fedavg,fedddpm+]", "fed.quick_test_patience=5")
    res = simulate(cfg, tmp_path)
    failures = [f for f in res["failures"] if f["phase"].startswith("diffusion")]
    assert len(failures) == 2 * 2 and {f["partition"] for f in failures} <= {1, None}  # every round, both methods
    for m in ("fedavg", "fedddpm+"):
        hist = res["methods"][m]["history"]
        assert sorted(hist) == ["1", "2"] and all(h["replies"] == 2 and not h.get("skipped") for h in hist.values())
        assert math.isfinite(res["methods"][m]["fd"]) and res["methods"][m]["bytes"] > 0
    assert res["bytes"]["total"] > 0 and set(res["bytes"]["per_client"]) == {0, 1, 2}
    assert res["warmup"]["crossover_n"] > 0 and json.loads((tmp_path / "results.json").read_text())["methods"]
    assert not (tmp_path / "ray").exists() and not list(tmp_path.rglob("session_*"))  # Ray's state not in the results

    encoder_mtime = (tmp_path / "encoder.safetensors").stat().st_mtime_ns
    res2 = simulate(load_config("federated", [*TINY, "fed.fail_partitions=[1]", "fed.methods=[fedavg]",
                                              "fed.rounds=3"]), tmp_path)
    hist = res2["methods"]["fedavg"]["history"]
    assert sorted(hist) == ["1", "2", "3"]
    assert hist["1"] == res["methods"]["fedavg"]["history"]["1"]  # round 1 was not run again
    assert (tmp_path / "encoder.safetensors").stat().st_mtime_ns == encoder_mtime
    assert res2["methods"]["fedavg"]["rounds"] == 3

    from pfdiff.federated.attack import attack_fed_run  # the finished global denoisers can be attacked
    att = json.loads(attack_fed_run(tmp_path, ("loss",)).read_text())["seeds"]["0"]
    assert set(att) == {"fed-fedavg", "fed-fedddpm+"} and 0 <= att["fed-fedavg"]["loss"]["auc"] <= 1


@pytest.mark.slow
def test_dp_clients_end_to_end_report_every_clients_epsilon_within_target(tmp_path):
    from pfdiff.federated.simulation import simulate

    cfg = tiny("fed.dp=example", "fed.encoder=public", "fed.methods=[fedavg,fedddpm]", "privacy.target_epsilon=5")
    res = simulate(cfg, tmp_path)
    priv = res["privacy"]
    assert priv["mode"] == "example" and "fedavg-reweight" not in res["baselines"]
    for m in ("fedavg", "fedddpm"):
        eps = [c["epsilon"] for c in priv["methods"][m].values()]
        assert len(eps) == 3 and all(0 < e <= 5.0 + 1e-6 for e in eps)
    # the warm-up is part of FedDDPM's release (its pool) and of FedAvg's (its repair is AID-filtered by the
    # warm-up pool's scorer): both count its steps
    assert priv["methods"]["fedddpm"]["0"]["steps"] == priv["methods"]["fedavg"]["0"]["steps"]
    assert res["methods"]["fedavg"]["repair_filter"] is not None
    # both methods train on the same client data with independent noise: releasing both composes
    for pid, composed in priv["composed_over_methods"].items():
        assert composed > max(priv["methods"][m][pid]["epsilon"] for m in ("fedavg", "fedddpm"))
    assert priv["private"] is True and "OS entropy" in priv["noise"]
    # a resume re-runs the statistics phase (the clients' feature caches are gone) without a new count release
    again = simulate(cfg, tmp_path)["privacy"]
    assert again["private_sends"]["stats"] == 1 and again["methods"] == priv["methods"]


def test_dp_promise_client_plan_composes_phase_one_and_meets_the_target():
    cfg = tiny("fed.dp=example", "fed.encoder=public", "privacy.mechanism=dp-promise", "privacy.target_epsilon=4",
               "fed.warmup_steps=30", "privacy.steps=30", "privacy.promise_phase1_steps=15")
    plan = task.client_dp_plan(cfg, 150)
    f = cfg.fed
    p1 = plan.phase1_steps_for(f.warmup_steps) + f.rounds * plan.phase1_steps_for(f.local_steps)
    assert plan.phase1_ratio == 0.5 and p1 == 15 + 2 * 2
    phase1 = [e for e in plan.events(plan.total_steps, p1) if "phase I" in e.name]
    assert phase1[0].noise_multiplier == plan.sigma  # Phase I is DP-SGD with the jointly calibrated σ
    eps = epsilon(plan.events(plan.total_steps, p1), cfg.privacy.delta)
    assert 3.6 < eps <= 4.0 + 1e-6
    dpsgd_only = task.client_dp_plan(load_config("federated", [*TINY, "fed.dp=example", "fed.encoder=public",
                                                               "privacy.target_epsilon=4", "fed.warmup_steps=30"]), 150)
    assert plan.sigma > dpsgd_only.sigma  # Phase I spends part of the budget: DP-SGD gets more noise
    loose = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"delta": 0.05})})
    with pytest.raises(ValueError, match="not below 1/N = 1/20"):
        task.client_dp_plan(loose, 20)  # a client with 20 examples: δ must be below 0.05


def test_dp_promise_client_trains_clipped_phase_one_then_dp_sgd():
    from pfdiff.federated.client_app import app

    cfg = tiny("fed.dp=example", "fed.encoder=public", "privacy.mechanism=dp-promise", "privacy.steps=20",
               "privacy.promise_phase1_steps=10")
    c = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                run_config={})
    _send(app, cfg, "stats", ArrayRecord(task.build_encoder_classifier(cfg).state_dict()), c)
    den = ArrayRecord(task.build_global_denoiser(cfg).state_dict())
    out = _send(app, cfg, "diffusion", den, c, **{"scaler-mean": [0.0] * 64, "scaler-std": [1.0] * 64})
    assert "train_loss" not in out.content["metrics"]  # nothing private but the weights
    assert any(not np.array_equal(out.content["arrays"][k].numpy(), den[k].numpy()) for k in den)
    view = task.sampling_view(task.build_global_denoiser(cfg), cfg)
    assert type(view).__name__ == "PhasedLabels" and view.S == cfg.privacy.promise_S


def test_failure_reasons_keep_the_clients_own_message():
    from pfdiff.federated.wire import short_reason

    ray_style = ("ray::ClientAppActor.run() (pid=1)\n  File \"x.py\", line 1\nflwr.clientapp.ClientAppException: \n"
                 "Exception ClientAppException occurred. Message: the fixed releases alone cost epsilon 0.5 >= target 0.3'>")
    assert short_reason(ray_style) == "the fixed releases alone cost epsilon 0.5 >= target 0.3"
    assert short_reason("Traceback\n  ...\nValueError: bad input") == "ValueError: bad input"


def _reversing_grid():
    """A fake grid that answers the last node first (partition 2, 1, 0), and an instruction to a node."""
    from flwr.app import MetricRecord

    def instruction(node):
        meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=3600.0, message_type=MessageType.TRAIN)
        return Message(RecordDict({"config": ConfigRecord({"phase": "x"})}), metadata=meta)

    class Grid:
        def send_and_receive(self, messages, timeout):
            return [Message(RecordDict({"metrics": MetricRecord({"partition-id": 3 - m.metadata.dst_node_id})}),
                            reply_to=m) for m in messages]

    return Grid, instruction


def test_wire_returns_replies_in_partition_order_whatever_the_arrival_order():
    from pfdiff.federated.wire import Wire

    Grid, instruction = _reversing_grid()
    wire = Wire(Grid(), timeout=1.0)
    replies = wire.exchange([instruction(n) for n in (1, 2, 3)], "x")
    assert [int(r.content["metrics"]["partition-id"]) for r in replies] == [0, 1, 2]
    assert set(wire.per_client) == {0, 1, 2} and not wire.failures


def test_wire_totals_accumulate_over_the_executions_of_a_run(tmp_path):
    from pfdiff.federated.wire import Wire

    Grid, instruction = _reversing_grid()
    path = tmp_path / "wire.json"
    wire = Wire(Grid(), timeout=1.0, path=path)
    wire.exchange([instruction(n) for n in (1, 2, 3)], "x")
    first = wire.totals()
    wire.failures.append({"phase": "x", "round": 1, "node": 9, "partition": None, "reason": "gone"})
    wire.exchange([instruction(1)], "y")
    resumed = Wire(Grid(), timeout=1.0, path=path)  # a resumed run: the earlier execution's traffic is kept
    assert resumed.totals() == wire.totals() and resumed.failures == wire.failures
    resumed.exchange([instruction(n) for n in (1, 2, 3)], "x")  # a round re-sent after the resume counts again
    assert resumed.sent["x"] == 2 * first["sent"]["x"] and resumed.received["x"] == 2 * first["received"]["x"]
    assert resumed.per_client[0]["received"] == 2 * first["per_client"][0]["received"] > 0
    assert Wire(Grid(), timeout=1.0, path=path).totals() == resumed.totals()


# ---------------------------------------------------------------- device


def test_federated_code_puts_models_data_and_resources_on_the_configured_device(monkeypatch, tmp_path):
    """Issue 17: models, client data and the server's tensors follow ``resolve_device(cfg.device)`` (faked here
    as the "meta" device: no GPU needed, and nothing can silently stay on the CPU); Ray gets GPUs only then."""
    from pfdiff import training
    from pfdiff.federated import client_app, server_app, simulation

    asked = []

    def fake_resolve(name):
        asked.append(name)
        return torch.device("meta")

    monkeypatch.setattr(task, "resolve_device", fake_resolve)
    cfg = tiny()
    assert task.device_of(cfg) == torch.device("meta") and asked == [cfg.device]
    for model in (task.build_encoder_classifier(cfg), task.build_global_denoiser(cfg)):
        assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.device.type for p in task.build_global_denoiser(cfg, torch.device("cpu")).parameters()} == {"cpu"}
    data = task.load_client_data(cfg, 0, 3)
    assert data.x.device.type == data.y.device.type == "meta"

    # a client's request: its device and its (lazily loaded) local data
    config = ConfigRecord({"run-config": task.config_to_text(cfg), "phase": "stats"})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    q = client_app._Request(_message(RecordDict({"arrays": ArrayRecord(), "config": config}), "query.stats"), ctx)
    assert q.device.type == q.data.x.device.type == "meta"
    assert task.array_tensor(ArrayRecord({"a": torch.ones(2)})["a"], q.device).device.type == "meta"

    class Grid:  # all the server's constructor asks of a grid
        def get_node_ids(self):
            return [1, 2, 3]

    srv = server_app.Server(Grid(), cfg, tmp_path)
    assert srv.device.type == "meta" and srv.tensor(np.zeros(3)).device.type == "meta"

    # Ray: every GPU and fed.client_gpus of one per client when the device is CUDA, none otherwise
    monkeypatch.setattr(training, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    init, client = simulation.ray_resources(tiny("fed.client_gpus=0.5"))
    assert init["num_gpus"] == 2 and client == {"num_cpus": 1, "num_gpus": 0.5}
    monkeypatch.setattr(training, "resolve_device", lambda name: torch.device("cpu"))
    init, client = simulation.ray_resources(cfg)
    assert init == {"num_cpus": cfg.fed.num_cpus, "num_gpus": 0} and client == {"num_cpus": 1, "num_gpus": 0.0}


def test_every_client_reply_goes_on_the_wire_as_cpu_numpy_arrays(monkeypatch):
    """Whatever a client sends (and caches in its context) is built by ``task.to_wire``: CPU numpy arrays."""
    from flwr.app import MetricRecord

    from pfdiff.federated.client_app import app

    built = []
    to_wire = task.to_wire

    def spy(tensors):
        record = to_wire(tensors)
        built.append(record)
        return record

    monkeypatch.setattr(task, "to_wire", spy)
    owned = lambda rec: any(rec is b for b in built)  # noqa: E731
    scaler = {"scaler-mean": [0.0] * 64, "scaler-std": [1.0] * 64}
    for upload in ("features", "model"):
        cfg = tiny(f"fed.warmup_upload={upload}")
        c = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                    run_config={})
        enc = ArrayRecord(task.build_encoder_classifier(cfg).state_dict())
        den = ArrayRecord(task.build_global_denoiser(cfg).state_dict())
        clf = ArrayRecord(task.build_encoder_classifier(cfg)["classifier"].state_dict())
        replies = [_send(app, cfg, "encoder", enc, c), _send(app, cfg, "stats", enc, c),
                   _send(app, cfg, "reweight", clf, c, **{"class-weights": [1.0] * 10}),
                   _send(app, cfg, "warmup", den, c, **scaler, **{"n-total": 1000}),
                   _send(app, cfg, "diffusion", den, c, **scaler)]
        assert owned(c.state["features"])
        for r in replies:
            assert not r.has_error() and isinstance(r.content["metrics"], MetricRecord)
            if "arrays" in r.content:
                assert owned(r.content["arrays"])
                assert all(type(a.numpy()) is np.ndarray for a in r.content["arrays"].values())
    t = torch.ones(3, requires_grad=True) * 2
    wire = to_wire({"t": t})["t"].numpy()
    assert type(wire) is np.ndarray and wire.tolist() == [2.0, 2.0, 2.0]


def test_la_tau_of_the_federated_baseline_is_chosen_on_the_validation_split_not_the_test_set():
    from types import SimpleNamespace

    from pfdiff.data.longtail import class_groups
    from pfdiff.federated.server_app import EvalData, accuracy

    counts = np.array([100, 1])  # τ·log π lifts class 1 by ≈ 4.6 τ
    srv = SimpleNamespace(cfg=tiny(), C=2, split=SimpleNamespace(groups=class_groups(counts)))
    # validation: class 1 at [0, -5] needs τ ≥ 1.1, class 0 at [10, 0] stays right below τ = 2.17 → τ = 1.5
    # (the smallest of the grid's equals); the test set would want τ = 0.5 (class 0 at [3, 0], class 1 at [0, -1])
    ev = EvalData(z_test=torch.tensor([[3.0, 0.0], [0.0, -1.0]]), y_test=torch.tensor([0, 1]),
                  z_val=torch.tensor([[10.0, 0.0], [0.0, -5.0]]), y_val=torch.tensor([0, 1]))
    out = accuracy(srv, torch.nn.Identity(), ev, counts)
    assert out["tau"] == 1.5 and out["validation"]["balanced"] == 1.0
    assert out["balanced"] == 0.5  # τ = 1.5 on the test set: class 0 at [3, 0] flips to class 1
    plain = accuracy(srv, torch.nn.Identity(), ev)
    assert "tau" not in plain and plain["validation"]["balanced"] == 0.5
    no_val = accuracy(srv, torch.nn.Identity(), EvalData(ev.z_test, ev.y_test, None, None), counts)
    assert no_val["tau"] == srv.cfg.logit_adjust_tau and no_val["validation"] is None
