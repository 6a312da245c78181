"""Long-tailed protocol: stratified split, exponential profile, many/medium/few groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from pfdiff.data.sources import DataError


def class_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(y), minlength=num_classes)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with the class proportions kept (sklearn), sorted."""
    idx = np.arange(len(y))
    try:
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError as e:  # e.g. a class with a single example cannot be stratified
        raise DataError(f"cannot split the data into train/test stratified by class: {e}") from e
    return np.sort(train), np.sort(test)


def balanced_indices(y: np.ndarray, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Equal counts per class: each class keeps min_c n_c random examples (sorted indices)."""
    y = np.asarray(y)
    counts = class_counts(y, int(y.max()) + 1 if num_classes is None else num_classes)
    n = int(counts[counts > 0].min())
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=n, replace=False) for c in np.flatnonzero(counts)]
    return np.sort(np.concatenate(picks))


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """n_c = ⌊n_max · IF^(−c/(C−1))⌋, at least 1 (Cui et al. 2019's exponential profile)."""
    if imbalance_factor < 1:
        raise ValueError(f"imbalance factor must be ≥ 1, got {imbalance_factor}")
    if num_classes == 1:
        return np.array([n_max])
    c = np.arange(num_classes)
    return np.maximum(1, np.floor(n_max * imbalance_factor ** (-c / (num_classes - 1)))).astype(int)


def longtail_indices(y: np.ndarray, imbalance_factor: float, seed: int, num_classes: int | None = None,
                     n_max: int | None = None) -> np.ndarray:
    """A long-tailed subset of ``y``: class c keeps ``longtail_counts(...)[c]`` random examples (class 0 = head)."""
    y = np.asarray(y)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    available = class_counts(y, num_classes)
    empty = np.flatnonzero(available == 0)
    if len(empty):
        raise DataError(f"class {int(empty[0])} has no training examples")
    n_max = int(available.min()) if n_max is None else n_max
    want = longtail_counts(n_max, num_classes, imbalance_factor)
    short = np.flatnonzero(want > available)
    if len(short):
        c = int(short[0])
        raise DataError(f"class {c} has {available[c]} training examples, the profile needs {want[c]}")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=want[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


@dataclass(frozen=True)
class ClassGroups:
    many: tuple[int, ...]
    medium: tuple[int, ...]
    few: tuple[int, ...]
    rule: str

    def group_of(self, c: int) -> str:
        for name in ("many", "medium", "few"):
            if c in getattr(self, name):
                return name
        raise KeyError(f"class {c} is in no group")

    def as_dict(self) -> dict:
        return {"many": list(self.many), "medium": list(self.medium), "few": list(self.few), "rule": self.rule}


THRESHOLD_RULE = "thresholds (>100 / 20-100 / <20 training examples)"
THIRDS_RULE = "thirds of classes by training count (a threshold group was empty)"


def class_groups(counts: np.ndarray, many_threshold: int = 100, few_threshold: int = 20) -> ClassGroups:
    """Many/medium/few by the standard thresholds; thirds of the classes by count if a group is empty."""
    counts = np.asarray(counts)
    many = tuple(int(c) for c in np.flatnonzero(counts > many_threshold))
    few = tuple(int(c) for c in np.flatnonzero(counts < few_threshold))
    medium = tuple(int(c) for c in np.flatnonzero((counts >= few_threshold) & (counts <= many_threshold)))
    if many and medium and few:
        return ClassGroups(many, medium, few, THRESHOLD_RULE)
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))  # head first, ties by index
    n = len(order)
    k_many, k_few = round(n / 3), round(n / 3)
    parts = (order[:k_many], order[k_many:n - k_few], order[n - k_few:])
    return ClassGroups(*(tuple(sorted(p)) for p in parts), THIRDS_RULE)
