"""Long-tail recognition metrics: top-1, balanced accuracy, many/medium/few, per class."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix

from pfdiff.data.longtail import GROUPS, ClassGroups


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class absent from ``y``."""
    cm = confusion_matrix(y, pred, labels=np.arange(num_classes))
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def recognition_metrics(pred: np.ndarray, y: np.ndarray, num_classes: int, groups: ClassGroups) -> dict:
    """Overall top-1, balanced accuracy (mean per-class recall) and the mean recall of each group."""
    pred, y = np.asarray(pred), np.asarray(y)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {pred.shape} and labels {y.shape} differ in shape")
    per_class = per_class_accuracy(pred, y, num_classes)
    out = {"top1": float((pred == y).mean()), "balanced": float(np.nanmean(per_class))}
    for name in GROUPS:
        members = list(getattr(groups, name))
        out[name] = float(np.nanmean(per_class[members])) if members else float("nan")
    out["per_class"] = [None if np.isnan(a) else float(a) for a in per_class]
    return out
