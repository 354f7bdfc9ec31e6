"""Page-Hinkley and the prequential window (stream/prequential.py), on seeded Bernoulli errors."""

from __future__ import annotations

import numpy as np
import pytest

from spacenet.stream.prequential import PageHinkley, Prequential


def _right(rng: np.random.Generator, n: int, error: float) -> np.ndarray:
    return rng.random(n) >= error


def test_a_steady_error_rate_raises_no_alarm_and_a_jump_does_soon() -> None:
    rng = np.random.default_rng(0)
    p = Prequential(window=500)  # the service's defaults
    assert p.add(_right(rng, 20_000, 0.05)) == 0  # 20,000 scored records at 5 % error: no drift
    assert p.accuracy == pytest.approx(0.95, abs=0.03)
    jump = _right(rng, 400, 0.5)
    found = [p.add(jump[i : i + 1]) for i in range(len(jump))]
    assert sum(found) >= 1 and found.index(1) < 150  # 5 % -> 50 %: found within 150 records
    assert p.drifts == sum(found) and p.scored == 20_400


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        PageHinkley(threshold=0)
    with pytest.raises(ValueError):
        Prequential(window=0)
    assert Prequential().accuracy is None


def test_a_message_offered_twice_is_scored_once() -> None:
    class Everything:
        known_labels = np.array([0, 1])

        def predict_labels(self, features: np.ndarray) -> np.ndarray:
            return np.zeros(len(features), np.int64)

    p = Prequential(every=2, sample=3)
    x, y = np.zeros((5, 4), np.uint8), np.array([0, 1, 0, 2, 0])
    assert p.offer(4, x, y, Everything()) == (3, 0)  # the first 3 of the known classes 0 and 1
    assert p.offer(4, x, y, Everything()) == (0, 0)  # decoded again after a task's end
    assert p.offer(5, x, y, Everything()) == (0, 0)  # not every 2nd message
    assert p.offer(6, x, y, Everything()) == (3, 0) and p.scored == 6 and p.accuracy == 4 / 6
