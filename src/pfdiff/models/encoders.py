"""Encoders E: images or 1-D signals → feature vectors z. GroupNorm only, so every encoder can be made private."""

from __future__ import annotations

from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class SmallCNN(nn.Module):
    """Conv encoder for small images (8×8 digits, 28×28 MNIST, 32×32 CIFAR)."""

    def __init__(self, in_channels: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        self.feature_dim = feature_dim
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), _norm(width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), _norm(width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), _norm(2 * width), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), _norm(2 * width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, feature_dim),
        )

    def forward(self, x):
        return self.net(x)


def _conv_out(length: int, kernel: int, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN1D(nn.Module):
    """Conv encoder for 1-D signals [C, L] (MNIST-1D: [1, 40]): the MNIST-1D paper's CNN (three stride-2
    convolutions, kernels 5/3/3, ReLU, flattened), with GroupNorm and a linear map to ``feature_dim``. Kept
    close to the paper so that its table checks this encoder (a global-average-pooled variant reaches ~99 %
    balanced and would leave the long-tail benchmark little room; see docs/mnist1d.md)."""

    def __init__(self, in_channels: int, length: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        self.feature_dim = feature_dim
        out_len = _conv_out(_conv_out(_conv_out(length, 5), 3), 3)
        if out_len < 1:
            raise ValueError(f"the cnn1d encoder needs signals of length >= 3, got {length}")
        self.net = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, stride=2, padding=1), _norm(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), _norm(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), _norm(width), nn.ReLU(),
            nn.Flatten(), nn.Linear(width * out_len, feature_dim),
        )

    def forward(self, x):
        return self.net(x)


class BasicBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016), GroupNorm instead of BatchNorm."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        h = self.c1(nn.functional.relu(self.n1(x)))
        h = self.c2(nn.functional.relu(self.n2(h)))
        return h + self.skip(x)


class ResNet32(nn.Module):
    """CIFAR ResNet-32 (3 stages × 5 blocks, widths 16/32/64), as used by LDMLR on CIFAR-LT."""

    def __init__(self, in_channels: int = 3, feature_dim: int = 64, blocks_per_stage: int = 5):
        super().__init__()
        self.feature_dim = feature_dim
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and stage > 0) else 1))
                cin = cout
        layers += [_norm(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, feature_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class IdentityEncoder(nn.Module):
    """For inputs that already are feature vectors (`.npz` features): z = x."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim

    def forward(self, x):
        return x


class MLPEncoder(nn.Module):
    """A trainable encoder for feature-vector inputs (two LayerNorm'd hidden layers), so that the
    end-to-end method has an E to move on `.npz` features; ``identity`` keeps them fixed."""

    def __init__(self, in_dim: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        self.feature_dim = feature_dim
        hidden = 8 * width
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(),
                                 nn.Linear(hidden, feature_dim))

    def forward(self, x):
        return self.net(x)


ENCODERS = {"cnn": SmallCNN, "cnn1d": CNN1D, "resnet32": ResNet32, "identity": IdentityEncoder, "mlp": MLPEncoder}
_AUTO = {1: "identity", 2: "cnn1d", 3: "cnn"}  # input rank → encoder: features, signals [C, L], images [C, H, W]


def create_encoder(name: str, input_shape: tuple[int, ...], feature_dim: int = 64, width: int = 32) -> nn.Module:
    """Build an encoder by name; ``auto`` picks identity for feature inputs, the 1-D CNN for signals and the
    CNN for images (``mlp`` is a trainable encoder for feature inputs)."""
    if name == "auto":
        name = _AUTO.get(len(input_shape), "cnn")
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS) + ['auto']}")
    if name in ("identity", "mlp"):
        if len(input_shape) != 1:
            raise ValueError(f"the {name} encoder needs feature vectors, got inputs of shape {input_shape}")
        return IdentityEncoder(input_shape[0]) if name == "identity" else MLPEncoder(input_shape[0], feature_dim, width)
    if name == "cnn1d":
        if len(input_shape) != 2:
            raise ValueError(f"the cnn1d encoder needs 1-D signals [C, L], got inputs of shape {input_shape}")
        return CNN1D(input_shape[0], input_shape[1], feature_dim, width)
    if len(input_shape) != 3:
        raise ValueError(f"encoder {name!r} needs images [C, H, W], got inputs of shape {input_shape}")
    if name == "cnn":
        return SmallCNN(input_shape[0], feature_dim, width)
    return ResNet32(input_shape[0], feature_dim)
