"""ServerApp (Flower Message API): the phases of federated feature diffusion, resumable, with metrics.

``app`` reads its settings from ``context.run_config`` (keys of :data:`DEFAULTS`; ``flwr run`` fills them
from ``pyproject.toml``'s ``[tool.flwr.app.config]``): a preset or YAML file, ``--set``-style overrides
and the run directory. :func:`run_server` does the work:

1. E + G by FedAvg (or the public encoder), 2. feature statistics (scaler, class counts; also fills
each client's feature cache), 3. the FedAvg re-weighting baseline for G, 4. the warm-up that builds
the auxiliary pool, 5. every method's diffusion rounds (checkpoint after each round), 6. evaluation on
the server's test set (used for reporting only: no decision of any method looks at it).

Device: the server's models, the pool, the test features and every server-side step (correction, sampling,
evaluation) run on ``task.device_of(cfg)``; what it sends is built with ``task.to_wire`` (CPU arrays), what it
receives is loaded onto the device, and checkpoints are read back onto it.

The round loop is ours, not ``Strategy.start``: it must resume from a checkpointed round, stop early
(FedDDPM+) and run server steps after the (possibly DP-noised) aggregation; it calls the strategy's
own ``configure_train`` / ``aggregate_train`` for everything FedAvg does.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from pfdiff.config import RunConfig, load_config  # noqa: E402
from pfdiff.evaluation.coverage import class_coverage  # noqa: E402
from pfdiff.evaluation.fid import frechet_distance  # noqa: E402
from pfdiff.evaluation.metrics import recognition_metrics  # noqa: E402
from pfdiff.federated import creff, task  # noqa: E402
from pfdiff.federated.aux_pool import AuxPool, client_share, pool_quotas, stratified_split  # noqa: E402
from pfdiff.federated.correction import (QuickTest, ServerCompute, accepted, correct_on_pool, pool_score,  # noqa: E402
                                         regenerate, relative_gain)
from pfdiff.federated.strategy import make_strategy, sample_clients  # noqa: E402
from pfdiff.federated.wire import MESSAGE_TYPES, Wire, record_bytes  # noqa: E402
from pfdiff.longtail.baselines import choose_tau, logit_adjusted  # noqa: E402
from pfdiff.longtail.common import encode, train_classifier_on_features  # noqa: E402
from pfdiff.longtail.filtering import MahalanobisScorer, aid_filter  # noqa: E402
from pfdiff.longtail.ldmlr import FeatureScaler, sample_features  # noqa: E402
from pfdiff.privacy.accounting import BudgetError, GaussianEvent, epsilon  # noqa: E402
from pfdiff.runs import atomic_write_json, load_state, save_state  # noqa: E402

log = logging.getLogger("pfdiff.federated")

METHODS = ("fedavg", "fedddpm", "fedddpm+", "progressive")
AUX_METHODS = ("fedddpm", "fedddpm+", "progressive")

DEFAULTS: dict[str, Any] = {
    "config": "federated",  # preset name or YAML path
    "set": "",  # space-separated overrides, e.g. "fed.rounds=5 fed.alpha=0.1"
    "run-dir": "runs/fed-flwr",
    "num-server-rounds": 0,  # > 0: overrides fed.rounds (Flower template key)
    "local-steps": 0,  # > 0: overrides fed.local_steps
}


def config_from_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, Path]:
    s = {**DEFAULTS, **run_config}
    overrides = [a for a in str(s["set"]).split() if a]
    if int(s["num-server-rounds"]) > 0:
        overrides.append(f"fed.rounds={int(s['num-server-rounds'])}")
    if int(s["local-steps"]) > 0:
        overrides.append(f"fed.local_steps={int(s['local-steps'])}")
    return load_config(str(s["config"]), overrides), Path(str(s["run-dir"]))


def check_plan(cfg: RunConfig) -> None:
    """Refuse, before any message is sent, the combinations whose privacy claim we could not keep."""
    f = cfg.fed
    unknown = [m for m in f.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown federated method(s) {unknown}; choose from {list(METHODS)}")
    unknown = [b for b in f.baselines if b not in creff.BASELINES]
    if unknown:
        raise ValueError(f"unknown federated baseline(s) {unknown}; choose from {list(creff.BASELINES)}")
    if f.dp != "none" and f.encoder != "public":
        raise ValueError(f"fed.dp={f.dp!r} needs fed.encoder='public': a FedAvg encoder and its feature scaler "
                         "would be released without DP")
    if f.clients_per_round is not None and f.clients_per_round > f.num_clients:
        raise ValueError(f"fed.clients_per_round={f.clients_per_round} exceeds fed.num_clients={f.num_clients}")
    if f.dp == "client" and f.clients_per_round is not None and f.clients_per_round < f.num_clients:
        raise ValueError("fed.dp='client' with fed.clients_per_round < fed.num_clients is refused: Flower's "
                         "fixed-clipping noise (num_sampled_clients) and the client-level ε assume every client "
                         "in every round")
    if f.score_source == "public" and f.encoder != "public":
        raise ValueError("fed.score_source='public' scores on the declared public part: it needs fed.encoder='public'")
    if f.dp == "client" and any(m in AUX_METHODS for m in f.methods):
        raise ValueError("fed.dp='client' covers the FedAvg rounds only; the warm-up uploads of "
                         f"{[m for m in f.methods if m in AUX_METHODS]} have no client-level guarantee")
    if f.dp == "example":  # the client-size-free calibrations, here rather than in every client's first round
        if "creff" in f.baselines:
            task.creff_sigma(cfg)  # BudgetError: the counts and CReFF's rounds cannot meet the target
        if releases := task.score_releases_planned(cfg):
            fixed = task.count_events(cfg) + [GaussianEvent(task.score_sigma(cfg), 1.0, releases, "client score")]
            spent = epsilon(fixed, cfg.privacy.delta, cfg.privacy.accountant)
            if spent >= cfg.privacy.target_epsilon:
                raise BudgetError(f"the noisy counts and the planned client scores (fed.score_epsilon="
                                  f"{f.score_epsilon:g}) already spend ε = {spent:.3g} ≥ privacy.target_epsilon="
                                  f"{cfg.privacy.target_epsilon:g}: nothing is left for the DP-SGD steps")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The ids of ``count`` connected SuperNodes (they register asynchronously after the run starts)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of fed.num_clients={count} SuperNodes connected "
                               f"within {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


class Server:
    """The state shared by the phases of one run: grid, config, wire, test data, run directory."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path):
        self.grid, self.cfg, self.dir = grid, cfg, run_dir
        self.nodes = wait_for_nodes(grid, cfg.fed.num_clients, cfg.fed.round_timeout)
        self.wire = Wire(grid, cfg.fed.round_timeout, run_dir / "wire.json")  # every execution's traffic
        self.split = task.split_of(cfg)
        self.C = self.split.num_classes
        self.cfg_text = task.config_to_text(cfg)
        self.loss_fn = task.make_loss(cfg, self.C)
        self.seed = cfg.seeds[0]
        self.device = task.device_of(cfg)
        self.pool_scorer: MahalanobisScorer | None = None  # AID scorer of the warm-up pool (``initial_pool``)
        # the statistics phase's releases (``phase_stats``: counts, n per client, scaler), set once after it;
        # the pool quotas read its (noisy) counts, every client-score query sends its scaler
        self.stats: dict[str, Any] | None = None
        self.public_score_data: tuple[torch.Tensor, torch.Tensor] | None = None  # score_source = public

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A numpy array of the server's data as a tensor on the server's device."""
        return torch.as_tensor(array).to(self.device)

    def config(self, phase: str, **extra) -> ConfigRecord:
        # the message type routes the message (``MESSAGE_TYPES``); "phase" names it in the record too
        return ConfigRecord({"run-config": self.cfg_text, "phase": phase, **extra})

    @property
    def private_noise(self) -> bool:
        """Clients draw OS-entropy noise: every execution of a private phase is a new release."""
        return self.cfg.fed.dp == "example" and not self.cfg.privacy.reproducible_noise

    def sends(self) -> dict[str, int]:
        path = self.dir / "private-sends.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def count_send(self, phase: str) -> None:
        """Write-ahead count of how often ``phase``'s private work was requested: a phase re-run after a crash
        draws new noise on the clients, so each execution is charged (with reproducible noise it replays)."""
        sends = self.sends()
        sends[phase] = sends.get(phase, 0) + 1 if self.private_noise else 1
        atomic_write_json(self.dir / "private-sends.json", sends)

    def count_score_send(self, method: str, round_: int) -> None:
        """Write-ahead count of a method's client-score releases (as ``rounds_started``: with OS-entropy noise
        every send is a new release, with reproducible noise a re-sent round replays)."""
        sends, key = self.sends(), f"score/{method}"
        sends[key] = sends.get(key, 0) + 1 if self.private_noise else max(sends.get(key, 0), round_)
        atomic_write_json(self.dir / "private-sends.json", sends)

    def broadcast(self, phase: str, arrays: ArrayRecord, config: ConfigRecord, key: str | None = None,
                  round_: int = 0) -> list[Message]:
        """One message to every node (phases without aggregation), on the wire as ``key`` (default: the phase)
        and ``round_``; the statistics and warm-up phases are counted first (a score query is counted by
        :meth:`count_score_send`, per method and round)."""
        if phase in ("stats", "warmup"):
            self.count_send(phase)
        return self.wire.exchange([self.message(phase, arrays, config, n) for n in self.nodes], key or phase, round_)

    @staticmethod
    def message(phase: str, arrays: ArrayRecord, config: ConfigRecord, node: int) -> Message:
        """The message of ``phase`` to one node: arrays and config, routed by the phase's message type."""
        return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                       message_type=MESSAGE_TYPES[phase])

    def fedavg_rounds(self, phase: str, arrays: ArrayRecord, rounds: int, **extra) -> ArrayRecord:
        strategy = make_strategy(self.cfg, len(self.nodes), client_dp=False, message_type=MESSAGE_TYPES[phase],
                                 select=self.selector(phase))
        for r in range(1, rounds + 1):
            replies = self.wire.exchange(strategy.configure_train(r, arrays, self.config(phase, **extra), self.grid),
                                         phase, r)
            if len(replies) >= self.cfg.fed.min_replies:
                arrays = strategy.aggregate_train(r, replies)[0]
        return arrays

    # ------------------------------------------------ client sampling (fed.clients_per_round)

    @property
    def sampling(self) -> bool:
        per = self.cfg.fed.clients_per_round
        return per is not None and per < len(self.nodes)

    def round_partitions(self, phase: str, r: int) -> list[int]:
        """The partitions sent FedAvg round ``r`` of ``phase`` (all, or a public draw: ``sample_clients``)."""
        return sample_clients(len(self.nodes), self.cfg.fed.clients_per_round, self.seed, phase, r)

    def selector(self, phase: str):
        """The strategy's node selection for ``phase`` (None: every client, Flower's own FedAvg path)."""
        if not self.sampling:
            return None
        return lambda r: [self.node_of_partition()[p] for p in self.round_partitions(phase, r)]

    def node_of_partition(self) -> dict[int, int]:
        """partition id → node id, asked once of every node (``query.partition``) unless replies already said."""
        known = {p: n for n, p in self.wire.node_to_partition.items() if n in self.nodes}
        if len(known) < len(self.nodes):
            config = ConfigRecord({"phase": "partition"})
            self.wire.exchange([Message(RecordDict({"config": config}), dst_node_id=n,
                                        message_type=MESSAGE_TYPES["partition"]) for n in self.nodes], "partition")
            known = {p: n for n, p in self.wire.node_to_partition.items() if n in self.nodes}
            if sorted(known) != list(range(len(self.nodes))):
                raise RuntimeError(f"client sampling needs every node's partition id; got {sorted(known)} of "
                                   f"{len(self.nodes)} nodes")
        return known

    def count_rounds(self, counts: dict[str, int], phase: str, r: int) -> dict[str, int]:
        """Write-ahead count of the rounds each client (partition) was sent: +1 per send with OS-entropy noise
        (a round re-sent after a resume is a new release); else the rounds ≤ ``r`` it was drawn in (a replay
        is the same release). Without sampling every client's count is ``rounds_started``."""
        if self.private_noise:
            return {**counts, **{str(p): counts.get(str(p), 0) + 1 for p in self.round_partitions(phase, r)}}
        drawn = [p for q in range(1, r + 1) for p in self.round_partitions(phase, q)]
        return {str(p): max(counts.get(str(p), 0), drawn.count(p)) for p in range(len(self.nodes))}


