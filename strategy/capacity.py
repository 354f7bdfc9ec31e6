"""Free-capacity accounting: what a SpaceNet model has used and what is left.

>>> layer = LayerCapacity(name="fc1", neurons=400, reserved_neurons=40, used_neurons=80,
...                       connections=313600, used_connections=10000, is_output=False)
>>> layer.free_neurons, round(layer.used_connection_ratio, 4)
(360, 0.0319)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class CapacityExhaustedError(RuntimeError):
    """A task cannot be allocated: too few free neurons, connections or output units.
    ``layer`` names the layer that ran out (None when not known)."""

    def __init__(self, message: str, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer


@dataclass(frozen=True)
class LayerCapacity:
    """One layer's neurons and connections. ``used_neurons`` counts neurons (reserved
    or not) that any task has selected; ``reserved_neurons`` are frozen for good."""

    name: str
    neurons: int
    reserved_neurons: int
    used_neurons: int
    connections: int
    used_connections: int
    is_output: bool

    @property
    def free_neurons(self) -> int:
        return self.neurons - self.reserved_neurons

    @property
    def free_neuron_ratio(self) -> float:
        return self.free_neurons / self.neurons if self.neurons else 0.0

    @property
    def used_connection_ratio(self) -> float:
        return self.used_connections / self.connections if self.connections else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(
            free_neurons=self.free_neurons,
            free_neuron_ratio=self.free_neuron_ratio,
            used_connection_ratio=self.used_connection_ratio,
        )
        return d


@dataclass(frozen=True)
class CapacityReport:
    """Per-layer capacity, tasks learned so far and how many more are estimated to fit."""

    layers: tuple[LayerCapacity, ...]
    tasks_learned: int
    classes_known: int
    tasks_remaining: int
    limiting_layer: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    task_inference_bytes: int = 0  # stored task-identity statistics (0 without the option)
    state_bytes: int = 0  # the learner's saved state (SpaceNet.state_dict's tensors, weights included)
    dense_bytes: int = 0  # the managed layers' weights and biases, dense (what a plain model saves)

    @property
    def state_ratio(self) -> float:
        """The saved state's size as a share of the dense model's (0 when unknown)."""
        return self.state_bytes / self.dense_bytes if self.dense_bytes else 0.0

    @property
    def used_connection_ratio(self) -> float:
        total = sum(layer.connections for layer in self.layers)
        return sum(layer.used_connections for layer in self.layers) / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "layers": [layer.as_dict() for layer in self.layers],
            "tasks_learned": self.tasks_learned,
            "classes_known": self.classes_known,
            "tasks_remaining": self.tasks_remaining,
            "limiting_layer": self.limiting_layer,
            "used_connection_ratio": self.used_connection_ratio,
            "task_inference_bytes": self.task_inference_bytes,
            "state_bytes": self.state_bytes,
            "dense_bytes": self.dense_bytes,
            "state_ratio": self.state_ratio,
        }

    def table(self) -> str:
        """A plain-text table, for logs and the demo."""
        rows = [f"{'layer':<10}{'free':>7}{'reserved':>10}{'used':>7}{'conn used':>12}"]
        for layer in self.layers:
            rows.append(
                f"{layer.name:<10}{layer.free_neurons:>7}{layer.reserved_neurons:>10}"
                f"{layer.used_neurons:>7}{layer.used_connection_ratio:>11.1%}"
            )
        rows.append(
            f"tasks learned {self.tasks_learned}, classes {self.classes_known}, "
            f"estimated tasks remaining {self.tasks_remaining}"
            + (f" (limited by {self.limiting_layer})" if self.limiting_layer else "")
        )
        if self.dense_bytes:
            rows.append(
                f"learner state {self.state_bytes / 1000:.1f} KB, {self.state_ratio:.2f}x the dense "
                f"model's {self.dense_bytes / 1000:.1f} KB"
            )
        if self.task_inference_bytes:
            rows.append(f"task-inference statistics {self.task_inference_bytes / 1000:.1f} KB")
        return "\n".join(rows)


def tasks_that_fit(free_neurons: int, n_select: int, n_reserve: int) -> int:
    """How many more tasks a hidden layer can allocate: each needs ``n_select`` free
    neurons at its start and leaves ``n_reserve`` of them reserved.

    >>> tasks_that_fit(400 - 5 * 40, 80, 40)
    4
    """
    if free_neurons < n_select:
        return 0
    if n_reserve <= 0:
        return 1 << 30
    return (free_neurons - n_select) // n_reserve + 1
