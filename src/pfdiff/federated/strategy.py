"""Server strategy: Flower's Message-API ``FedAvg`` (weights = each reply's ``num-examples``) with a history.

The FedDDPM correction, FedDDPM+'s QUICK-TEST and the progressive pool are *not* inside
``aggregate_train``: with client-level DP, Flower's ``DifferentialPrivacyServerSideFixedClipping``
wraps this strategy and adds its noise to what ``aggregate_train`` returns, so anything done there
would come before the noise and break the Gaussian mechanism's sensitivity. The server app runs them
on the (noised) aggregate instead — post-processing (``server_app.run_method``).

Client sampling (``fed.clients_per_round``): FedAvg samples with Python's global ``random`` over the
connected node ids, which differ between runs. Here the clients of round r of a phase are drawn by
:func:`sample_clients` from **public** randomness seeded by (run seed, phase, round) over *partition ids*,
so every method's diffusion round r goes to the same clients (a fair comparison), a resumed run re-sends
to the same clients, and the draw does not depend on any client's data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from pfdiff.config import RunConfig
from pfdiff.training import derive_seed


def sample_clients(num_clients: int, per_round: int | None, seed: int, phase: str, server_round: int) -> list[int]:
    """The partition ids of round ``server_round`` of ``phase``: all of them when ``per_round`` is None or
    ≥ ``num_clients``, else ``per_round`` drawn uniformly without replacement (CReFF's sampling) from a
    generator seeded by (seed, phase, round) — public, so the same in every method, process and resume."""
    if per_round is None or per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, "fed-client-sampling", phase, server_round))
    return sorted(int(p) for p in rng.choice(num_clients, size=per_round, replace=False))


class FedDiffusionAvg(FedAvg):
    """FedAvg that keeps the aggregated train metrics per round; its messages carry ``message_type``
    (``train.<action>``: the ClientApp handler of the phase) instead of FedAvg's plain ``train``, and go to
    ``select(round)`` (node ids) when given, else to every connected client."""

    def __init__(self, num_nodes: int, message_type: str = MessageType.TRAIN,
                 select: Callable[[int], list[int]] | None = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=max(1, num_nodes))
        self.message_type = message_type
        self.select = select
        self.history: dict[int, dict[str, float]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        if self.select is not None:  # FedAvg's configure_train with our node selection instead of random.sample
            config["server-round"] = server_round
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            return list(self._construct_messages(record, list(self.select(server_round)), self.message_type))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for m in messages:  # FedAvg builds plain "train" messages; the setter validates the type
            m.metadata.message_type = self.message_type
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.history[server_round] = {k: float(v) for k, v in metrics.items()
                                          if isinstance(v, (int, float)) and k != "partition-id"}
        return arrays, metrics


def make_strategy(cfg: RunConfig, num_nodes: int, client_dp: bool, message_type: str = MessageType.TRAIN,
                  select: Callable[[int], list[int]] | None = None) -> Strategy:
    """FedAvg sending ``message_type`` to ``select(round)`` (default: every client), wrapped in Flower's
    server-side fixed-clipping DP when ``client_dp`` (client-level DP; ``check_plan`` refuses it with client
    sampling, so its ``num_sampled_clients`` is every client)."""
    strategy = FedDiffusionAvg(num_nodes, message_type, select)
    if not client_dp:
        return strategy
    f = cfg.fed
    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=f.client_noise_multiplier,
                                                      clipping_norm=f.client_clip, num_sampled_clients=num_nodes)