# ---------------------------------------------------------------- phases 1–4


def phase_encoder(srv: Server) -> torch.nn.ModuleDict:
    """E + G: FedAvg of local cross-entropy steps, or fitted on the server's public part."""
    path = srv.dir / "encoder.safetensors"
    model = task.build_encoder_classifier(srv.cfg)
    if path.exists():
        return task.load_arrays(model, load_state(path)["model"])
    f = srv.cfg.fed
    if f.encoder == "public":
        pub, _ = task.public_private_indices(srv.cfg)
        x, y = srv.tensor(srv.split.train.x[pub]), srv.tensor(srv.split.train.y[pub])
        task.train_encoder_local(model, x, y, f.encoder_rounds * f.encoder_local_steps, f.local_lr,
                                 f.local_batch_size, srv.seed, ("public",))
    else:
        arrays = srv.fedavg_rounds("encoder", task.to_wire(model.state_dict()), f.encoder_rounds)
        model = task.load_arrays(model, arrays.to_torch_state_dict())
    save_state(path, {"model": model.state_dict()})
    return model


def phase_stats(srv: Server, model: torch.nn.ModuleDict) -> dict[str, Any]:
    """Clients encode their data once (cached in their ``context.state``) and report class counts (noisy
    under example-level DP) and, without DP, feature sums; the scaler comes from those sums or, with a
    public encoder, from the public part. On a resume (``released-stats.json`` written by an earlier execution)
    the clients still re-encode (their feature cache went with their process), but each is sent the counts it
    released before and returns those: no new release, nothing counted (every client must answer again)."""
    arrays, path = task.to_wire(model.state_dict()), srv.dir / "released-stats.json"
    if path.exists():
        released = json.loads(path.read_text())
        msgs = [srv.message("stats", arrays, srv.config("stats", **{"released-counts": released[str(p)]}), n)
                for p, n in sorted(srv.node_of_partition().items())]
        replies = srv.wire.exchange(msgs, "stats")
    else:
        replies = srv.broadcast("stats", arrays, srv.config("stats"))
    if len(replies) < len(srv.nodes):
        reasons = sorted({f["reason"] for f in srv.wire.failures if f["phase"] == "stats"})
        raise RuntimeError(f"the statistics phase needs every client; {len(srv.nodes) - len(replies)} failed: "
                           + " | ".join(reasons))
    m = [r.content["metrics"] for r in replies]
    counts = np.sum([np.asarray(x["counts"]) for x in m], axis=0)
    n_per_client = {int(x["partition-id"]): int(x["num-examples"]) for x in m}
    if not path.exists():  # each client's released counts, for a resume (already released: post-processing)
        atomic_write_json(path, {str(int(x["partition-id"])): [int(c) for c in x["counts"]] for x in m})
    if srv.cfg.fed.encoder == "public":
        pub, _ = task.public_private_indices(srv.cfg)
        scaler = FeatureScaler.fit(encode(model["encoder"], srv.tensor(srv.split.train.x[pub])))
    else:
        n = sum(n_per_client.values())
        s1 = torch.tensor(np.sum([x["sum"] for x in m], axis=0))
        s2 = torch.tensor(np.sum([x["sumsq"] for x in m], axis=0))
        mean = s1 / n
        std = ((s2 / n - mean ** 2).clamp_min(0) * n / max(1, n - 1)).sqrt().clamp_min(1e-6)
        scaler = FeatureScaler(mean.float().to(srv.device), std.float().to(srv.device))
    # kept for evaluation and attacks (the server holds it anyway; it is sent to every client)
    save_state(srv.dir / "scaler.safetensors", {"mean": scaler.mean, "std": scaler.std})
    return {"counts": counts, "n_per_client": n_per_client, "scaler": scaler}


