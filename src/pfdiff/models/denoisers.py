"""Feature denoiser ε_θ(z_t, t, y): residual MLP with time and label embeddings (LDMLR's choice)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM §B): [*t.shape, dim].

    Any leading shape: ``t`` [B] or [B, K] (the DP-SGD engine's layout, K noise draws per example)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class ResidualBlock(nn.Module):
    """LayerNorm → SiLU → Linear, conditioned additively on the embedding, plus a skip."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)  # each block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.fc1(nn.functional.silu(self.norm1(h))) + self.emb(emb)
        r = self.fc2(self.drop(nn.functional.silu(self.norm2(r))))
        return h + r


class DiagonalAffine(nn.Module):
    """x ↦ w ⊙ x + b per dimension: FeatureDenoiser's skip for high-dimensional features, where a full
    dim × dim skip would cost dim² per row (4.2 M multiply-adds at 2048-d, ~3/4 of the whole network)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


SKIPS = ("linear", "diagonal")
SKIP_AUTO_MAX_DIM = 512  # ``skip="auto"`` (the config's): a full linear skip up to this feature dimension


def skip_for(dim: int, skip: str = "auto") -> str:
    """The skip a feature dimension gets: ``auto`` → linear up to SKIP_AUTO_MAX_DIM, diagonal above."""
    if skip == "auto":
        return "linear" if dim <= SKIP_AUTO_MAX_DIM else "diagonal"
    if skip not in SKIPS:
        raise ValueError(f"unknown denoiser skip {skip!r}; choose auto or one of {list(SKIPS)}")
    return skip


class FeatureDenoiser(nn.Module):
    """ε_θ(z_t, t, y) for feature vectors z ∈ R^dim.

    Labels run over ``0..num_classes-1`` plus the null label ``num_classes`` used by
    classifier-free guidance. Only LayerNorm is used, so Opacus can make it private. Every layer acts
    on the last dimension, so inputs may carry extra leading dimensions: z_t [B, K, dim] with t, y
    [B, K] gives [B, K, dim] (the layout of ``DiffusionLoss(..., inner_multiplicity=True)``).
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 256, depth: int = 3,
                 time_dim: int = 64, dropout: float = 0.0, skip: str = "linear"):
        super().__init__()
        self.dim, self.num_classes, self.time_dim = dim, num_classes, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, hidden, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        # LayerNorm makes the hidden path blind to the *magnitude* of z_t (for low-dimensional z it sees
        # only the direction), while ε̂ must grow linearly with z_t at high noise. A linear skip from the
        # input restores that, so samples that start in rare, far regions of the prior are not lost. Diagonal
        # (per-dimension scale) for high-dimensional features: the magnitude is restored at O(dim) cost.
        self.skip = nn.Linear(dim, dim) if skip_for(dim, skip) == "linear" else DiagonalAffine(dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.label_emb(y)
        h = self.inp(z_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h))) + self.skip(z_t)
