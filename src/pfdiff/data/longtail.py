"""Long-tailed protocol: stratified split, exponential profile, many/medium/few groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from pfdiff.data.sources import DataError

GROUPS = ("many", "medium", "few")  # the class groups of the long-tail protocol, in table order


def class_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Examples per class, length ``num_classes`` (labels must lie in [0, num_classes))."""
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)


def _labels(y: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise DataError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"labels must lie in [0, {num_classes}), found {int(y.min())}..{int(y.max())}")
    return y, num_classes


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with the class proportions kept (sklearn ``train_test_split``), each sorted."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    idx = np.arange(len(y))
    try:
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError as e:  # e.g. a class with a single example cannot be stratified
        raise DataError(f"cannot split the data into train/test stratified by class: {e}") from e
    return np.sort(train), np.sort(test)


def balanced_indices(y: np.ndarray, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Equal counts per present class: each keeps min_c n_c random examples (sorted indices)."""
    y, num_classes = _labels(y, num_classes)
    counts = class_counts(y, num_classes)
    n = int(counts[counts > 0].min())
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=n, replace=False) for c in np.flatnonzero(counts)]
    return np.sort(np.concatenate(picks))


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """n_c = floor(n_max * IF^(-c/(C-1))), at least 1 (Cui et al. 2019's exponential profile)."""
    if not imbalance_factor >= 1:  # also rejects NaN
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    if n_max < 1 or num_classes < 1:
        raise ValueError(f"n_max and num_classes must be >= 1, got {n_max} and {num_classes}")
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    c = np.arange(num_classes)
    # the tiny epsilon keeps exact products such as 500 * 100^-1 = 5 from flooring to 4
    n = np.floor(n_max * float(imbalance_factor) ** (-c / (num_classes - 1)) + 1e-9)
    return np.maximum(1, n).astype(np.int64)


def longtail_indices(y: np.ndarray, imbalance_factor: float, seed: int, num_classes: int | None = None,
                     n_max: int | None = None) -> np.ndarray:
    """A long-tailed subset of ``y``: class c keeps ``longtail_counts(...)[c]`` random examples (class 0 = head)."""
    y, num_classes = _labels(y, num_classes)
    available = class_counts(y, num_classes)
    empty = np.flatnonzero(available == 0)
    if len(empty):
        raise DataError(f"class {int(empty[0])} has no training examples")
    n_max = int(available.min()) if n_max is None else int(n_max)  # default: every class can be filled
    want = longtail_counts(n_max, num_classes, imbalance_factor)
    short = np.flatnonzero(want > available)
    if len(short):
        c = int(short[0])
        raise DataError(f"class {c} has {available[c]} training examples, the long-tail profile needs {want[c]}")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=want[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


@dataclass(frozen=True)
class ClassGroups:
    """Many-/medium-/few-shot class indices and the rule that produced them."""

    many: tuple[int, ...]
    medium: tuple[int, ...]
    few: tuple[int, ...]
    rule: str

    def group_of(self, c: int) -> str:
        """'many', 'medium' or 'few'; KeyError for a class in no group."""
        for name in GROUPS:
            if c in getattr(self, name):
                return name
        raise KeyError(f"class {c} is in no group")

    def as_dict(self) -> dict:
        return {"many": list(self.many), "medium": list(self.medium), "few": list(self.few), "rule": self.rule}


THIRDS_RULE = "thirds of classes by training count (a threshold group was empty)"


def class_groups(counts: np.ndarray, many_threshold: int = 100, few_threshold: int = 20) -> ClassGroups:
    """Many (> many_threshold) / medium / few (< few_threshold); thirds of the classes by count if a group is empty."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    many = tuple(int(c) for c in np.flatnonzero(counts > many_threshold))
    few = tuple(int(c) for c in np.flatnonzero(counts < few_threshold))
    medium = tuple(int(c) for c in np.flatnonzero((counts >= few_threshold) & (counts <= many_threshold)))
    if many and medium and few:
        rule = f"thresholds (>{many_threshold} / {few_threshold}-{many_threshold} / <{few_threshold})"
        return ClassGroups(many, medium, few, rule)
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))  # head first, ties by class index
    n = len(order)
    k = round(n / 3)  # many and few get round(C/3) each, medium the rest: 3/4/3 for 10, 1/1/1 for 3
    parts = (order[:k], order[k:n - k], order[n - k:])
    return ClassGroups(*(tuple(sorted(p)) for p in parts), THIRDS_RULE)
