"""Core benchmarks (issue 3): denoiser training and DDIM sampling throughput, quickstart wall time by stage.

Writes benchmarks/results/core.json. Targets checked here (not in timed tests):
- generating the quickstart's pseudo-features takes < 10 % of its wall time (batched sampling).
Run: .venv/bin/python benchmarks/bench_core.py [--skip-quickstart]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pfdiff.config import load_config
from pfdiff.diffusion import Denoiser, DiffusionLoss, generate, make_schedule
from pfdiff.longtail.pipeline import run_experiment
from pfdiff.models import FeatureDenoiser
from pfdiff.runs import RunDir, atomic_write_json
from pfdiff.training import resolve_device

OUT = Path(__file__).parent / "results" / "core.json"


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench_training(device, dim=64, classes=10, batch=256, hidden=256) -> dict:
    """Optimiser steps of the feature denoiser (quickstart sizes): examples per second."""
    model = FeatureDenoiser(dim, classes, hidden=hidden).to(device)
    schedule = make_schedule("linear", 1000).to(device)
    loss_fn = DiffusionLoss(schedule, cond_drop_prob=0.1, null_label=classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    z, y = torch.randn(batch, dim, device=device), torch.randint(0, classes, (batch,), device=device)

    def step():
        loss = loss_fn(model, z, y).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    sec = _timed(step, 50)
    return {"batch": batch, "hidden": hidden, "dim": dim, "seconds_per_step": sec, "examples_per_s": batch / sec}


def bench_sampling(device, dim=64, classes=10, n=2000, hidden=256) -> dict:
    """DDIM pseudo-features per second at 10 and 50 steps, one batched call."""
    model = FeatureDenoiser(dim, classes, hidden=hidden).to(device).eval()
    schedule = make_schedule("linear", 1000).to(device)
    y = torch.arange(classes, device=device).repeat_interleave(n // classes)
    out = {}
    for steps in (10, 50):
        sec = _timed(lambda: generate("ddim", Denoiser(model, schedule), torch.randn(len(y), dim, device=device), y,
                                      steps), 3)
        out[f"ddim_{steps}_steps"] = {"n": len(y), "seconds": sec, "features_per_s": len(y) / sec}
    return out


def bench_quickstart() -> dict:
    """The quickstart as `pfdiff run` runs it, wall time split by stage (mean over its seeds)."""
    cfg = load_config("quickstart")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        results = run_experiment(cfg, RunDir.create(cfg, tmp))
        wall = time.perf_counter() - t0
    stages = {k: v["mean"] * len(cfg.seeds) for k, v in results["timings"].items()}
    sampling_share = stages.get("sampling", 0.0) / wall
    return {"wall_seconds": wall, "stage_seconds_total": stages, "sampling_share": sampling_share,
            "target_sampling_share_below": 0.10, "target_met": sampling_share < 0.10,
            "target_wall_seconds_below": 300, "wall_target_met": wall < 300}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-quickstart", action="store_true")
    args = parser.parse_args()
    device = resolve_device("auto")
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "python": sys.version.split()[0], "machine": platform.machine(),
              "denoiser_training": bench_training(device), "sampling": bench_sampling(device)}
    if not args.skip_quickstart:
        report["quickstart"] = bench_quickstart()
    atomic_write_json(OUT, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
