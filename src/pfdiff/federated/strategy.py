"""Server strategy for federated feature diffusion: Flower's Message-API ``FedAvg`` plus a correction hook.

``FedDiffusionAvg`` is plain weighted FedAvg (weights = ``num-examples`` of each client's reply) of the
denoiser's parameters. After every aggregation it calls :meth:`FedDiffusionAvg.after_aggregate`, the
place where the later FedDDPM-style server-side correction of the aggregated denoiser goes (e.g. a
server momentum / control-variate step, or re-fitting on the label-marginal mismatch of the clients).
It also keeps a per-round history of the aggregated metrics (``self.history``), besides the ``Result``
that ``start`` returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class FedDiffusionAvg(FedAvg):
    """FedAvg of the feature denoiser with a post-aggregation hook (identity for now)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.history: dict[int, dict[str, float]] = {}

    def after_aggregate(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        """Server-side correction of the aggregated denoiser ``arrays`` after round ``server_round``.

        Placeholder for the FedDDPM server correction: returns ``arrays`` unchanged. A subclass (or the
        later implementation) may return a new ``ArrayRecord`` with the same keys and shapes; it becomes
        the global model sent out for evaluation and for the next round.
        """
        return arrays

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = self.after_aggregate(arrays, server_round)
        if metrics is not None:
            self.history.setdefault(server_round, {}).update({k: float(v) for k, v in metrics.items()})
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.history.setdefault(server_round, {}).update({k: float(v) for k, v in metrics.items()})
        return metrics
