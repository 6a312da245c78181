"""ClientApp (Flower Message API): local diffusion training and held-out evaluation of the feature denoiser.

Each SuperNode reads its ``partition-id`` / ``num-partitions`` from ``context.node_config`` (set by the
simulation runtime, or ``--node-config`` on a real SuperNode). Everything else the client needs (data
split settings, local steps, learning rate) arrives in the message's ``ConfigRecord`` under ``"config"``,
so the app needs no out-of-band state.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from pfdiff.federated.task import build_model, evaluate_local, load_client_data, train_local  # noqa: E402

app = ClientApp()


def _setup(msg: Message, context: Context):
    cfg = msg.content["config"]
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    alpha = float(cfg["alpha"]) if float(cfg.get("alpha", 0.0)) > 0 else None  # 0 ⇒ IID
    seed = int(cfg.get("seed", 0))
    model = build_model(seed, int(cfg.get("hidden", 64)), int(cfg.get("depth", 2)))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_client_data(partition_id, num_partitions, alpha, seed)
    return cfg, partition_id, seed, model, data


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global denoiser, run a few local AdamW steps of the diffusion loss, send it back."""
    cfg, pid, seed, model, data = _setup(msg, context)
    loss = train_local(model, data.x_train, data.y_train, steps=int(cfg.get("local-steps", 20)),
                       lr=float(cfg.get("lr", 1e-3)), batch_size=int(cfg.get("batch-size", 64)), seed=seed,
                       server_round=int(cfg.get("server-round", 0)), partition_id=pid)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(data.y_train)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Mean diffusion loss of the global denoiser on this client's held-out features."""
    _, pid, seed, model, data = _setup(msg, context)
    loss = evaluate_local(model, data.x_test, data.y_test, seed=seed, partition_id=pid)
    content = RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(data.y_test)})})
    return Message(content=content, reply_to=msg)
