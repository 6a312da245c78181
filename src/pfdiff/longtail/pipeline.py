"""Runs the configured methods for every (split seed, seed) pair and collects the results.

The protocol (docs/longtail_protocol.md): each split seed fixes a stratified split with a balanced test set,
a balanced validation set held out of the training pool before the long-tailed subsampling, and the
long-tailed training subset. For each seed, every method is trained and every choice is made on the
validation split (τ of ``+la``, LDMLR's pseudo weight); only then does the final evaluation unseal the test
set (``LongTailSplit.final_evaluation``) and score every method once. Stage 1 is trained once per stage-1
loss (``BASE@LOSS``) and shared by every method built on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from pfdiff import distributed
from pfdiff.config import RunConfig
from pfdiff.data import DataError, class_counts
from pfdiff.evaluation import GROUPS, recognition_metrics
from pfdiff.evaluation.coverage import class_coverage
from pfdiff.longtail.baselines import choose_tau, classifier_retraining, logit_adjusted, train_stage1
from pfdiff.longtail.common import LongTailSplit, augmentation_kind, encode, make_split, predict_logits
from pfdiff.longtail.end_to_end import drift_distances, parse_e2e, per_class_frechet, train_end_to_end
from pfdiff.longtail.filtering import CROSS_FIT_FOLDS, MahalanobisScorer, aid_filter
from pfdiff.longtail.ldmlr import (FeatureScaler, finetune_encoder_with_pseudo, finetune_with_pseudo, pseudo_counts,
                                   sample_features, stage3_prior, train_feature_diffusion)
from pfdiff.longtail.methods import Method, parse_method
from pfdiff.longtail.private import (clip_rows, count_event, noisy_counts, preflight, public_private_split,
                                     public_size, train_private_denoiser, train_private_stage1)
from pfdiff.privacy.accounting import GaussianEvent, PrivacyLedger, epsilon_all
from pfdiff.privacy.noise import noise_source
from pfdiff.runs import RunDir, atomic_write_json
from pfdiff.training import Stopwatch, configure_acceleration, default_threads, resolve_device, steps_per_epoch


class Timer:
    """Wall-clock seconds per named stage, summed over the stage's calls and over the attempts of a resumed run.

    A call counts the time of the attempt that finished it. With a ``ledger`` (a JSON file
    ``{"NAME#k": seconds}`` for the k-th call of stage NAME, rewritten atomically after every call), a call that
    an earlier attempt finished counts the seconds recorded then (not the time its restore takes now); a call
    resumed mid-way counts the seconds its training loops restore from their checkpoints (their steps before the
    kill, ``training.Stopwatch``) plus its time after the resume. Work after a loop's last checkpoint, lost to
    the kill and redone, counts once. Calls must come in the same order in every attempt (they do: the same
    config drives them)."""

    def __init__(self, ledger: Path | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.ledger = ledger
        self._done: dict[str, float] = json.loads(ledger.read_text()) if ledger and ledger.exists() else {}
        self._calls: dict[str, int] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        self._calls[name] = k = self._calls.get(name, 0) + 1
        key = f"{name}#{k}"
        with Stopwatch() as watch:
            out = fn()
        seconds = self._done.get(key, watch.seconds)
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self.ledger is not None and key not in self._done:
            self._done[key] = seconds
            atomic_write_json(self.ledger, self._done)
        return out


PSEUDO_WEIGHTED = ("ldmlr", "ldmlr-aid", "ldmlr-ft", "ldmlr-paper", "dp-ldmlr")  # bases whose stage 3 has a pseudo-feature weight


def split_seeds(cfg: RunConfig) -> list[int]:
    """The split seeds a run loops over: ``split_seeds``, else the one ``data.split_seed``."""
    return list(cfg.split_seeds) if cfg.split_seeds is not None else [cfg.data.split_seed]


def split_config(cfg: RunConfig, split_seed: int) -> RunConfig:
    """``cfg`` with ``data.split_seed = split_seed`` (what every stage of that split reads)."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"split_seed": split_seed})})


def run_key(cfg: RunConfig, split_seed: int, seed: int) -> str:
    """Name of one (split, seed) run in the run directory: ``seedN`` with one split seed (as before),
    ``splitS-seedN`` with several (``seeds/KEY.json``, ``checkpoints/KEY/``, ``privacy/KEY.json``)."""
    return f"seed{seed}" if len(split_seeds(cfg)) == 1 else f"split{split_seed}-seed{seed}"


