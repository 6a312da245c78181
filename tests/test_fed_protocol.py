"""The benchmark protocol's machinery (issue 19): client sampling per round, each client's ε under sampling,
and the fedbench preset. No Ray: the server talks to a fake grid."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from pfdiff.config import load_config  # noqa: E402
from pfdiff.federated.strategy import make_strategy, sample_clients  # noqa: E402

@pytest.fixture(autouse=True)
def task_identity():
    """A server's Message needs the runtime's TaskIdentity (set by Flower inside a run); restored after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, f"_{k}", None) for k in ("run_id", "node_id", "task_id")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, f"_{k}", v)


TINY = ["fed.rounds=6", "fed.local_steps=3", "fed.warmup_steps=10", "fed.encoder_rounds=2"]


class FakeReply:
    def __init__(self, node: int, pid: int):
        self.metadata = SimpleNamespace(src_node_id=node)
        self.content = RecordDict({"metrics": MetricRecord({"partition-id": pid})})

    def has_error(self) -> bool:
        return False


class FakeGrid:
    """Nodes with random ids (as Flower's simulation gives them), partitions in creation order; records every
    message sent as (message type, partition)."""

    def __init__(self, n: int):
        ids = np.random.default_rng(7).choice(10**9, size=n, replace=False)
        self.partition = {int(node): i for i, node in enumerate(ids)}
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self):
        return list(self.partition)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.sent.append((m.metadata.message_type, self.partition[node]))
            out.append(FakeReply(node, self.partition[node]))
        return out


def server(*overrides, n=10, run_dir=Path("/nonexistent-run-dir")):
    from pfdiff.federated.server_app import Server

    cfg = load_config("federated", [*TINY, f"fed.num_clients={n}", *overrides])
    grid = FakeGrid(n)
    return Server(grid, cfg, run_dir), grid


def _diffusion_round(srv, grid, r: int) -> list[int]:
    """The partitions one method's diffusion round r is sent to (its own strategy, as run_method builds it)."""
    from pfdiff.federated.wire import MESSAGE_TYPES

    strategy = make_strategy(srv.cfg, len(srv.nodes), client_dp=False, message_type=MESSAGE_TYPES["diffusion"],
                             select=srv.selector("diffusion"))
    msgs = list(strategy.configure_train(r, ArrayRecord(), ConfigRecord({"phase": "diffusion"}), grid))
    assert all(m.metadata.message_type == "train.diffusion" for m in msgs)
    return sorted(grid.partition[m.metadata.dst_node_id] for m in msgs)


def test_sampling_draws_the_same_clients_for_every_method_and_the_right_count():
    srv, grid = server("fed.clients_per_round=4")
    per_method = [[_diffusion_round(srv, grid, r) for r in range(1, 7)] for _ in range(3)]  # 3 "methods"
    assert per_method[0] == per_method[1] == per_method[2]
    rounds = per_method[0]
    assert all(len(p) == 4 == len(set(p)) and set(p) <= set(range(10)) for p in rounds)
    assert len({tuple(p) for p in rounds}) > 1  # a new draw each round
    # the node ids are mapped once through the partition query, sent to every node
    assert [t for t, _ in grid.sent].count("query.partition") == 10
    # a draw over partitions (public seed, phase, round): a second server with other node ids sends to the same
    other, other_grid = server("fed.clients_per_round=4")
    other_grid.partition = {node + 1: p for node, p in other_grid.partition.items()}
    other.nodes = sorted(other_grid.partition)
    assert [_diffusion_round(other, other_grid, r) for r in range(1, 7)] == rounds
    # phases differ (the encoder's round 1 is its own draw) and so do seeds
    enc = [sample_clients(10, 4, srv.seed, "encoder", r) for r in range(1, 7)]
    assert enc != rounds and [sample_clients(10, 4, 1, "diffusion", r) for r in range(1, 7)] != rounds


def test_fedavg_phases_are_sampled_and_one_off_phases_go_to_every_client(tmp_path):
    srv, grid = server("fed.clients_per_round=3", "fed.min_replies=100", run_dir=tmp_path)  # no aggregation
    srv.fedavg_rounds("reweight", ArrayRecord(), 2)
    sent = [p for t, p in grid.sent if t == "train.reweight"]
    expected = [sample_clients(10, 3, srv.seed, "reweight", r) for r in (1, 2)]
    assert sorted(sent[:3]) == expected[0] and sorted(sent[3:]) == expected[1] and len(sent) == 6
    for phase in ("stats", "warmup"):
        grid.sent.clear()
        srv.broadcast(phase, ArrayRecord(), srv.config(phase))
        assert sorted(p for _, p in grid.sent) == list(range(10))


