"""Classifiers G: feature vectors → class logits."""

from __future__ import annotations

import torch
from torch import nn


class CosineClassifier(nn.Module):
    """Logits s·cos(z, w_c) (Gidaris & Komodakis 2018): scale-free, often kinder to tail classes."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) * feature_dim**-0.5)
        self.scale = scale

    def forward(self, z):
        return self.scale * nn.functional.normalize(z, dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T


def create_classifier(name: str, feature_dim: int, num_classes: int) -> nn.Module:
    """``linear`` (LDMLR's G) or ``cosine``."""
    if name == "linear":
        return nn.Linear(feature_dim, num_classes)
    if name == "cosine":
        return CosineClassifier(feature_dim, num_classes)
    raise ValueError(f"unknown classifier {name!r}; choose one of ['cosine', 'linear']")
