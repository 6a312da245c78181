"""Server strategy: Flower's Message-API ``FedAvg`` (weights = each reply's ``num-examples``) with a history.

The FedDDPM correction, FedDDPM+'s QUICK-TEST and the progressive pool are *not* inside
``aggregate_train``: with client-level DP, Flower's ``DifferentialPrivacyServerSideFixedClipping``
wraps this strategy and adds its noise to what ``aggregate_train`` returns, so anything done there
would come before the noise and break the Gaussian mechanism's sensitivity. The server app runs them
on the (noised) aggregate instead — post-processing (``server_app.run_method``).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from pfdiff.config import RunConfig


class FedDiffusionAvg(FedAvg):
    """FedAvg over every connected client that keeps the aggregated train metrics per round; its messages
    carry ``message_type`` (``train.<action>``: the ClientApp handler of the phase) instead of FedAvg's
    plain ``train``."""

    def __init__(self, num_nodes: int, message_type: str = MessageType.TRAIN) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=max(1, num_nodes))
        self.message_type = message_type
        self.history: dict[int, dict[str, float]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
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


def make_strategy(cfg: RunConfig, num_nodes: int, client_dp: bool, message_type: str = MessageType.TRAIN
                  ) -> Strategy:
    """FedAvg sending ``message_type``, wrapped in Flower's server-side fixed-clipping DP when ``client_dp``
    (client-level DP)."""
    strategy = FedDiffusionAvg(num_nodes, message_type)
    if not client_dp:
        return strategy
    f = cfg.fed
    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=f.client_noise_multiplier,
                                                      clipping_norm=f.client_clip, num_sampled_clients=num_nodes)
