"""``pfdiff regimes``: the dynamical regimes (``analysis.regimes``) measured on pfdiff's own models.

Per dataset (digits features: stage-1 encoder + LDMLR feature denoiser; digits images: the DPDM U-Net,
non-private; any ``data.name``/``--path`` source the same way) it computes the theory (t_S, t_C),
measures speciation by cloning and collapse with the trained model, compares few-step DDIM grids
(uniform vs around t_S), and for features also the dp-promise S table and collapse vs n against the
membership attack's AUC. Writes ``regimes.json``, ``regimes_<dataset>.png`` (+ ``regimes_collapse_vs_n.png``)
and ``regimes.md`` under the output folder.

Device (features): the run config's ``device`` (CUDA when present, else CPU) trains, loads and encodes the
models and samples from them; the measurements themselves (``analysis.regimes``: cloning, collapse, step
placement) draw their noise from CPU generators and run on the CPU, so ``FeatureSetup`` hands them CPU copies.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pfdiff.analysis import regimes as R
from pfdiff.config import RegimesConfig
from pfdiff.diffusion import Denoiser, NoiseSchedule, make_schedule, sample_ddim
from pfdiff.runs import atomic_write_json, atomic_write_text
from pfdiff.training import derive_seed, resolve_device

Quality = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


# ---------------------------------------------------------------------------------------------- shared


def _pick(n: int, k: int, seed: int, *tag: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, *tag))
    return torch.randperm(n, generator=g)[:min(n, k)]


def _halves(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, a seeded split of the indices into two halves (probes, references)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "halves"))
    a, b = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        a.append(idx[: len(idx) // 2]), b.append(idx[len(idx) // 2:])
    return torch.cat(a), torch.cat(b)


def _grid(schedule: NoiseSchedule, rc: RegimesConfig, points: int | None = None) -> list[int]:
    return R.ou_grid_steps(schedule, points or rc.grid_points, rc.t_min, rc.t_max)


def _tv(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Total-variation distance between the class histograms of two label vectors."""
    pa, pb = (torch.bincount(v, minlength=num_classes).double() / len(v) for v in (a, b))
    return float(0.5 * (pa - pb).abs().sum())


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


@torch.no_grad()
def compare_placements(denoiser: Denoiser, shape: tuple[int, ...], num_classes: int,
                       t_S: float, quality: Quality, classify: Callable, prior: torch.Tensor,
                       rc: RegimesConfig) -> dict[str, Any]:
    """Few-step deterministic DDIM (η = 0) on each grid of ``regimes.placement_timesteps``, same noise for all.

    Class-conditional (labels balanced): ``quality(x, y)`` (FD to real data, classifier agreement) and the
    RMSE to the ``reference_steps``-step trailing sample from the same noise (the discretisation error).
    Unconditional (null label): where speciation decides the class, so the grid around t_S could matter —
    TV distance of the classifier's class histogram to that of the reference sampler and to the prior.
    """
    y = torch.arange(num_classes).repeat_interleave(rc.samples_per_class)
    null = torch.full_like(y, num_classes)
    noise = torch.randn((len(y), *shape), generator=torch.Generator().manual_seed(derive_seed(rc.seed, "placement")))
    prior_labels = torch.multinomial(prior.float(), 100_000, replacement=True,
                                     generator=torch.Generator().manual_seed(derive_seed(rc.seed, "prior")))

    def run(steps, labels):
        return sample_ddim(denoiser, noise, labels, steps, spacing="trailing")

    ref_c, ref_u = run(rc.reference_steps, y), run(rc.reference_steps, null)
    lab_ref = classify(ref_u)
    reference = {"steps": rc.reference_steps, "placement": "trailing", **quality(ref_c, y),
                 "uncond_tv_to_prior": _tv(lab_ref, prior_labels, num_classes)}
    rows = []
    for k in rc.few_steps:
        for name, ts in R.placement_timesteps(denoiser.schedule, k, t_S).items():
            xc, xu = run(ts, y), run(ts, null)
            lab = classify(xu)
            rows.append({"steps": k, "placement": name, "timesteps": ts, **quality(xc, y),
                         "rmse_to_reference": _rmse(xc, ref_c), "uncond_rmse_to_reference": _rmse(xu, ref_u),
                         "uncond_tv_to_reference": _tv(lab, lab_ref, num_classes),
                         "uncond_tv_to_prior": _tv(lab, prior_labels, num_classes)})
    return {"t_S": t_S, "reference": reference, "rows": rows}


