"""Built-in architectures, referenced as `zoo:NAME` in `--arch` and in manifests.

Each entry is a class whose constructor takes only JSON-able keyword arguments (so a manifest can
rebuild it) plus the example input shape it expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear → ReLU → Dropout blocks, then a Linear head. Inputs of any shape are flattened."""

    def __init__(self, input_size: int = 64, hidden_sizes: list[int] = (512, 256, 128),
                 num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))  # (B, input_size) → (B, num_classes)


class CNN1d(nn.Module):
    """The MNIST-1D paper's CNN: strided Conv1d + ReLU layers, flatten, a Linear head."""

    def __init__(self, length: int = 40, channels: list[int] = (32, 32, 32), kernel_size: int = 5,
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width, in_ch = length, 1
        for ch in channels:
            layers += [nn.Conv1d(in_ch, ch, kernel_size, stride=2, padding=1), nn.ReLU()]
            width = (width + 2 - kernel_size) // 2 + 1
            in_ch = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, -1)  # (B, L) → (B, 1, L)
        x = self.features(x)  # (B, C, L')
        return self.head(x.flatten(1))  # (B, C·L') → (B, num_classes)


class CNN2d(nn.Module):
    """LeNet-style: two Conv2d + BatchNorm + ReLU + MaxPool stages, then two Linears."""

    def __init__(self, image_size: int = 8, in_channels: int = 1, channels: list[int] = (16, 32),
                 hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        layers: list[nn.Module] = []
        in_ch, side = in_channels, image_size
        for ch in channels:
            layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch, side = ch, side // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)  # (B, C, H, W)
        return self.classifier(self.features(x).flatten(1))


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections, as real transformers have them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, D) → (B, H, T, D/H)
            return y.reshape(b, t, self.heads, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, -1))  # (B, H, T, D/H) → (B, T, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer1d(nn.Module):
    """A small pre-norm transformer encoder for MNIST-1D: patches → blocks → mean pool → Linear."""

    def __init__(self, length: int = 40, patch_size: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, num_classes: int = 10):
        super().__init__()
        if length % patch_size:
            raise ValueError(f"length {length} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed = nn.Linear(patch_size, dim)
        self.pos = nn.Parameter(torch.randn(1, length // patch_size, dim) / math.sqrt(dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, self.patch_size)  # (B, L) → (B, T, P)
        x = self.embed(x) + self.pos  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))  # (B, T, D) → (B, D) → (B, classes)


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[..., nn.Module]
    input_shape: Callable[[dict], list[int]]  # example input shape (batch 1) from the kwargs


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(MLP, lambda kw: [1, kw.get("input_size", 64)]),
    "cnn1d": ZooEntry(CNN1d, lambda kw: [1, kw.get("length", 40)]),
    "cnn2d": ZooEntry(
        CNN2d, lambda kw: [1, kw.get("in_channels", 1) * kw.get("image_size", 8) ** 2]
    ),
    "transformer1d": ZooEntry(Transformer1d, lambda kw: [1, kw.get("length", 40)]),
}
