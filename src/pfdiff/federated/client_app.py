"""ClientApp (Flower Message API): every client-side phase of federated feature diffusion.

A SuperNode reads its ``partition-id`` / ``num-partitions`` from ``context.node_config`` (set by the
simulation runtime, or ``--node-config`` on a real SuperNode). Flower routes each message by its type
(``wire.MESSAGE_TYPES``) to one handler below; its ``ConfigRecord`` ``"config"`` carries the run's
``RunConfig`` (YAML, key ``"run-config"``), the ``"phase"`` (the action's name, for the record) and what
the phase needs (round, scaler, class weights); ``"arrays"`` carries the model of the phase:

- ``query.partition``: nothing but the node's partition id (sent once when clients are sampled per round);
- ``train.encoder``: E + G, local cross-entropy steps (FedAvg);
- ``query.stats``: E + G; encodes the local data once, keeps the features in ``context.state`` and
  returns the class counts (noisy under example-level DP) and, without DP, the feature sums for the scaler;
- ``train.reweight``: G, class-weighted cross-entropy on the cached features (the re-weighting baseline);
- ``train.warmup``: the initial denoiser; trains the client's own denoiser, then uploads it or N
  pseudo-features sampled from it (``fed.warmup_upload``);
- ``train.diffusion``: the global denoiser, local diffusion steps (DP-SGD under example-level DP);
- ``train.creff``: G (``g.*``) and CReFF's re-trained classifier (``phi.*``); returns the per-class sums of the
  classifier's CE gradient at φ on the cached features (``grad.*``; clipped per example and noised under
  example-level DP) with the counts of the statistics phase and, without DP, G after local CE steps (FedAvg).
- ``query.score``: the (corrected) global denoiser; returns the sum of its per-example diffusion losses on the
  cached features at fixed draws, and the number of examples (``fed.score_source = clients``; clipped and
  noised under example-level DP).

Models, local data, cached features and sampling live on ``task.device_of(cfg)`` (``cfg.device``: CUDA
when this process sees a GPU, else CPU); replies are built with ``task.to_wire`` (CPU arrays).
"""

from __future__ import annotations

import os
from functools import cached_property

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from pfdiff.config import RunConfig  # noqa: E402
from pfdiff.federated import task  # noqa: E402
from pfdiff.federated.aux_pool import client_share  # noqa: E402
from pfdiff.longtail.common import encode  # noqa: E402
from pfdiff.longtail.ldmlr import sample_features  # noqa: E402

app = ClientApp()


class InjectedFault(RuntimeError):
    """Raised by a client listed in ``fed.fail_partitions`` (fault-tolerance tests)."""


