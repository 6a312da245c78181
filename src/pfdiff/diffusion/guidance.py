"""Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = out_∅ + s·(out_y − out_∅)."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierFreeGuidance(nn.Module):
    """Wraps a conditional model; scale 1 is the plain conditional model, 0 the unconditional one.

    The guided output is formed in the model's own parameterisation (ε, v or x0); all three are
    affine in the score at fixed (z_t, t), so guiding any of them is the same guidance.
    """

    def __init__(self, model: nn.Module, null_label: int, scale: float):
        super().__init__()
        self.model, self.null_label, self.scale = model, int(null_label), float(scale)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.model(z_t, t, y)
        null = torch.full_like(y, self.null_label)
        if self.scale == 0.0:
            return self.model(z_t, t, null)
        # one batched call: the conditional rows, then the same rows with the null label
        out = self.model(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)