def measure(denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, probes: torch.Tensor,
            probes_y: torch.Tensor, refs: torch.Tensor, refs_y: torch.Tensor, classify: Callable, num_classes: int,
            quality: Quality, rc: RegimesConfig) -> dict[str, Any]:
    """Theory + cloning + collapse + step placement for one trained model and its training set (x, y)."""
    t0, schedule = time.perf_counter(), denoiser.schedule
    spec = R.speciation_time(x, y)
    ou_grid = np.linspace(rc.t_min, rc.t_max, rc.entropy_points)
    collapse_theory = R.collapse_times(x, y, ou_grid, rc.entropy_queries, rc.seed)
    prior = torch.bincount(y, minlength=num_classes).double() / len(y)
    steps = _grid(schedule, rc)
    idx = _pick(len(x), rc.starts, rc.seed, "cloning-starts")
    null = torch.full((len(idx),), num_classes, dtype=torch.long)
    t1 = time.perf_counter()
    cloning = R.cloning_curve(denoiser, x[idx], steps, classify, null, clones=rc.clones,
                              sampler_steps=rc.sampler_steps, seed=rc.seed)
    t2 = time.perf_counter()
    measured = R.speciation_from_cloning(cloning["t"], cloning["phi"])
    pidx = _pick(len(probes), rc.probes, rc.seed, "probes")
    collapse = R.collapse_curve(denoiser, probes[pidx], probes_y[pidx], steps, x, y, refs, refs_y,
                                sampler_steps=rc.sampler_steps, seed=rc.seed)
    t3 = time.perf_counter()
    t_place = measured["t_S"] if math.isfinite(measured["t_S"]) else spec.t_S
    placement = compare_placements(denoiser, tuple(x.shape[1:]), num_classes, t_place, quality, classify, prior, rc)
    t4 = time.perf_counter()
    return {"schedule": {"name": schedule.name, "T": schedule.T, "denoiser": denoiser.describe(),
                         "t_last": float(schedule.ou_time()[-1])},
            "n_train": len(y), "train_counts": torch.bincount(y, minlength=num_classes).tolist(),
            "prior_same_class": float((prior ** 2).sum()),
            "speciation_theory": spec.as_dict(),
            "steps_of_t_S": {name: R.step_at_ou_time(make_schedule(name, schedule.T), spec.t_S)
                             for name in ("linear", "cosine")},
            "collapse_theory": collapse_theory, "cloning": cloning, "speciation_measured": measured,
            "collapse": collapse, "placement": placement,
            "seconds": {"theory": t1 - t0, "cloning": t2 - t1, "collapse": t3 - t2, "placement": t4 - t3}}


# ---------------------------------------------------------------------------------------------- features


@dataclass
class FeatureSetup:
    cfg: Any  # RunConfig
    split: Any  # LongTailSplit
    encoder: nn.Module
    classifier: nn.Module
    scaler: Any  # FeatureScaler
    denoiser: nn.Module
    schedule: NoiseSchedule
    u: torch.Tensor
    y: torch.Tensor
    u_held: torch.Tensor
    y_held: torch.Tensor
    u_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    seconds: float
    device: torch.device  # where models are trained and sampled (the fields above are CPU copies)