def _cached_features(context: Context, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The features this client encoded in the 'stats' phase (kept, as CPU arrays, in its Flower
    ``context.state``), on ``device``."""
    if "features" not in context.state:
        raise RuntimeError("this client has no cached features: the server must run the 'stats' phase first")
    rec = context.state["features"]
    return task.array_tensor(rec["z"], device), task.array_tensor(rec["y"], device)


def _scaled_features(cfg_rec, context: Context, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    z, y = _cached_features(context, device)
    mean = torch.tensor(list(cfg_rec["scaler-mean"]), device=device)
    std = torch.tensor(list(cfg_rec["scaler-std"]), device=device)
    return (z - mean) / std, y


def _local_denoiser(cfg: RunConfig, arrays: ArrayRecord, u, y, phase: str, rnd: int, pid: int):
    """Train the received denoiser for the warm-up (``rnd`` 0) or one round's local steps; under DP these
    are the steps of the client's plan at their global indices (``ClientDPPlan.spent``)."""
    f = cfg.fed
    steps = f.warmup_steps if rnd == 0 else f.local_steps
    model = task.load_arrays(task.build_global_denoiser(cfg), arrays.to_torch_state_dict())
    loss_fn = task.make_loss(cfg, task.split_of(cfg).num_classes)
    seed = cfg.seeds[0]
    if f.dp == "example":
        plan = task.client_dp_plan(cfg, len(y))
        first, first_p1 = (0, 0) if rnd == 0 else plan.spent(rnd - 1)
        loss = task.train_denoiser_local_dp(model, u, y, loss_fn, plan, cfg, first, steps, seed, pid, first_p1)
    else:
        loss = task.train_denoiser_local(model, u, y, loss_fn, steps, f.local_lr, f.local_batch_size, seed,
                                         (phase, rnd, pid))
    return model, loss


def _released_counts(context: Context) -> np.ndarray:
    """The class counts this client released in the 'stats' phase (noisy under DP), kept in its
    ``context.state``: later phases reuse them, so they are released once (post-processing after that)."""
    if "released-counts" not in context.state:
        raise RuntimeError("this client has no released counts: the server must run the 'stats' phase first")
    return context.state["released-counts"]["counts"].numpy().astype(np.int64)


def _counts(cfg: RunConfig, y: torch.Tensor, pid: int) -> np.ndarray:
    sigma = task.client_dp_plan(cfg, len(y)).count_sigma if cfg.fed.dp == "example" else None
    return task.noisy_label_counts(y, task.split_of(cfg).num_classes, sigma, task.client_noise(cfg, pid))


class _Request:
    """What every handler reads from a message and its node: config, device, partition, round, arrays,
    local data (loaded on first use, on the device)."""

    def __init__(self, msg: Message, context: Context):
        self.msg = msg
        self.cfg_rec = msg.content["config"]
        self.cfg = task.config_from_text(str(self.cfg_rec["run-config"]))
        self.f, self.seed = self.cfg.fed, self.cfg.seeds[0]
        self.device = task.device_of(self.cfg)
        self.pid, self.nparts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        self.rnd = int(self.cfg_rec.get("server-round", 0))
        self.arrays: ArrayRecord = msg.content["arrays"]

    @cached_property
    def data(self) -> task.ClientData:
        return task.load_client_data(self.cfg, self.pid, self.nparts)

    @property
    def n(self) -> int:
        return len(self.data.y)

    def reply(self, arrays: ArrayRecord | None, **metrics) -> Message:
        content = RecordDict({"metrics": MetricRecord({"partition-id": self.pid, **metrics})})
        if arrays is not None:
            content["arrays"] = arrays
        return Message(content=content, reply_to=self.msg)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """This node's partition id only (the server maps its client sampling, drawn over partitions, to nodes)."""
    pid = int(context.node_config["partition-id"])
    return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


@app.train("encoder")
def encoder(msg: Message, context: Context) -> Message:
    q = _Request(msg, context)
    model = task.load_arrays(task.build_encoder_classifier(q.cfg), q.arrays.to_torch_state_dict())
    loss = task.train_encoder_local(model, q.data.x, q.data.y, q.f.encoder_local_steps, q.f.local_lr,
                                    q.f.local_batch_size, q.seed, (q.rnd, q.pid))
    return q.reply(task.to_wire(model.state_dict()), **{"num-examples": q.n, "train_loss": loss})


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    q = _Request(msg, context)
    model = task.load_arrays(task.build_encoder_classifier(q.cfg), q.arrays.to_torch_state_dict())
    z = encode(model["encoder"], q.data.x)
    context.state["features"] = task.to_wire({"z": z.contiguous(), "y": q.data.y.contiguous()})
    # on a resume the server sends back what this client released before: re-sent, not re-drawn (no new release)
    counts = (np.asarray(list(q.cfg_rec["released-counts"]), dtype=np.int64) if "released-counts" in q.cfg_rec
              else _counts(q.cfg, q.data.y, q.pid))
    context.state["released-counts"] = ArrayRecord({"counts": torch.as_tensor(counts)})
    metrics = {"num-examples": q.n, "counts": counts.tolist()}
    if q.f.dp == "none":  # feature sums for the scaler: released only when the run makes no DP claim
        metrics.update({"sum": z.sum(0).double().tolist(), "sumsq": (z.double() ** 2).sum(0).tolist()})
    return q.reply(None, **metrics)


@app.train("reweight")
def reweight(msg: Message, context: Context) -> Message:
    q = _Request(msg, context)
    z, y = _cached_features(context, q.device)
    clf = task.load_arrays(task.build_encoder_classifier(q.cfg)["classifier"], q.arrays.to_torch_state_dict())
    weights = torch.tensor(list(q.cfg_rec["class-weights"]), dtype=torch.float32, device=q.device)
    loss = task.train_classifier_local(clf, z, y, weights, q.f.encoder_local_steps, q.f.local_lr,
                                       q.f.local_batch_size, q.seed, (q.rnd, q.pid))
    return q.reply(task.to_wire(clf.state_dict()), **{"num-examples": q.n, "train_loss": loss})


@app.train("warmup")
def warmup(msg: Message, context: Context) -> Message:
    q = _Request(msg, context)
    cfg, f = q.cfg, q.f
    u, y = _scaled_features(q.cfg_rec, context, q.device)
    model, _ = _local_denoiser(cfg, q.arrays, u, y, "warmup", 0, q.pid)
    counts = _released_counts(context)  # the stats phase's (noisy) counts: not a second release
    if f.warmup_upload == "model":
        return q.reply(task.to_wire(model.state_dict()), **{"num-examples": q.n, "counts": counts.tolist()})
    if "class-quotas" in q.cfg_rec:  # fed.pool_quota: its share of each class's quota (post-processing)
        per_class = client_share(np.asarray(q.cfg_rec["class-quotas"]), np.asarray(q.cfg_rec["class-counts"]),
                                 counts)
    else:  # histogram: its share of B by its count, split by its class counts
        n_samples = int(round(f.aux_size * counts.sum() / max(1, int(q.cfg_rec["n-total"]))))
        per_class = np.round(counts / max(1, counts.sum()) * n_samples).astype(int)
    u_hat, y_hat = sample_features(task.sampling_view(model.eval(), cfg),
                                   cfg.diffusion.make_schedule(), per_class,
                                   cfg.diffusion, q.seed, q.device, tag=f"fed-warmup-{q.pid}")
    return q.reply(task.to_wire({"u": u_hat.contiguous(), "y": y_hat.contiguous()}), **{"num-examples": q.n})


@app.train("diffusion")
def diffusion(msg: Message, context: Context) -> Message:
    q = _Request(msg, context)
    f = q.f
    if q.pid in f.fail_partitions:
        raise InjectedFault(f"client {q.pid}: injected fault in round {q.rnd}")
    u, y = _scaled_features(q.cfg_rec, context, q.device)
    model, loss = _local_denoiser(q.cfg, q.arrays, u, y, "diffusion", q.rnd, q.pid)
    # client-level DP: equal weights, so one client moves the average by at most clip/m (the wrapper's σ·clip/m)
    weight = 1 if f.dp == "client" else q.n
    metrics = {"num-examples": weight, "train_loss": loss} if f.dp == "none" else {"num-examples": weight}
    return q.reply(task.to_wire(model.state_dict()), **metrics)


@app.train("creff")
def creff(msg: Message, context: Context) -> Message:
    """CReFF's client (Shang et al. 2022): real-feature gradients of the re-trained classifier φ, per class;
    without DP also the local CE steps of G (the FedAvg of the model goes on). Under example-level DP the
    gradient sums are clipped per example and noised (``task.creff_sigma``) and G is not trained: its steps
    would be a release without a guarantee."""
    q = _Request(msg, context)
    z, y = _cached_features(context, q.device)
    num_classes = task.split_of(q.cfg).num_classes
    part = lambda prefix: {k[len(prefix):]: v for k, v in q.arrays.to_torch_state_dict().items()  # noqa: E731
                           if k.startswith(prefix)}
    phi = task.load_arrays(task.build_encoder_classifier(q.cfg)["classifier"], part("phi.")).eval()
    private = q.f.dp == "example"
    sums = task.class_gradient_sums(phi, z, y, num_classes, q.f.creff_clip if private else None)
    if private:
        sums = task.noisy_gradient_sums(sums, task.creff_sigma(q.cfg) * q.f.creff_clip,
                                        task.client_noise(q.cfg, q.pid), q.rnd)
    out = {f"grad.{k}": v for k, v in sums.items()}
    metrics = {"num-examples": q.n, "counts": _released_counts(context).tolist()}
    if not private:
        g = task.load_arrays(task.build_encoder_classifier(q.cfg)["classifier"], part("g."))
        ones = torch.ones(num_classes, device=q.device)
        metrics["train_loss"] = task.train_classifier_local(g, z, y, ones, q.f.encoder_local_steps, q.f.local_lr,
                                                            q.f.local_batch_size, q.seed, ("creff", q.rnd, q.pid))
        out.update({f"g.{k}": v for k, v in g.state_dict().items()})
    return q.reply(task.to_wire(out), **metrics)
@app.query("score")
def score(msg: Message, context: Context) -> Message:
    """The global model's loss sum on this client's features (``task.client_score_sum``) and its example count
    (declared public: sent with every reply)."""
    q = _Request(msg, context)
    u, y = _scaled_features(q.cfg_rec, context, q.device)
    model = task.load_arrays(task.build_global_denoiser(q.cfg), q.arrays.to_torch_state_dict())
    total = task.client_score_sum(model, u, y, q.cfg, q.pid, q.rnd, str(q.cfg_rec["method"]) if "method" in q.cfg_rec else "")
    return q.reply(None, **{"num-examples": len(y), "loss-sum": total})