def prepare(cfg: RunConfig) -> LongTailSplit:
    """Everything that can refuse a run, before its directory exists: the methods, the device, the data, the
    stage-1 augmentation and the validation plan and, for a private run, the whole privacy plan (δ < 1/N_private,
    σ reachable, ε within the target); under torchrun, batch sizes the processes cannot share and dp-… methods.
    Returns the first split, its test set sealed."""
    methods = [parse_method(m) for m in cfg.methods]
    resolve_device(cfg.device)
    if cfg.pseudo_weight_grid and cfg.data.val_per_class == 0:
        raise ValueError("pseudo_weight_grid is chosen on the validation split: set data.val_per_class > 0")
    private = any(m.base.startswith("dp-") for m in methods)
    if private and cfg.privacy.encoder == "dp" and any(m.stage1 != "ce" for m in methods):
        raise ValueError("privacy.encoder=dp trains stage 1 with DP-SGD and cross-entropy only; drop the @LOSS of "
                         f"{[m.name for m in methods if m.stage1 != 'ce']} or use privacy.encoder=public")
    if distributed.world_size() > 1:  # torchrun: stages 1 and 2 split each batch between the processes
        if private:
            raise ValueError(f"the dp-… methods do not run under torchrun (WORLD_SIZE={distributed.world_size()}): "
                             "DP-SGD's noise and accounting are those of one process; run them without torchrun")
        distributed.check_batch_size(cfg.stage1.batch_size, "stage1.batch_size")
        distributed.check_batch_size(cfg.diffusion.batch_size, "diffusion.batch_size")
    split = make_split(split_config(cfg, split_seeds(cfg)[0]))
    check_training_set(cfg, split, methods)
    augmentation_kind(cfg.stage1, split.train.input_shape)
    if private:
        preflight(cfg, len(split.train.y))
    return split.sealed()


MIN_TRAIN_PER_CLASS = 2  # one example per class trains nothing a classifier or a class-conditional denoiser can use


def check_training_set(cfg: RunConfig, split: LongTailSplit, methods: list[Method]) -> None:
    """The long-tailed training set is large enough for every stage asked for: at least
    ``MIN_TRAIN_PER_CLASS`` examples per class, and enough rows for the AID scorer's cross-fitting
    (``filtering.CROSS_FIT_FOLDS``) wherever a method filters (on the public part in a private run)."""
    d, source = cfg.data, cfg.data.path or cfg.data.name
    n = len(split.train.y)
    few = np.flatnonzero(split.counts < MIN_TRAIN_PER_CLASS)
    if few.size:
        raise DataError(f"{source}: the long-tailed training set ({n} examples at data.imbalance_factor="
                        f"{d.imbalance_factor:g}, {split.num_classes} classes) leaves class(es) {few[:8].tolist()} with "
                        f"{split.counts[few[:8]].tolist()} example(s); every class needs at least {MIN_TRAIN_PER_CLASS}: "
                        "supply more data or lower data.imbalance_factor")
    filtered = [m.name for m in methods if m.base == "ldmlr-aid" or getattr(parse_e2e(m.base), "aid", False)]
    n_pub = public_size(n, cfg.privacy.public_fraction)
    if cfg.privacy.aid_filter and n_pub < CROSS_FIT_FOLDS and any(m.base == "dp-ldmlr" for m in methods):
        raise DataError(f"{source}: the AID filter of dp-ldmlr is fitted on the public part, {n_pub} example(s) of "
                        f"{n}; it needs at least {CROSS_FIT_FOLDS} (supply more data, raise privacy.public_fraction "
                        "or set privacy.aid_filter=false)")
    if filtered and n < CROSS_FIT_FOLDS:
        raise DataError(f"{source}: the AID filter of {filtered} needs at least {CROSS_FIT_FOLDS} training examples, "
                        f"the long-tailed training set has {n}")


def run_experiment(cfg: RunConfig, run: RunDir, split: LongTailSplit | None = None) -> dict[str, Any]:
    """Every (split seed, seed) pair of ``cfg`` (skipping pairs already finished in ``run``), then the aggregate
    table (mean ± std over all pairs). ``split``: the first split from :func:`prepare` (which also ran the
    checks), else prepared here. Stage times and ``seconds`` cover every attempt of a resumed run (``Timer``);
    at the end metrics.jsonl is compacted (``RunDir.compact_metrics``), so it holds each record once."""
    split = (split or prepare(cfg)).sealed()
    methods = [parse_method(m) for m in cfg.methods]
    torch.set_num_threads(default_threads(cfg.threads))
    device = resolve_device(cfg.device)
    configure_acceleration(cfg.precision, cfg.compile, cfg.fused_optimizer, device)
    summaries: dict[int, dict] = {}
    per_seed = []
    for i, s in enumerate(split_seeds(cfg)):
        cfg_s = split_config(cfg, s)
        split_s = split if i == 0 else make_split(cfg_s).sealed()
        summaries[s] = split_summary(split_s, cfg_s)
        run.write_json("split.json", split_file(summaries))
        for seed in cfg.seeds:
            key = run_key(cfg, s, seed)
            name = f"seeds/{key}.json"
            if not (run.path / name).exists():
                run.write_json(name, SeedRun(split_s, cfg_s, seed, device, run, key).run(methods))
            per_seed.append(run.read_json(name))
    results = aggregate(per_seed, methods, split, device, summaries[split_seeds(cfg)[0]], summaries, cfg)
    run.write_json("results.json", results)
    run.compact_metrics()  # a resumed run re-logged the steps after its last checkpoints: each record once
    return results