def scaler_config(scaler: FeatureScaler) -> dict[str, list[float]]:
    return {"scaler-mean": scaler.mean.tolist(), "scaler-std": scaler.std.tolist()}


def phase_reweight(srv: Server, model: torch.nn.ModuleDict, counts: np.ndarray) -> torch.nn.Module:
    """Re-weighting baseline: FedAvg of G with class-weighted CE (w_c ∝ 1/n_c) on frozen features."""
    path = srv.dir / "reweight.safetensors"
    clf = copy.deepcopy(model["classifier"])
    if path.exists():
        return task.load_arrays(clf, load_state(path)["model"])
    w = 1.0 / np.maximum(counts, 1)
    w = (w / w.mean()).tolist()
    arrays = srv.fedavg_rounds("reweight", task.to_wire(clf.state_dict()), srv.cfg.fed.reweight_rounds,
                               **{"class-weights": w})
    clf = task.load_arrays(clf, arrays.to_torch_state_dict())
    save_state(path, {"model": clf.state_dict()})
    return clf


def phase_warmup(srv: Server, stats: dict[str, Any]) -> dict[str, Any]:
    """Peng et al.'s warm-up: every client trains its own denoiser and uploads it, or N pseudo-features
    sampled from it; the server turns either into the auxiliary pool (scored by the AID scorer). With
    ``fed.pool_quota`` ≠ histogram the server sends per-class quotas of B (from the released counts) and a
    client generates its share of each class; the held-out slice is stratified by class."""
    path = srv.dir / "warmup.safetensors"
    f = srv.cfg.fed
    released = np.asarray(stats["counts"])  # the statistics phase's (noisy) counts, summed over the clients
    if path.exists():
        return load_state(path, srv.device)
    init = task.to_wire(task.build_global_denoiser(srv.cfg).state_dict())
    n_total = int(stats["counts"].sum())
    quotas = pool_quotas(released, f.aux_size, f.pool_quota)
    extra = {"n-total": n_total}
    if f.pool_quota != "histogram":
        extra.update({"class-quotas": quotas.tolist(), "class-counts": released.tolist()})
    replies = srv.broadcast("warmup", init, srv.config("warmup", **scaler_config(stats["scaler"]), **extra))
    if not replies:
        raise RuntimeError("no client answered the warm-up")
    us, ys, upload_bytes = [], [], []
    for r in replies:
        arrays = r.content["arrays"]
        upload_bytes.append(record_bytes(r.content))
        if f.warmup_upload == "model":
            counts = np.asarray(r.content["metrics"]["counts"])
            per_class = (np.round(counts / n_total * f.aux_size).astype(int) if f.pool_quota == "histogram"
                         else client_share(quotas, released, counts))
            model = task.load_arrays(task.build_global_denoiser(srv.cfg), arrays.to_torch_state_dict()).eval()
            pid = int(r.content["metrics"]["partition-id"])
            u, y = sample_features(task.sampling_view(model, srv.cfg), srv.loss_fn.schedule, per_class, srv.cfg.diffusion, srv.seed,
                                   srv.device, tag=f"fed-warmup-server-{pid}")
        else:
            u, y = task.array_tensor(arrays["u"], srv.device), task.array_tensor(arrays["y"], srv.device).long()
        us.append(u)
        ys.append(y)
    u, y = torch.cat(us), torch.cat(ys)
    # held-out slice first (every class with ≥ 2 pool samples in it), then the training part
    val, rest = stratified_split(y, f.aux_val_share, torch.Generator().manual_seed(srv.seed))
    order = torch.cat([val, rest])
    u, y = u[order], y[order]
    state = {"u": u, "y": y, "n_val": len(val), "upload_bytes": upload_bytes, "quotas": torch.as_tensor(quotas),
             "model_bytes": record_bytes(init), "feature_bytes": _per_feature_bytes(u.shape[1])}
    save_state(path, state)
    return state


