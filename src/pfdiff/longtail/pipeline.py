"""Runs the configured methods for every seed on one fixed split and collects the results."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from pfdiff.config import RunConfig
from pfdiff.data import class_counts
from pfdiff.evaluation import GROUPS, recognition_metrics
from pfdiff.longtail.baselines import classifier_retraining, logit_adjusted, train_stage1
from pfdiff.longtail.common import LongTailSplit, encode, make_split, predict_logits
from pfdiff.longtail.end_to_end import drift_distances, parse_e2e, per_class_frechet, train_end_to_end
from pfdiff.longtail.filtering import MahalanobisScorer, aid_filter
from pfdiff.longtail.ldmlr import (FeatureScaler, finetune_encoder_with_pseudo, finetune_with_pseudo, pseudo_counts,
                                   sample_features, train_feature_diffusion)
from pfdiff.longtail.methods import Method, parse_method
from pfdiff.longtail.private import (clip_rows, noisy_counts, preflight, public_private_split,
                                     train_private_denoiser, train_private_stage1)
from pfdiff.privacy.accounting import GaussianEvent, PrivacyLedger, epsilon_all
from pfdiff.privacy.noise import noise_source
from pfdiff.runs import RunDir, atomic_write_json
from pfdiff.training import resolve_device


class Timer:
    """Wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out


def prepare(cfg: RunConfig) -> LongTailSplit:
    """Everything that can refuse a run, before its directory exists: the methods, the device, the data and,
    for a private run, the whole privacy plan (δ < 1/N_private, σ reachable, ε within the target)."""
    methods = [parse_method(m) for m in cfg.methods]
    resolve_device(cfg.device)
    split = make_split(cfg)
    if any(m.base.startswith("dp-") for m in methods):
        preflight(cfg, len(split.train.y))
    return split


def run_experiment(cfg: RunConfig, run: RunDir, split: LongTailSplit | None = None) -> dict[str, Any]:
    """Every seed of ``cfg`` (skipping seeds already finished in ``run``), then the aggregate table.
    ``split``: from :func:`prepare` (which also ran the checks), else prepared here."""
    split = split or prepare(cfg)
    methods = [parse_method(m) for m in cfg.methods]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    run.write_json("split.json", split_summary(split, cfg))
    per_seed = []
    for seed in cfg.seeds:
        name = f"seeds/seed{seed}.json"
        if not (run.path / name).exists():
            run.write_json(name, SeedRun(split, cfg, seed, device, run).run(methods))
        per_seed.append(run.read_json(name))
    results = aggregate(per_seed, methods, split, device, split_summary(split, cfg))
    run.write_json("results.json", results)
    return results


