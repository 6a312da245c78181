"""DP-SGD overhead: one non-private step vs one DP-SGD step (pfdiff.privacy.dpsgd) of the same model and loss.

Both steps: a batch of 256 examples, the diffusion loss with K = 4 noise draws per example, AdamW.
- non-private: mean over the batch of the K-averaged per-example losses, backward, AdamW step;
- DP: DPSGD.step — per-example clipping of the K-averaged losses, Opacus' Gaussian noise, AdamW step.
  Sampling rate q = 1 with N = 256, so the Poisson batch is the expected 256 every step (fixed size).
The two are timed in alternating rounds (the machine may be shared; adjacent steps see the same load);
we report the mean of N rounds (and median / min) and ratio = dp_ms / nonprivate_ms. Target: ≤ 1.5×.
Candidates (DPSGD's ``method``), in this order (allocator tuning cannot be undone in-process):
- ``bk`` (production for Linear/LayerNorm/Embedding models): book-keeping on the [B, K, …] model call,
  per-example norms from Gram matrices, the clipped sum in one contraction; no per-example gradients;
- ``vmap``: torch.func vmap(grad) per example (production for conv models, the tests' reference), [B, …]
  per-example gradients (735 MB);
- ``*_tuned_allocator``: the same after ``tune_cpu_allocator()`` (DPSGD(tune_allocator=True), opt-in).
Opacus' ghost clipping and grad-sample hooks were engines until issue 16 (2.4× and 17× here, see the git
history of benchmarks/results/dp.json); they are gone from DPSGD.
Writes benchmarks/results/dp.json. Run: .venv/bin/python benchmarks/bench_dp.py [--rounds 15]
One function per model: add e.g. ``bench_unet`` to MODELS returning the same keys.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.diffusion import DiffusionLoss, make_schedule
from pfdiff.longtail.ldmlr import build_denoiser
from pfdiff.privacy.dpsgd import DPSGD, METHODS
from pfdiff.runs import atomic_write_json
from pfdiff.training import generator, resolve_device

OUT = Path(__file__).parent / "results" / "dp.json"
TARGET_RATIO = 1.5
HEADLINE = "bk_tuned_allocator"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternating(fns: dict[str, Callable[[int], None]], rounds: int, device: torch.device,
                 warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds of each function per round; the functions alternate within a round."""
    for step in range(warmup):
        for fn in fns.values():
            fn(step)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(warmup + r)
            _sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _summary(ms: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(ms), "median": statistics.median(ms), "min": min(ms)}


def bench_model(make_model: Callable[[], nn.Module], loss_fn: DiffusionLoss, data: tuple[torch.Tensor, ...],
                K: int, device: torch.device, rounds: int, max_physical_batch_size: int, tune_allocator: bool,
                method: str = "bk", track_norms: bool = True, lr: float = 1e-3, noise_multiplier: float = 1.0,
                max_grad_norm: float = 1.0, secure_mode: bool = False) -> dict:
    """Non-private vs DP step for one model; ``data`` = (z0, y), all rows in every step."""
    batch = len(data[0])
    torch.manual_seed(0)
    plain = make_model().to(device)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=lr)
    torch.manual_seed(0)
    private = make_model().to(device)
    engine = DPSGD(private, torch.optim.AdamW(private.parameters(), lr=lr), noise_multiplier=noise_multiplier,
                   max_grad_norm=max_grad_norm, dataset_size=batch, sample_rate=1.0,  # q·N = batch, fixed
                   max_physical_batch_size=max_physical_batch_size, tune_allocator=tune_allocator,
                   method=method, track_norms=track_norms, secure_mode=secure_mode)

    def nonprivate(step: int) -> None:
        g = generator(device, 0, "bench-ldm", step)
        loss = loss_fn(plain, *data, noise_multiplicity=K, generator=g).loss.mean()
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def dp(step: int) -> None:
        g = generator(device, 0, "bench-ldm", step)
        engine.step(lambda m, z, y: loss_fn(m, z, y, noise_multiplicity=K, generator=g).loss, data, step)

    times = _alternating({"nonprivate": nonprivate, "dp": dp}, rounds, device)
    paired = [d / n for d, n in zip(times["dp"], times["nonprivate"])]
    np_ms, dp_ms = statistics.mean(times["nonprivate"]), statistics.mean(times["dp"])
    return {"batch": batch, "K": K, "max_physical_batch_size": max_physical_batch_size, "rounds": rounds,
            "method": method, "tune_allocator": tune_allocator, "track_norms": track_norms,
            "secure_mode": secure_mode, "noise": engine.noise.label,
            "params": sum(p.numel() for p in private.parameters()),
            "nonprivate_ms": np_ms, "dp_ms": dp_ms, "ratio": dp_ms / np_ms,
            "ratio_median_of_rounds": statistics.median(paired),
            "ratio_of_min": min(times["dp"]) / min(times["nonprivate"]),  # least disturbed by other load
            "nonprivate_ms_stats": _summary(times["nonprivate"]), "dp_ms_stats": _summary(times["dp"])}


