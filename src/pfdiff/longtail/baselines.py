"""Stage 1 (E + G with a stage-1 loss) and the standard long-tail baselines built on it.

- ``ce``: the stage-1 classifier as it is; ``ce@LOSS`` (alias ``LOSS``): stage 1 trained with another loss
  (``la-loss``, ``bsce``, ``ldam-drw``: longtail/losses.py).
- ``logit_adjust`` (= ``ce+la``): post-hoc logit adjustment, f_c(x) − τ·log π_c (Menon et al. 2021, eq. 8).
- ``resample``: classifier re-training on frozen features with class-balanced sampling
  (cRT; Kang et al. 2020, "Decoupling representation and classifier").

Stage 1's recipe (``stage1.*``): AdamW or SGD with momentum, constant/cosine/step schedule after a linear
warm-up (a torch LR scheduler inside the one training loop), and on-device augmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pfdiff import distributed
from pfdiff.config import RunConfig
from pfdiff.config import OptimConfig
from pfdiff.data import class_counts
from pfdiff.evaluation.metrics import recognition_metrics
from pfdiff.longtail.common import (LongTailSplit, augmenter, init_encoder_classifier, log_prior, seeded_init,
                                    train_classifier_on_features)
from pfdiff.longtail.losses import STAGE1_LOSSES, stage1_loss
from pfdiff.models import create_classifier
from pfdiff.models.classifiers import CosineClassifier
from pfdiff.training import (balanced_batch, make_scheduler, optimizer_options, shuffled_batch, steps_per_epoch,
                             train)


def stage1_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum (optionally Nesterov), at ``stage1.lr`` with ``stage1.weight_decay``."""
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **optimizer_options())


def stage1_scheduler(opt: torch.optim.Optimizer, o: OptimConfig, steps_per_epoch: int):
    """The per-step LR schedule of stage 1: linear warm-up over ``warmup_epochs``, then ``schedule``
    (milestones of ``step`` are fractions of the epochs, rounded to whole epochs). None: constant."""
    total = o.epochs * steps_per_epoch
    milestones = tuple(round(f * o.epochs) * steps_per_epoch for f in o.step_milestones)
    return make_scheduler(opt, o.schedule, total, round(o.warmup_epochs * steps_per_epoch), milestones, o.step_gamma)


def train_stage1(split: LongTailSplit, cfg: RunConfig, seed: int, device: torch.device,
                 checkpoint: Path | None, log: Callable[[dict], None] | None,
                 loss: str = "ce") -> tuple[nn.Module, nn.Module]:
    """Train encoder E and classifier G jointly on the long-tailed set with the stage-1 loss ``loss``
    (``ce``, ``la-loss``, ``bsce``, ``ldam-drw``) and the recipe of ``cfg.stage1``.

    ``ldam-drw`` uses a normalised (cosine) classifier with scale s = ``stage1.ldam_scale``, as LDAM's code does
    (its margins are in cosine units); every other loss uses ``model.classifier``. Every loss starts from the
    same seeded initial E (and G where the kind matches), so the losses are compared on paired runs.

    Under torchrun (``pfdiff.distributed``) every process draws and augments the same batch and takes its rows
    through DDP-wrapped E+G; the averaged gradient is that of the whole batch, so the weights equal a single
    process's up to float rounding (the all-reduce sums in another order). This holds for every encoder here:
    they normalise with GroupNorm, per example (BatchNorm's batch statistics would differ per process). The
    logged loss is rank 0's part of the batch loss (×W), not the batch's."""
    if loss not in STAGE1_LOSSES:
        raise ValueError(f"unknown stage-1 loss {loss!r}; choose from {sorted(STAGE1_LOSSES)}")
    o = cfg.stage1
    encoder, classifier = init_encoder_classifier(cfg, split.train.input_shape, split.num_classes, seed, device)
    if loss == "ldam-drw":
        classifier = seeded_init(seed, "classifier", lambda: CosineClassifier(
            encoder.feature_dim, split.num_classes, scale=o.ldam_scale), device)
    x = torch.as_tensor(split.train.x, device=device)
    y = torch.as_tensor(split.train.y, device=device)
    per_epoch = steps_per_epoch(len(y), o.batch_size)
    criterion = stage1_loss(loss, class_counts(split.train.y, split.num_classes), o, per_epoch)
    augment = augmenter(o, split.train.input_shape)
    params = list(encoder.parameters()) + list(classifier.parameters())
    opt = stage1_optimizer(params, o)

    world = distributed.world_size()
    distributed.check_batch_size(o.batch_size, "stage1.batch_size")
    net = distributed.wrap(nn.Sequential(encoder, classifier))  # DDP under torchrun; E and G keep their params

    def step_fn(step: int):
        idx = shuffled_batch(len(y), o.batch_size, step, seed).to(device)
        xb = x[idx] if augment is None else augment(x[idx], seed, step)
        if world == 1:
            return criterion(classifier(encoder(xb)), y[idx], step), {}
        # the whole batch drawn and augmented as by one process (same draws); this process's rows through DDP
        rows = distributed.rows(len(idx))
        return distributed.part(*criterion.shard_terms(net(xb[rows]), y[idx], rows, step)), {}

    name = "" if loss == "ce" else f" ({loss})"
    train({"encoder": encoder, "classifier": classifier}, opt, step_fn, o.epochs * per_epoch,
          description=f"seed {seed} · stage 1: E+G{name}", checkpoint=checkpoint,
          checkpoint_every=cfg.checkpoint_every, log=log, scheduler=stage1_scheduler(opt, o, per_epoch))
    return encoder, classifier


def logit_adjusted(logits: torch.Tensor, counts, tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): subtract τ·log of the training prior."""
    return logits - tau * log_prior(counts, logits.device)


def choose_tau(val_logits: torch.Tensor, counts, y_val: np.ndarray, taus, num_classes: int,
               groups) -> tuple[float, dict]:
    """τ of post-hoc logit adjustment chosen on the validation split: the τ of ``taus`` with the highest balanced
    accuracy of the adjusted ``val_logits`` (the smallest among equals); returns (τ, its validation metrics)."""
    best: tuple[float, dict] | None = None
    for tau in sorted(set(taus)):
        vm = recognition_metrics(logit_adjusted(val_logits, counts, tau).argmax(1).cpu().numpy(), y_val,
                                 num_classes, groups)
        if best is None or vm["balanced"] > best[1]["balanced"]:
            best = (tau, vm)
    return best


def classifier_retraining(split: LongTailSplit, z: torch.Tensor, y: torch.Tensor, cfg: RunConfig, seed: int,
                          checkpoint: Path | None, log: Callable[[dict], None] | None) -> nn.Module:
    """cRT: a fresh G trained on frozen stage-1 features with class-balanced batches."""
    m, p = cfg.model, cfg.pseudo
    classifier = seeded_init(seed, "crt", lambda: create_classifier(m.classifier, z.shape[1], split.num_classes),
                             z.device)
    bs = cfg.stage1.batch_size
    return train_classifier_on_features(
        classifier, z, y, epochs=p.finetune_epochs, batch_size=bs, lr=p.finetune_lr,
        weight_decay=cfg.stage1.weight_decay, seed=seed, description=f"seed {seed} · cRT",
        checkpoint=checkpoint, log=log,
        batch_fn=lambda step: balanced_batch(y, split.num_classes, bs, step, seed))