def split_file(summaries: dict[int, dict]) -> dict:
    """split.json: the summary of the (first) split; with several split seeds also every split's, by seed."""
    first = next(iter(summaries.values()))
    return first if len(summaries) == 1 else {**first, "splits": {str(k): v for k, v in summaries.items()}}


@dataclass
class Fitted:
    """A trained method before its choices: E, G and the class prior G was fitted on (what +la divides by)."""

    encoder: nn.Module
    classifier: nn.Module
    prior: torch.Tensor


class SeedRun:
    """One (split, seed) pair: stage 1 (once per stage-1 loss) and LDMLR's stage 2 are trained once and shared
    by every method that needs them. :meth:`run` fits every method and makes its choices on the validation
    split, then evaluates every method on the test set inside ``split.final_evaluation()``."""

    def __init__(self, split: LongTailSplit, cfg: RunConfig, seed: int, device: torch.device, run: RunDir,
                 key: str | None = None):
        split = split.sealed()
        self.split, self.cfg, self.seed, self.device, self.run_dir = split, cfg, seed, device, run
        self.key = key or f"seed{seed}"
        self.ck = run.checkpoints / self.key
        self.timer = Timer(self.ck / "timings.json")  # beside the checkpoints whose work it times
        self.diagnostics: dict[str, Any] = {}
        self.x = torch.as_tensor(split.train.x, device=device)
        self.y = torch.as_tensor(split.train.y, device=device)
        self.x_val = None if split.val is None else torch.as_tensor(split.val.x, device=device)
        self.y_val = None if split.val is None else split.val.y
        self._stage1: dict[str, tuple] = {}
        self._pseudo: dict[str, tuple] = {}
        self._denoisers: dict[str, tuple] = {}  # stage-1 loss → (scaler, stage-2 denoiser, schedule)
        self._dp_pseudo: dict[str, tuple] = {}
        self._fits: dict[tuple, Fitted] = {}
        self._features: dict[tuple[int, str], torch.Tensor] = {}
        self.encoder_steps: dict[str, int] = {}  # "stage1[@loss]" / E2E base → optimiser steps of its encoder
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
        self.run_dir.log({"seed": self.seed, "split_seed": self.cfg.data.split_seed, **record})

    def run(self, methods: list[Method]) -> dict[str, Any]:
        chosen = {method.name: self.choose(method) for method in methods}  # the test set is still sealed
        metrics = {}
        with self.split.final_evaluation() as test:
            x_test, y_test = torch.as_tensor(test.x, device=self.device), test.y
            for method in methods:
                fit, choice, val = chosen[method.name]
                logits = self.logits(fit, x_test, "test")
                if method.adjust:
                    logits = logit_adjusted(logits, fit.prior.cpu().numpy(), choice["tau"])
                m = recognition_metrics(logits.argmax(1).cpu().numpy(), y_test, self.split.num_classes,
                                        self.split.groups)
                m["seconds"] = self.method_seconds(method)
                m["encoder_steps"] = self.method_encoder_steps(method)
                m["chosen"], m["validation"] = choice, val
                metrics[method.name] = m
                self.log({"event": "test", "method": method.name, **{k: m[k] for k in ("top1", "balanced", *GROUPS)}})
        return {"seed": self.seed, "split_seed": self.cfg.data.split_seed, "key": self.key, "methods": metrics,
                "timings": self.timer.seconds, "diagnostics": self.diagnostics}

    # --- choices on the validation split --------------------------------------------------------------
    def choose(self, method: Method) -> tuple[Fitted, dict[str, Any], dict[str, float] | None]:
        """Train ``method`` (once per pseudo weight of the grid) and choose τ of +la and the pseudo weight by
        balanced accuracy on the validation split (ties: the earlier weight of the grid, the smaller τ).
        Without a validation split: ``logit_adjust_tau`` and ``pseudo.pseudo_weight`` as configured."""
        has_weight = method.base in PSEUDO_WEIGHTED
        weights: list[float | None] = list(self.cfg.pseudo_weight_grid) if has_weight and self.cfg.pseudo_weight_grid else [None]
        on_val = self.x_val is not None
        taus = sorted(set(self.cfg.la_tau_grid)) if on_val else [self.cfg.logit_adjust_tau]
        best: tuple | None = None
        for w in weights:
            fit = self.fitted(method, w)
            if not on_val:
                best = (fit, w, taus[0], None)
                break
            val_logits = self.logits(fit, self.x_val, "val")
            if method.adjust:
                tau, vm = choose_tau(val_logits, fit.prior.cpu().numpy(), self.y_val, taus, self.split.num_classes,
                                     self.split.groups)
            else:
                tau, vm = 0.0, recognition_metrics(val_logits.argmax(1).cpu().numpy(), self.y_val,
                                                   self.split.num_classes, self.split.groups)
            if best is None or vm["balanced"] > best[3]["balanced"]:
                best = (fit, w, tau, vm)
        fit, w, tau, vm = best
        choice = {"tau": tau if method.adjust else None,
                  "pseudo_weight": (self.cfg.pseudo.pseudo_weight if w is None else w) if has_weight else None,
                  "on": "validation" if on_val else "config (no validation split)",
                  "chosen_on_validation": [k for k, v in (("tau", method.adjust), ("pseudo_weight", len(weights) > 1
                                                          or w is not None)) if v and on_val]}
        val = None if vm is None else {k: vm[k] for k in ("top1", "balanced", *GROUPS)}
        self.log({"event": "choice", "method": method.name, **choice, **({"val_balanced": val["balanced"]} if val else {})})
        return fit, choice, val

    def logits(self, fit: Fitted, x: torch.Tensor, tag: str) -> torch.Tensor:
        """G(E(x)) of a fitted method; the features of each encoder on ``tag`` (val / test) are computed once."""
        k = (id(fit.encoder), tag)
        if k not in self._features:
            self._features[k] = encode(fit.encoder, x)
        return predict_logits(fit.classifier, self._features[k])

    def method_seconds(self, method: Method) -> float:
        """Wall time a method costs on its own: its stages (every pseudo weight of the grid) plus the shared
        stages it builds on."""
        sfx = "" if method.stage1 == "ce" else f"@{method.stage1}"
        stage1 = [f"stage1{sfx}"]
        stages = {"ce": stage1, "resample": stage1 + [f"crt{sfx}"]}.get(method.base)
        if stages is None:
            stages = (stage1 + [f"stage2{sfx}", f"sampling{sfx}", method.spec] if method.base.startswith("ldmlr")
                      else [method.spec])
            variant = parse_e2e(method.base)
            warm = None if variant is None else (variant.warm or self.cfg.e2e.warm_start)
            if warm in ("stage1", "stage2"):  # a warm start pays for the stages it starts from
                stages += stage1 + (["stage2", "sampling"] if warm == "stage2" else [])
        return sum(self.timer.seconds.get(s, 0.0) for s in stages)

    def method_encoder_steps(self, method: Method) -> int | None:
        """Optimiser steps the method's encoder E received: stage 1's for the two-stage methods, the E2E run's
        (plus stage 1's when warm-started); None where E was trained further in a way not counted (ldmlr-ft,
        a DP encoder)."""
        if parse_e2e(method.base) is not None:
            return self.encoder_steps.get(method.base)
        if method.base == "ldmlr-ft" or (self.private_mode and self.cfg.privacy.encoder == "dp"):
            return None
        return self.encoder_steps.get("stage1" if method.stage1 == "ce" else f"stage1@{method.stage1}")

    # --- shared stages ----------------------------------------------------------------------------
    def stage1(self, loss: str = "ce"):
        """(encoder, classifier, z_train) of stage 1 with the stage-1 loss ``loss``, trained once per seed."""
        if loss not in self._stage1:
            split = self.split
            tag = "" if loss == "ce" else f"@{loss}"
            if self.private_mode:
                split = replace(split, train=split.train.subset(self.public_idx.cpu().numpy()))
            if self.private_mode and self.cfg.privacy.encoder == "dp":  # prepare() refuses any loss but ce here
                enc, g, self.encoder_event = self.timer("stage1", lambda: train_private_stage1(
                    self.x[self.private_idx], self.y[self.private_idx], self.split.num_classes,
                    self.split.train.input_shape, self.cfg, self.seed, self.ledger(),
                    self.ck / "dp-stage1.safetensors", self.log, self.noise))
            else:
                name = "stage1" if loss == "ce" else f"stage1-{loss}"
                enc, g = self.timer(f"stage1{tag}", lambda: train_stage1(
                    split, self.cfg, self.seed, self.device, self.ck / f"{name}.safetensors", self.log, loss))
            self._stage1[loss] = (enc, g, encode(enc, self.x))
            n = len(self.public_idx) if self.private_mode else len(self.y)
            self.encoder_steps[f"stage1{tag}"] = self.cfg.stage1.epochs * steps_per_epoch(n, self.cfg.stage1.batch_size)
        return self._stage1[loss]

    def paper_pseudo(self, loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
        """``ldmlr-paper``: pseudo-features of the same stage-2 denoiser in LDMLR's proportional counts."""
        key = f"paper@{loss}"
        if key not in self._pseudo:
            self.pseudo(loss)  # trains (or loads) the stage-2 denoiser of this stage 1
            scaler, denoiser, schedule = self._denoisers[loss]
            n_gen = pseudo_counts(self.split.counts, paper_protocol(self.cfg).pseudo)
            u_hat, y_hat = sample_features(denoiser, schedule, n_gen, self.cfg.diffusion, self.seed, self.device,
                                           tag="paper-pseudo")
            self._pseudo[key] = (scaler.inverse(u_hat), y_hat)
            self.diagnostics[f"ldmlr-paper{'' if loss == 'ce' else '@' + loss}"] = {"generated_per_class": n_gen.tolist()}
        return self._pseudo[key]

    def pseudo(self, loss: str = "ce"):
        """LDMLR stage 2 on the features of stage 1 (``loss``) and its pseudo-features (raw feature space)."""
        if loss not in self._pseudo:
            _, _, z = self.stage1(loss)
            tag, fs = ("", "") if loss == "ce" else (f"@{loss}", f"-{loss}")
            scaler = FeatureScaler.fit(z)
            denoiser, schedule = self.timer(f"stage2{tag}", lambda: train_feature_diffusion(
                scaler.transform(z), self.y, self.split.num_classes, self.cfg, self.seed,
                self.ck / f"stage2{fs}.safetensors", self.log))
            self._denoisers[loss] = (scaler, denoiser, schedule)
            n_gen = pseudo_counts(self.split.counts, self.cfg.pseudo)
            u_hat, y_hat = self.timer(f"sampling{tag}", lambda: sample_features(
                denoiser, schedule, n_gen, self.cfg.diffusion, self.seed, self.device))
            z_hat = scaler.inverse(u_hat)
            # a separate, class-balanced set to measure drift on the same footing as the E2E runs
            u_d, y_d = sample_features(denoiser, schedule, np.full(self.split.num_classes, self.cfg.e2e.drift_per_class),
                                       self.cfg.diffusion, self.seed, self.device, tag="drift")
            self._pseudo[loss] = (z_hat, y_hat, scaler.inverse(u_d), y_d)
            self.coverage(f"ldmlr{tag}", self.stage1(loss)[0], scaler.inverse(u_d), y_d, z)
            self.log({"event": "drift", "method": f"ldmlr{tag}", "step": 0,
                      **drift_distances(z, self.y, scaler.inverse(u_d), y_d)})
            save_file({"z_real": z.cpu().contiguous(), "y_real": self.y.cpu().contiguous(),
                       "z_pseudo": z_hat.cpu().contiguous(), "y_pseudo": y_hat.cpu().contiguous()},
                      str(self.ck / f"features{fs}.safetensors"))
            self.diagnostics[f"ldmlr{tag}"] = {"generated_per_class": n_gen.tolist(),
                                               "frechet_per_class": per_class_frechet(z, self.y, z_hat, y_hat)}
        return self._pseudo[loss]

    def ledger(self) -> PrivacyLedger:
        """This run's privacy ledger (``privacy/KEY.json``, KEY = seedN), rewritten before every private step."""
        if self._ledger is None:
            p = self.cfg.privacy
            self._ledger = PrivacyLedger(self.run_dir.path / "privacy" / f"{self.key}.json",
                                         p.target_epsilon, p.delta, private=self.noise.private)
        return self._ledger

    def private_counts(self) -> tuple[np.ndarray, GaussianEvent | None]:
        """The private part's class counts as released: noisy (Gaussian, accounted) or declared public
        (``count_epsilon = 0``). Drawn once per seed and saved, so a resumed run reuses the release instead
        of drawing (and paying for) a new one."""
        if self._private_counts is None:
            path = self.ck / "noisy-counts.json"
            event = count_event(self.cfg.privacy)
            if event is not None and path.exists():  # the saved release: reused, nothing drawn
                counts = np.asarray(self.run_dir.read_json(path.relative_to(self.run_dir.path))["counts"])
            else:
                if event is not None:
                    self.ledger().record_release(event)  # accounted before the noise is drawn
                exact = class_counts(self.y[self.private_idx].cpu().numpy(), self.split.num_classes)
                counts, _ = noisy_counts(exact, self.cfg.privacy, self.noise)
                if event is not None:
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
    def with_weight(self, w: float | None) -> RunConfig:
        """The config with LDMLR's pseudo weight ``w`` (None: as configured)."""
        if w is None:
            return self.cfg
        return self.cfg.model_copy(update={"pseudo": self.cfg.pseudo.model_copy(update={"pseudo_weight": w})})

    def fitted(self, method: Method, w: float | None = None) -> Fitted:
        """The trained base of ``method`` on its stage-1 loss (and pseudo weight ``w``), cached: ``ce`` and
        ``ce+la`` share one model."""
        key = (method.base, method.stage1, w)
        if key not in self._fits:
            self._fits[key] = self._train_base(method.base, method.stage1, w)
        return self._fits[key]

    def _train_base(self, base: str, loss: str, w: float | None) -> Fitted:
        tag, fs = ("", "") if loss == "ce" else (f"@{loss}", f"-{loss}")
        if base in ("ce", "resample"):
            enc, g, z = self.stage1(loss)
            if base == "ce":
                return Fitted(enc, g, self.counts())
            y = self.y
            if self.private_mode:
                z, y = z[self.public_idx], y[self.public_idx]
            g = self.timer(f"crt{tag}", lambda: classifier_retraining(self.split, z, y, self.cfg, self.seed,
                                                                      self.ck / f"crt{fs}.safetensors", self.log))
            return Fitted(enc, g, torch.ones(self.split.num_classes, device=self.device))
        if base.startswith("ldmlr"):
            return self.ldmlr(base, loss, w)
        if base == "dp-ldmlr":
            return self.dp_ldmlr(loss, w)
        return self.end_to_end(base)

    def end_to_end(self, base: str) -> Fitted:
        """An E2E variant, warm-started from stage 1 (E, G) or stages 1 and 2 (+ ε_θ, scaler) if asked."""
        variant = parse_e2e(base)
        warm = variant.warm or self.cfg.e2e.warm_start
        init = None
        if warm != "none":
            enc, g, _ = self.stage1("ce")
            init = {"encoder": enc, "classifier": g}
            if warm == "stage2":
                self.pseudo("ce")
                scaler, denoiser, _ = self._denoisers["ce"]
                init.update(denoiser=denoiser, scaler=(scaler.mean, scaler.std))
        e2e = self.timer(base, lambda: train_end_to_end(self.split, self.cfg, variant, self.seed, self.device,
                                                        self.ck / f"{base}.safetensors", self.log, base, init))
        diag = {**e2e.diagnostics(), "warm_start": warm}
        self.diagnostics.setdefault("e2e", {})[base] = diag
        if "filter" in diag:
            self.diagnostics.setdefault("aid", {})[base] = diag["filter"]
        self.encoder_steps[base] = e2e.steps + (self.encoder_steps.get("stage1", 0) if warm != "none" else 0)
        self.coverage(base, e2e.encoder, *e2e.last_samples)
        return Fitted(e2e.encoder, e2e.classifier, e2e.effective_prior())

    def coverage(self, name: str, encoder: nn.Module, z_fake: torch.Tensor, y_fake: torch.Tensor,
                 z_train: torch.Tensor | None = None) -> None:
        """Per-class precision / recall of pseudo-features against the validation features of the same encoder
        (evaluation/coverage.py), beside the recall of the training features themselves. Needs a validation
        split; not computed for private runs (the training-feature reference would describe private data).
        ``z_train``: the encoder's training features when the caller already has them."""
        if self.x_val is None or self.private_mode:
            return
        z_val = encode(encoder, self.x_val)
        if z_train is None:
            z_train = encode(encoder, self.x)
        encoder.train()
        self.diagnostics.setdefault("coverage", {})[name] = class_coverage(
            z_val, self.y_val, z_fake, y_fake, z_train, self.y, self.split.num_classes, self.cfg.e2e.coverage_k)

    def ldmlr(self, base: str, loss: str = "ce", w: float | None = None) -> Fitted:
        enc, g, z = self.stage1(loss)
        z_hat, y_hat, z_drift, y_drift = self.pseudo(loss)
        cfg = self.with_weight(w)
        if base == "ldmlr-paper":  # the authors' stage 3 on the same denoiser: proportional counts, fc-only, LSC
            z_hat, y_hat = self.paper_pseudo(loss)
            cfg = paper_protocol(cfg)
        tag, fs = ("", "") if loss == "ce" else (f"@{loss}", f"-{loss}")
        ws = "" if w is None else f"-w{w:g}"
        spec = f"{base}{tag}"
        if base == "ldmlr-aid":
            result = aid_filter(MahalanobisScorer(z, self.y, self.split.num_classes), z_hat, y_hat,
                                self.split.num_classes, self.cfg.e2e.aid_quantile)
            self.diagnostics.setdefault("aid", {})[spec] = result.summary()
            z_hat, y_hat = z_hat[result.keep], y_hat[result.keep]
        # G is fine-tuned on every real training feature (public and private alike: LDMLR is not private)
        generated = torch.bincount(y_hat, minlength=self.split.num_classes).cpu().numpy()
        prior = torch.as_tensor(stage3_prior(self.split.counts, generated, cfg.pseudo), dtype=torch.float32,
                                device=self.device)
        if base == "ldmlr-ft":
            enc, g = self.timer(spec, lambda: finetune_encoder_with_pseudo(
                enc, g, self.x, self.y, z_hat, y_hat, cfg, self.seed, self.ck / f"{base}{fs}{ws}.safetensors",
                self.log, lambda e, step: self.log_drift(spec, e, z_drift, y_drift, step)))
            return Fitted(enc, g, prior)
        g = self.timer(spec, lambda: finetune_with_pseudo(g, z, self.y, z_hat, y_hat, cfg, self.seed,
                                                          self.ck / f"{base}{fs}-stage3{ws}.safetensors", self.log, spec))
        return Fitted(enc, g, prior)

    def dp_pseudo(self, loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """DP-LDMLR's denoiser (DP on the private part, charged to the ledger) and its (AID-filtered)
        pseudo-features, once per stage-1 loss: (z_hat, y_hat, generated per class)."""
        if loss not in self._dp_pseudo:
            _, _, z = self.stage1(loss)
            C, p = self.split.num_classes, self.cfg.privacy
            tag, fs = ("", "") if loss == "ce" else (f"@{loss}", f"-{loss}")
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
                    self.ck / f"public-stage2{fs}.safetensors", self.log)[0]
            denoiser, schedule, info = self.timer(f"dp-ldmlr{tag}", lambda: train_private_denoiser(
                scaler.transform(z_priv), y_priv, C, self.cfg, self.seed, ledger, fixed,
                self.ck / f"dp-stage2{fs}.safetensors", self.log, init, self.noise))
            counts_pub = torch.bincount(y_pub, minlength=C).cpu().numpy().astype(int)
            # fill every class of G's training set (public real + pseudo) up to the largest estimated class size
            n_gen = np.maximum(0, (counts_pub + counts_priv).max() - counts_pub)
            u_hat, y_hat = self.timer(f"dp-ldmlr{tag}", lambda: sample_features(
                denoiser, schedule, n_gen, self.cfg.diffusion, self.seed, self.device, tag="dp-pseudo"))
            z_hat = scaler.inverse(u_hat)
            if p.aid_filter:  # scorer fit on public features only: filtering costs no privacy
                result = aid_filter(MahalanobisScorer(z_pub, y_pub, C), z_hat, y_hat, C, self.cfg.e2e.aid_quantile)
                self.diagnostics.setdefault("aid", {})[f"dp-ldmlr{tag}"] = result.summary()
                z_hat, y_hat = z_hat[result.keep], y_hat[result.keep]
                n_gen = torch.bincount(y_hat, minlength=C).cpu().numpy()
            summary = ledger.summary(cross_check=True)
            self.diagnostics["privacy"] = {**summary, **info, "encoder": p.encoder, "public_pretrain": p.public_pretrain,
                                           "released_private_counts": counts_priv.tolist() if count_event else None,
                                           "count_event": count_event is not None, "generated_per_class": n_gen.tolist(),
                                           "declared_public": declared_public(self.cfg),
                                           # against *public* features: a distance to the private ones would be an
                                           # uncovered release of private data
                                           "frechet_to_public_per_class": per_class_frechet(z_pub, y_pub, z_hat, y_hat)}
            self._dp_pseudo[loss] = (z_hat, y_hat, n_gen)
        return self._dp_pseudo[loss]

    def dp_ldmlr(self, loss: str = "ce", w: float | None = None) -> Fitted:
        """LDMLR with a DP denoiser on the private part; G is fine-tuned on public features + pseudo-features
        (post-processing: no privacy cost, so several pseudo weights cost no extra ε)."""
        enc, g, z = self.stage1(loss)
        z_hat, y_hat, n_gen = self.dp_pseudo(loss)
        cfg = self.with_weight(w)
        tag, fs = ("", "") if loss == "ce" else (f"@{loss}", f"-{loss}")
        ws = "" if w is None else f"-w{w:g}"
        z_pub, y_pub = z[self.public_idx], self.y[self.public_idx]
        g = self.timer(f"dp-ldmlr{tag}", lambda: finetune_with_pseudo(
            g, z_pub, y_pub, z_hat, y_hat, cfg, self.seed, self.ck / f"dp-stage3{fs}{ws}.safetensors", self.log,
            "DP-LDMLR"))
        counts_pub = torch.bincount(y_pub, minlength=self.split.num_classes).cpu().numpy()
        prior = torch.as_tensor(counts_pub + cfg.pseudo.pseudo_weight * n_gen, dtype=torch.float32, device=self.device)
        return Fitted(enc, g, prior)

    def log_drift(self, method: str, encoder, z_hat, y_hat, step: int) -> None:
        z = encode(encoder, self.x)
        encoder.train()
        self.log({"event": "drift", "method": method, "step": step,
                  **drift_distances(z, self.y, z_hat, y_hat)})


def paper_protocol(cfg: RunConfig) -> RunConfig:
    """LDMLR's stage 3 as the authors' code runs it (``ldmlr-paper``): max(round(0.2·n_c), 5) pseudo-features
    per class (the imbalance kept), only the fc layer fine-tuned from stage 1 with Adam (lr 1e-3, batch 1024,
    no weight decay), and LSC — post-hoc adjustment by the *real* training prior (``stage3_prior``), applied
    by ``+la`` with τ chosen on validation. Their 400 epochs are ``pseudo.finetune_epochs`` here (shorter;
    the authors also pick the best epoch on the test set, which pfdiff does not copy)."""
    p = cfg.pseudo.model_copy(update={"fill": "proportional", "proportion": 0.2, "min_per_class": 5,
                                      "finetune_lr": 1e-3, "finetune_batch_size": 1024, "finetune_weight_decay": 0.0})
    return cfg.model_copy(update={"pseudo": p})


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
    if cfg.data.val_per_class:
        out.append("the validation split (data.val_per_class per class, held out of the training pool, never "
                   "trained on; it only chooses τ of +la and the pseudo weight from the released models' outputs)")
    if p.count_epsilon == 0:
        out.insert(1, "the private part's class counts (privacy.count_epsilon = 0)")
    return out


def split_summary(split: LongTailSplit, cfg: RunConfig) -> dict[str, Any]:
    """split.json: in a private run the private part's class counts are not written (only the public
    part's, and N_private, which is declared public)."""
    out = {**split.summary(), "split_seed": cfg.data.split_seed, "val_per_class": cfg.data.val_per_class}
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
              summary: dict | None = None, summaries: dict[int, dict] | None = None,
              cfg: RunConfig | None = None) -> dict:
    """Mean ± std over all (split seed, seed) pairs of every metric, per method; per-class means; mean timings;
    the choices made on validation per method and pair."""
    table: dict[str, Any] = {}
    choices: dict[str, list[dict]] = {}
    for method in methods:
        rows = [s["methods"][method.name] for s in per_seed]
        table[method.name] = {k: _mean_std([r[k] for r in rows]) for k in ("top1", "balanced", *GROUPS, "seconds")}
        steps = [r.get("encoder_steps") for r in rows]
        if all(v is not None for v in steps):
            table[method.name]["encoder_steps"] = _mean_std(steps)
        per_class = np.array([[np.nan if a is None else a for a in r["per_class"]] for r in rows], dtype=float)
        table[method.name]["per_class"] = np.nanmean(per_class, axis=0).tolist()
        choices[method.name] = [{"split_seed": s.get("split_seed"), "seed": s["seed"], **r.get("chosen", {}),
                                 "val_balanced": (r.get("validation") or {}).get("balanced")}
                                for s, r in zip(per_seed, rows)]
    stages = sorted({k for s in per_seed for k in s["timings"]})
    timings = {k: _mean_std([s["timings"].get(k, 0.0) for s in per_seed]) for k in stages}
    out = {"methods": table, "method_names": {m.name: m.description for m in methods},
           "baselines": [m.name for m in methods if m.is_baseline],
           "seeds": [s["seed"] for s in per_seed], "pairs": [[s.get("split_seed"), s["seed"]] for s in per_seed],
           "run_keys": [s.get("key", f"seed{s['seed']}") for s in per_seed], "choices": choices,
           "timings": timings, "device": str(device), "split": summary or split.summary(), "per_seed": per_seed}
    if summaries and len(summaries) > 1:
        out["splits"] = {str(k): v for k, v in summaries.items()}
    if cfg is not None:
        out["protocol"] = {"split_seeds": split_seeds(cfg), "seeds": list(cfg.seeds),
                           "val_per_class": cfg.data.val_per_class, "la_tau_grid": list(cfg.la_tau_grid),
                           "pseudo_weight_grid": list(cfg.pseudo_weight_grid),
                           "logit_adjust_tau": cfg.logit_adjust_tau}
    coverage = _mean_coverage(per_seed)
    if coverage:
        out["coverage"] = coverage
    e2e = {name: [s["diagnostics"]["e2e"][name] for s in per_seed if name in s["diagnostics"].get("e2e", {})]
           for name in dict.fromkeys(k for s in per_seed for k in s["diagnostics"].get("e2e", {}))}
    if e2e:
        out["e2e"] = {name: _mean_e2e(runs) for name, runs in e2e.items()}
    private = [s["diagnostics"]["privacy"] for s in per_seed if "privacy" in s["diagnostics"]]
    if private:  # the seeds' releases compose: ε of publishing all of them together
        events = [GaussianEvent(**e) for p in private for e in p["entries"]]
        out["all_seeds_epsilon"] = epsilon_all(events, private[0]["delta"])
    return out