def _per_feature_bytes(dim: int) -> dict[str, float]:
    """Bytes of N pseudo-features (float32 + int64 label) as Flower serialises them: a + b·N, fitted."""
    sizes = {n: record_bytes(ArrayRecord({"u": torch.zeros(n, dim), "y": torch.zeros(n, dtype=torch.long)}))
             for n in (1, 1001)}
    per = (sizes[1001] - sizes[1]) / 1000
    return {"per_feature": per, "fixed": sizes[1] - per}


# ---------------------------------------------------------------- phase 5: one method's rounds


def initial_pool(srv: Server, warm: dict[str, Any], method: str) -> tuple[AuxPool, torch.Tensor, torch.Tensor,
                                                                            MahalanobisScorer]:
    """The training part of the warm-up pool (the progressive pool starts from its first
    ``pool_initial_share``: same generation budget as the fixed pool), the held-out slice, the scorer."""
    n_val = int(warm["n_val"])
    u_val, y_val = warm["u"][:n_val], warm["y"][:n_val]
    u, y = warm["u"][n_val:], warm["y"][n_val:]
    if srv.pool_scorer is None:  # one cross-fitted fit on the warm-up pool serves every method
        srv.pool_scorer = MahalanobisScorer(u, y, srv.C)
    scorer = srv.pool_scorer
    if method == "progressive":
        keep = int(round(srv.cfg.fed.pool_initial_share * len(y)))
        u, y = u[:keep], y[:keep]
    pool = AuxPool(u.clone(), y.clone(), torch.zeros(len(y), dtype=torch.long, device=u.device),
                   scorer.score(u, y).float())
    return pool, u_val, y_val, scorer


def method_checkpoint(run_dir: Path, method: str) -> Path:
    """Where a method's global denoiser and round state live (``fedddpm+`` → ``fedddpmplus/``)."""
    return Path(run_dir) / method.replace("+", "plus") / "checkpoint.safetensors"


def run_method(srv: Server, method: str, stats: dict[str, Any], warm: dict[str, Any] | None) -> dict[str, Any]:
    """The diffusion rounds of one method, checkpointed after every round (``<run-dir>/<method>/``)."""
    f, cfg = srv.cfg.fed, srv.cfg
    ckpt_path = method_checkpoint(srv.dir, method)
    model = task.build_global_denoiser(cfg)
    pool = u_val = y_val = scorer = None
    if warm is not None and method in AUX_METHODS:
        pool, u_val, y_val, scorer = initial_pool(srv, warm, method)
    st: dict[str, Any] = {"round": 0, "rounds_started": 0, "history": {}, "compute": vars(ServerCompute()),
                          "quick": None, "stopped_at": None, "best_score": None, "client_rounds": {}}
    if ckpt_path.exists():
        saved = load_state(ckpt_path, srv.device)
        model.load_state_dict(saved["model"])
        st = saved["state"]
        # a checkpoint from before client sampling: every client took part in every round started
        st.setdefault("client_rounds", {str(p): st["rounds_started"] for p in range(len(srv.nodes))})
        if pool is not None:
            pool = AuxPool.from_state(saved["pool"])
        log.info("%s: resuming after round %s", method, st["round"])
    compute = ServerCompute(**st["compute"])
    quick = QuickTest(f.quick_test_threshold, f.quick_test_patience, **(st["quick"] or {}))
    # every method's round r goes to the same clients: the draw is seeded by (seed, "diffusion", r), not the method
    strategy = make_strategy(cfg, len(srv.nodes), client_dp=f.dp == "client", message_type=MESSAGE_TYPES["diffusion"],
                             select=srv.selector("diffusion"))
    arrays = task.to_wire(model.state_dict())
    extra = scaler_config(stats["scaler"])

    for r in range(st["round"] + 1, f.rounds + 1):
        if st["stopped_at"]:
            break
        # write-ahead: the clients spend privacy now; with OS-entropy noise a round re-sent after a resume is
        # a new release and is counted again
        st["rounds_started"] = st["rounds_started"] + 1 if srv.private_noise else max(st["rounds_started"], r)
        st["client_rounds"] = srv.count_rounds(st["client_rounds"], "diffusion", r)
        _save(ckpt_path, model, pool, st)
        t0, b0 = time.perf_counter(), srv.wire.totals()["total"]
        up0 = srv.wire.received.get(f"diffusion/{method}", 0)
        msgs = strategy.configure_train(r, arrays, srv.config("diffusion", **extra), srv.grid)
        replies = srv.wire.exchange(msgs, f"diffusion/{method}", r)
        row: dict[str, Any] = {"replies": len(replies)}
        enough = len(replies) >= f.min_replies and (f.dp != "client" or len(replies) == len(srv.nodes))
        new = strategy.aggregate_train(r, replies)[0] if enough else None
        if new is None:
            log.warning("%s round %s: %s replies (< minimum); the global model is kept", method, r, len(replies))
            row["skipped"] = True
        else:
            model.load_state_dict(new.to_torch_state_dict())
            row.update(server_round(srv, method, model, pool, u_val, y_val, scorer, quick, compute, st, r))
        arrays = task.to_wire(model.state_dict())
        row.update(bytes=srv.wire.totals()["total"] - b0,
                   upload_bytes=srv.wire.received.get(f"diffusion/{method}", 0) - up0, seconds=time.perf_counter() - t0)
        st["history"][str(r)] = row
        st["round"], st["compute"] = r, vars(compute)
        st["quick"] = quick.state()
        _save(ckpt_path, model, pool, st)
    return {"model": model, "pool": pool, "scorer": scorer, "state": st, "compute": compute}


def server_round(srv: Server, method: str, model, pool, u_val, y_val, scorer, quick: QuickTest,
                 compute: ServerCompute, st: dict, r: int) -> dict[str, Any]:
    """What the server does after aggregating round ``r`` (post-processing of the aggregate)."""
    f, row = srv.cfg.fed, {}
    tag = (method, r)
    if method == "fedddpm" or method == "progressive":
        compute.add(correct_on_pool(model, pool, srv.loss_fn, f.server_steps, f.server_lr, f.server_batch_size,
                                    srv.seed, tag, f.correction_weight))
    if u_val is not None:
        score, row["score_source"] = round_score(srv, method, model, u_val, y_val, r)
        row["score"] = score
    if method == "fedddpm+" and quick.update(score):
        compute.add(correct_on_pool(model, pool, srv.loss_fn, f.plus_steps, f.server_lr, f.server_batch_size,
                                    srv.seed, tag + ("one-shot",), f.correction_weight))
        if row["score_source"] != "clients":  # a client score after the stop would be a release beyond the plan
            row["score_after_one_shot"] = round_score(srv, method, model, u_val, y_val, r)[0]
        st["stopped_at"] = r
        row["quick_test_stop"] = True
    if method == "progressive":
        best = st["best_score"]
        gain = 0.0 if best is None else relative_gain(best, score)
        row["gain"] = gain
        row["gate"] = "accepted" if best is None or accepted(gain, srv.cfg) else "rejected"
        if row["gate"] == "accepted":
            info, c = regenerate(task.sampling_view(model, srv.cfg), srv.loss_fn.schedule, pool, scorer, srv.cfg,
                                 srv.C, r, srv.seed, regen_per_class(srv, pool))
            compute.add(c)
            row["regenerated"] = info
            st["best_score"] = score if best is None else min(best, score)
        row["pool"] = pool.summary()
        row["pool"]["per_class"] = pool.class_counts(srv.C).tolist()
    return row


