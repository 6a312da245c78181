"""Shared pieces of the recognition pipelines: the long-tailed split, features, classifier training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.data import ArrayDataset, ClassGroups, balanced_indices, class_counts, class_groups, load_dataset, longtail_indices, stratified_split
from pfdiff.models import create_classifier, create_encoder
from pfdiff.training import generator, shuffled_batch, train


@dataclass
class LongTailSplit:
    """A fixed-seed stratified split with a long-tailed training subset and a balanced test set."""

    train: ArrayDataset
    test: ArrayDataset
    counts: np.ndarray  # training examples per class
    groups: ClassGroups
    heldout: ArrayDataset | None = None  # the training pool's examples the long-tailed subset left out (never
    # trained on; decided by data.split_seed before training): the non-members of membership attacks

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.train.name, "num_classes": self.num_classes, "train_size": len(self.train.y),
                "test_size": len(self.test.y), "train_counts": self.counts.tolist(),
                "test_counts": class_counts(self.test.y, self.num_classes).tolist(), "groups": self.groups.as_dict()}


def make_split(cfg: RunConfig) -> LongTailSplit:
    """Load the configured data, split it (seeded by ``data.split_seed``) and draw the long-tailed subset."""
    data = load_dataset(cfg.data.name, cfg.data.path)
    train_idx, test_idx = stratified_split(data.y, cfg.data.test_fraction, cfg.data.split_seed)
    # exactly balanced test set; the few extra test examples go back to the training pool
    keep = test_idx[balanced_indices(data.y[test_idx], cfg.data.split_seed, data.num_classes)]
    pool = data.subset(np.union1d(train_idx, np.setdiff1d(test_idx, keep)))
    lt_idx = longtail_indices(pool.y, cfg.data.imbalance_factor, cfg.data.split_seed, data.num_classes)
    lt = pool.subset(lt_idx)
    counts = class_counts(lt.y, data.num_classes)
    heldout = pool.subset(np.setdiff1d(np.arange(len(pool.y)), lt_idx))
    return LongTailSplit(lt, data.subset(keep), counts, class_groups(counts), heldout)


def to_tensors(ds: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(ds.x, device=device), torch.as_tensor(ds.y, device=device)


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Features z = E(x) in eval mode, batched."""
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict_logits(classifier: nn.Module, z: torch.Tensor) -> torch.Tensor:
    classifier.eval()
    return classifier(z)


def log_prior(counts: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """log π_c of the training label distribution (every class has at least one example)."""
    counts = torch.as_tensor(counts, dtype=torch.float32, device=device)
    return torch.log(counts / counts.sum())


def train_classifier_on_features(classifier: nn.Module, z: torch.Tensor, y: torch.Tensor, *, epochs: int,
                                 batch_size: int, lr: float, weight_decay: float, seed: int, description: str,
                                 weights: torch.Tensor | None = None, checkpoint: Path | None = None,
                                 log: Callable[[dict], None] | None = None,
                                 batch_fn: Callable[[int], torch.Tensor] | None = None) -> nn.Module:
    """Fit G on fixed features with (optionally per-example weighted) cross-entropy."""
    steps = epochs * max(1, -(-len(y) // batch_size))
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    w = torch.ones(len(y), device=z.device) if weights is None else weights

    def step_fn(step: int):
        idx = batch_fn(step) if batch_fn else shuffled_batch(len(y), batch_size, step, seed)
        idx = idx.to(z.device)
        per_example = nn.functional.cross_entropy(classifier(z[idx]), y[idx], reduction="none")
        return (w[idx] * per_example).sum() / w[idx].sum(), {}

    train({"classifier": classifier}, opt, step_fn, steps, description=description, checkpoint=checkpoint,
          log=log)
    return classifier


def seeded_init(seed: int, name: str, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """Build a module with weights drawn from a seed of its own, so methods do not perturb each other."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator("cpu", seed, "init", name).initial_seed())
        return build().to(device)


def init_encoder_classifier(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int, seed: int,
                            device: torch.device, prefix: str = "") -> tuple[nn.Module, nn.Module]:
    """Fresh E and G of the configured kinds, each seeded by ``prefix`` + "encoder" / "classifier"."""
    m = cfg.model
    encoder = seeded_init(seed, f"{prefix}encoder",
                          lambda: create_encoder(m.encoder, input_shape, m.feature_dim, m.width), device)
    classifier = seeded_init(seed, f"{prefix}classifier",
                             lambda: create_classifier(m.classifier, encoder.feature_dim, num_classes), device)
    return encoder, classifier
