"""Ready models: the reference MLP for (Fashion-)MNIST and a small CNN for CIFAR.

>>> import torch
>>> SpaceNetMLP()(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> SmallCNN(num_classes=100)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 100])
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SpaceNetMLP(nn.Module):
    """The reference network: 784-400-400-10, ReLU, Xavier-uniform init, zero biases."""

    def __init__(self, input_size: int = 784, hidden: tuple[int, ...] = (400, 400), num_classes: int = 10):
        super().__init__()
        sizes = (input_size, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.out = nn.Linear(sizes[-1], num_classes)
        _xavier(self)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = layer(x).relu()
        out: Tensor = self.out(x)
        return out


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (32-64-128 channels, each followed by 2x2 max-pool), a
    hidden Linear layer and the output layer: small enough for CPU tests, and every
    weight layer is a Conv2d or Linear that SpaceNet can manage."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: tuple[int, int, int] = (32, 64, 128),
        hidden: int = 256,
        image_size: int = 32,
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.channels = channels
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(in_channels, c1, 3, padding=1),
                nn.Conv2d(c1, c2, 3, padding=1),
                nn.Conv2d(c2, c3, 3, padding=1),
            ]
        )
        self.pool = nn.MaxPool2d(2)
        spatial = image_size // 8
        self.fc = nn.Linear(c3 * spatial * spatial, hidden)
        self.out = nn.Linear(hidden, num_classes)
        _xavier(self)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = self.pool(conv(x).relu())
        x = self.fc(x.flatten(1)).relu()
        out: Tensor = self.out(x)
        return out

    def spacenet_defaults(self, num_tasks: int = 5) -> dict[str, object]:
        """SpaceNet settings sized so ``num_tasks`` tasks fit: per hidden layer of width W,
        each task reserves W // (num_tasks + 1) neurons and selects twice that many.
        Budgets are densities (floats) of each task's free selected x selected block."""
        widths: list[int] = [*self.channels, self.fc.out_features]
        reserve = [max(1, w // (num_tasks + 1)) for w in widths]
        return {
            "n_select": tuple(min(w, 2 * r) for w, r in zip(widths, reserve, strict=True)),
            "n_reserve": tuple(reserve),
            "connections": (1.0, 0.5, 0.5, 0.2, 0.5),
        }
