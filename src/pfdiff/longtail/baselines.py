"""Stage 1 (E + G with cross-entropy) and the standard long-tail baselines built on it.

- ``ce``: the stage-1 classifier as it is.
- ``logit_adjust``: post-hoc logit adjustment, f_c(x) − τ·log π_c (Menon et al. 2021, eq. 8).
- ``resample``: classifier re-training on frozen features with class-balanced sampling
  (cRT; Kang et al. 2020, "Decoupling representation and classifier").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.longtail.common import (LongTailSplit, init_encoder_classifier, log_prior, seeded_init,
                                    train_classifier_on_features)
from pfdiff.models import create_classifier
from pfdiff.training import balanced_batch, shuffled_batch, train


def train_stage1(split: LongTailSplit, cfg: RunConfig, seed: int, device: torch.device,
                 checkpoint: Path | None, log: Callable[[dict], None] | None) -> tuple[nn.Module, nn.Module]:
    """Train encoder E and classifier G jointly with plain cross-entropy on the long-tailed set."""
    o = cfg.stage1
    encoder, classifier = init_encoder_classifier(cfg, split.train.input_shape, split.num_classes, seed, device)
    x = torch.as_tensor(split.train.x, device=device)
    y = torch.as_tensor(split.train.y, device=device)
    params = list(encoder.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)

    def step_fn(step: int):
        idx = shuffled_batch(len(y), o.batch_size, step, seed).to(device)
        return nn.functional.cross_entropy(classifier(encoder(x[idx])), y[idx]), {}

    steps = o.epochs * max(1, -(-len(y) // o.batch_size))
    train({"encoder": encoder, "classifier": classifier}, opt, step_fn, steps,
          description=f"seed {seed} · stage 1: E+G", checkpoint=checkpoint,
          checkpoint_every=cfg.checkpoint_every, log=log)
    return encoder, classifier


def logit_adjusted(logits: torch.Tensor, counts, tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): subtract τ·log of the training prior."""
    return logits - tau * log_prior(counts, logits.device)


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
