"""Runs the configured methods for every seed on one fixed split and collects the results."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from pfdiff.config import RunConfig
from pfdiff.evaluation import GROUPS, frechet_distance, recognition_metrics
from pfdiff.longtail.baselines import classifier_retraining, logit_adjusted, train_stage1
from pfdiff.longtail.common import LongTailSplit, encode, make_split, predict_logits
from pfdiff.longtail.ldmlr import FeatureScaler, finetune_with_pseudo, pseudo_counts, sample_features, train_feature_diffusion
from pfdiff.runs import RunDir
from pfdiff.training import resolve_device

METHODS = {
    "ce": "Cross-entropy (stage 1 E+G)",
    "logit_adjust": "Post-hoc logit adjustment (Menon et al. 2021)",
    "resample": "Class-balanced classifier re-training, cRT (Kang et al. 2020)",
    "ldmlr": "LDMLR: pseudo-features from feature diffusion (Han et al. 2024)",
}


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")


class Timer:
    """Wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out


def run_experiment(cfg: RunConfig, run: RunDir) -> dict[str, Any]:
    """Every seed of ``cfg`` (skipping seeds already finished in ``run``), then the aggregate table."""
    check_methods(cfg.methods)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    split = make_split(cfg)
    run.write_json("split.json", split.summary())
    per_seed = []
    for seed in cfg.seeds:
        seed_file = run.path / "seeds" / f"seed{seed}.json"
        if seed_file.exists():
            per_seed.append(run.read_json(f"seeds/seed{seed}.json"))
            continue
        result = run_seed(split, cfg, seed, device, run)
        run.write_json(f"seeds/seed{seed}.json", result)
        per_seed.append(result)
    results = aggregate(per_seed, cfg, split, device)
    run.write_json("results.json", results)
    return results


def run_seed(split: LongTailSplit, cfg: RunConfig, seed: int, device: torch.device, run: RunDir) -> dict[str, Any]:
    """Stage 1 once, then each method on top of it; per-method metrics, timings and diagnostics."""
    timer, ck = Timer(), run.checkpoints / f"seed{seed}"

    def log(record: dict) -> None:
        run.log({"seed": seed, **record})

    encoder, classifier = timer("stage1", lambda: train_stage1(split, cfg, seed, device, ck / "stage1.safetensors", log))
    x_test, y_test = (torch.as_tensor(a, device=device) for a in (split.test.x, split.test.y))
    z = encode(encoder, torch.as_tensor(split.train.x, device=device))
    y = torch.as_tensor(split.train.y, device=device)
    z_test = encode(encoder, x_test)
    logits: dict[str, torch.Tensor] = {}
    diagnostics: dict[str, Any] = {}
    base_logits = predict_logits(classifier, z_test)
    if "ce" in cfg.methods:
        logits["ce"] = base_logits
    if "logit_adjust" in cfg.methods:
        logits["logit_adjust"] = logit_adjusted(base_logits, split.counts, cfg.logit_adjust_tau)
    if "resample" in cfg.methods:
        g = timer("crt", lambda: classifier_retraining(split, z, y, cfg, seed, ck / "crt.safetensors", log))
        logits["resample"] = predict_logits(g, z_test)
    if "ldmlr" in cfg.methods:
        g, diagnostics["ldmlr"] = run_ldmlr(split, z, y, classifier, cfg, seed, timer, ck, log, run)
        logits["ldmlr"] = predict_logits(g, z_test)
    y_np = y_test.cpu().numpy()
    metrics = {name: recognition_metrics(lg.argmax(1).cpu().numpy(), y_np, split.num_classes, split.groups)
               for name, lg in logits.items()}
    for name, m in metrics.items():
        log({"event": "test", "method": name, **{k: m[k] for k in ("top1", "balanced", *GROUPS)}})
    return {"seed": seed, "methods": metrics, "timings": timer.seconds, "diagnostics": diagnostics}


def run_ldmlr(split, z, y, classifier, cfg: RunConfig, seed: int, timer: Timer, ck: Path, log, run: RunDir):
    """Stages 2 and 3 of LDMLR on top of the frozen stage-1 encoder."""
    scaler = FeatureScaler.fit(z)
    denoiser, schedule = timer("stage2", lambda: train_feature_diffusion(
        scaler.transform(z), y, split.num_classes, cfg, seed, ck / "stage2.safetensors", log))
    n_gen = pseudo_counts(split.counts, cfg.pseudo)
    u_hat, y_hat = timer("sampling", lambda: sample_features(denoiser, schedule, n_gen, cfg.diffusion, seed, z.device))
    z_hat = scaler.inverse(u_hat)
    g = timer("stage3", lambda: finetune_with_pseudo(classifier, z, y, z_hat, y_hat, cfg, seed,
                                                     ck / "stage3.safetensors", log))
    save_file({"z_real": z.cpu().contiguous(), "y_real": y.cpu().contiguous(),
               "z_pseudo": z_hat.cpu().contiguous(), "y_pseudo": y_hat.cpu().contiguous()},
              str(ck / "features.safetensors"))
    return g, {"generated_per_class": n_gen.tolist(), "frechet_per_class": per_class_frechet(z, y, z_hat, y_hat)}


def per_class_frechet(z, y, z_hat, y_hat) -> list[float | None]:
    """FD between each class's pseudo-features and its real training features (None: too few samples)."""
    out: list[float | None] = []
    for c in range(int(y.max()) + 1):
        real, fake = z[y == c].cpu().numpy(), z_hat[y_hat == c].cpu().numpy()
        out.append(frechet_distance(real, fake) if len(real) >= 2 and len(fake) >= 2 else None)
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0}


def aggregate(per_seed: list[dict], cfg: RunConfig, split: LongTailSplit, device: torch.device) -> dict[str, Any]:
    """Mean ± std over seeds of every metric, per method; per-class means; mean timings."""
    table: dict[str, Any] = {}
    for method in cfg.methods:
        rows = [s["methods"][method] for s in per_seed]
        table[method] = {k: _mean_std([r[k] for r in rows]) for k in ("top1", "balanced", *GROUPS)}
        per_class = np.array([[np.nan if a is None else a for a in r["per_class"]] for r in rows], dtype=float)
        table[method]["per_class"] = np.nanmean(per_class, axis=0).tolist()
    stages = sorted({k for s in per_seed for k in s["timings"]})
    timings = {k: _mean_std([s["timings"].get(k, 0.0) for s in per_seed]) for k in stages}
    return {"methods": table, "method_names": {m: METHODS[m] for m in cfg.methods}, "seeds": cfg.seeds,
            "timings": timings, "device": str(device), "split": split.summary(), "per_seed": per_seed}