def regen_per_class(srv: Server, pool: AuxPool) -> np.ndarray | None:
    """What the progressive pool regenerates per class: the quotas of ``fed.pool_quota`` over regen_share of the
    pool, or None (the pool's own histogram, as before) for ``histogram``."""
    f = srv.cfg.fed
    if f.pool_quota == "histogram":
        return None
    return pool_quotas(np.asarray(srv.stats["counts"]), int(round(f.regen_share * len(pool))), f.pool_quota)


def round_score(srv: Server, method: str, model, u_val, y_val, r: int) -> tuple[float, str]:
    """The score of round ``r`` and its source: ``fed.score_source`` for the methods that decide on it
    (``task.SCORED_METHODS``), the held-out pool slice for the others (a record only, free)."""
    f = srv.cfg.fed
    source = f.score_source if method in task.SCORED_METHODS else "pool"
    if source == "pool":
        return pool_score(model, u_val, y_val, srv.loss_fn, srv.seed), source
    if source == "public":
        return pool_score(model, *srv.public_score_data, srv.loss_fn, srv.seed), source
    return client_score(srv, method, model, r), source


def client_score(srv: Server, method: str, model, r: int) -> float:
    """Σ_k loss sum_k / Σ_k n_k over the clients that answered (n_k: each client's example count, declared
    public); the release is counted before the messages go out."""
    srv.count_score_send(method, r)
    config = srv.config("score", **scaler_config(srv.stats["scaler"]), **{"server-round": r, "method": method})
    replies = srv.broadcast("score", task.to_wire(model.state_dict()), config, f"score/{method}", r)
    if not replies:
        raise RuntimeError(f"{method} round {r}: no client answered the score query")
    if len(replies) < len(srv.nodes):
        log.warning("%s round %s: %s of %s clients scored", method, r, len(replies), len(srv.nodes))
    m = [x.content["metrics"] for x in replies]
    return float(sum(float(x["loss-sum"]) for x in m) / max(1, sum(int(x["num-examples"]) for x in m)))


def _save(path: Path, model, pool: AuxPool | None, st: dict) -> None:
    save_state(path, {"model": model.state_dict(), "pool": pool.state() if pool is not None else {}, "state": st})


# ---------------------------------------------------------------- phase 6: evaluation (server test set, reporting only)


@dataclass(frozen=True)
class EvalData:
    """The encoded features every row is scored on: the test set (the report's numbers; no choice looks at it)
    and the balanced validation split (``data.val_per_class`` per class, held out of the training pool before
    the long-tailed subset is drawn, never on any client): LA's τ, CReFF's round and the report's pick of a
    pfdiff variant are made on it. ``z_val`` is None without a validation split."""
    z_test: torch.Tensor
    y_test: torch.Tensor
    z_val: torch.Tensor | None
    y_val: torch.Tensor | None


def eval_features(srv: Server, enc_clf: torch.nn.ModuleDict) -> EvalData:
    encoder, test, val = enc_clf["encoder"], srv.split.test, srv.split.val
    return EvalData(encode(encoder, srv.tensor(test.x)), srv.tensor(test.y),
                    None if val is None else encode(encoder, srv.tensor(val.x)),
                    None if val is None else srv.tensor(val.y))


def accuracy(srv: Server, classifier: torch.nn.Module, ev: EvalData, counts: np.ndarray | None = None) -> dict:
    """Test metrics of G, with "validation": the same metrics on the validation split (None without one). With
    ``counts``, post-hoc logit adjustment by the prior of ``counts``; its τ (``"tau"``) chosen on the validation
    split from ``la_tau_grid`` as the centralised runs choose it (``choose_tau``), ``logit_adjust_tau``
    without a validation split."""
    classifier.eval()
    with torch.no_grad():
        logits, val_logits = classifier(ev.z_test), None if ev.z_val is None else classifier(ev.z_val)
    tau = None
    if counts is not None:
        tau = srv.cfg.logit_adjust_tau if val_logits is None else choose_tau(
            val_logits, counts, ev.y_val.cpu().numpy(), srv.cfg.la_tau_grid, srv.C, srv.split.groups)[0]
        logits = logit_adjusted(logits, counts, tau)
        val_logits = None if val_logits is None else logit_adjusted(val_logits, counts, tau)
    out = _metrics(srv, logits, ev.y_test)
    out["validation"] = None if val_logits is None else _metrics(srv, val_logits, ev.y_val)
    if counts is not None:
        out["tau"] = tau
    return out


def _metrics(srv: Server, logits: torch.Tensor, y: torch.Tensor) -> dict:
    out = recognition_metrics(logits.argmax(1).cpu().numpy(), y.cpu().numpy(), srv.C, srv.split.groups)
    out.pop("per_class")
    return out


def validation_balanced(srv: Server, classifier: torch.nn.Module, ev: EvalData) -> float:
    """G's balanced accuracy on the validation split only (for choices made during training: CReFF's round)."""
    classifier.eval()
    with torch.no_grad():
        return _metrics(srv, classifier(ev.z_val), ev.y_val)["balanced"]