def test_without_sampling_every_round_goes_to_every_client_through_flowers_fedavg():
    srv, grid = server()
    assert srv.selector("diffusion") is None
    assert _diffusion_round(srv, grid, 1) == list(range(10))
    assert not any(t == "query.partition" for t, _ in grid.sent)  # nothing extra is sent without sampling
    assert sample_clients(10, 10, 0, "diffusion", 1) == sample_clients(10, None, 0, "diffusion", 1) == list(range(10))


def test_sampling_refusals():
    from pfdiff.federated.server_app import check_plan

    with pytest.raises(ValueError, match="exceeds fed.num_clients"):
        check_plan(load_config("federated", ["fed.clients_per_round=11"]))
    with pytest.raises(ValueError, match="fed.dp='client' with fed.clients_per_round"):
        check_plan(load_config("federated", ["fed.dp=client", "fed.encoder=public", "fed.methods=[fedavg]",
                                             "fed.clients_per_round=5"]))
    check_plan(load_config("federated", ["fed.dp=client", "fed.encoder=public", "fed.methods=[fedavg]",
                                         "fed.clients_per_round=10"]))  # = every client: today's claim holds


@pytest.mark.parametrize("private_noise", [True, False])
def test_rounds_sent_are_counted_per_client_write_ahead(private_noise):
    noise = [] if private_noise else ["privacy.reproducible_noise=true"]
    srv, _ = server("fed.dp=example", "fed.encoder=public", "fed.clients_per_round=3", *noise, n=6)
    counts: dict[str, int] = {}
    for r in range(1, 7):
        counts = srv.count_rounds(counts, "diffusion", r)
    drawn = [p for r in range(1, 7) for p in sample_clients(6, 3, srv.seed, "diffusion", r)]
    assert {p: counts.get(str(p), 0) for p in range(6)} == {p: drawn.count(p) for p in range(6)}
    assert sum(counts.values()) == 6 * 3
    resent = srv.count_rounds(counts, "diffusion", 6)  # round 6 re-sent after a resume
    in_six = set(sample_clients(6, 3, srv.seed, "diffusion", 6))
    # OS-entropy noise: a re-sent round is a new release; reproducible noise replays the same one
    assert {p: resent.get(str(p), 0) - counts.get(str(p), 0) for p in range(6)} == {
        p: int(private_noise and p in in_six) for p in range(6)}


def _dp_server_after_six_sampled_rounds():
    """A DP server of 4 clients, 2 drawn per round, and each client's count of the 6 rounds it was sent."""
    srv, _ = server("fed.dp=example", "fed.encoder=public", "fed.clients_per_round=2", "privacy.target_epsilon=8",
                    n=4)
    srv.sends = lambda: {}
    counts: dict[str, int] = {}
    for r in range(1, 7):
        counts = srv.count_rounds(counts, "diffusion", r)
    return srv, counts


def test_each_clients_epsilon_counts_only_the_rounds_it_was_sent():
    from pfdiff.federated import task
    from pfdiff.federated.server_app import PARTICIPATION, _privacy_claim
    from pfdiff.privacy.accounting import epsilon

    srv, counts = _dp_server_after_six_sampled_rounds()
    drawn = [p for r in range(1, 7) for p in sample_clients(4, 2, srv.seed, "diffusion", r)]
    stats = {"n_per_client": {p: 40 for p in range(4)}}
    claim = _privacy_claim(srv, stats, {"fedavg": {"rounds_started": 6, "client_rounds": counts}})
    assert claim["participation"] == PARTICIPATION and "no privacy amplification" in PARTICIPATION
    plan, p = task.client_dp_plan(srv.cfg, 40), srv.cfg.privacy
    per = claim["methods"]["fedavg"]
    few, many = min(range(4), key=drawn.count), max(range(4), key=drawn.count)
    assert drawn.count(few) < drawn.count(many)
    for c in (few, many):
        k = drawn.count(c)
        assert per[str(c)]["rounds"] == k and per[str(c)]["steps"] == k * plan.local_steps
        assert per[str(c)]["epsilon"] == pytest.approx(epsilon(plan.events(k * plan.local_steps), p.delta,
                                                               p.accountant))
    assert per[str(few)]["epsilon"] < per[str(many)]["epsilon"] <= 8 + 1e-6
    # results without per-client counts (before sampling): every round started is charged
    old = _privacy_claim(srv, stats, {"fedavg": {"rounds_started": 6}})
    assert all(e["rounds"] == 6 for e in old["methods"]["fedavg"].values())


