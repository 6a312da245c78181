"""Membership inference against the feature denoisers of a finished run (``pfdiff attack RUN_DIR``).

Members are the examples a denoiser was trained on (the long-tailed training set for LDMLR, its
private part for DP-LDMLR); non-members are the training pool's examples that the long-tailed
subset left out (``LongTailSplit.heldout``: same distribution, decided by ``data.split_seed``
before any training). Both sets are balanced per class (k_c = min of the two), so a classifier of
the label alone cannot tell them apart. Features are computed with the run's own stage-1 encoder
and scaled (and, for DP, clipped) exactly as the denoiser saw them during training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.diffusion import make_schedule
from pfdiff.evaluation.mia import attack_settings, balanced_pairs
from pfdiff.longtail.common import LongTailSplit, encode, init_encoder_classifier, make_split
from pfdiff.longtail.ldmlr import FeatureScaler, build_denoiser, sample_features
from pfdiff.longtail.private import clip_rows, public_private_split, sampling_view
from pfdiff.runs import RunDir
from pfdiff.training import load_modules


@dataclass
class Target:
    """One released denoiser with its members and non-members in the space it was trained in."""

    name: str
    model: nn.Module
    members: tuple[torch.Tensor, torch.Tensor]
    nonmembers: tuple[torch.Tensor, torch.Tensor]
    pseudo: tuple[torch.Tensor, torch.Tensor]  # released (or freshly sampled) pseudo-features, same space


def _encoder(cfg: RunConfig, split: LongTailSplit, ck: Path, seed: int) -> nn.Module:
    name = "dp-stage1" if (ck / "dp-stage1.safetensors").exists() else "stage1"
    enc, g = init_encoder_classifier(cfg, split.train.input_shape, split.num_classes, seed, torch.device("cpu"))
    load_modules(ck / f"{name}.safetensors", {"encoder": enc, "classifier": g})
    return enc.eval()


def _denoiser(cfg: RunConfig, path: Path, dim: int, num_classes: int) -> nn.Module:
    model = build_denoiser(cfg, dim, num_classes)
    load_modules(path, {"denoiser": model}, use_ema_for="denoiser")
    return model.eval()


def load_targets(run_dir: Path, seed: int) -> list[Target]:
    """Every feature denoiser a run trained for ``seed`` (LDMLR's, DP-LDMLR's), ready to attack."""
    run = RunDir.open(run_dir)
    cfg = run.config()
    split = make_split(cfg)
    ck = run.checkpoints / f"seed{seed}"
    if not ck.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoints for seed {seed}")
    C = split.num_classes
    enc = _encoder(cfg, split, ck, seed)
    z = encode(enc, torch.as_tensor(split.train.x))
    z_out = encode(enc, torch.as_tensor(split.heldout.x))
    y, y_out = torch.as_tensor(split.train.y), torch.as_tensor(split.heldout.y)
    targets = []
    if (ck / "stage2.safetensors").exists():
        scaler = FeatureScaler.fit(z)
        mem, non = balanced_pairs(split.train.y, split.heldout.y, C, seed)
        feats = load_file(str(ck / "features.safetensors")) if (ck / "features.safetensors").exists() else None
        pseudo = (scaler.transform(feats["z_pseudo"]), feats["y_pseudo"]) if feats else None
        model = _denoiser(cfg, ck / "stage2.safetensors", z.shape[1], C)
        targets.append(Target("ldmlr", model, (scaler.transform(z[mem]), y[mem]),
                              (scaler.transform(z_out[non]), y_out[non]), pseudo))
    if (ck / "dp-stage2.safetensors").exists():
        p = cfg.privacy
        pub, priv = public_private_split(split.train.y, C, p.public_fraction, cfg.data.split_seed)
        scaler = FeatureScaler.fit(z[pub])
        mem, non = balanced_pairs(split.train.y[priv], split.heldout.y, C, seed)
        space = lambda v: clip_rows(scaler.transform(v), p.feature_radius)  # noqa: E731 — as in training
        model = sampling_view(_denoiser(cfg, ck / "dp-stage2.safetensors", z.shape[1], C), p, C)
        targets.append(Target("dp-ldmlr", model, (space(z[priv][mem]), y[priv][mem]),
                              (space(z_out[non]), y_out[non]), None))
    return targets


def lira_attack(t: Target, cfg: RunConfig, schedule, seed: int, shadows: int
                ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Online LiRA (Carlini et al. 2022) on a non-private LDMLR denoiser: ``shadows`` shadow denoisers, each
    trained exactly as the target's stage 2 (same config, its own seed) on a random half of members ∪
    non-members; the per-example statistic is the loss attack's score. Cost: ``shadows`` stage-2 trainings
    (``diffusion.steps`` each, ≈ 30 s per shadow for the quickstart on 2 cores)."""
    from pfdiff.evaluation import mia
    from pfdiff.longtail.ldmlr import train_feature_diffusion
    from pfdiff.training import generator

    u, y = torch.cat([t.members[0], t.nonmembers[0]]), torch.cat([t.members[1], t.nonmembers[1]])
    kw = mia.attack_settings(schedule.T)["loss"]
    score = lambda m: mia.loss_scores(m, schedule, u, y, cfg.diffusion.prediction, seed=seed, **kw)  # noqa: E731
    C = int(y.max()) + 1
    s_in, s_out = np.full((shadows, len(y)), np.nan), np.full((shadows, len(y)), np.nan)
    for k in range(shadows):
        inside = torch.rand(len(y), generator=generator("cpu", seed, "lira-split", k)) < 0.5
        shadow, _ = train_feature_diffusion(u[inside], y[inside], C, cfg, seed * 1000 + k + 1, None, None)
        s = np.asarray(score(shadow))
        s_in[k, inside.numpy()], s_out[k, ~inside.numpy()] = s[inside.numpy()], s[~inside.numpy()]
    stat = mia.lira_scores(score(t.model), s_out, s_in)
    n = len(t.members[1])
    return {**mia.attack_metrics(stat[:n], stat[n:]), "shadows": shadows}, (stat[:n], stat[n:])


