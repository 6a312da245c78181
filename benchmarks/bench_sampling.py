"""Pseudo-feature sampling cost against the number of features and the feature dimension (issue 17).

`sample_features` draws the initial noise for every row, then runs the sampler in chunks of
``diffusion.sample_batch`` rows, so the cost per feature should stay flat as the request grows and the
peak memory should follow the chunk, not the request. Measured here, for one process, interleaving
nothing else: DDIM (10 steps) of a FeatureDenoiser (hidden 256, depth 3, 10 classes).

- n sweep (dim 64): 1k → 100k features, chunked (sample_batch 4096) and in one call (sample_batch = n).
- dim sweep (n 10k, chunked): 64 → 2048.

Peak memory: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs before
each measurement) minus the resident size before it. Target (issue 17): cost per feature within 1.3× from
1k to 100k and peak memory bounded by the chunk. Writes benchmarks/results/sampling.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py [--threads 1] [--device auto]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pfdiff.config import DiffusionConfig
from pfdiff.diffusion import make_schedule
from pfdiff.longtail.ldmlr import sample_features
from pfdiff.models import FeatureDenoiser
from pfdiff.runs import atomic_write_json
from pfdiff.training import resolve_device

OUT = Path(__file__).parent / "results" / "sampling.json"
CLASSES, STEPS, CHUNK = 10, 10, 4096
TARGET_RATIO = 1.3


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _measure(model, schedule, n: int, sample_batch: int, device) -> dict:
    per_class = np.full(CLASSES, n // CLASSES)
    d = DiffusionConfig(sample_steps=STEPS, sample_batch=sample_batch)
    if device.type == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _rss_kb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    u, _ = sample_features(model, schedule, per_class, d, 0, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else (_rss_kb("VmHWM") - before) / 1024)
    del u
    return {"n": int(per_class.sum()), "sample_batch": sample_batch, "seconds": seconds,
            "us_per_feature": 1e6 * seconds / per_class.sum(), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    schedule = make_schedule("linear", 1000).to(device)
    torch.manual_seed(0)

    def model(dim: int):
        return FeatureDenoiser(dim, CLASSES, hidden=256, depth=3).to(device).eval()

    m64 = model(64)
    _measure(m64, schedule, 1000, CHUNK, device)  # warm-up
    n_rows = []
    for n in (1_000, 10_000, 100_000):
        for batch in (CHUNK, n):
            row = _measure(m64, schedule, n, batch, device)
            n_rows.append({**row, "mode": "chunked" if batch == CHUNK else "one call"})
            print(row, flush=True)
    dim_rows = []
    for dim in (64, 256, 1024, 2048):
        row = {"dim": dim, **_measure(model(dim), schedule, 10_000, CHUNK, device)}
        dim_rows.append(row)
        print(row, flush=True)
    chunked = [r["us_per_feature"] for r in n_rows if r["mode"] == "chunked"]
    ratio = max(chunked) / min(chunked)
    atomic_write_json(args.out, {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0], "machine": platform.machine(),
        "sampler": f"ddim, {STEPS} steps", "denoiser": "FeatureDenoiser hidden 256, depth 3, 10 classes",
        "chunk": CHUNK, "n_sweep": n_rows, "dim_sweep": dim_rows,
        "chunked_cost_ratio_1k_to_100k": ratio, "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO})
    print(f"chunked cost per feature, max/min over 1k–100k: {ratio:.2f} (target ≤ {TARGET_RATIO}) → {args.out}")


if __name__ == "__main__":
    main()