def evaluate_method(srv: Server, out: dict, enc_clf, scaler: FeatureScaler, ev: EvalData, pool_scorer,
                    ref: "CoverageReference | None" = None) -> dict[str, Any]:
    """FD of generated to real test features, and the long-tail repair: G re-trained on class-balanced
    pseudo-features (AID-filtered when a pool scorer exists) sampled by the server; with ``ref``, the coverage
    of held-out features by the pseudo-features G is re-trained on."""
    model, cfg = task.sampling_view(out["model"].eval(), srv.cfg), srv.cfg
    per_test = np.bincount(ev.y_test.cpu().numpy(), minlength=srv.C)
    u, _ = sample_features(model, srv.loss_fn.schedule, per_test, cfg.diffusion, srv.seed, srv.device,
                           tag="fed-eval-fd")
    fd = frechet_distance(scaler.inverse(u).cpu().numpy(), ev.z_test.cpu().numpy())
    per_class = np.full(srv.C, cfg.fed.repair_per_class)
    u, y = sample_features(model, srv.loss_fn.schedule, per_class, cfg.diffusion, srv.seed, srv.device,
                           tag="fed-repair")
    kept, filter_info = len(y), None
    if pool_scorer is not None:  # the same AID filter and per-class bookkeeping as the centralised E2E runs
        res = aid_filter(pool_scorer, u, y, srv.C, cfg.e2e.aid_quantile)
        used = all(k > 0 for k in res.kept_per_class)
        if used:
            u, y = u[res.keep], y[res.keep]
        # a class left without any pseudo-feature would be repaired by nothing: then the unfiltered set is used,
        # and the report says so (never silently)
        filter_info = {**res.summary(), "used": used}
        kept = len(y)
    g = train_classifier_on_features(copy.deepcopy(enc_clf["classifier"]), scaler.inverse(u), y,
                                     epochs=cfg.fed.repair_epochs, batch_size=cfg.stage1.batch_size,
                                     lr=cfg.pseudo.finetune_lr, weight_decay=cfg.stage1.weight_decay,
                                     seed=srv.seed, description=f"long-tail repair G ({out['name']})")
    st, comp = out["state"], out["compute"]
    f = cfg.fed
    rounds_run = st["round"]  # a FedDDPM+ stop ends the loop in the round it stopped
    return {"fd": fd, "repair": accuracy(srv, g, ev), "repair_pseudo_kept": kept,
            "repair_filter": filter_info, "coverage": None if ref is None else ref.coverage(scaler.inverse(u), y),
            "rounds": rounds_run, "rounds_saved": f.rounds - rounds_run,
            # each client's rounds sent (client_rounds); a round re-sent after a resume counts its steps again
            "client_steps": f.local_steps * sum(st["client_rounds"].values()),
            "server_steps": comp.steps, "server_generated": comp.generated, "server_seconds": comp.seconds,
            "final_score": next((h.get("score_after_one_shot", h.get("score")) for h in
                                 reversed(list(st["history"].values())) if "score" in h), None),
            "bytes": int(sum(h["bytes"] for h in st["history"].values())),
            # the clients' uploads of the method's rounds (None for a checkpoint from before it was recorded)
            "upload_bytes": (int(sum(h["upload_bytes"] for h in st["history"].values()))
                             if all("upload_bytes" in h for h in st["history"].values()) else None),
            "history": st["history"]}


# ---------------------------------------------------------------- privacy


# What the runner computes from the true data for the researcher's report: not messages of the protocol.
EVALUATION_ONLY = ["test-set metrics (FD, accuracies)",
                   "validation-split metrics and the choices made on them (LA's τ, CReFF's round, the report's pick "
                   "of a variant): the validation split is the researcher's, held out of the training pool, on no client",
                   "per-client class histograms",
                   "FD of the clients' real features to the test set",
                   "coverage of held-out features (its train-recall reference reads the clients' real features)"]


def privacy_report(srv: Server, stats: dict, results: dict[str, Any]) -> dict[str, Any]:
    """Each client's example-level ε per method (dp = example), or the client-level ε (dp = client)."""
    out = _privacy_claim(srv, stats, results)
    out["evaluation_only_no_guarantee"] = EVALUATION_ONLY
    return out


def _privacy_claim(srv: Server, stats: dict, results: dict[str, Any]) -> dict[str, Any]:
    cfg, f = srv.cfg, srv.cfg.fed
    p = cfg.privacy
    if f.dp == "none":
        scores = (" — including the clients' loss sums of fed.score_source = clients, a declared non-private "
                  "release" if f.score_source == "clients" else "")
        return {"mode": "none", "claim": "no differential privacy: every release (models, pseudo-features, "
                f"counts, feature sums, CReFF's per-class gradients) is computed from private data without a "
                f"guarantee{scores}"}
    if f.dp == "client":
        out = {}
        for m, res in results.items():
            started = res["rounds_started"]
            ev = [GaussianEvent(f.client_noise_multiplier, 1.0, started, "client-level FedAvg")]
            out[m] = {"client_level_epsilon": epsilon(ev, p.delta, p.accountant), "rounds": started}
        return {"mode": "client", "delta": p.delta, "methods": out,
                "declared_public": ["encoder, G and scaler (public part)",
                                   "each client's class counts (released exactly at the statistics phase)"]}
    sends = srv.sends()
    per_method = {}
    for m, res in results.items():
        if m == "creff":
            per_method[m] = _creff_epsilons(srv, stats, res, sends)
            continue
        # FedAvg has no pool, but in a run with a warm-up its repair pseudo-features are AID-filtered by the
        # warm-up pool's scorer, so its released G depends on the warm-up release as well
        uses_warmup = res.get("uses_warmup", m in AUX_METHODS)
        eps = {}
        for pid, n in sorted(stats["n_per_client"].items()):
            plan = task.client_dp_plan(cfg, n)
            rounds = _client_rounds(res, pid)
            events, steps, phase1 = _client_events(plan, rounds, uses_warmup, sends, res.get("score_sends", 0))
            eps[str(pid)] = {"epsilon": epsilon(events, p.delta, p.accountant),
                             "sigma": plan.sigma, "sample_rate": plan.sample_rate, "steps": steps,
                             "phase1_steps": phase1, "rounds": rounds, "score_releases": res.get("score_sends", 0),
                             "score_sigma": plan.score_sigma}
        per_method[m] = eps
    return {"mode": "example", "target_epsilon": p.target_epsilon, "delta": p.delta, "accountant": p.accountant,
            "neighbouring_relation": "add/remove one example of a client (Poisson subsampling)",
            "noise": task.client_noise(cfg, 0).label, "private": not p.reproducible_noise,
            "methods": per_method, "composed_over_methods": _composed_over_methods(srv, stats, results),
            "participation": PARTICIPATION if srv.sampling else None,
            # how often each private phase was executed (a resume re-sends the statistics phase, an interrupted
            # round or warm-up): every execution is a release with fresh noise, already in the ε above
            "private_sends": srv.sends(),
            "mechanism": p.mechanism,
            "covered": ["local DP-SGD steps (warm-up and rounds)",
                        *(["noisy class counts (also fedavg-ce+la's prior)"] if p.count_epsilon > 0 else []),
                        "pseudo-features and models derived from them (post-processing)"]
            + (["the warm-up pool's AID scorer, which filters the repair pseudo-features of every method listed "
                "(post-processing of the warm-up: the warm-up is in each such method's ε, FedAvg's included)"]
               if any(res.get("uses_warmup") and m not in AUX_METHODS for m, res in results.items()) else [])
            + (["dp-promise Phase-I steps (DP-SGD on t ≥ S, same σ)"] if p.mechanism == "dp-promise" else [])
            + ([f"CReFF's per-class gradient sums (clipped to {f.creff_clip:g} per example, Gaussian σ = "
                f"{task.creff_sigma(cfg):.3f}; the federated features and the re-trained G are post-processing)"]
               if "creff" in results else [])
            + ([f"client scores (loss sums clipped to [0, {f.score_clip:g}], Gaussian noise, one per round of "
                f"{'/'.join(task.SCORED_METHODS)})"] if f.score_source == "clients" else []),
            "declared_public": ["each client's number of examples", "encoder, G and scaler (public part)"]
            + (["each client's class counts (privacy.count_epsilon = 0: sent exactly)"] if p.count_epsilon == 0
               else [])}


