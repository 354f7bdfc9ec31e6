"""Prequential (test-then-train) accuracy of one stream, and a drift test on it.

A sample of the labelled records arriving for training is scored by the model being
served *before* the records are learned, the usual evaluation of online learners (Gama,
Sebastião & Rodrigues, 2013). In a class-incremental stream a new task's classes are
unknown to that model until the task is trained, so only records of classes the model
knows are scored: their windowed accuracy says how the model does on what it has learned,
on today's data. A Page-Hinkley test (Page 1954; Hinkley 1971) on the error indicator
flags a lasting rise of the error rate: a drift of the inputs of known classes. It is a
monitoring signal only: it never opens a task or allocates capacity. Nothing here is
checkpointed: after a restart the window fills again.

    >>> ph = PageHinkley(delta=0.005, threshold=5.0, min_samples=10)
    >>> [ph.update(0.0) for _ in range(50)].count(True)      # a steady error rate of 0
    0
    >>> any(ph.update(1.0) for _ in range(20))               # the error rate jumps to 1
    True
    >>> p = Prequential(window=4)
    >>> p.add(np.array([True, True, False, True]))
    0
    >>> p.accuracy, p.scored
    (0.75, 4)
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from spacenet.stream.config import ServiceConfig


class Scorer(Protocol):
    """What scores records: the served model (``learner.Predictor``)."""

    @property
    def known_labels(self) -> npt.NDArray[np.int64]: ...
    def predict_labels(self, features: npt.NDArray[Any]) -> npt.NDArray[np.int64]: ...


class PageHinkley:
    """Page-Hinkley test for an increase of the mean of ``x`` (here: the error indicator).

    With ``m_t = sum_i (x_i - mean_i - delta)`` and ``M_t = min m_t``, drift is signalled
    when ``m_t - M_t > threshold`` after at least ``min_samples`` values; the test then
    starts afresh. ``delta`` is the change it tolerates, ``threshold`` (lambda) trades
    detection delay against false alarms."""

    def __init__(self, delta: float = 0.005, threshold: float = 25.0, min_samples: int = 30) -> None:
        if delta < 0 or threshold <= 0 or min_samples < 1:
            raise ValueError("delta >= 0, threshold > 0 and min_samples >= 1 are needed")
        self.delta = delta
        self.threshold = threshold
        self.min_samples = min_samples
        self.reset()

    def reset(self) -> None:
        self.n_ = 0
        self.mean_ = 0.0
        self.cumulative_ = 0.0
        self.minimum_ = 0.0

    def update(self, x: float) -> bool:
        """Add one value; True when it completes a detected drift (the test then restarts)."""
        self.n_ += 1
        self.mean_ += (x - self.mean_) / self.n_
        self.cumulative_ += x - self.mean_ - self.delta
        self.minimum_ = min(self.minimum_, self.cumulative_)
        if self.n_ >= self.min_samples and self.cumulative_ - self.minimum_ > self.threshold:
            self.reset()
            return True
        return False


class Prequential:
    """The last ``window`` scored records of a stream (right or wrong), their accuracy, and
    the drift test fed with their errors. ``offer`` scores a sample of a message: records of
    known classes, at most ``sample`` of them, of every ``every``-th message by offset."""

    def __init__(
        self, window: int = 500, drift: PageHinkley | None = None, every: int = 4, sample: int = 8
    ) -> None:
        if window < 1 or every < 1 or sample < 1:
            raise ValueError("window, every and sample must be at least 1")
        self.window, self.every, self.sample = window, every, sample
        self.drift = drift or PageHinkley()
        self._right: collections.deque[bool] = collections.deque(maxlen=window)
        self.scored = 0  # records scored since the start
        self.last_offset_ = -1  # of the last message offered
        self.drifts = 0  # drifts detected since the start

    @classmethod
    def from_config(cls, cfg: ServiceConfig) -> Prequential:
        """The prequential score ``spacenet serve`` keeps per stream (needs ``prequential_every`` > 0)."""
        drift = PageHinkley(threshold=cfg.drift_threshold)
        return cls(cfg.prequential_window, drift, cfg.prequential_every, cfg.prequential_sample)

    @property
    def accuracy(self) -> float | None:
        """Accuracy over the window (None before any record is scored)."""
        return sum(self._right) / len(self._right) if self._right else None

    def offer(
        self, offset: int, features: npt.NDArray[Any], labels: npt.NDArray[np.int64], scorer: Scorer
    ) -> tuple[int, int]:
        """Score the sample of one message (before it is learned): (records scored, drifts).
        A message offered again (ingest decodes again what follows a task's end) is not."""
        if offset % self.every or offset <= self.last_offset_:
            return 0, 0
        self.last_offset_ = offset
        rows = np.flatnonzero(np.isin(labels, scorer.known_labels))[: self.sample]
        if not len(rows):
            return 0, 0
        right = scorer.predict_labels(np.ascontiguousarray(features[rows])) == labels[rows]
        return len(rows), self.add(right)

    def add(self, right: npt.NDArray[np.bool_]) -> int:
        """Record scored records in order; returns the drifts they completed."""
        found = 0
        for ok in right.tolist():
            self._right.append(bool(ok))
            found += self.drift.update(0.0 if ok else 1.0)
        self.scored += len(right)
        self.drifts += found
        return found
