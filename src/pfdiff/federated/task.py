"""Model, data and local train/evaluate for federated feature diffusion (Flower app layout: ``task.py``).

What is trained: pfdiff's class-conditional feature denoiser (``pfdiff.longtail.ldmlr.build_denoiser``),
v-prediction with a linear schedule (T = 1000, the ``RunConfig`` defaults), on per-client feature
vectors. Skeleton data: the flattened 8×8 scikit-learn digits, standardised per feature (64-d).

Partitioning uses flwr-datasets (``IidPartitioner`` / ``DirichletPartitioner`` by label) on an
in-memory ``datasets.Dataset`` of example indices, so it runs offline. Note: the standardisation uses
statistics of the whole digits set, i.e. it stands in for a pre-agreed feature normalisation; a real
federated run would have to agree on it privately (later work).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.diffusion import DiffusionLoss, make_schedule
from pfdiff.longtail.ldmlr import build_denoiser
from pfdiff.training import generator

FEATURE_DIM = 64
NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2


def small_config(hidden: int = 64, depth: int = 2) -> RunConfig:
    """``RunConfig`` with a small denoiser (hidden 64, depth 2) for fast federated runs."""
    cfg = RunConfig()
    model = cfg.model.model_copy(update={"denoiser_hidden": hidden, "denoiser_depth": depth})
    return cfg.model_copy(update={"model": model})


def build_model(seed: int = 0, hidden: int = 64, depth: int = 2) -> nn.Module:
    """The global denoiser, initialised deterministically from ``seed``."""
    torch.manual_seed(seed)
    return build_denoiser(small_config(hidden, depth), FEATURE_DIM, NUM_CLASSES)


def make_loss(cfg: RunConfig | None = None) -> DiffusionLoss:
    d = (cfg or RunConfig()).diffusion
    schedule = make_schedule(d.schedule, d.T)
    return DiffusionLoss(schedule, prediction=d.prediction, weighting=d.weighting,
                         cond_drop_prob=d.cond_drop_prob, null_label=NUM_CLASSES)


# ---------------------------------------------------------------- data


@lru_cache(maxsize=1)
def digits_features() -> tuple[np.ndarray, np.ndarray]:
    """Digits images flattened to [N, 64] and standardised per feature; labels [N]."""
    from pfdiff.data import load_dataset

    ds = load_dataset("digits", None)
    x = ds.x.reshape(len(ds.x), -1).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x.astype(np.float32), ds.y.astype(np.int64)


@lru_cache(maxsize=8)
def partition_indices(num_partitions: int, alpha: float | None, seed: int, labels: tuple[int, ...] | None = None
                      ) -> tuple[np.ndarray, ...]:
    """Example indices of each client: IID (``alpha`` None) or Dirichlet(α) label skew.

    Built with flwr-datasets on an in-memory ``datasets.Dataset`` (no download). ``labels`` defaults to
    the digits labels; pass a tuple to partition another label vector.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    y = digits_features()[1] if labels is None else np.asarray(labels, dtype=np.int64)
    table = Dataset.from_dict({"idx": np.arange(len(y)), "label": y})
    if alpha is None:
        part = IidPartitioner(num_partitions=num_partitions)
        table = table.shuffle(seed=seed)  # IidPartitioner splits contiguously
    else:
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    min_partition_size=10, self_balancing=False, shuffle=True, seed=seed)
    part.dataset = table
    return tuple(np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_partitions))


@dataclass
class ClientData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_client_data(partition_id: int, num_partitions: int, alpha: float | None, seed: int) -> ClientData:
    """This client's features, split (seeded) into a local train part and a held-out part."""
    x, y = digits_features()
    idx = partition_indices(num_partitions, alpha, seed)[partition_id]
    perm = torch.randperm(len(idx), generator=generator("cpu", seed, "holdout", partition_id)).numpy()
    idx = idx[perm]
    n_test = max(1, int(round(HELD_OUT_FRACTION * len(idx))))
    te, tr = idx[:n_test], idx[n_test:]
    t = torch.from_numpy
    return ClientData(t(x[tr]), t(y[tr]), t(x[te]), t(y[te]))


# ---------------------------------------------------------------- local train / evaluate


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_size: int,
                seed: int, server_round: int, partition_id: int, weight_decay: float = 0.0) -> float:
    """``steps`` AdamW steps of the diffusion loss; returns the mean training loss over the steps."""
    loss_fn = make_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    total = 0.0
    for step in range(steps):
        g = generator("cpu", seed, "fed-train", server_round, partition_id, step)
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=g)
        loss = loss_fn(model, x[idx], y[idx], generator=g).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / max(1, steps)


@torch.no_grad()
def evaluate_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, partition_id: int,
                   noise_multiplicity: int = 4) -> float:
    """Mean diffusion loss on the held-out part (fixed draws of t, ε per client: comparable across rounds)."""
    loss_fn = make_loss()
    model.eval()
    g = generator("cpu", seed, "fed-eval", partition_id)
    return float(loss_fn(model, x, y, noise_multiplicity=noise_multiplicity, generator=g).loss.mean())