def _creff_epsilons(srv: Server, stats: dict, res: dict[str, Any], sends: dict[str, int]) -> dict[str, dict]:
    """Each client's ε for CReFF: its noisy counts and one release of its per-class gradient sums per round
    it was sent (``_client_rounds``)."""
    cfg, out = srv.cfg, {}
    for pid in sorted(stats["n_per_client"]):
        rounds = _client_rounds(res, pid)
        events = task.creff_events(cfg, rounds, max(1, sends.get("stats", 1)))
        out[str(pid)] = {"epsilon": epsilon(events, cfg.privacy.delta, cfg.privacy.accountant),
                         "sigma": task.creff_sigma(cfg), "sample_rate": 1.0, "steps": rounds, "phase1_steps": 0}
    return out


# under client sampling (fed.clients_per_round): what each client's ε counts
PARTICIPATION = ("each client's ε counts only the rounds it was sent (clients sampled per round from public "
                 "randomness seeded by the run seed, the phase and the round: data-independent, so no privacy "
                 "amplification by sampling is claimed); its σ is calibrated for every planned round, so a client "
                 "sent fewer rounds spends less than the target")


def _client_rounds(res: dict[str, Any], pid: int) -> int:
    """Rounds a client was sent (write-ahead, ``Server.count_rounds``); every round started for old results."""
    rounds = res.get("client_rounds")
    if rounds is None:
        return int(res["rounds_started"])
    return int(rounds.get(str(pid), 0))  # a client never drawn was sent nothing


def _client_events(plan: task.ClientDPPlan, rounds: int, warmup: bool, sends: dict[str, int], scores: int = 0
                   ) -> tuple[list[GaussianEvent], int, int]:
    """A client's events for ``rounds`` executed rounds (+ the warm-up, ``sends["warmup"]`` times if it ran
    more than once), its noisy counts (``sends["stats"]`` releases) and ``scores`` client-score releases; also
    the DP-SGD and Phase-I steps."""
    w = max(1, sends.get("warmup", 1)) if warmup else 0
    steps = w * plan.warmup_steps + rounds * plan.local_steps
    p1 = w * plan.phase1_steps_for(plan.warmup_steps) + rounds * plan.phase1_steps_for(plan.local_steps)
    events = plan.events(steps, p1, scores=scores) + plan.events(0, 0) * (max(1, sends.get("stats", 1)) - 1)
    return events, steps, p1


def _composed_over_methods(srv: Server, stats: dict, results: dict[str, Any]) -> dict[str, float]:
    """Each client's ε for releasing every method's models together: all methods train on the same client
    data with independent noise, so their steps compose (counts and the shared warm-up once)."""
    cfg, out = srv.cfg, {}
    warm = any(m in AUX_METHODS for m in results)
    scores = sum(res.get("score_sends", 0) for res in results.values())  # every client is queried: all alike
    for pid, n in sorted(stats["n_per_client"].items()):
        rounds = sum(_client_rounds(res, pid) for m, res in results.items() if m != "creff")
        events, _, _ = _client_events(task.client_dp_plan(cfg, n), rounds, warm, srv.sends(), scores)
        if "creff" in results:  # its gradient releases (the counts are already in the events above)
            events = events + task.creff_events(cfg, _client_rounds(results["creff"], pid), 0)
        out[str(pid)] = epsilon(events, cfg.privacy.delta, cfg.privacy.accountant)
    return out


# ---------------------------------------------------------------- the whole run


def skipped_baselines(cfg: RunConfig) -> dict[str, str]:
    """The baselines this configuration does not run, each with the reason (for the report)."""
    if cfg.fed.dp != "none":
        return {"fedavg-reweight": f"not run under fed.dp = {cfg.fed.dp}: its FedAvg of G on private features "
                                   "has no DP guarantee"}
    if cfg.fed.reweight_rounds == 0:
        return {"fedavg-reweight": "fed.reweight_rounds = 0: no re-weighting round, its G would be fedavg-ce's"}
    return {}


def la_prior(cfg: RunConfig) -> dict[str, Any]:
    """Where ``fedavg-ce+la``'s prior (the statistics phase's class counts, summed over clients) comes from, and
    what it costs: the provenance stated in results.json and the report."""
    f, p = cfg.fed, cfg.privacy
    if f.dp == "example" and p.count_epsilon > 0:
        return {"source": "noisy class counts of the statistics phase", "private": True,
                "privacy": f"Gaussian noise per client (privacy.count_epsilon = {p.count_epsilon:g}), accounted in "
                           "each client's ε as the event 'noisy counts'"}
    why = {"none": "fed.dp = none: a declared non-private release",
           "client": "fed.dp = client: declared public (not covered by the client-level noise)",
           "example": "privacy.count_epsilon = 0: declared public"}[f.dp]
    return {"source": "exact class counts of the statistics phase", "private": False, "privacy": why}


