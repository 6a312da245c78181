"""A small class-conditional U-Net ε_θ(x_t, t, y) for small images (8×8 digits, 28×28 MNIST, 32×32).

Built for DP-SGD (DPDM, Dockhorn et al. 2022): GroupNorm only (Opacus-valid, no batch statistics),
no in-place ops and no data-dependent control flow, so ``torch.func.vmap`` can take per-example
gradients of it. The layout is the DDPM/ADM one (Ho et al. 2020; Dhariwal & Nichol 2021) without
attention: residual blocks conditioned additively on a time + label embedding, stride-2 conv
downsampling, nearest-neighbour upsampling to the skip's size (so odd sizes such as 7×7 work), and
skip connections by concatenation. The output conv is zero-initialised, so the untrained model
predicts 0 and the first updates are not swamped by random outputs.

Labels run over ``0..num_classes-1`` plus the null label ``num_classes`` (classifier-free guidance),
the convention of :class:`pfdiff.models.FeatureDenoiser`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pfdiff.models.denoisers import timestep_embedding


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class ResBlock(nn.Module):
    """GN → SiLU → conv, + Linear(emb), GN → SiLU → conv (zero-init), plus a (1×1 if needed) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = _norm(cout, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """3×3 conv with stride 2 (⌈H/2⌉ × ⌈W/2⌉)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a given size, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(nn.Module):
    """ε_θ(x_t, t, y) (or v_θ / x0_θ, whatever it is trained for) for images [B, C, H, W].

    Args:
        in_channels: image channels C (1 for digits/MNIST, 3 for CIFAR).
        num_classes: classes; the label embedding has one more row, the null label.
        base_channels: channels at full resolution; level i has ``base_channels · channel_mults[i]``.
        channel_mults: one entry per resolution level; ``len − 1`` stride-2 downsamplings
            (8×8 → 4×4 → 2×2 and 28×28 → 14×14 → 7×7 with the default (1, 2, 2)).
        num_res_blocks: residual blocks per level on the way down (one more on the way up, as in DDPM).
        time_dim: width of the sinusoidal timestep embedding fed to the embedding MLP.
        groups: GroupNorm groups (reduced to a divisor of the channel count where needed).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, time_dim: int = 64,
                 groups: int = 8, dropout: float = 0.0):
        super().__init__()
        if not channel_mults or num_res_blocks < 1 or base_channels < 1:
            raise ValueError("need at least one level, one residual block per level and base_channels ≥ 1")
        self.in_channels, self.num_classes, self.time_dim = in_channels, num_classes, time_dim
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.inp = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        chans = [base_channels]  # channels of every skip tensor, in the order they are pushed
        ch = base_channels
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_channels * mult, emb_dim, groups, dropout))
                ch = base_channels * mult
                chans.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, groups, dropout), ResBlock(ch, ch, emb_dim, groups, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + chans.pop(), base_channels * mult, emb_dim, groups, dropout))
                ch = base_channels * mult
            if level > 0:
                self.up.append(Upsample(ch))
        self.out_norm = _norm(ch, groups)
        self.out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.label_emb(y)
        h = self.inp(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:  # upsample to the resolution of the next skip (handles odd sizes: 4 → 7)
                h = layer(h, skips[-1].shape[-2:])
        return self.out(F.silu(self.out_norm(h)))