def test_a_method_whose_repair_the_warm_up_pool_filters_counts_the_warm_up_in_its_epsilon():
    """FedAvg has no pool, but in a run with a warm-up its repair pseudo-features are AID-filtered by the warm-up
    pool's scorer: its released G depends on the warm-up, whose DP steps must be in its ε."""
    from pfdiff.federated import task
    from pfdiff.federated.server_app import _privacy_claim

    srv, counts = _dp_server_after_six_sampled_rounds()
    stats = {"n_per_client": {p: 40 for p in range(4)}}
    plan = task.client_dp_plan(srv.cfg, 40)
    run = {"rounds_started": 6, "client_rounds": counts}
    alone = _privacy_claim(srv, stats, {"fedavg": {**run, "uses_warmup": False}})
    filtered = _privacy_claim(srv, stats, {"fedavg": {**run, "uses_warmup": True}})
    for p in map(str, range(4)):
        k = counts.get(p, 0)
        assert alone["methods"]["fedavg"][p]["steps"] == k * plan.local_steps
        assert filtered["methods"]["fedavg"][p]["steps"] == plan.warmup_steps + k * plan.local_steps
        assert filtered["methods"]["fedavg"][p]["epsilon"] > alone["methods"]["fedavg"][p]["epsilon"]
    assert any("AID scorer" in c for c in filtered["covered"]) and not any("AID scorer" in c for c in alone["covered"])
    # FedDDPM's pool is the warm-up's whatever the key says for old results
    assert _privacy_claim(srv, stats, {"fedddpm": run})["methods"]["fedddpm"]["0"]["steps"] >= plan.warmup_steps


def test_creffs_epsilon_counts_each_clients_rounds_and_composes_with_the_methods():
    """CReFF's rounds go to the diffusion methods' clients (the same draw): its ε per client counts that client's
    rounds, and the composition over methods adds them to the same client's diffusion rounds."""
    from pfdiff.federated.server_app import _privacy_claim

    srv, counts = _dp_server_after_six_sampled_rounds()
    stats = {"n_per_client": {p: 40 for p in range(4)}}
    few, many = min(range(4), key=lambda p: counts.get(str(p), 0)), max(range(4), key=lambda p: counts.get(str(p), 0))
    assert counts.get(str(few), 0) < counts[str(many)]
    both = {"fedavg": {"rounds_started": 6, "client_rounds": counts},
            "creff": {"rounds_started": 6, "client_rounds": counts}}
    claim = _privacy_claim(srv, stats, both)
    creff = claim["methods"]["creff"]
    assert creff[str(few)]["steps"] == counts.get(str(few), 0) and creff[str(many)]["steps"] == counts[str(many)]
    assert creff[str(few)]["epsilon"] < creff[str(many)]["epsilon"] <= 8 + 1e-6
    alone = _privacy_claim(srv, stats, {"fedavg": both["fedavg"]})["composed_over_methods"]
    composed = claim["composed_over_methods"]
    assert all(composed[str(p)] > alone[str(p)] for p in (few, many))


def test_fedbench_preset_loads_and_its_plan_passes():
    from pfdiff.federated.server_app import check_plan

    cfg = load_config("fedbench")
    f = cfg.fed
    assert (cfg.data.name, cfg.data.imbalance_factor, cfg.model.encoder) == ("mnist1d", 100, "cnn1d")
    assert (f.num_clients, f.clients_per_round, f.compare_alphas, cfg.seeds) == (20, 8, [0.1, 0.5, 1.0], [0, 1, 2])
    assert set(f.methods) == {"fedavg", "fedddpm", "fedddpm+", "progressive"} and f.reweight_rounds > 0
    check_plan(cfg)
    from pfdiff.federated.simulation import run_dir, run_overrides

    run = load_config("fedbench", run_overrides(0.1, 2))
    assert run.seeds == [2] and run.fed.alpha == 0.1
    assert run_dir(Path("r"), 0.1, 2, cfg.seeds).as_posix() == "r/alpha-0.1/seed-2"
    assert run_dir(Path("r"), 0.1, 0, [0]).as_posix() == "r/alpha-0.1"  # one seed: as before


@pytest.mark.slow
def test_fedbench_partitions_respect_the_minimum_size_at_alpha_0_1():
    from pfdiff.federated import task

    cfg = load_config("fedbench", ["fed.alpha=0.1"])
    sizes = [len(p) for p in task.client_indices(cfg, cfg.fed.num_clients)]
    assert len(sizes) == 20 and min(sizes) >= cfg.fed.min_partition_size


def test_an_unreachable_min_partition_size_fails_with_a_clear_error():
    from pfdiff.federated import task

    y = np.repeat(np.arange(10), [400, 200, 100, 50, 30, 20, 10, 8, 5, 3])
    with pytest.raises(ValueError, match="fed.min_partition_size=30 in 11 draws"):
        task.partition_indices(y, 20, 0.1, 0, 30)
