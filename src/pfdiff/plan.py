"""What ``pfdiff run`` would do, without doing it (``pfdiff check`` = ``pfdiff run --dry-run``).

:func:`make_plan` runs the checks ``run`` makes before its run directory exists (``pipeline.prepare``: methods,
device, data, augmentation, privacy preflight) and returns the plan as a dict: the data, the methods, the
stages of one (split seed, seed) pair with their optimiser steps and which methods share them, every privacy
release with its σ and ε (from ``private.preflight``, the same calibration the run does), and a rough wall
time from the per-step costs in ``benchmarks/results/*.json``. :func:`render_plan` turns it into text.
Nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pfdiff.config import RunConfig

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# bench_e2e.py runs the quickstart (digits-LT: 8×8 images, the auto `cnn` encoder) for its stage-1 and E2E costs
E2E_BENCH_INPUT, E2E_BENCH_ENCODER = (1, 8, 8), "cnn"


def make_plan(cfg: RunConfig, bench_dir: Path | None = None) -> dict[str, Any]:
    """The plan of ``pfdiff run`` for ``cfg``; raises what ``run`` would raise before writing anything."""
    from pfdiff.longtail.pipeline import prepare, split_seeds, split_summary

    split = prepare(cfg)
    private = any(m.startswith("dp-") for m in cfg.methods)
    summary = split_summary(split, cfg)
    data = {"name": cfg.data.name, "path": cfg.data.path, "classes": split.num_classes,
            "input_shape": list(split.train.input_shape), "train": summary["train_size"],
            "val": summary["val_size"], "test": summary["test_size"], "imbalance_factor": cfg.data.imbalance_factor}
    if private:
        data.update(public=summary["n_public"], private=summary["n_private"])
    else:
        data.update(n_max=int(split.counts.max()), n_min=int(split.counts.min()))
    pairs = [[s, seed] for s in split_seeds(cfg) for seed in cfg.seeds]
    stages = pair_stages(cfg, split, private)
    bench = load_benchmarks(bench_dir or BENCH_DIR)
    device = _device(cfg)
    for st in stages:
        st["seconds"], st["estimate"] = estimate(st, cfg, split, device, bench)
    missing = sorted({st["estimate"] for st in stages if st["seconds"] is None})
    per_pair = sum(st["seconds"] or 0.0 for st in stages)
    return {"config": cfg.name, "device": device, "data": data, "methods": list(cfg.methods), "pairs": pairs,
            "stages": stages, "privacy": privacy_plan(cfg, len(split.train.y), len(pairs)) if private else None,
            "time": {"per_pair_seconds": per_pair, "total_seconds": per_pair * len(pairs), "missing": missing,
                     "machines": sorted({m for st in stages if st["seconds"] is not None for m in [st["machine"]]})}}


def _device(cfg: RunConfig) -> str:
    from pfdiff.training import resolve_device

    return resolve_device(cfg.device).type


def _steps(n: int, batch: int) -> int:
    from pfdiff.training import steps_per_epoch

    return steps_per_epoch(n, batch)


def pair_stages(cfg: RunConfig, split, private: bool) -> list[dict[str, Any]]:
    """The stages one (split seed, seed) pair trains, in the order ``SeedRun`` runs them, each once however
    many methods use it (``used_by``): what pipeline.py shares (stage 1 per stage-1 loss, stage 2 per loss).
    Long on purpose: one branch per method base, in SeedRun's order, so that it reads against pipeline.py
    side by side (tests/test_plan.py checks the sharing and the step counts of one config)."""
    from pfdiff.longtail.end_to_end import e2e_budget, parse_e2e
    from pfdiff.longtail.ldmlr import pseudo_counts
    from pfdiff.longtail.methods import parse_method
    from pfdiff.longtail.pipeline import PSEUDO_WEIGHTED, paper_protocol
    from pfdiff.longtail.private import public_size

    p, d, o, ps = cfg.privacy, cfg.diffusion, cfg.stage1, cfg.pseudo
    n, C = len(split.train.y), split.num_classes
    n_fit = public_size(n, p.public_fraction) if private else n  # what stage 1 and cRT train on
    stages: dict[str, dict[str, Any]] = {}

    def add(key: str, kind: str, label: str, steps: int, batch: int, method: str, **extra) -> None:
        st = stages.setdefault(key, {"stage": key, "kind": kind, "label": label, "steps": int(steps),
                                     "batch": int(batch), "used_by": [], **extra})
        if method not in st["used_by"]:
            st["used_by"].append(method)

    def stage1(loss: str, method: str) -> None:
        tag = "" if loss == "ce" else f"@{loss}"
        if private and p.encoder == "dp":
            add("stage1", "stage1-dp", "stage 1: E + G by DP-SGD on the private part", p.encoder_steps,
                p.encoder_batch_size, method)
        else:
            add(f"stage1{tag}", "stage1", f"stage 1: E + G ({loss} loss{', public part' if private else ''})",
                o.epochs * _steps(n_fit, o.batch_size), o.batch_size, method)

    def stage2(loss: str, method: str) -> np.ndarray:
        tag = "" if loss == "ce" else f"@{loss}"
        add(f"stage2{tag}", "stage2", "stage 2: feature denoiser ε_θ", d.steps, d.batch_size, method)
        n_gen = pseudo_counts(split.counts, ps)
        add(f"sampling{tag}", "sampling", f"sampling: pseudo-features + {C}×{cfg.e2e.drift_per_class} for drift",
            d.sample_steps, d.sample_batch, method, features=int(n_gen.sum()) + C * cfg.e2e.drift_per_class)
        return n_gen

    for name in cfg.methods:
        m = parse_method(name)
        tag = "" if m.stage1 == "ce" else f"@{m.stage1}"
        weights = len(cfg.pseudo_weight_grid) if m.base in PSEUDO_WEIGHTED and cfg.pseudo_weight_grid else 1
        bs = ps.finetune_batch_size or o.batch_size
        if m.base in ("ce", "resample") or m.base.startswith("ldmlr") or m.base == "dp-ldmlr":
            stage1(m.stage1, name)
        if m.base == "resample":
            add(f"crt{tag}", "classifier", "cRT: G re-trained, class-balanced batches",
                ps.finetune_epochs * _steps(n_fit, o.batch_size), o.batch_size, name)
        elif m.base.startswith("ldmlr"):
            n_gen = stage2(m.stage1, name)
            if m.base == "ldmlr-paper":
                n_gen = pseudo_counts(split.counts, paper_protocol(cfg).pseudo)
                add(f"sampling-paper{tag}", "sampling", "sampling: proportional pseudo-features (ldmlr-paper)",
                    d.sample_steps, d.sample_batch, name, features=int(n_gen.sum()))
                bs = paper_protocol(cfg).pseudo.finetune_batch_size
            if m.base == "ldmlr-ft":
                add(m.spec, "stage3-encoder", "stage 3: E + G fine-tuned on real + pseudo",
                    weights * ps.finetune_epochs * _steps(n, o.batch_size), o.batch_size, name)
            else:
                add(m.spec, "classifier", "stage 3: G fine-tuned on real + pseudo-features"
                    + (f" (× {weights} pseudo weights)" if weights > 1 else ""),
                    weights * ps.finetune_epochs * _steps(n + int(n_gen.sum()), bs), bs, name)
        elif m.base == "dp-ldmlr":
            n_pub = n_fit
            if p.public_pretrain:
                add(f"public-stage2{tag}", "stage2", "stage 2 warm start: ε_θ on the public features", d.steps,
                    d.batch_size, name)
            phase1 = p.promise_phase1_steps if p.mechanism == "dp-promise" else 0
            add(f"dp-stage2{tag}", "stage2-dp", f"DP stage 2: ε_θ by DP-SGD on the private part ({p.mechanism}"
                + (f", {phase1} phase-I steps at batch {p.promise_phase1_batch}" if phase1 else "") + ")",
                phase1 + p.steps, p.expected_batch_size, name)
            # the released counts are noisy: the number generated is known only roughly before the run
            n_gen = int(split.counts.max()) * C - n_pub
            add(f"dp-sampling{tag}", "sampling", "sampling: DP pseudo-features (≈, from noisy counts)",
                d.sample_steps, d.sample_batch, name, features=max(0, n_gen))
            add(f"dp-stage3{tag}", "classifier", "stage 3: G fine-tuned on public + DP pseudo-features",
                weights * ps.finetune_epochs * _steps(n_pub + max(0, n_gen), bs), bs, name)
        elif (variant := parse_e2e(m.base)) is not None:
            warm = variant.warm or cfg.e2e.warm_start
            if warm in ("stage1", "stage2"):
                stage1("ce", name)
            if warm == "stage2":
                stage2("ce", name)
            steps, batch = e2e_budget(cfg, n)
            add(m.base, "e2e", f"end to end: E, G, ε_θ (strategy {variant.strategy})", steps, batch, name,
                strategy=variant.strategy)
        # ce / +la: no training beyond stage 1 (+la reuses its base's model)
    return list(stages.values())


def privacy_plan(cfg: RunConfig, n_train: int, n_pairs: int) -> dict[str, Any]:
    """Every release of one pair with σ, q, steps and its ε alone, the composed ε (the run's accountant) and ε
    of publishing all pairs together; from ``private.preflight`` (the run's own calibration and checks)."""
    from pfdiff.longtail.private import preflight
    from pfdiff.privacy.accounting import epsilon, epsilon_all

    p = cfg.privacy
    pre = preflight(cfg, n_train)
    events = pre["events"]
    return {"delta": p.delta, "target_epsilon": p.target_epsilon, "accountant": p.accountant,
            "mechanism": p.mechanism, "n_private": pre["n_private"], "sigma": pre["sigma"],
            "noise": "NOT PRIVATE (reproducible_noise)" if p.reproducible_noise else "OS entropy",
            "events": [{"name": e.name, "sigma": e.noise_multiplier, "sample_rate": e.sample_rate, "steps": e.steps,
                        "epsilon": epsilon([e], p.delta, p.accountant)} for e in events],
            "epsilon": epsilon(events, p.delta, p.accountant),
            "all_pairs_epsilon": epsilon_all(list(events) * n_pairs, p.delta) if n_pairs > 1 else None,
            "paper_claim": pre.get("paper_claim")}


# ------------------------------------------------------------------------------------------ time estimate

def load_benchmarks(folder: Path) -> dict[str, dict]:
    """benchmarks/results/*.json by stem (none: an empty dict, the estimate then says so)."""
    out = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    return out


def _machine(b: dict, name: str) -> str:
    return f"{name}.json: {b.get('device', 'cpu')}, {b.get('threads', '?')} thread(s), torch {b.get('torch', '?')}"


def _encoder_name(cfg: RunConfig, shape: tuple[int, ...]) -> str:
    from pfdiff.models.encoders import _AUTO

    return _AUTO.get(len(shape), "cnn") if cfg.model.encoder == "auto" else cfg.model.encoder


def estimate(st: dict, cfg: RunConfig, split, device: str, bench: dict) -> tuple[float | None, str]:
    """(seconds, what it was estimated from) of one stage, or (None, "no benchmark for …"). Per-step costs are
    scaled linearly in the batch, the sampler steps and DP-SGD's K: rough by construction."""
    kind, steps, batch = st["kind"], st["steps"], st["batch"]
    m, shape = cfg.model, tuple(split.train.input_shape)
    if device != "cpu":
        return None, f"no benchmark for {st['stage']} on {device} (all benchmarks are CPU runs)"
    # the denoiser benchmarks measure hidden 256, depth 3, 64-d: other sizes are not rescaled, only named
    at = "" if (m.denoiser_hidden, m.denoiser_depth, m.feature_dim) == (256, 3, 64) else ", measured at hidden 256, depth 3"
    if kind == "stage2" and "core" in bench:
        b = bench["core"]["denoiser_training"]
        st["machine"] = _machine(bench["core"], "core")
        return steps * b["seconds_per_step"] * batch / b["batch"], f"core.json denoiser_training{at}"
    if kind == "stage2-dp" and "dp" in bench:
        b = bench["dp"]["models"]["feature_denoiser"].get("bk_tuned_allocator")
        if b:
            st["machine"] = _machine(bench["dp"], "dp")
            k = cfg.privacy.noise_multiplicity / b["K"]
            return steps * b["dp_ms"] / 1000 * batch / b["batch"] * k, f"dp.json feature_denoiser{at}"
    if kind == "sampling" and "sampling" in bench:
        rows = [r for r in bench["sampling"].get("dim_sweep", []) if "us_per_feature" in r]
        if rows:
            r = min(rows, key=lambda r: abs(r["dim"] - m.feature_dim))
            sampler_steps = int(bench["sampling"].get("sampler", "ddim, 10 steps").split(",")[1].split()[0])
            st["machine"] = _machine(bench["sampling"], "sampling")
            return (st["features"] * r["us_per_feature"] * 1e-6 * steps / sampler_steps,
                    f"sampling.json {r['dim']}-d DDIM{at}")
    if kind == "stage1":
        enc = _encoder_name(cfg, shape)
        for r in (bench.get("stage1") or {}).get("rows", []):
            if r["encoder"] == enc and tuple(r["input_shape"]) == shape and r.get("device", "cpu") == device:
                st["machine"] = _machine(bench["stage1"], "stage1")
                return steps * r["ms_per_step"] / 1000 * batch / r["batch"], f"stage1.json {r['preset']}"
        if enc == E2E_BENCH_ENCODER and shape == E2E_BENCH_INPUT and "e2e" in bench:
            b = bench["e2e"]
            per_example = b["ldmlr"]["stage_seconds"]["stage1"] / (b["ldmlr"]["stage1_epochs"] * b["train_size"])
            st["machine"] = _machine(b, "e2e")
            return steps * batch * per_example, "e2e.json stage 1 (digits-LT)"
        return None, f"no benchmark for stage 1 with encoder {enc} on inputs {list(shape)}"
    if kind == "e2e" and _encoder_name(cfg, shape) == E2E_BENCH_ENCODER and shape == E2E_BENCH_INPUT:
        b = bench.get("e2e", {})
        row = next((v for k, v in b.get("e2e", {}).items() if k.startswith(f"e2e-{st['strategy']}-")), None)
        if row:
            st["machine"] = _machine(b, "e2e")
            return steps * batch * row["seconds_per_epoch"] / b["train_size"], f"e2e.json e2e-{st['strategy']}"
    what = {"classifier": "classifier fine-tuning on fixed features (cRT, stage 3; small)",
            "stage3-encoder": "E + G fine-tuning (ldmlr-ft)", "stage1-dp": "DP-SGD stage 1 (privacy.encoder=dp)",
            "e2e": f"end-to-end training on inputs {list(shape)}"}.get(kind, kind)
    return None, f"no benchmark for {what}"


# ------------------------------------------------------------------------------------------ text

def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as plain text (what ``pfdiff check`` prints)."""
    d = plan["data"]
    sizes = f"N train {d['train']}, val {d['val']}, test {d['test']}"
    if "private" in d:
        sizes += f" (public {d['public']}, private {d['private']})"
    else:
        sizes += f" (n_max {d['n_max']}, n_min {d['n_min']})"
    lines = [f"plan of `pfdiff run` for {plan['config']} (nothing written; the checks of `pfdiff run` passed)",
             f"data: {d['name']}{' ' + d['path'] if d['path'] else ''}: {sizes}, {d['classes']} classes, "
             f"inputs {d['input_shape']}, imbalance factor {d['imbalance_factor']:g}",
             f"methods: {', '.join(plan['methods'])}",
             f"device: {plan['device']}; {len(plan['pairs'])} (split seed, seed) pair(s): "
             + ", ".join(f"({s}, {t})" for s, t in plan["pairs"]),
             "stages of each pair (each trained once, shared by the methods listed):"]
    for st in plan["stages"]:
        extra = f", {st['features']} features" if "features" in st else ""
        unit = "sampler steps" if st["kind"] == "sampling" else "steps"
        cost = _duration(st["seconds"]) if st["seconds"] is not None else "?"
        lines.append(f"  {st['stage']}: {st['label']}: {st['steps']} {unit} × batch {st['batch']}{extra}; "
                     f"{cost} ({st['estimate']}); for {', '.join(st['used_by'])}")
    if not plan["stages"]:
        lines.append("  (none)")
    pv = plan["privacy"]
    if pv:
        lines.append(f"privacy (per pair; add/remove one of N_private = {pv['n_private']}, δ = {pv['delta']:g}, "
                     f"{pv['accountant']}, noise from {pv['noise']}):")
        for e in pv["events"]:
            lines.append(f"  {e['name']}: σ = {e['sigma']:.4g}, q = {e['sample_rate']:.4g}, {e['steps']} step(s): "
                         f"ε = {e['epsilon']:.3f} alone")
        lines.append(f"  composed: ε = {pv['epsilon']:.3f} ≤ target {pv['target_epsilon']:g}")
        if pv["all_pairs_epsilon"]:
            lines.append(f"  all {len(plan['pairs'])} pairs published together: ε = "
                         + ", ".join(f"{k} {v:.3f}" for k, v in pv["all_pairs_epsilon"].items()))
        if pv["paper_claim"] is not None:
            lines.append(f"  dp-promise as its paper accounts Phase I: ε = {pv['paper_claim']:.3f} (claimed, not a guarantee)")
    t = plan["time"]
    known = "" if not t["missing"] else " + stages without a benchmark"
    lines.append(f"expected wall time (rough): {_duration(t['per_pair_seconds'])} per pair, "
                 f"{_duration(t['total_seconds'])} in all{known}")
    for line in t["machines"]:
        lines.append(f"  measured on {line}")
    for line in t["missing"]:
        lines.append(f"  {line}")
    return "\n".join(lines)
