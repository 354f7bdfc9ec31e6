"""One stream, one unit: what the service learns from one stream, saved and restored as one.

A stream is a partition of the training topic, its order the learning order. A
``StreamUnit`` owns everything that stream has taught the service: its ingest (decoder,
boundary detector, task buffer with every task's held-out sample, the records pending a
class, the position after the last message handled, per partition), its learner, the
model version, the accuracy matrix and the predictor it serves. ``state_dict()`` is all of
that as one checkpoint payload and ``load_state_dict`` its inverse.

The unit knows nothing of Kafka clients, threads or the poll loop (``loop.py``), which
drives it in this order::

    handle(backlog) / tick(now)  -> yields a ClosedTask when a task closes with records
    train(closed)                -> TaskResult, in a worker thread: nothing else touches the
                                    unit meanwhile
    finish(result)               -> a new model version, or the task's records dead-lettered
    state_dict()                 -> checkpointed by the loop
    publish()                    -> once that checkpoint is on disk: serve the new model
    announcement()               -> the models-topic event of the current model version

``spacenet serve`` makes one unit per assigned partition (``loop.py``); a unit's metrics
carry its partition as the ``stream`` label.

    >>> import collections, tempfile
    >>> import numpy as np
    >>> from prometheus_client import CollectorRegistry
    >>> from spacenet.stream import wire
    >>> from spacenet.stream.observability.telemetry import Telemetry
    >>> cfg = ServiceConfig(
    ...     input_shape=(1, 2, 2), hidden=(8, 8), n_select=4, n_reserve=2, connections=(0.5, 0.5, 0.5),
    ...     min_count=2, group_window=8, holdout_fraction=0.0, device="cpu", state_dir=tempfile.mkdtemp())
    >>> tm = Telemetry(CollectorRegistry())
    >>> unit = StreamUnit(cfg, tm, DeadLetters(print, "t.dlq", tm.metrics), partition=0)
    >>> Message = collections.namedtuple("Message", "topic partition offset key value headers")
    >>> def message(offset, label):
    ...     value = wire.encode(np.full((4, 1, 2, 2), 60 * label, np.uint8), [label] * 4)
    ...     return Message("t", 0, offset, None, value, wire.make_headers())
    >>> backlog = collections.deque(message(i, y) for i, y in enumerate([0, 1, 0, 1, 2, 3]))
    >>> closing = unit.handle(backlog)
    >>> closed = next(closing)                 # class 2 opens task 1: task 0 closes
    >>> closed
    (0, (0, 1))
    >>> unit.finish(unit.train(closed))
    >>> next(closing, "done"), unit.model_version_, unit.positions_, len(backlog)
    ('done', 1, {0: 5}, 1)
    >>> restored = StreamUnit(cfg, tm, DeadLetters(print, "t.dlq", tm.metrics), partition=0)
    >>> restored.load_state_dict(unit.state_dict())
    >>> restored.model_version_, restored.positions_, restored.predictor_.version
    (1, {0: 5}, 1)
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from spacenet.strategy.capacity import CapacityExhaustedError
from spacenet.strategy.cl_metrics import AccuracyMatrix
from spacenet.stream.config import ServiceConfig, state_path
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.ingest import Closed, Ingest
from spacenet.stream.learner import Learner, Predictor, TrainingAbandoned
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.prequential import Prequential

log = logging.getLogger(__name__)
STATE_FORMAT = 2  # 2: sparse learner state (SpaceNet state version 2), records as zstd Arrow IPC


@dataclass(frozen=True)
class TaskResult:
    """What training one closed task gave: held-out accuracy per task (accuracy, samples)
    or the error that stopped it, and the optimizer steps it took."""

    task: int
    classes: tuple[int, ...]
    train_seconds: float
    accuracy: dict[int, tuple[float, int]]
    steps: int
    error: BaseException | None = None
    task_inference_accuracy: float | None = None  # held-out records whose task was chosen right


class StreamUnit:
    """Ingest, learner and model version of one stream (see the module doc)."""

    model_version_: int  # tasks learned into the model (0: none yet)
    steps_: int  # optimizer steps of the tasks learned into the model
    predictor_: Predictor | None  # what predictions are served with: the newest checkpointed model
    trained_: Predictor | None  # the newest model, served once its checkpoint is on disk

    def __init__(
        self,
        cfg: ServiceConfig,
        telemetry: Telemetry,
        dead_letters: DeadLetters,
        partition: int,
        learner: Learner | None = None,
    ) -> None:
        self.cfg = cfg
        self.partition = partition
        self.stream = str(partition)  # the ``stream`` label of its metrics
        self.tm = telemetry
        self.m = telemetry.metrics
        self.dead_letters = dead_letters
        self.learner = learner or Learner(cfg)
        spill = state_path(cfg) / f"spill/partition-{partition}"
        self.ingest = Ingest.from_config(cfg, self.m, dead_letters, spill, self.stream)
        self.detector, self.buffer = self.ingest.detector, self.ingest.buffer
        if cfg.prequential_every > 0:  # monitoring only, not checkpointed
            self.prequential = Prequential.from_config(cfg)
            self.ingest.on_labeled = self._score
        self.accuracy_ = AccuracyMatrix()
        self.task_inference_accuracy_: float | None = None  # of the newest model (option on)
        self.model_version_ = self.steps_ = 0
        self.predictor_ = self.trained_ = None

    @property
    def positions_(self) -> dict[int, int]:
        """The offset after the last message handled, per partition (what may be committed)."""
        return self.ingest.positions_

    # ------------------------------------------------------------------ ingest
    def handle(self, backlog: collections.deque[Any]) -> Iterator[Closed]:
        """Handle messages from the front of ``backlog`` (``Ingest.handle``): yields each task
        that closes, which must be trained (``train``, ``finish``) before the next ``next()``."""
        return self.ingest.handle(backlog)

    def tick(self, now: float) -> Iterator[Closed]:
        """Close the open task if the stream has been idle past the timeout."""
        return self.ingest.events(self.detector.tick(now))

    def timeout_due(self, now: float) -> bool:
        return self.detector.timeout_due(now)

    def restart_clock(self, now: float) -> None:
        """Idle time counts from ``now`` (after a pause the stream did not cause)."""
        self.detector.restart_clock(now)

    def _score(self, offset: int, features: Any, labels: Any) -> None:
        """Prequential score of a labelled message by the served model, before it is learned."""
        if self.predictor_ is None:
            return
        scored, drifts = self.prequential.offer(offset, features, labels, self.predictor_)
        if scored:
            self.m.prequential(self.stream, scored, self.prequential.accuracy, drifts)

    # ---------------------------------------------------------------- training
    def train(self, closed: Closed) -> TaskResult:
        """Train the closed task on the buffer, in stream order, then score every task's
        held-out sample. Runs in a worker thread; raises nothing the loop must handle."""
        task, classes = closed
        steps_before = self.learner.steps_
        try:
            dataset = self.buffer.dataset(scale=1.0, stream_order=True)  # the partition order
            seconds = self.learner.train_task(dataset, list(classes))
        except (CapacityExhaustedError, TrainingAbandoned) as e:
            return TaskResult(task, classes, 0.0, {}, self.learner.steps_ - steps_before, e)
        held_out = {t: self.buffer.holdout_dataset(t, scale=1.0) for t in self.buffer.holdout_tasks}
        accuracy = self.learner.evaluate(held_out)
        steps = self.learner.steps_ - steps_before
        return TaskResult(
            task,
            classes,
            seconds,
            accuracy,
            steps,
            task_inference_accuracy=self.learner.task_inference_accuracy(held_out),
        )

    def finish(self, result: TaskResult) -> None:
        """Take in a training result: a new model version, or, for a task that does not fit,
        its training records to the dead-letter topic. An abandoned training changes nothing."""
        self.m.training_finished(
            result.train_seconds, failed=result.error is not None, task=result.task, stream=self.stream
        )
        self.m.steps(result.steps)
        if isinstance(result.error, TrainingAbandoned):
            return
        if isinstance(result.error, CapacityExhaustedError):
            log.error(
                "capacity exhausted: task %d (classes %s) cannot be learned: %s; its %d records go to "
                "the dead-letter topic",
                result.task,
                list(result.classes),
                result.error,
                len(self.buffer),
            )
            for batch in self.buffer.iter_batches():
                self.dead_letters.records(batch, "capacity_exhausted", self.cfg.topic)
            self.m.capacity_exhausted(result.error.layer)
            return
        for task, (acc, n) in result.accuracy.items():
            self.accuracy_.record(result.task, task, acc, n)
        self.task_inference_accuracy_ = result.task_inference_accuracy
        self.model_version_ += 1
        self.steps_ += result.steps
        self.trained_ = self.learner.frozen_copy(self.model_version_)
        self._snapshot()
        log.info(
            "stream %d: task %d learned in %.1fs (model version %d); held-out accuracy %s",
            self.partition,
            result.task,
            result.train_seconds,
            self.model_version_,
            {t: round(a, 3) for t, (a, _) in result.accuracy.items()},
        )

    def stop(self) -> None:
        """Ask a training in progress to stop at its next step (``TrainingAbandoned``)."""
        self.learner.stop_.set()

    def close(self) -> None:
        """Delete the open task's spill files (its records live on in the last checkpoint)."""
        self.buffer.clear()

    # --------------------------------------------------------------- publishing
    def publish(self) -> None:
        """Serve the newest model (call once the checkpoint that holds it is on disk)."""
        if self.trained_ is not None:
            self.predictor_ = self.trained_

    def announcement(self) -> dict[str, Any]:
        """The models-topic event of the current model version."""
        report = self.learner.spacenet.capacity()
        return {
            "stream": self.partition,
            "model_version": self.model_version_,
            "steps": self.steps_,
            "tasks_learned": report.tasks_learned,
            "classes": sorted(self.learner.spacenet.label_to_unit_),
            "final_accuracy": self.accuracy_.final_accuracy() if self.accuracy_.n_trained else None,
            "accuracy": self.accuracy_.as_dict(),
            "capacity": report.as_dict(),
            "time": time.time(),
        }

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything this stream taught the service, as one checkpoint payload: the model, the
        detector, the held-out samples, every record observed but not yet learned (the open
        task's and the pending ones) and the position after the last message handled."""
        return {
            "format": STATE_FORMAT,
            "model_version": self.model_version_,
            "steps": self.steps_,
            "learner": self.learner.state_dict(),
            "detector": json.dumps(self.detector.state_dict()),
            "positions": {str(p): o for p, o in self.positions_.items()},
            **self.ingest.pending.state_dict(),
            **self.buffer.state_dict(),
            "accuracy": json.dumps(self.accuracy_.as_dict()),
            "task_inference_accuracy": json.dumps(self.task_inference_accuracy_),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output, as if this process had produced it."""
        self.learner.load_state_dict(state["learner"])
        self.detector.load_state_dict(json.loads(state["detector"]))
        self.detector.restart_clock(time.monotonic())  # the clock of another process
        # The open task, else the last one: what spacenet_current_task read before the restart.
        task = self.detector.current_task_
        if task is None and self.detector.task_classes_:
            task = max(self.detector.task_classes_)
        if task is not None:
            self.m.set_current_task(self.stream, task)
        self.ingest.positions_ = {int(p): int(o) for p, o in state["positions"].items()}
        self.ingest.pending.load_state_dict(state)
        self.buffer.load_state_dict(state)
        self.accuracy_ = AccuracyMatrix.from_dict(json.loads(state["accuracy"]))
        self.task_inference_accuracy_ = json.loads(state.get("task_inference_accuracy", "null"))
        self.model_version_ = int(state["model_version"])
        self.steps_ = int(state.get("steps", 0))  # absent from checkpoints of earlier versions
        self.predictor_ = self.trained_ = self.learner.frozen_copy(self.model_version_)
        self.m.model_published(self.stream, self.model_version_)
        self._snapshot()

    def _snapshot(self) -> None:
        """Publish the model's capacity and held-out scores to the metrics."""
        self.tm.snapshot(
            self.stream,
            self.learner.spacenet,
            self.accuracy_,
            self.model_version_,
            self.task_inference_accuracy_,
        )
