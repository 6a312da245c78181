"""Pseudo-feature sampling cost against the number of features and the feature dimension (issue 17).

`sample_features` draws the initial noise for every row, then runs the sampler in chunks of
``diffusion.sample_batch`` rows, so the cost per feature should stay flat as the request grows and the
peak memory should follow the chunk, not the request. Measured here, for one process, interleaving
nothing else: DDIM (10 steps) of a FeatureDenoiser (hidden 256, depth 3, 10 classes).

- n sweep (dim 64): 1k → 100k features, chunked (sample_batch 4096) and in one call (sample_batch = n).
- dim sweep (n 10k, chunked): 64 → 2048, with the config's default skip (``model.denoiser_skip: auto``:
  the full linear skip up to 512-d, per-dimension above; the full one made 2048-d 7.4× the 64-d cost).

Peak memory: every measurement runs in a fresh process; ``rss_growth_mib`` is its peak resident memory
(ru_maxrss) during the request minus the peak after a 100-row warm-up (CUDA: the allocator's peak too). Target (issue 17): cost per feature within 1.3× from
1k to 100k and peak memory bounded by the chunk. Writes benchmarks/results/sampling.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py [--threads 1] [--device auto]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pfdiff.config import DiffusionConfig
from pfdiff.diffusion import make_schedule
from pfdiff.longtail.ldmlr import sample_features
from pfdiff.models import FeatureDenoiser, skip_for
from pfdiff.runs import atomic_write_json
from pfdiff.training import resolve_device

OUT = Path(__file__).parent / "results" / "sampling.json"
CLASSES, STEPS, CHUNK = 10, 10, 4096
TARGET_RATIO = 1.3


def _child(dim: int, n: int, sample_batch: int, device: str, threads: int) -> dict:
    """One measurement in a fresh process, so that its peak resident memory is its own."""
    import resource

    torch.set_num_threads(threads)
    dev = torch.device(device)
    schedule = make_schedule("linear", 1000).to(dev)
    torch.manual_seed(0)
    model = FeatureDenoiser(dim, CLASSES, hidden=256, depth=3, skip=skip_for(dim)).to(dev).eval()
    d = DiffusionConfig(sample_steps=STEPS, sample_batch=sample_batch)
    sample_features(model, schedule, np.full(CLASSES, 10), d, 0, dev)  # warm-up (100 rows)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    u, _ = sample_features(model, schedule, np.full(CLASSES, n // CLASSES), d, 0, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"dim": dim, "skip": skip_for(dim), "n": len(u), "sample_batch": sample_batch, "seconds": seconds,
           "us_per_feature": 1e6 * seconds / len(u), "peak_rss_mib": peak, "rss_growth_mib": peak - base}
    if dev.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def _measure(pool, dim: int, n: int, sample_batch: int, device, threads: int) -> dict:
    row = pool.apply(_child, (dim, n, sample_batch, str(device), threads))
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ctx = multiprocessing.get_context("spawn")
    n_rows, dim_rows = [], []
    with ctx.Pool(1, maxtasksperchild=1) as pool:  # every measurement in a fresh process
        for n in (1_000, 10_000, 100_000):
            for batch in (CHUNK, n):
                # the chunked points three times (fresh processes), the fastest kept: the machine may be shared
                runs = [_measure(pool, 64, n, batch, device, args.threads) for _ in range(3 if batch == CHUNK else 1)]
                row = min(runs, key=lambda r: r["seconds"])
                n_rows.append({**row, "mode": "chunked" if batch == CHUNK else "one call",
                               "seconds_of_repeats": [r["seconds"] for r in runs]})
        for dim in (64, 256, 1024, 2048):
            dim_rows.append(_measure(pool, dim, 10_000, CHUNK, device, args.threads))
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