def attack_targets(targets: list[Target], cfg: RunConfig, seed: int, attacks: tuple[str, ...], lira: int = 0
                   ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Run the attacks and the copying check on each target: ({target: results}, {curve name: scores})."""
    from pfdiff.evaluation import mia

    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.T)
    results, curves = {}, {}
    for t in targets:
        t0 = time.perf_counter()
        metrics, scores = mia.run_attacks(t.model, schedule, cfg.diffusion.prediction, *t.members, *t.nonmembers,
                                          attacks=attacks, seed=seed, attack_kwargs=attack_settings(schedule.T))
        entry: dict[str, Any] = dict(metrics)
        curves.update({f"{t.name} · {name} (seed {seed})": s for name, s in scores.items()})
        if lira and t.name == "ldmlr":  # shadows are trained as the (non-private) target was
            entry["lira"], curves[f"{t.name} · lira (seed {seed})"] = lira_attack(t, cfg, schedule, seed, lira)
        pseudo = t.pseudo
        if pseudo is None:  # the released model can generate them: 50 per class
            C = int(max(t.members[1].max(), t.nonmembers[1].max())) + 1
            pseudo = sample_features(t.model, schedule, np.full(C, 50), cfg.diffusion, seed, torch.device("cpu"),
                                     tag="attack-pseudo")
        entry["copying"] = mia.nearest_neighbour_check(*pseudo, *t.members, *t.nonmembers, seed=seed)
        entry["n_members"] = int(len(t.members[1]))
        entry["seconds"] = time.perf_counter() - t0
        results[t.name] = entry
    return results, curves


def attack_run(run_dir: Path, attacks: tuple[str, ...] = ("loss", "secmi", "pia"), lira: int = 0) -> dict[str, Any]:
    """Attack every denoiser of every seed: {"seeds": {seed: {target: …}}, "roc_curves": …}."""
    run = RunDir.open(run_dir)
    cfg = run.config()
    out: dict[str, Any] = {"attacks": list(attacks), "seeds": {}, "roc_curves": {}}
    for seed in cfg.seeds:
        targets = load_targets(run_dir, seed) if (run.checkpoints / f"seed{seed}").exists() else []
        if targets:
            results, curves = attack_targets(targets, cfg, seed, attacks, lira)
            out["seeds"][str(seed)] = results
            out["roc_curves"].update(curves)
    if not out["seeds"]:
        raise FileNotFoundError(f"{run_dir} has no trained denoiser to attack (no checkpoints/seedN/stage2 or dp-stage2)")
    return out


def attack_and_report(run_dir: Path, attacks: tuple[str, ...] = ("loss", "secmi", "pia"), lira: int = 0) -> Path:
    """``pfdiff attack``: attack, write ``attack.json`` and ``plots/roc.png``, re-render the report."""
    from pfdiff.evaluation.mia import plot_roc
    from pfdiff.report import render_report

    run = RunDir.open(run_dir)
    out = attack_run(run_dir, attacks, lira)
    curves = out.pop("roc_curves")
    run.write_json("attack.json", out)
    plot_roc(curves, run.plots / "roc.png", title=f"membership inference: {run.path.name}")
    return render_report(run)
