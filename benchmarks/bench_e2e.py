"""End-to-end training cost (issue 4): E2E wall time per epoch as a ratio to LDMLR's.

An *epoch* is one pass of the N real training examples through a training loop.
- LDMLR trains its networks one after another: E+G (stage 1), then ε_θ (stage 2). One "LDMLR epoch"
  is one epoch of each, i.e. stage1_seconds/stage1_epochs + stage2_seconds/stage2_epochs.
- E2E trains E, G and ε_θ in one loop (plus on-the-fly generation, drift refreshes): one epoch is
  steps·batch/N of that loop.
The JSON also gives whole-method wall times (LDMLR: stage 1 + 2 + sampling + stage 3), since the
loops run for different numbers of epochs.

Writes benchmarks/results/e2e.json. Run: .venv/bin/python benchmarks/bench_e2e.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pfdiff.config import load_config
from pfdiff.longtail.end_to_end import e2e_budget
from pfdiff.longtail.pipeline import run_experiment
from pfdiff.runs import RunDir, atomic_write_json

OUT = Path(__file__).parent / "results" / "e2e.json"
VARIANTS = ["e2e-A-rad", "e2e-B-rad", "e2e-C-rad"]


def main() -> None:
    # digits-LT (the quickstart data): the ratio is a property of the loop, and the mnist1d ablation takes an hour
    cfg = load_config("quickstart", ["seeds=[0]", f"methods={['ldmlr', *VARIANTS]}"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        results = run_experiment(cfg, RunDir.create(cfg, tmp))
        wall = time.perf_counter() - t0
    seconds = {k: v["mean"] for k, v in results["timings"].items()}
    n = results["split"]["train_size"]
    stage1_epochs = cfg.stage1.epochs
    stage2_epochs = cfg.diffusion.steps * cfg.diffusion.batch_size / n
    steps, batch = e2e_budget(cfg, n)  # default: stage 1's steps and batch size (equal encoder steps)
    e2e_epochs = steps * batch / n
    ldmlr_per_epoch = seconds["stage1"] / stage1_epochs + seconds["stage2"] / stage2_epochs
    ldmlr_total = sum(seconds.get(k, 0.0) for k in ("stage1", "stage2", "sampling", "ldmlr"))
    variants = {}
    for v in VARIANTS:
        per_epoch = seconds[v] / e2e_epochs
        variants[v] = {"seconds": seconds[v], "epochs": e2e_epochs, "seconds_per_epoch": per_epoch,
                       "ratio_per_epoch_to_ldmlr": per_epoch / ldmlr_per_epoch,
                       "ratio_total_to_ldmlr": seconds[v] / ldmlr_total}
    report = {"device": results["device"], "torch": torch.__version__, "threads": torch.get_num_threads(),
              "python": sys.version.split()[0], "machine": platform.machine(), "train_size": n,
              "ldmlr": {"stage_seconds": seconds, "stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs,
                        "seconds_per_epoch": ldmlr_per_epoch, "total_seconds": ldmlr_total},
              "e2e": variants, "wall_seconds": wall,
              "definition": "epoch = one pass of the N real training examples; LDMLR epoch = one epoch of "
                            "stage 1 (E+G) + one epoch of stage 2 (ε_θ)"}
    atomic_write_json(OUT, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