class SeedRun:
    """One seed: stage 1 and LDMLR's stage 2 are trained once and shared by every method that needs them."""

    def __init__(self, split: LongTailSplit, cfg: RunConfig, seed: int, device: torch.device, run: RunDir):
        self.split, self.cfg, self.seed, self.device, self.run_dir = split, cfg, seed, device, run
        self.timer, self.ck = Timer(), run.checkpoints / f"seed{seed}"
        self.diagnostics: dict[str, Any] = {}
        self.x = torch.as_tensor(split.train.x, device=device)
        self.y = torch.as_tensor(split.train.y, device=device)
        self.x_test = torch.as_tensor(split.test.x, device=device)
        self._stage1: tuple | None = None
        self._pseudo: tuple | None = None
        self._bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # private mode (a dp-… method is asked for): E and the stage-1 G see only the declared public part
        self.private_mode = any(parse_method(m).base.startswith("dp-") for m in cfg.methods)
        self.public_idx = self.private_idx = None
        self.encoder_event = None  # privacy.encoder: dp — the DP-SGD event of E + stage-1 G
        self._ledger: PrivacyLedger | None = None
        self._private_counts: tuple[np.ndarray, GaussianEvent | None] | None = None
        self.noise = noise_source(cfg.privacy, seed)  # OS entropy unless the run is marked NOT PRIVATE
        if self.private_mode:
            pub, priv = public_private_split(split.train.y, split.num_classes, cfg.privacy.public_fraction,
                                             cfg.data.split_seed)
            self.public_idx = torch.as_tensor(pub, device=device)
            self.private_idx = torch.as_tensor(priv, device=device)

    def log(self, record: dict) -> None:
        self.run_dir.log({"seed": self.seed, **record})

    def run(self, methods: list[Method]) -> dict[str, Any]:
        y_test = self.split.test.y
        metrics = {}
        for method in methods:
            logits, prior = self.logits_and_prior(method.base)
            if method.adjust:
                logits = logit_adjusted(logits, prior.cpu().numpy(), self.cfg.logit_adjust_tau)
            m = recognition_metrics(logits.argmax(1).cpu().numpy(), y_test, self.split.num_classes, self.split.groups)
            m["seconds"] = self.method_seconds(method.base)
            metrics[method.name] = m
            self.log({"event": "test", "method": method.name, **{k: m[k] for k in ("top1", "balanced", *GROUPS)}})
        return {"seed": self.seed, "methods": metrics, "timings": self.timer.seconds, "diagnostics": self.diagnostics}

    def method_seconds(self, base: str) -> float:
        """Wall time a method costs on its own: its stages plus the shared stages it builds on."""
        stages = {"ce": ["stage1"], "resample": ["stage1", "crt"]}.get(base)
        if stages is None:
            stages = ["stage1", "stage2", "sampling", base] if base.startswith("ldmlr") else [base]
        return sum(self.timer.seconds.get(s, 0.0) for s in stages)

    # --- shared stages ----------------------------------------------------------------------------
    def stage1(self):
        """(encoder, classifier, z_train, z_test) of stage 1, trained once per seed."""
        if self._stage1 is None:
            split = self.split
            if self.private_mode:
                split = replace(split, train=split.train.subset(self.public_idx.cpu().numpy()))
            if self.private_mode and self.cfg.privacy.encoder == "dp":
                enc, g, self.encoder_event = self.timer("stage1", lambda: train_private_stage1(
                    self.x[self.private_idx], self.y[self.private_idx], self.split.num_classes,
                    self.split.train.input_shape, self.cfg, self.seed, self.ledger(),
                    self.ck / "dp-stage1.safetensors", self.log, self.noise))
            else:
                enc, g = self.timer("stage1", lambda: train_stage1(split, self.cfg, self.seed, self.device,
                                                                   self.ck / "stage1.safetensors", self.log))
            self._stage1 = (enc, g, encode(enc, self.x), encode(enc, self.x_test))
        return self._stage1

    def pseudo(self):
        """LDMLR stage 2 and its pseudo-features (raw feature space), once per seed."""
        if self._pseudo is None:
            _, _, z, _ = self.stage1()
            scaler = FeatureScaler.fit(z)
            denoiser, schedule = self.timer("stage2", lambda: train_feature_diffusion(
                scaler.transform(z), self.y, self.split.num_classes, self.cfg, self.seed,
                self.ck / "stage2.safetensors", self.log))
            n_gen = pseudo_counts(self.split.counts, self.cfg.pseudo)
            u_hat, y_hat = self.timer("sampling", lambda: sample_features(
                denoiser, schedule, n_gen, self.cfg.diffusion, self.seed, self.device))
            z_hat = scaler.inverse(u_hat)
            # a separate, class-balanced set to measure drift on the same footing as the E2E runs
            u_d, y_d = sample_features(denoiser, schedule, np.full(self.split.num_classes, self.cfg.e2e.drift_per_class),
                                       self.cfg.diffusion, self.seed, self.device, tag="drift")
            self._pseudo = (z_hat, y_hat, scaler.inverse(u_d), y_d)
            self.log({"event": "drift", "method": "ldmlr", "step": 0,
                      **drift_distances(z, self.y, scaler.inverse(u_d), y_d)})
            save_file({"z_real": z.cpu().contiguous(), "y_real": self.y.cpu().contiguous(),
                       "z_pseudo": z_hat.cpu().contiguous(), "y_pseudo": y_hat.cpu().contiguous()},
                      str(self.ck / "features.safetensors"))
            self.diagnostics["ldmlr"] = {"generated_per_class": n_gen.tolist(),
                                         "frechet_per_class": per_class_frechet(z, self.y, z_hat, y_hat)}
        return self._pseudo

    def ledger(self) -> PrivacyLedger:
        """This seed's privacy ledger (``privacy/seedN.json``), rewritten before every private step."""
        if self._ledger is None:
            p = self.cfg.privacy
            self._ledger = PrivacyLedger(self.run_dir.path / "privacy" / f"seed{self.seed}.json",
                                         p.target_epsilon, p.delta, private=self.noise.private)
        return self._ledger

    def private_counts(self) -> tuple[np.ndarray, GaussianEvent | None]:
        """The private part's class counts as released: noisy (Gaussian, accounted) or declared public
        (``count_epsilon = 0``). Drawn once per seed and saved, so a resumed run reuses the release instead
        of drawing (and paying for) a new one."""
        if self._private_counts is None:
            path = self.ck / "noisy-counts.json"
            exact = class_counts(self.y[self.private_idx].cpu().numpy(), self.split.num_classes)
            counts, event = noisy_counts(exact, self.cfg.privacy, self.noise)
            if event is not None:
                if path.exists():
                    counts = np.asarray(self.run_dir.read_json(path.relative_to(self.run_dir.path))["counts"])
                else:
                    self.ledger().record_release(event)  # accounted before it is written anywhere
                    atomic_write_json(path, {"counts": counts.tolist()})
            self._private_counts = (counts, event)
        return self._private_counts

    def counts(self) -> torch.Tensor:
        """The class prior of stage 1's classifier: the training counts (non-private runs), the public part's
        counts (public encoder), or under ``privacy.encoder: dp`` the *released* private counts (noisy and
        accounted, or declared public) — never the exact private ones."""
        if not self.private_mode:
            counts = torch.bincount(self.y, minlength=self.split.num_classes)
        elif self.cfg.privacy.encoder == "dp":
            counts = torch.as_tensor(self.private_counts()[0], device=self.device)
        else:
            counts = torch.bincount(self.y[self.public_idx], minlength=self.split.num_classes)
        return counts.float()

    # --- methods ------------------------------------------------------------------------------------
    def logits_and_prior(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Test logits of a base method and the class prior its classifier was trained on (cached)."""
        if base not in self._bases:
            self._bases[base] = self._train_base(base)
        return self._bases[base]

    def _train_base(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        if base in ("ce", "resample"):
            _, g, z, z_test = self.stage1()
            if base == "ce":
                return predict_logits(g, z_test), self.counts()
            y = self.y
            if self.private_mode:
                z, y = z[self.public_idx], y[self.public_idx]
            g = self.timer("crt", lambda: classifier_retraining(self.split, z, y, self.cfg, self.seed,
                                                                 self.ck / "crt.safetensors", self.log))
            return predict_logits(g, z_test), torch.ones(self.split.num_classes, device=self.device)
        if base.startswith("ldmlr"):
            return self.ldmlr(base)
        if base == "dp-ldmlr":
            return self.dp_ldmlr()
        variant = parse_e2e(base)
        e2e = self.timer(base, lambda: train_end_to_end(self.split, self.cfg, variant, self.seed, self.device,
                                                        self.ck / f"{base}.safetensors", self.log, base))
        if variant.aid and e2e.filter_stats:
            self.diagnostics.setdefault("aid", {})[base] = e2e.filter_stats[-1]
        return predict_logits(e2e.classifier, encode(e2e.encoder, self.x_test)), e2e.effective_prior()

    def ldmlr(self, base: str) -> tuple[torch.Tensor, torch.Tensor]:
        enc, g, z, z_test = self.stage1()
        z_hat, y_hat, z_drift, y_drift = self.pseudo()
        if base == "ldmlr-aid":
            result = aid_filter(MahalanobisScorer(z, self.y, self.split.num_classes), z_hat, y_hat,
                                self.split.num_classes, self.cfg.e2e.aid_quantile)
            self.diagnostics.setdefault("aid", {})[base] = result.summary()
            z_hat, y_hat = z_hat[result.keep], y_hat[result.keep]
        # G is fine-tuned on every real training feature (public and private alike: LDMLR is not private)
        prior = torch.as_tensor(self.split.counts, dtype=torch.float32, device=self.device) + self.cfg.pseudo.pseudo_weight * torch.bincount(
            y_hat, minlength=self.split.num_classes).float()
        if base == "ldmlr-ft":
            enc, g = self.timer(base, lambda: finetune_encoder_with_pseudo(
                enc, g, self.x, self.y, z_hat, y_hat, self.cfg, self.seed, self.ck / f"{base}.safetensors",
                self.log, lambda e, step: self.log_drift(base, e, z_drift, y_drift, step)))
            return predict_logits(g, encode(enc, self.x_test)), prior
        g = self.timer(base, lambda: finetune_with_pseudo(g, z, self.y, z_hat, y_hat, self.cfg, self.seed,
                                                          self.ck / f"{base}-stage3.safetensors", self.log, base))
        return predict_logits(g, z_test), prior

    def dp_ldmlr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LDMLR with a DP denoiser on the private part; G is fine-tuned on public features + pseudo-features."""
        enc, g, z, z_test = self.stage1()
        C, p = self.split.num_classes, self.cfg.privacy
        z_pub, y_pub = z[self.public_idx], self.y[self.public_idx]
        z_priv, y_priv = z[self.private_idx], self.y[self.private_idx]
        scaler = FeatureScaler.fit(z_pub)  # public statistics: nothing private leaks through the scaler
        counts_priv, count_event = self.private_counts()
        ledger = self.ledger()
        fixed = [e for e in (self.encoder_event, count_event) if e is not None]
        init = None
        if p.public_pretrain:  # public features only: a free warm start for the DP training
            init = lambda: train_feature_diffusion(  # noqa: E731
                clip_rows(scaler.transform(z_pub), p.feature_radius), y_pub, C, self.cfg, self.seed,
                self.ck / "public-stage2.safetensors", self.log)[0]
        denoiser, schedule, info = self.timer("dp-ldmlr", lambda: train_private_denoiser(
            scaler.transform(z_priv), y_priv, C, self.cfg, self.seed, ledger, fixed,
            self.ck / "dp-stage2.safetensors", self.log, init, self.noise))
        counts_pub = torch.bincount(y_pub, minlength=C).cpu().numpy().astype(int)
        # fill every class of G's training set (public real + pseudo) up to the largest estimated class size
        n_gen = np.maximum(0, (counts_pub + counts_priv).max() - counts_pub)
        u_hat, y_hat = self.timer("dp-ldmlr", lambda: sample_features(denoiser, schedule, n_gen, self.cfg.diffusion,
                                                                      self.seed, self.device, tag="dp-pseudo"))
        z_hat = scaler.inverse(u_hat)
        if p.aid_filter:  # scorer fit on public features only: filtering costs no privacy
            result = aid_filter(MahalanobisScorer(z_pub, y_pub, C), z_hat, y_hat, C, self.cfg.e2e.aid_quantile)
            self.diagnostics.setdefault("aid", {})["dp-ldmlr"] = result.summary()
            z_hat, y_hat = z_hat[result.keep], y_hat[result.keep]
            n_gen = torch.bincount(y_hat, minlength=C).cpu().numpy()
        g = self.timer("dp-ldmlr", lambda: finetune_with_pseudo(g, z_pub, y_pub, z_hat, y_hat, self.cfg, self.seed,
                                                                self.ck / "dp-stage3.safetensors", self.log, "DP-LDMLR"))
        summary = ledger.summary(cross_check=True)
        self.diagnostics["privacy"] = {**summary, **info, "encoder": p.encoder, "public_pretrain": p.public_pretrain,
                                       "released_private_counts": counts_priv.tolist() if count_event else None,
                                       "count_event": count_event is not None, "generated_per_class": n_gen.tolist(),
                                       "declared_public": declared_public(self.cfg),
                                       # against *public* features: a distance to the private ones would be an
                                       # uncovered release of private data
                                       "frechet_to_public_per_class": per_class_frechet(z_pub, y_pub, z_hat, y_hat)}
        prior = torch.as_tensor(counts_pub + self.cfg.pseudo.pseudo_weight * n_gen, dtype=torch.float32,
                                device=self.device)
        return predict_logits(g, z_test), prior

    def log_drift(self, method: str, encoder, z_hat, y_hat, step: int) -> None:
        z = encode(encoder, self.x)
        encoder.train()
        self.log({"event": "drift", "method": method, "step": step,
                  **drift_distances(z, self.y, z_hat, y_hat)})


def declared_public(cfg: RunConfig) -> list[str]:
    """What a private run treats as public (no privacy cost), for the report."""
    p = cfg.privacy
    out = ["N (training-set size) and N_private = N − round(f·N): the public part is a uniformly random subset "
           "of round(f·N) examples chosen without looking at the data (the accountant's q = B/N_private needs N)",
           "the public part's examples, and everything fitted on them"
           + (" (encoder, stage-1 classifier, feature scaler, AID scorer, public warm start)" if p.encoder == "public"
              else " (feature scaler, AID scorer, public warm start)"),
           "the class groups many/medium/few used for evaluation (fixed by the benchmark's design counts)",
           "the test set (evaluation only)"]
    if p.count_epsilon == 0:
        out.insert(1, "the private part's class counts (privacy.count_epsilon = 0)")
    return out


def split_summary(split: LongTailSplit, cfg: RunConfig) -> dict[str, Any]:
    """split.json: in a private run the private part's class counts are not written (only the public
    part's, and N_private, which is declared public)."""
    out = split.summary()
    if any(parse_method(m).base.startswith("dp-") for m in cfg.methods):
        pub, priv = public_private_split(split.train.y, split.num_classes, cfg.privacy.public_fraction,
                                         cfg.data.split_seed)
        del out["train_counts"]
        out.update(public_counts=class_counts(split.train.y[pub], split.num_classes).tolist(),
                   n_public=len(pub), n_private=len(priv))
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0}


