"""``SpaceNetPlugin``'s saved state, without Avalanche: ``{"spacenet": ..., "calibration": ...}``.

The plugin saves and loads through these, and so does code that drives a ``SpaceNet``
without importing Avalanche (the service, while it only serves), so both read and write
one layout.
"""

from __future__ import annotations

from typing import Any

from spacenet.strategy.calibration import TaskLogitNorm
from spacenet.strategy.spacenet import SpaceNet


def plugin_state(spacenet: SpaceNet, calibration: TaskLogitNorm | None) -> dict[str, Any]:
    """SpaceNet's sparse state (``SpaceNet.state_dict``: the managed layers' used weights,
    biases, ownership, reservations, class map) and the calibration's, if any."""
    state: dict[str, Any] = {"spacenet": spacenet.state_dict()}
    if calibration is not None:
        state["calibration"] = calibration.state_dict()
    return state


def load_plugin_state(state: dict[str, Any], spacenet: SpaceNet, calibration: TaskLogitNorm | None) -> None:
    """Restore ``plugin_state`` output into an attached ``spacenet`` (and ``calibration``)."""
    spacenet.load_state_dict(state["spacenet"])
    if calibration is not None and "calibration" in state:
        calibration.load_state_dict(state["calibration"])