def feature_setup(rc: RegimesConfig, run_dir: Path | None = None, data: str | None = None,
                  path: str | None = None) -> FeatureSetup:
    """Stage-1 encoder + classifier and the LDMLR feature denoiser: loaded from ``run_dir``'s checkpoints
    (seed ``rc.seed``) or trained here (``rc.feature_steps`` denoiser steps) on the config's device; features
    standardised. Models and features are returned on the CPU (module doc)."""
    from pfdiff.config import load_config
    from pfdiff.longtail.baselines import train_stage1
    from pfdiff.longtail.common import encode, init_encoder_classifier, make_split, to_tensors
    from pfdiff.longtail.ldmlr import FeatureScaler, build_denoiser, train_feature_diffusion
    from pfdiff.runs import RunDir
    from pfdiff.training import load_modules

    t0 = time.perf_counter()
    # CPU-only on purpose: the measurements (analysis.regimes) draw from CPU generators, so that they replay exactly
    # on any machine; everything FeatureSetup hands them is moved here once trained / encoded on the device
    cpu = torch.device("cpu")
    if run_dir is not None:
        run = RunDir.open(run_dir)
        cfg = run.config()
        ck = run.checkpoints / f"seed{rc.seed}"
        if not (ck / "stage1.safetensors").exists() or not (ck / "stage2.safetensors").exists():
            raise FileNotFoundError(f"{run_dir} has no stage1/stage2 checkpoints for seed {rc.seed}")
    else:
        extra = [f"data.name={data}"] + ([f"data.path={path}"] if path else []) if data else []
        cfg = load_config(rc.preset, [*rc.overrides, *extra])
        cfg = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"steps": rc.feature_steps})})
    device = resolve_device(cfg.device)
    split = make_split(cfg)
    C = split.num_classes
    x, y = to_tensors(split.train, device)
    if run_dir is not None:
        enc, g = init_encoder_classifier(cfg, split.train.input_shape, C, rc.seed, device)
        load_modules(ck / "stage1.safetensors", {"encoder": enc, "classifier": g})
    else:
        enc, g = train_stage1(split, cfg, rc.seed, device, None, None)
    enc.eval(), g.eval()
    z = encode(enc, x)
    scaler = FeatureScaler.fit(z)
    u = scaler.transform(z)
    if run_dir is not None:
        den = build_denoiser(cfg, u.shape[1], C).to(device)
        load_modules(ck / "stage2.safetensors", {"denoiser": den}, use_ema_for="denoiser")
        schedule = cfg.diffusion.make_schedule()
    else:
        den, schedule = train_feature_diffusion(u, y, C, cfg, rc.seed, None, None)
    xh, yh = to_tensors(split.heldout, device)
    xt, yt = to_tensors(split.test, device)
    u_held, u_test = scaler.transform(encode(enc, xh)), scaler.transform(encode(enc, xt))
    return FeatureSetup(cfg, split, enc.to(cpu), g.to(cpu), FeatureScaler(scaler.mean.to(cpu), scaler.std.to(cpu)),
                        den.eval().to(cpu), schedule.to(cpu), u.to(cpu), y.to(cpu), u_held.to(cpu), yh.to(cpu),
                        u_test.to(cpu), yt.to(cpu), str(run_dir) if run_dir else "trained here",
                        time.perf_counter() - t0, device=device)


