"""Message exchange with byte counting and failure logging (what Flower actually sends, per client).

Bytes are those of the serialised ``RecordDict`` of each message (Flower's protobuf, ``ByteSize()``),
i.e. the payload on the wire without gRPC framing.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from pfdiff.runs import atomic_write_json

log = logging.getLogger("pfdiff.federated")

#: Flower message type (``<category>.<action>``) of each phase: the ClientApp registers one handler per
#: action (``@app.train("encoder")``, ``@app.query("stats")``, …) and Flower routes every message by it.
MESSAGE_TYPES = {"encoder": "train.encoder", "stats": "query.stats", "reweight": "train.reweight",
                 "warmup": "train.warmup", "diffusion": "train.diffusion",
                 "creff": "train.creff",
                 "partition": "query.partition",  # which partition a node holds (for client sampling)
                 "score": "query.score"}


def record_bytes(content: RecordDict | ArrayRecord) -> int:
    """Serialised size in bytes of a ``RecordDict`` (or of one ``ArrayRecord`` wrapped in one)."""
    if isinstance(content, ArrayRecord):
        content = RecordDict({"arrays": content})
    return recorddict_to_proto(content).ByteSize()


def short_reason(reason: str, limit: int = 300) -> str:
    """The client's own error message out of a runtime's wrapped traceback (Ray appends it after
    "Message: "), else the last line; at most ``limit`` characters."""
    text = reason.rsplit("Message: ", 1)[-1] if "Message: " in reason else reason
    lines = [line.strip(" '>") for line in text.strip().splitlines() if line.strip(" '>")]
    return (lines[0] if "Message: " in reason and lines else (lines[-1] if lines else reason))[:limit]


class Wire:
    """``grid.send_and_receive`` that counts bytes per phase and per client and keeps the failures. With ``path``
    the counts and failures of every execution of the run accumulate there (written after each exchange, read
    back on a resume): a resumed run's totals are all the traffic of the run — a round re-sent after a resume
    counts twice, as it was sent twice — not only the last execution's."""

    def __init__(self, grid: Grid, timeout: float, path: Path | None = None):
        self.grid, self.timeout, self.path = grid, timeout, path
        self.sent: dict[str, int] = defaultdict(int)  # phase → bytes server → clients
        self.received: dict[str, int] = defaultdict(int)  # phase → bytes clients → server
        self.per_client: dict[int, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
        self.node_to_partition: dict[int, int] = {}  # node ids are per execution: not kept
        self.failures: list[dict] = []
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            self.sent.update(saved["sent"])
            self.received.update(saved["received"])
            self.per_client.update({int(k): dict(v) for k, v in saved["per_client"].items()})
            self.failures = list(saved["failures"])

    def _persist(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {**self.totals(), "failures": self.failures})

    def exchange(self, messages: Iterable[Message], phase: str, round_: int = 0) -> list[Message]:
        """Send, wait (up to the timeout), return the replies without error in partition order; log and keep
    the others."""
        messages = list(messages)
        pending_bytes = {}
        for m in messages:
            b = record_bytes(m.content)
            self.sent[phase] += b
            pending_bytes[m.metadata.dst_node_id] = b
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        ok = []
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                self._fail(phase, round_, node, f"{r.error.code}: {r.error.reason}")
                continue
            b = record_bytes(r.content)
            self.received[phase] += b
            pid = int(r.content["metrics"]["partition-id"])
            self.node_to_partition[node] = pid
            self.per_client[pid]["received"] += b
            self.per_client[pid]["sent"] += pending_bytes.get(node, 0)
            ok.append(r)
        answered = {r.metadata.src_node_id for r in replies}
        for node in pending_bytes.keys() - answered:
            self._fail(phase, round_, node, f"no reply within {self.timeout:.0f} s")
        self._persist()
        # replies arrive in whatever order the clients finish; everything downstream (FedAvg's float sums,
        # the warm-up pool's concatenation) must not depend on it, or the same seed gives different runs
        return sorted(ok, key=lambda r: int(r.content["metrics"]["partition-id"]))

    def _fail(self, phase: str, round_: int, node: int, reason: str) -> None:
        reason = short_reason(reason)
        pid = self.node_to_partition.get(node)
        self.failures.append({"phase": phase, "round": round_, "node": node, "partition": pid, "reason": reason})
        log.warning("%s round %s: client %s (node %s) failed: %s", phase, round_, pid, node, reason)

    def totals(self) -> dict:
        return {"sent": dict(self.sent), "received": dict(self.received),
                "per_client": {k: dict(v) for k, v in sorted(self.per_client.items())},
                "total": sum(self.sent.values()) + sum(self.received.values())}
