"""Federated simulation cost (issue 6): 10 clients × 20 rounds on digits must finish within 10 minutes
on 2 CPU cores (Ray simulation, every phase: FedAvg E+G, statistics, re-weighting baseline, warm-up,
then the diffusion rounds of FedAvg, FedDDPM, FedDDPM+ and the progressive pool, and the evaluation).

Writes benchmarks/results/fed.json. Run: .venv/bin/python benchmarks/bench_fed.py [alpha]
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pfdiff.config import load_config
from pfdiff.federated.simulation import simulate
from pfdiff.runs import atomic_write_json

OUT = Path(__file__).parent / "results" / "fed.json"
TARGET_SECONDS = 600.0


def main() -> None:
    alpha = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    cfg = load_config("federated", [f"fed.alpha={alpha}"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = simulate(cfg, Path(tmp))
        wall = time.perf_counter() - t0
    f = cfg.fed
    out = {
        "what": f"{f.num_clients} clients × {f.rounds} rounds per method, methods {f.methods}, Dirichlet α={alpha}, "
                "Ray simulation, wall time of the whole run incl. Ray start-up and evaluation",
        "wall_seconds": wall, "target_seconds": TARGET_SECONDS, "meets_target": wall <= TARGET_SECONDS,
        "server_app_seconds": res["seconds"],
        "per_method": {m: {"rounds": v["rounds"], "round_seconds_total": sum(h["seconds"] for h in v["history"].values()),
                           "server_seconds": v["server_seconds"], "bytes": v["bytes"]}
                       for m, v in res["methods"].items()},
        "bytes_total": res["bytes"]["total"],
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    atomic_write_json(OUT, out)
    print(f"{wall:.1f} s (target {TARGET_SECONDS:.0f} s) → {OUT}")


if __name__ == "__main__":
    main()