def _feature_quality(fs: FeatureSetup, classify: Callable) -> Quality:
    from pfdiff.evaluation.fid import frechet_distance

    real = fs.u_test.double().numpy()

    def quality(u: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {"fd_test": frechet_distance(real, u.double().numpy()),
                "accuracy": float((classify(u) == y).float().mean())}

    return quality


def promise_table(fs: FeatureSetup, t_S_upper: float, classify: Callable, rc: RegimesConfig) -> dict[str, Any]:
    """``regimes.promise_S_table`` for the ``dp`` preset with dp-promise on this run's split (same data), and
    per candidate S the check of its premise: class-conditional samples of this (non-private) denoiser with
    the label withheld on t ≥ S (``PhasedLabels``, as dp-promise samples; the configured sampler) — the share
    the classifier assigns to the requested class. Withholding labels above t_S should cost nothing."""
    from pfdiff.config import load_config
    from pfdiff.longtail.ldmlr import sample_features
    from pfdiff.longtail.private import PhasedLabels, count_event, public_private_split

    dcfg = load_config("dp", ["privacy.mechanism=dp-promise", f"data.name={fs.cfg.data.name}",
                              *([f"data.path={fs.cfg.data.path}"] if fs.cfg.data.path else [])])
    p, C = dcfg.privacy, fs.split.num_classes
    _, priv = public_private_split(fs.split.train.y, C, p.public_fraction, dcfg.data.split_seed)
    counts_event = count_event(p)  # the noisy class counts' release (its σ depends only on the config)
    schedule = dcfg.diffusion.make_schedule()
    out = R.promise_S_table(p, len(priv), schedule, rc.promise_candidates, t_S_upper,
                            [e for e in (counts_event,) if e is not None], rc.promise_eps_share)
    out["default_S"] = p.promise_S
    out["schedule"] = {"name": schedule.name, "T": schedule.T}
    d = fs.cfg.diffusion
    if (d.schedule, d.T) == (schedule.name, schedule.T):
        per_class = np.full(C, rc.samples_per_class)
        den = copy.deepcopy(fs.denoiser).to(fs.device)  # sampled on the device, classified on the CPU
        for row in out["rows"]:
            u, y = sample_features(PhasedLabels(den, row["S"], C), fs.schedule, per_class, d, rc.seed,
                                   fs.device, tag="regimes-promise")
            row["label_accuracy_withheld_above_S"] = float((classify(u.cpu()) == y.cpu()).float().mean())
        out["label_accuracy_sampler"] = f"{d.sampler}, {d.sample_steps} steps, η = {d.eta}"
    return out


def collapse_vs_n(fs: FeatureSetup, classify: Callable, rc: RegimesConfig) -> dict[str, Any]:
    """Train one denoiser per n on n examples per class drawn from features the encoder never saw (held-out
    ∪ test); per n: t_C (formula, Monte Carlo), collapse curve, copy share of fresh samples, and the
    membership attacks' AUC (members vs the rest, balanced per class). Each denoiser is trained, sampled and
    attacked on ``fs.device``; the collapse curve runs on a CPU copy (module doc)."""
    from pfdiff.evaluation.mia import attack_settings, balanced_pairs, nearest_neighbour_check, run_attacks
    from pfdiff.longtail.ldmlr import sample_features, train_feature_diffusion

    pool_u, pool_y = torch.cat([fs.u_held, fs.u_test]), torch.cat([fs.y_held, fs.y_test])
    C, cfg = fs.split.num_classes, fs.cfg
    cfg = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"steps": rc.sweep_steps})})
    schedule = cfg.diffusion.make_schedule()
    ou_grid = np.linspace(rc.t_min, rc.t_max, rc.entropy_points)
    rows = []
    for n in rc.sweep_n:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(derive_seed(rc.seed, "sweep", n))
        mem, rest = [], []
        for c in range(C):
            idx = torch.nonzero(pool_y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            k = min(n, max(0, len(idx) - 2))  # keep ≥ 2 non-members (a probe and a reference) per class
            mem.append(idx[:k]), rest.append(idx[k:])
        mem, rest = torch.cat(mem), torch.cat(rest)
        um, ym, ur, yr = pool_u[mem], pool_y[mem], pool_u[rest], pool_y[rest]
        dev = fs.device
        den, _ = train_feature_diffusion(um.to(dev), ym.to(dev), C, cfg, derive_seed(rc.seed, "sweep-model", n),
                                         None, None)
        den.eval()
        den_cpu = copy.deepcopy(den).cpu()
        theory = R.collapse_times(um, ym, ou_grid, rc.entropy_queries, rc.seed)
        per_class = [v for k, v in theory["groups"].items() if k != "all" and "t_C" in v]
        pi, ri = _halves(yr, rc.seed)
        pidx = pi[_pick(len(pi), rc.probes, rc.seed, "sweep-probes")]
        curve = R.collapse_curve(cfg.diffusion.denoiser(den_cpu, schedule), ur[pidx], yr[pidx],
                                 _grid(schedule, rc, rc.sweep_grid_points), um, ym, ur[ri], yr[ri],
                                 sampler_steps=rc.sampler_steps, seed=rc.seed)
        counts = torch.bincount(ym, minlength=C).numpy()
        u_gen, y_gen = sample_features(den, schedule, np.where(counts > 0, 50, 0), cfg.diffusion, rc.seed, dev,
                                       tag="regimes-sweep")
        copies = nearest_neighbour_check(u_gen, y_gen, um, ym, ur[ri], yr[ri], seed=rc.seed)
        bm, bn = balanced_pairs(ym.numpy(), yr.numpy(), C, rc.seed)
        attacks, _ = run_attacks(cfg.diffusion.denoiser(den, schedule), um[bm].to(dev), ym[bm].to(dev), ur[bn].to(dev),
                                 yr[bn].to(dev), seed=rc.seed, attack_kwargs=attack_settings(schedule.T))
        finite = lambda vals: [v for v in vals if math.isfinite(v)]  # noqa: E731
        rows.append({"n_per_class": n, "n_members": len(mem), "members_per_class": counts.tolist(),
                     "t_C_formula_median": float(np.median([v["t_C_formula"] for v in per_class])),
                     "t_C_median": float(np.median(finite([v["t_C"] for v in per_class]) or [math.nan])),
                     "collapse_curve": curve, "generated_copy_share": copies["copy_fraction"],
                     "generated_median_ratio": copies["median_ratio"],
                     "auc": {k: v["auc"] for k, v in attacks.items()},
                     "tpr_at_1pct_fpr": {k: v["tpr_at_1pct_fpr"] for k, v in attacks.items()},
                     "n_attack_pairs": int(len(bm)), "seconds": time.perf_counter() - t0})
    return {"steps": rc.sweep_steps, "rows": rows,
            "pool": "features of held-out ∪ test examples (never seen by the stage-1 encoder)"}


def run_features(rc: RegimesConfig, run_dir: Path | None = None, data: str | None = None, path: str | None = None,
                 sweep: bool = True) -> dict[str, Any]:
    from pfdiff.longtail.common import predict_logits

    fs = feature_setup(rc, run_dir, data, path)
    C = fs.split.num_classes

    def classify(u: torch.Tensor) -> torch.Tensor:
        return predict_logits(fs.classifier, fs.scaler.inverse(u)).argmax(1)

    # probes and references: the pool examples the long-tailed subset left out, or the test split without them
    u_out, y_out = (fs.u_held, fs.y_held) if len(fs.y_held) >= 4 * C else (fs.u_test, fs.y_test)
    probes, refs = _halves(y_out, rc.seed)
    out = measure(fs.cfg.diffusion.denoiser(fs.denoiser, fs.schedule), fs.u, fs.y, u_out[probes], y_out[probes],
                  u_out[refs], y_out[refs], classify, C, _feature_quality(fs, classify), rc)
    out["source"], out["setup_seconds"] = fs.source, fs.seconds
    out["classifier_test_accuracy"] = float((classify(fs.u_test) == fs.y_test).float().mean())
    out["space"] = f"standardised {fs.u.shape[1]}-d stage-1 features of {fs.cfg.data.name} (long-tailed split)"
    upper = out["speciation_measured"]["t_S_upper"]
    if not math.isfinite(upper):
        upper = out["speciation_theory"]["t_S"] + R.cloning_window_offset(0.1)
    t0 = time.perf_counter()
    out["promise"] = promise_table(fs, upper, classify, rc)
    out["seconds"]["promise"] = time.perf_counter() - t0
    if sweep and rc.sweep_n:
        t0 = time.perf_counter()
        out["collapse_vs_n"] = collapse_vs_n(fs, classify, rc)
        out["seconds"]["collapse_vs_n"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------- images


def run_images(rc: RegimesConfig, data: str = "digits", path: str | None = None) -> dict[str, Any]:
    """The DPDM U-Net (non-private, ``rc.image_steps`` steps) on a balanced image split; the evaluator CNN
    decides classes and gives the FD features; the test split gives probes and references."""
    from pfdiff.imagespace.dpdm import (DPDMConfig, accuracy, feature_fid, load_image_splits, train_denoiser,
                                        train_image_classifier)

    t0 = time.perf_counter()
    dc = DPDMConfig(dataset=data, data_path=path, steps=rc.image_steps)
    sp = load_image_splits(dc.dataset, dc.data_path, dc.test_fraction, dc.split_seed, dc.balanced_train)
    xtr, ytr, xte, yte = sp.x_train, sp.y_train, sp.x_test, sp.y_test
    if rc.max_train is not None:
        i, j = _pick(len(xtr), rc.max_train, rc.seed, "max-train"), _pick(len(xte), rc.max_train, rc.seed, "max-test")
        xtr, ytr, xte, yte = xtr[i], ytr[i], xte[j], yte[j]
    model, info = train_denoiser(xtr, ytr, sp.num_classes, None, dc, rc.seed)
    evaluator = train_image_classifier(xtr, ytr, sp.num_classes, steps=dc.clf_steps, batch_size=dc.clf_batch_size,
                                       lr=dc.clf_lr, feature_dim=dc.clf_feature_dim, width=dc.clf_width,
                                       seed=rc.seed, tag="regimes-evaluator")
    setup = time.perf_counter() - t0

    @torch.no_grad()
    def classify(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([evaluator(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)])

    def quality(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x = x.clamp(-1, 1)
        return {"fd_test": feature_fid(evaluator, xte, x), "accuracy": accuracy(evaluator, x, y)}

    probes, refs = _halves(yte, rc.seed)
    out = measure(dc.denoiser(model), xtr, ytr, xte[probes], yte[probes],
                  xte[refs], yte[refs], classify, sp.num_classes, quality, rc)
    out["source"], out["setup_seconds"] = "trained here (DPDM recipe, non-private)", setup
    out["denoiser"] = {k: info[k] for k in ("steps", "parameters", "train_seconds", "loss_last10pct") if k in info}
    out["classifier_test_accuracy"] = accuracy(evaluator, xte, yte)
    out["space"] = f"{sp.name} images {list(sp.shape)} in [-1, 1] (balanced split)"
    return out


# ---------------------------------------------------------------------------------------------- entry point


def run_regimes(out_dir: Path, what: tuple[str, ...] = ("features", "images"), data: str = "digits",
                path: str | None = None, run_dir: Path | None = None, config: RegimesConfig | None = None,
                threads: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the analyses, write ``regimes.json``, the plots and ``regimes.md`` into ``out_dir``; return results."""
    from pfdiff.analysis.regimes_report import render

    rc = RegimesConfig.model_validate({**(config or RegimesConfig()).model_dump(), **overrides})
    unknown = set(what) - {"features", "images"}
    if unknown:
        raise ValueError(f"unknown analyses {sorted(unknown)}; choose from features, images")
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"paper": "Biroli, Bonnaire, de Bortoli & Mézard 2024, Dynamical regimes of diffusion "
                                        "models (arXiv:2402.18491)",
                               "config": rc.model_dump(mode="json"),
                               "threads": torch.get_num_threads(), "datasets": {}}
    try:
        for kind in what:
            t1 = time.perf_counter()
            res = run_features(rc, run_dir, data, path) if kind == "features" else run_images(rc, data, path)
            res["wall_seconds"] = time.perf_counter() - t1
            results["datasets"][f"{data}-{kind}"] = res
            results["wall_seconds"] = time.perf_counter() - t0
            atomic_write_json(out_dir / "regimes.json", results)
    finally:
        torch.set_num_threads(old)
    results["wall_seconds"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "regimes.json", results)
    atomic_write_text(out_dir / "regimes.md", render(results, out_dir))
    return results
