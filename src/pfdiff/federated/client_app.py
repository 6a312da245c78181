"""ClientApp (Flower Message API): every client-side phase of federated feature diffusion.

A SuperNode reads its ``partition-id`` / ``num-partitions`` from ``context.node_config`` (set by the
simulation runtime, or ``--node-config`` on a real SuperNode). The message's ``ConfigRecord``
``"config"`` carries the run's ``RunConfig`` (YAML, key ``"run-config"``), the ``"phase"`` and what the
phase needs (round, scaler, class weights); ``"arrays"`` carries the model of the phase:

- ``encoder``: E + G, local cross-entropy steps (FedAvg);
- ``stats``: E + G; encodes the local data once, keeps the features in ``context.state`` and returns
  the class counts (noisy under example-level DP) and, without DP, the feature sums for the scaler;
- ``reweight``: G, class-weighted cross-entropy on the cached features (the re-weighting baseline);
- ``warmup``: the initial denoiser; trains the client's own denoiser, then uploads it or N
  pseudo-features sampled from it (``fed.warmup_upload``);
- ``diffusion``: the global denoiser, local diffusion steps (DP-SGD under example-level DP).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from pfdiff.config import RunConfig  # noqa: E402
from pfdiff.federated import task  # noqa: E402
from pfdiff.diffusion import make_schedule  # noqa: E402
from pfdiff.longtail.common import encode  # noqa: E402
from pfdiff.longtail.ldmlr import sample_features  # noqa: E402

app = ClientApp()


class InjectedFault(RuntimeError):
    """Raised by a client listed in ``fed.fail_partitions`` (fault-tolerance tests)."""


def _cached_features(context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The features this client encoded in the 'stats' phase (kept in its Flower ``context.state``)."""
    if "features" not in context.state:
        raise RuntimeError("this client has no cached features: the server must run the 'stats' phase first")
    rec = context.state["features"]
    return task.array_tensor(rec["z"]), task.array_tensor(rec["y"])


def _scaled_features(cfg_rec, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    z, y = _cached_features(context)
    mean, std = torch.tensor(list(cfg_rec["scaler-mean"])), torch.tensor(list(cfg_rec["scaler-std"]))
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


def _counts(cfg: RunConfig, y: torch.Tensor, pid: int) -> np.ndarray:
    sigma = task.client_dp_plan(cfg, len(y)).count_sigma if cfg.fed.dp == "example" else None
    return task.noisy_label_counts(y, task.split_of(cfg).num_classes, sigma, task.client_noise(cfg, pid))


def _reply(msg: Message, arrays: ArrayRecord | None, pid: int, **metrics) -> Message:
    content = RecordDict({"metrics": MetricRecord({"partition-id": pid, **metrics})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg_rec = msg.content["config"]
    cfg = task.config_from_text(str(cfg_rec["run-config"]))
    pid, nparts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    phase, rnd, f = str(cfg_rec["phase"]), int(cfg_rec.get("server-round", 0)), cfg.fed
    if pid in f.fail_partitions and phase == "diffusion":
        raise InjectedFault(f"client {pid}: injected fault in round {rnd}")
    arrays = msg.content["arrays"]
    data = task.load_client_data(cfg, pid, nparts)
    n = len(data.y)
    seed = cfg.seeds[0]

    if phase == "encoder":
        model = task.load_arrays(task.build_encoder_classifier(cfg), arrays.to_torch_state_dict())
        loss = task.train_encoder_local(model, data.x, data.y, f.encoder_local_steps, f.local_lr,
                                        f.local_batch_size, seed, (rnd, pid))
        return _reply(msg, ArrayRecord(model.state_dict()), pid, **{"num-examples": n, "train_loss": loss})

    if phase == "stats":
        model = task.load_arrays(task.build_encoder_classifier(cfg), arrays.to_torch_state_dict())
        z = encode(model["encoder"], data.x)
        context.state["features"] = ArrayRecord({"z": z.contiguous(), "y": data.y.contiguous()})
        metrics = {"num-examples": n, "counts": _counts(cfg, data.y, pid).tolist()}
        if f.dp == "none":  # feature sums for the scaler: released only when the run makes no DP claim
            metrics.update({"sum": z.sum(0).double().tolist(), "sumsq": (z.double() ** 2).sum(0).tolist()})
        return _reply(msg, None, pid, **metrics)

    if phase == "reweight":
        z, y = _cached_features(context)
        clf = task.build_encoder_classifier(cfg)["classifier"]
        clf = task.load_arrays(clf, arrays.to_torch_state_dict())
        weights = torch.tensor(list(cfg_rec["class-weights"]), dtype=torch.float32)
        loss = task.train_classifier_local(clf, z, y, weights, f.encoder_local_steps, f.local_lr,
                                           f.local_batch_size, seed, (rnd, pid))
        return _reply(msg, ArrayRecord(clf.state_dict()), pid, **{"num-examples": n, "train_loss": loss})

    u, y = _scaled_features(cfg_rec, context)
    if phase == "warmup":
        model, _ = _local_denoiser(cfg, arrays, u, y, phase, 0, pid)
        counts = _counts(cfg, y, pid)
        if f.warmup_upload == "model":
            return _reply(msg, ArrayRecord(model.state_dict()), pid, **{"num-examples": n, "counts": counts.tolist()})
        n_samples = int(round(f.aux_size * counts.sum() / max(1, int(cfg_rec["n-total"]))))
        per_class = np.round(counts / max(1, counts.sum()) * n_samples).astype(int)
        u_hat, y_hat = sample_features(task.sampling_view(model.eval(), cfg), make_schedule(cfg.diffusion.schedule, cfg.diffusion.T), per_class,
                                       cfg.diffusion, seed, torch.device("cpu"), tag=f"fed-warmup-{pid}")
        return _reply(msg, ArrayRecord({"u": u_hat.contiguous(), "y": y_hat.contiguous()}), pid, **{"num-examples": n})

    if phase == "diffusion":
        model, loss = _local_denoiser(cfg, arrays, u, y, phase, rnd, pid)
        # client-level DP: equal weights, so one client moves the average by at most clip/m (the wrapper's σ·clip/m)
        weight = 1 if f.dp == "client" else n
        metrics = {"num-examples": weight, "train_loss": loss} if f.dp == "none" else {"num-examples": weight}
        return _reply(msg, ArrayRecord(model.state_dict()), pid, **metrics)

    raise ValueError(f"unknown phase {phase!r}")