def bench_feature_denoiser(device: torch.device, rounds: int, tune_allocator: bool, method: str = "bk",
                           track_norms: bool = True, secure_mode: bool = False,
                           max_physical_batch_size: int = 256, batch: int = 256, K: int = 4, dim: int = 64,
                           classes: int = 10) -> dict:
    """LDMLR's feature denoiser with the default config (hidden 256, depth 3), feature dim 64, 10 classes."""
    cfg = RunConfig()
    d = cfg.diffusion
    schedule = make_schedule(d.schedule, d.T).to(device)
    loss_fn = DiffusionLoss(schedule, **d.loss_options(),
                            cond_drop_prob=d.cond_drop_prob, null_label=classes)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(batch, dim, generator=g).to(device),
            torch.randint(0, classes, (batch,), generator=g).to(device))
    out = bench_model(lambda: build_denoiser(cfg, dim, classes), loss_fn, data, K, device, rounds,
                      max_physical_batch_size, tune_allocator, method, track_norms, secure_mode=secure_mode)
    return {"model": f"FeatureDenoiser(dim={dim}, classes={classes}, hidden={cfg.model.denoiser_hidden}, "
                     f"depth={cfg.model.denoiser_depth})", **out}


def bench_unet(device: torch.device, rounds: int, tune_allocator: bool, method: str = "vmap",
               track_norms: bool = True, batch: int = 256, K: int = 4, secure_mode: bool = False) -> dict:
    """The DPDM reference's U-Net on 8×8 digits-sized images (pfdiff.imagespace.dpdm defaults)."""
    from pfdiff.imagespace.dpdm import DPDMConfig
    from pfdiff.models.unet import UNet

    if method != "vmap":  # conv layers cannot take the [B, K, C, H, W] layout of the hook paths
        return {"skipped": f"method {method!r} needs Linear/LayerNorm/Embedding-only models; the U-Net uses vmap"}
    c = DPDMConfig()
    schedule = make_schedule("cosine", 1000).to(device)
    loss_fn = DiffusionLoss(schedule, prediction="v", cond_drop_prob=0.1, null_label=10)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(batch, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
    make = lambda: UNet(1, 10, base_channels=c.base_channels, channel_mults=c.channel_mults,  # noqa: E731
                        num_res_blocks=c.num_res_blocks)
    out = bench_model(make, loss_fn, data, K, device, rounds, batch, tune_allocator, method, track_norms,
                      secure_mode=secure_mode)
    return {"model": f"UNet(1, 10, base_channels={c.base_channels}, channel_mults={tuple(c.channel_mults)})", **out}


MODELS: dict[str, Callable[..., dict]] = {"feature_denoiser": bench_feature_denoiser, "unet": bench_unet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed steps of each kind (after 2 warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="DPSGD methods to compare")
    parser.add_argument("--no-tuned", action="store_true", help="skip the tuned-allocator variants")
    args = parser.parse_args()
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    results: dict[str, dict] = {name: {} for name in args.models}
    # the production setting first (pfdiff's DP stages run without norm statistics), then the options
    variants = [("bk", False, "bk", False, False), ("bk_secure_mode", False, "bk", False, True)]
    variants += [(m, False, m, True, False) for m in args.methods if m != "bk"]
    if not args.no_tuned:
        variants += [(f"{m}_tuned_allocator", True, m, True, False) for m in args.methods]
    for variant, tune, method, norms, secure in variants:
        for name in args.models:
            results[name][variant] = MODELS[name](device, args.rounds, tune_allocator=tune, method=method,
                                                  track_norms=norms, secure_mode=secure)
    # pfdiff's DP stages run bk with the tuned allocator (on a VM, glibc's default re-faults the freed pages
    # of every step: bk 1.54× there, tuned 1.47×)
    head = results.get("feature_denoiser", {}).get(HEADLINE, {})
    report = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": threads,
        "torch": torch.__version__, "load_average_1m": os.getloadavg()[0],
        "batch": head.get("batch"), "K": head.get("K"),
        "nonprivate_ms": head.get("nonprivate_ms"), "dp_ms": head.get("dp_ms"), "ratio": head.get("ratio"),
        "target_ratio": TARGET_RATIO, "meets_target": bool(head) and head["ratio"] <= TARGET_RATIO,
        "ratio_median_of_rounds": head.get("ratio_median_of_rounds"), "ratio_of_min": head.get("ratio_of_min"),
        "headline": f"models.feature_denoiser.{HEADLINE} (pfdiff's DP stages: method='bk', one physical batch "
                    "of 256, tune_cpu_allocator(), no norm statistics, noise from a torch generator seeded with OS "
                    "entropy every step; bk: glibc's default allocator; bk_secure_mode adds Opacus' 4-normal noise)",
        "models": results,
    }
    atomic_write_json(OUT, report)
    print(f"threads={threads} load={report['load_average_1m']:.1f}")
    for name, entries in results.items():
        for variant, r in entries.items():
            if "skipped" in r:
                print(f"{name:17s} {variant:26s} skipped: {r['skipped']}")
                continue
            print(f"{name:17s} {variant:26s} non-private {r['nonprivate_ms']:7.1f} ms  DP {r['dp_ms']:7.1f} ms  "
                  f"ratio {r['ratio']:.2f} (median of rounds {r['ratio_median_of_rounds']:.2f}, "
                  f"of min {r['ratio_of_min']:.2f})")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