def aggregate(per_seed: list[dict], methods: list[Method], split: LongTailSplit, device: torch.device,
              summary: dict | None = None) -> dict:
    """Mean ± std over seeds of every metric, per method; per-class means; mean timings."""
    table: dict[str, Any] = {}
    for method in methods:
        rows = [s["methods"][method.name] for s in per_seed]
        table[method.name] = {k: _mean_std([r[k] for r in rows]) for k in ("top1", "balanced", *GROUPS, "seconds")}
        per_class = np.array([[np.nan if a is None else a for a in r["per_class"]] for r in rows], dtype=float)
        table[method.name]["per_class"] = np.nanmean(per_class, axis=0).tolist()
    stages = sorted({k for s in per_seed for k in s["timings"]})
    timings = {k: _mean_std([s["timings"].get(k, 0.0) for s in per_seed]) for k in stages}
    out = {"methods": table, "method_names": {m.name: m.description for m in methods},
            "seeds": [s["seed"] for s in per_seed], "timings": timings, "device": str(device),
            "split": summary or split.summary(), "per_seed": per_seed}
    private = [s["diagnostics"]["privacy"] for s in per_seed if "privacy" in s["diagnostics"]]
    if private:  # the seeds' releases compose: ε of publishing all of them together
        events = [GaussianEvent(**e) for p in private for e in p["entries"]]
        out["all_seeds_epsilon"] = epsilon_all(events, private[0]["delta"])
    return out