def _nanmean_lists(lists: list[list]) -> list[float | None]:
    arr = np.array([[np.nan if v is None else v for v in row] for row in lists], dtype=float)
    with np.errstate(all="ignore"):
        means = np.nanmean(arr, axis=0) if len(arr) else arr
    return [None if np.isnan(v) else float(v) for v in means]


def _mean_coverage(per_seed: list[dict]) -> dict[str, dict[str, list]]:
    """Per generating method: each coverage list (precision, recall, recall_train) averaged over the runs."""
    names = dict.fromkeys(k for s in per_seed for k in s["diagnostics"].get("coverage", {}))
    out = {}
    for name in names:
        runs = [s["diagnostics"]["coverage"][name] for s in per_seed if name in s["diagnostics"].get("coverage", {})]
        out[name] = {k: _nanmean_lists([r[k] for r in runs]) for k in ("precision", "recall", "recall_train")}
        out[name]["runs"] = len(runs)
    return out


def _mean_e2e(runs: list[dict]) -> dict[str, Any]:
    """An E2E variant over its runs: mean loss shares and kept fraction, routing, warm start, steps, and
    whether any run's generation branch produced nothing."""
    out: dict[str, Any] = {"routing": runs[0]["routing"], "warm_start": runs[0].get("warm_start"),
                           "steps": runs[0]["steps"], "batch_size": runs[0]["batch_size"], "runs": len(runs),
                           "loss_shares": {k: float(np.mean([r["loss_shares"][k] for r in runs]))
                                           for k in runs[0]["loss_shares"]}}
    filters = [r["filter"] for r in runs if "filter" in r]
    if filters:
        out["filter"] = {"kind": filters[0]["kind"],
                         "kept_fraction": _nanmean_lists([[f["kept_fraction"]] for f in filters])[0],
                         "kept_fraction_per_class": _nanmean_lists([f["kept_fraction_per_class"] for f in filters]),
                         "no_generation_runs": sum(bool(f["no_generation"]) for f in filters)}
    return out