def run_server(grid: Grid, cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    check_plan(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    srv = Server(grid, cfg, run_dir)
    t0 = time.perf_counter()
    enc_clf = phase_encoder(srv)
    stats = srv.stats = phase_stats(srv, enc_clf)
    ev = eval_features(srv, enc_clf)
    z_train, y_train = client_features(srv, enc_clf)
    ref = CoverageReference(srv, enc_clf, z_train, y_train)
    baselines = {"fedavg-ce": accuracy(srv, enc_clf["classifier"], ev),
                 "fedavg-ce+la": accuracy(srv, enc_clf["classifier"], ev, stats["counts"])}
    skipped = {**skipped_baselines(cfg), **creff.skip_reasons(cfg)}
    if "fedavg-reweight" not in skipped:
        rw = phase_reweight(srv, enc_clf, stats["counts"])
        baselines["fedavg-reweight"] = accuracy(srv, rw, ev)
    privacy_in = {}
    if "creff" not in skipped:
        select = cfg.fed.creff_round == "validation" and ev.z_val is not None
        out = creff.run_creff(srv, enc_clf, (lambda clf: validation_balanced(srv, clf, ev)) if select else None)
        baselines["creff"] = creff.summary(out, accuracy(srv, out["classifier"], ev))
        baselines["creff"]["coverage"] = ref.coverage(*creff.labelled(out["features"]))
        privacy_in["creff"] = {"rounds_started": out["state"]["rounds_started"],
                               "client_rounds": out["state"]["client_rounds"]}
    warm = phase_warmup(srv, stats) if any(m in AUX_METHODS for m in cfg.fed.methods) else None
    if cfg.fed.score_source == "public":
        srv.public_score_data = public_score_data(srv, enc_clf, stats["scaler"])
    methods = {}
    for m in cfg.fed.methods:
        out = run_method(srv, m, stats, warm)
        out["name"] = m
        scorer = out["scorer"] or (MahalanobisScorer(warm["u"], warm["y"], srv.C) if warm else None)
        methods[m] = evaluate_method(srv, out, enc_clf, stats["scaler"], ev, scorer, ref)
        # the warm-up is part of this method's release when its pool or its repair's AID filter came from it
        privacy_in[m] = {"rounds_started": out["state"]["rounds_started"], "client_rounds": out["state"]["client_rounds"],
                         "score_sends": srv.sends().get(f"score/{m}", 0),
                         "uses_warmup": m in AUX_METHODS or scorer is not None}
    results = {
        "alpha": cfg.fed.alpha, "num_clients": len(srv.nodes), "baselines": baselines, "methods": methods,
        "skipped_baselines": skipped, "la_prior": la_prior(cfg),
        "warmup": warmup_summary(warm, cfg) if warm else None,
        "bytes": srv.wire.totals(), "failures": srv.wire.failures,
        "privacy": privacy_report(srv, stats, privacy_in), "seconds": time.perf_counter() - t0,
        "counts": stats["counts"].tolist(), "groups": srv.split.groups.as_dict(),
        "fd_reference": fd_references(srv, stats["scaler"], warm, ev.z_test, z_train),
        # true per-client histograms, computed by the runner for the report only (never sent to the server)
        "client_histograms": task.client_histograms(cfg, len(srv.nodes)).tolist(),
    }
    atomic_write_json(run_dir / "results.json", results)
    return results


def public_score_data(srv: Server, enc_clf, scaler: FeatureScaler) -> tuple[torch.Tensor, torch.Tensor]:
    """The declared public part's standardised features and labels (``fed.score_source = public``: free)."""
    pub, _ = task.public_private_indices(srv.cfg)
    z = encode(enc_clf["encoder"], srv.tensor(srv.split.train.x[pub]))
    return scaler.transform(z), srv.tensor(srv.split.train.y[pub]).long()


def client_features(srv: Server, enc_clf) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation only: the global encoder's features of the clients' (private) training examples, and labels."""
    _, priv = task.public_private_indices(srv.cfg)
    return encode(enc_clf["encoder"], srv.tensor(srv.split.train.x[priv])), srv.tensor(srv.split.train.y[priv]).long()


# held-out examples per class in the coverage reference: the tail classes' left-out pool is large (IF 100), and
# the k-NN radii of the reference take a [n, n] distance matrix per class
COVERAGE_MAX_PER_CLASS = 1000


class CoverageReference:
    """Evaluation only (:data:`EVALUATION_ONLY`): per class, the global encoder's features of held-out examples
    — the training pool's examples the long-tailed subsampling left out (``split.heldout``: never on any client;
    at most :data:`COVERAGE_MAX_PER_CLASS` per class, a fixed draw), or the validation set without it — and the
    clients' real training features, whose recall of the held-out ones is what copying them would give
    (:func:`pfdiff.evaluation.coverage.class_coverage`)."""

    def __init__(self, srv: Server, enc_clf, z_train: torch.Tensor, y_train: torch.Tensor):
        held = srv.split.heldout if srv.split.heldout is not None else srv.split.val
        self.source = "held-out pool" if srv.split.heldout is not None else "validation set"
        self.C, self.k, self.z_train, self.y_train = srv.C, srv.cfg.e2e.coverage_k, z_train, y_train
        if held is None:
            self.z = None
            return
        y = np.asarray(held.y)
        rng = np.random.default_rng(srv.cfg.data.split_seed)  # public: the held-out examples are not private
        idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:COVERAGE_MAX_PER_CLASS]
                              for c in range(srv.C)]).astype(np.int64)
        self.z, self.y = encode(enc_clf["encoder"], srv.tensor(held.x[idx])), torch.as_tensor(y[idx])

    def coverage(self, z_fake: torch.Tensor, y_fake: torch.Tensor) -> dict[str, Any] | None:
        """Per-class precision / recall of ``z_fake`` (raw feature space) against the held-out features."""
        if self.z is None:
            return None
        out = class_coverage(self.z, self.y.to(self.z.device), z_fake.to(self.z.device), y_fake.to(self.z.device),
                             self.z_train, self.y_train.to(self.z.device), self.C, self.k)
        return {**out, "reference": self.source, "reference_per_class": torch.bincount(
            self.y.long(), minlength=self.C).tolist()}


def fd_references(srv: Server, scaler: FeatureScaler, warm: dict | None, z_test, z_train) -> dict[str, float]:
    """Reference points for the FD column (evaluation only): the clients' real features and the warm-up pool."""
    out = {"real_train": frechet_distance(z_train.cpu().numpy(), z_test.cpu().numpy())}
    if warm is not None:
        out["warmup_pool"] = frechet_distance(scaler.inverse(warm["u"]).cpu().numpy(), z_test.cpu().numpy())
    return out


def warmup_summary(warm: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Upload a denoiser or N pseudo-features? Measured serialised bytes and the crossover N."""
    fb = warm["feature_bytes"]
    model_bytes = int(warm["model_bytes"])
    crossover = (model_bytes - fb["fixed"]) / fb["per_feature"]
    return {"upload": cfg.fed.warmup_upload, "model_bytes": model_bytes, "bytes_per_feature": fb["per_feature"],
            "crossover_n": int(np.ceil(crossover)), "upload_bytes_per_client": [int(b) for b in warm["upload_bytes"]],
            "pool_size": int(len(warm["y"])), "val_size": int(warm["n_val"]), "pool_quota": cfg.fed.pool_quota,
            "quotas": [int(q) for q in warm["quotas"]] if "quotas" in warm else None,
            "pool_per_class": _per_class(warm["y"], warm.get("quotas")),
            "val_per_class": _per_class(warm["y"][:int(warm["n_val"])], warm.get("quotas"))}


def _per_class(y: torch.Tensor, quotas) -> list[int]:
    return torch.bincount(y.cpu().long(), minlength=0 if quotas is None else len(quotas)).tolist()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Template entry point: settings from ``context.run_config`` over :data:`DEFAULTS`."""
    cfg, run_dir = config_from_run_config(dict(context.run_config))
    run_server(grid, cfg, run_dir)
