"""SpaceNet, the method: sparse per-task training with neuron reservation, as an Avalanche plugin.

    >>> from spacenet.strategy import SpaceNetMLP, SpaceNetPlugin
    >>> SpaceNetPlugin.__name__
    'SpaceNetPlugin'

``SpaceNetPlugin`` imports Avalanche (slow to import), so it is loaded on first use.
"""

from typing import Any

from spacenet.strategy.calibration import TaskLogitNorm
from spacenet.strategy.capacity import CapacityExhaustedError, CapacityReport, LayerCapacity
from spacenet.strategy.models import SmallCNN, SpaceNetMLP
from spacenet.strategy.spacenet import SpaceNet

__all__ = [
    "CapacityExhaustedError",
    "CapacityReport",
    "LayerCapacity",
    "SmallCNN",
    "SpaceNet",
    "SpaceNetMLP",
    "SpaceNetPlugin",
    "TaskLogitNorm",
]


def __getattr__(name: str) -> Any:
    if name == "SpaceNetPlugin":
        from spacenet.strategy.plugin import SpaceNetPlugin

        return SpaceNetPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
