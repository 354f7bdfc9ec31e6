"""Continual-learning metrics from an accuracy matrix (framework-free).

``R[i][j]`` is the accuracy on task ``j``'s test data measured after training task
``i``. Tasks are numbered 0, 1, 2, ... in training order; after training task ``i``
the *seen* tasks are 0..i. Let ``T - 1`` be the last trained task (the last row).
Rows may also hold tasks not trained yet (their accuracy is near 0 in
class-incremental learning); the summary metrics only look at seen tasks.

    >>> m = AccuracyMatrix()
    >>> m.record(0, 0, 0.9, 100)
    >>> m.record(1, 0, 0.6, 100); m.record(1, 1, 0.8, 300)
    >>> round(m.final_accuracy(), 4), round(m.sample_weighted_accuracy(), 4)
    (0.7, 0.75)
    >>> {j: round(f, 4) for j, f in m.forgetting().items()}, round(m.backward_transfer(), 4)
    ({0: 0.3}, -0.3)

Used by the benchmark runner (``bench.py``) and by the streaming service.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class AccuracyMatrix:
    """A growing accuracy matrix ``R[after_task][task]`` with sample counts.

    Definitions (``T - 1`` is the last row recorded, tasks ``j <= T - 1`` are seen):

    - final accuracy: ``mean_{j <= T-1} R[T-1][j]``, the mean of the per-task accuracies
      after the last trained task (the SpaceNet paper's metric);
    - sample-weighted accuracy: ``sum_j n_j R[T-1][j] / sum_j n_j`` over seen tasks, the
      accuracy on all their test samples pooled (``n_j`` as recorded in the last row);
    - forgetting of task ``j < T-1``: ``max_{j <= l < T-1} R[l][j] - R[T-1][j]`` (only
      rows recorded after ``j`` was trained count); average forgetting is its mean;
    - backward transfer: ``BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])``.

    With a single trained task there is nothing to forget: forgetting is empty and
    average forgetting and BWT are 0.0.
    """

    def __init__(self) -> None:
        self._acc: dict[int, dict[int, float]] = {}
        self._n: dict[int, dict[int, int]] = {}

    # ----------------------------------------------------------------- input
    def record(self, after_task: int, task: int, accuracy: float, n_samples: int) -> None:
        """Store ``R[after_task][task] = accuracy``, measured on ``n_samples`` samples."""
        if after_task < 0 or task < 0:
            raise ValueError("task indices start at 0")
        if not 0.0 <= accuracy <= 1.0 or math.isnan(accuracy):
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        if n_samples < 0:
            raise ValueError("n_samples must be >= 0")
        self._acc.setdefault(after_task, {})[task] = float(accuracy)
        self._n.setdefault(after_task, {})[task] = int(n_samples)

    # ---------------------------------------------------------------- access
    @property
    def n_trained(self) -> int:
        """Number of trained tasks ``T``: the last row recorded plus one (0 when empty)."""
        return max(self._acc) + 1 if self._acc else 0

    @property
    def n_tasks(self) -> int:
        """Number of columns: the highest task evaluated plus one."""
        return max((max(row) + 1 for row in self._acc.values() if row), default=0)

    def get(self, after_task: int, task: int) -> float | None:
        """``R[after_task][task]``, or None when it was not recorded."""
        return self._acc.get(after_task, {}).get(task)

    def _require(self, after_task: int, task: int) -> float:
        value = self.get(after_task, task)
        if value is None:
            raise ValueError(f"R[{after_task}][{task}] was not recorded")
        return value

    def _last(self) -> int:
        if not self._acc:
            raise ValueError("the accuracy matrix is empty")
        return self.n_trained - 1

    # --------------------------------------------------------------- metrics
    def seen_accuracy(self, after_task: int) -> float:
        """Mean of ``R[after_task][j]`` over ``j <= after_task`` (the seen tasks)."""
        return sum(self._require(after_task, j) for j in range(after_task + 1)) / (after_task + 1)

    def final_accuracy(self) -> float:
        """Mean over seen tasks of the accuracies after the last trained task."""
        return self.seen_accuracy(self._last())

    def accuracy_curve(self) -> list[float | None]:
        """``seen_accuracy(i)`` for every row ``i`` (None where a seen entry is missing)."""
        curve: list[float | None] = []
        for i in range(self.n_trained):
            ok = all(self.get(i, j) is not None for j in range(i + 1))
            curve.append(self.seen_accuracy(i) if ok else None)
        return curve

    def sample_weighted_accuracy(self) -> float:
        """Accuracy on all seen tasks' test samples pooled (last row)."""
        last = self._last()
        hits = total = 0.0
        for j in range(last + 1):
            n = self._n[last].get(j)
            if n is None:
                raise ValueError(f"R[{last}][{j}] was not recorded")
            hits += self._acc[last][j] * n
            total += n
        return hits / total if total else 0.0

    def forgetting(self) -> dict[int, float]:
        """Task ``j < T-1`` -> ``max_{j <= l < T-1} R[l][j] - R[T-1][j]``."""
        last = self._last()
        out: dict[int, float] = {}
        for j in range(last):
            earlier = [v for l_ in range(j, last) if (v := self.get(l_, j)) is not None]
            if not earlier:
                raise ValueError(f"no accuracy recorded for task {j} between its training and the last row")
            out[j] = max(earlier) - self._require(last, j)
        return out

    def average_forgetting(self) -> float:
        """Mean of ``forgetting()``; 0.0 with a single trained task."""
        values = list(self.forgetting().values())
        return sum(values) / len(values) if values else 0.0

    def backward_transfer(self) -> float:
        """``mean_{j < T-1} (R[T-1][j] - R[j][j])``; 0.0 with a single trained task."""
        last = self._last()
        if last == 0:
            return 0.0
        return sum(self._require(last, j) - self._require(j, j) for j in range(last)) / last

    def summary(self) -> dict[str, float]:
        """The four headline numbers, keyed by name."""
        return {
            "final_accuracy": self.final_accuracy(),
            "sample_accuracy": self.sample_weighted_accuracy(),
            "average_forgetting": self.average_forgetting(),
            "bwt": self.backward_transfer(),
        }

    # ------------------------------------------------------------ conversion
    def matrix(self) -> list[list[float | None]]:
        """Dense rows ``n_trained x n_tasks``; None where nothing was recorded."""
        return [[self.get(i, j) for j in range(self.n_tasks)] for i in range(self.n_trained)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"accuracy": [[R or null]], "n_samples": [[n or null]]}``."""
        cols = range(self.n_tasks)
        return {
            "accuracy": self.matrix(),
            "n_samples": [[self._n.get(i, {}).get(j) for j in cols] for i in range(self.n_trained)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        """Inverse of ``as_dict``."""
        matrix = cls()
        acc: Sequence[Sequence[float | None]] = data["accuracy"]
        counts: Sequence[Sequence[int | None]] = data["n_samples"]
        for i, (acc_row, n_row) in enumerate(zip(acc, counts, strict=True)):
            for j, (a, n) in enumerate(zip(acc_row, n_row, strict=True)):
                if a is not None:
                    matrix.record(i, j, a, 0 if n is None else n)
        return matrix

    def table(self, digits: int = 3) -> str:
        """Plain text: one row per trained task, one column per task, and the seen mean."""
        width = digits + 4
        header = (
            "after\\task" + "".join(f"{j:>{width}}" for j in range(self.n_tasks)) + f"{'seen':>{width + 2}}"
        )
        rows = [header]
        for i, mean in enumerate(self.accuracy_curve()):
            cells = "".join(
                f"{'-':>{width}}" if (v := self.get(i, j)) is None else f"{v:>{width}.{digits}f}"
                for j in range(self.n_tasks)
            )
            seen = "-" if mean is None else f"{mean:.{digits}f}"
            rows.append(f"{i:<10}{cells}{seen:>{width + 2}}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccuracyMatrix):
            return NotImplemented
        return self._acc == other._acc and self._n == other._n

    __hash__ = None  # type: ignore[assignment]  # mutable


def mean_matrix(matrices: Sequence[AccuracyMatrix]) -> list[list[float | None]]:
    """Element-wise mean of dense matrices (over the entries present; None if none are)."""
    if not matrices:
        return []
    rows = max(m.n_trained for m in matrices)
    cols = max(m.n_tasks for m in matrices)
    out: list[list[float | None]] = []
    for i in range(rows):
        row: list[float | None] = []
        for j in range(cols):
            values = [v for m in matrices if (v := m.get(i, j)) is not None]
            row.append(sum(values) / len(values) if values else None)
        out.append(row)
    return out
