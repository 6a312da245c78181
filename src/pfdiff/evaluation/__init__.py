"""Evaluation: recognition metrics and feature-space Fréchet distance."""

from pfdiff.evaluation.fid import frechet_distance
from pfdiff.evaluation.metrics import GROUPS, per_class_accuracy, recognition_metrics

__all__ = ["frechet_distance", "GROUPS", "per_class_accuracy", "recognition_metrics"]
