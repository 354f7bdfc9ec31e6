"""``spacenet serve``: learn tasks from a Kafka topic, checkpoint, commit, publish, serve.

One thread owns the training consumer. Each message is decoded and validated (bad
ones go to the dead-letter topic with a reason), fed to the boundary detector and
routed (``ingest.py``): training records into the task buffer, pending ones aside, late ones into
their task's held-out sample. When a task closes, its partitions are paused and a
worker thread trains it while this thread keeps polling (so the group membership
holds); then every task's held-out sample is scored, a checkpoint is written, the
new model version is published (flushed to the models topic) and the offsets the
checkpoint covers are committed. A restart that finds the checkpoint's offsets not
committed announces its model again: announcements are at least once, keyed by version.

Exactly-once learning: a checkpoint holds the model, the detector, the held-out
samples, and every record observed but not yet learned (the open task's records and
the pending ones), with the position after the last message observed. Offsets are
committed only after that checkpoint is on disk, and on start partitions are sought
to the checkpoint's positions, so a crash anywhere replays records, never loses or
re-learns them.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kafka.errors import KafkaError

from spacenet.strategy.capacity import CapacityExhaustedError
from spacenet.strategy.cl_metrics import AccuracyMatrix
from spacenet.stream.checkpoint import CheckpointError, CheckpointStore
from spacenet.stream.config import ServiceConfig, state_path
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.faults import maybe_crash
from spacenet.stream.ingest import Ingest
from spacenet.stream.learner import Learner, Predictor, TrainingAbandoned
from spacenet.stream.telemetry import Telemetry

log = logging.getLogger(__name__)
CAUGHT_UP_TIMEOUT_MS = 5000  # how long an idle-timeout check waits for the broker


@dataclass(frozen=True)
class TaskResult:
    task: int
    classes: tuple[int, ...]
    train_seconds: float
    accuracy: dict[int, tuple[float, int]]
    error: BaseException | None = None


class Service:
    """The training loop; ``kafka`` supplies the clients (see ``serve.py``)."""

    def __init__(
        self,
        cfg: ServiceConfig,
        consumer: Any,
        producer: Any,
        telemetry: Telemetry,
        learner: Learner | None = None,
    ) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.producer = producer
        self.tm = telemetry
        self.m = telemetry.metrics
        self.learner = learner or Learner(cfg)
        self.store = CheckpointStore(state_path(cfg) / "checkpoints", keep=cfg.keep_checkpoints)
        self.dead_letters = DeadLetters(producer.send, cfg.dead_letter_topic, self.m)
        self.ingest = Ingest.from_config(cfg, self.m, self.dead_letters, state_path(cfg) / "spill")
        self.detector, self.buffer, self.pending = (
            self.ingest.detector,
            self.ingest.buffer,
            self.ingest.pending,
        )
        self.accuracy_ = AccuracyMatrix()
        self.model_version_ = 0
        self.announced_version_ = 0  # the newest model version known to be on the models topic
        self.predictor_: Predictor | None = None
        self.stop_ = threading.Event()
        self.ready_reason_ = "starting"
        self._backlog: collections.deque[Any] = collections.deque()
        self._gen: Iterator[tuple[int, tuple[int, ...]]] | None = None
        self._job: Future[TaskResult] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spacenet-train")
        self._checkpoint_due = False
        self._next_checkpoint_try = 0.0
        self._published: Predictor | None = None
        self._steps_before = 0

    # ------------------------------------------------------------------ main loop
    def run(self, restored: bool = False) -> int:
        """Until ``stop_`` is set; returns the process exit code. ``restored``: the
        caller already called ``restore()`` (before subscribing, so that partition
        assignment can seek to the checkpoint's positions)."""
        if not restored:
            self.restore()
        self.ready_reason_ = ""
        try:
            while not self.stop_.is_set():
                self.step()
        finally:
            self._shutdown()
        return 0

    def step(self) -> None:
        if self._job is not None:
            self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms)  # paused: keeps the membership
            if self._job.done():
                self._finish_training(self._job.result())
            return
        if self._gen is not None:
            self._advance()
            return
        # A commit needs the group membership: before the first assignment, poll (join) first.
        if (
            self._checkpoint_due
            and self.consumer.assignment()
            and time.monotonic() >= self._next_checkpoint_try
        ):
            self._checkpoint_and_publish()
            return
        if not self._backlog:
            polled = self.consumer.poll(
                timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records
            )
            for messages in polled.values():
                self._backlog.extend(messages)
            self.tm.lag(self.consumer, self.positions_)
            self.m.batch()
            if not self._backlog:
                now = time.monotonic()
                # Owning no partition (starting, rebalancing, waiting for a dead member's
                # session to expire), an unreachable broker or records still to fetch are
                # not an idle stream: no timeout may close a task then.
                if not self.consumer.assignment() or (
                    self.detector.timeout_due(now) and not self._caught_up()
                ):
                    self.detector.restart_clock(now)
                    return
                self._gen = self.ingest.events(self.detector.tick(now))
                return
        self._gen = self.ingest.handle(self._backlog)

    def _caught_up(self) -> bool:
        """Whether the broker answers and every assigned partition is read to its end."""
        parts = list(self.consumer.assignment())
        try:
            ends = self.consumer.end_offsets(parts, timeout_ms=CAUGHT_UP_TIMEOUT_MS)
            return all(
                self.consumer.position(tp, timeout_ms=CAUGHT_UP_TIMEOUT_MS) >= ends[tp] for tp in parts
            )
        except KafkaError as e:
            log.warning("the broker did not answer (%s): the open task stays open", e)
            return False

    def _advance(self) -> None:
        assert self._gen is not None
        try:
            task, classes = next(self._gen)
        except StopIteration:
            self._gen = None
            return
        self._start_training(task, classes)

    # ---------------------------------------------------------------- training
    def _start_training(self, task: int, classes: tuple[int, ...]) -> None:
        self.consumer.pause(*self.consumer.assignment())
        self.m.training_started()
        self._steps_before = self.learner.steps_
        self._job = self._executor.submit(self._train, task, classes)

    def _train(self, task: int, classes: tuple[int, ...]) -> TaskResult:
        """Runs in the worker thread; the main thread does not touch the buffer meanwhile."""
        try:
            dataset = self.buffer.dataset(scale=1.0, stream_order=True)  # the partition order
            seconds = self.learner.train_task(dataset, list(classes))
        except (CapacityExhaustedError, TrainingAbandoned) as e:
            return TaskResult(task, classes, 0.0, {}, e)
        held_out = {t: self.buffer.holdout_dataset(t, scale=1.0) for t in self.buffer.holdout_tasks}
        return TaskResult(task, classes, seconds, self.learner.evaluate(held_out))

    def _finish_training(self, result: TaskResult) -> None:
        self._job = None
        self.m.training_finished(result.train_seconds, failed=result.error is not None, task=result.task)
        self.m.steps(self.learner.steps_ - self._steps_before)
        if isinstance(result.error, TrainingAbandoned):
            log.warning("training of task %d abandoned for shutdown; it replays on restart", result.task)
            self.stop_.set()
            return
        self.consumer.resume(*self.consumer.assignment())
        self.detector.restart_clock(time.monotonic())  # training time is not idle stream time
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
            self._checkpoint_due = True
            return
        for task, (acc, n) in result.accuracy.items():
            self.accuracy_.record(result.task, task, acc, n)
        self.model_version_ += 1
        self._published = self.learner.frozen_copy(self.model_version_)
        self.tm.snapshot(self.learner.spacenet, self.accuracy_, self.model_version_)
        self._checkpoint_due = True
        log.info(
            "task %d learned in %.1fs (model version %d); held-out accuracy %s",
            result.task,
            result.train_seconds,
            self.model_version_,
            {t: round(a, 3) for t, (a, _) in result.accuracy.items()},
        )

    # --------------------------------------------------- checkpoint, commit, publish
    def _checkpoint_and_publish(self) -> None:
        self.producer.flush()  # dead letters are durable before their offsets are committed
        payload = self._payload()
        try:
            with self.m.checkpoint():
                self.store.save(self.model_version_, payload)
        except CheckpointError as e:
            self.ready_reason_ = f"checkpoint failing: {e}"
            log.error("%s; offsets stay uncommitted, retrying in 10 s", e)
            self._next_checkpoint_try = time.monotonic() + 10.0
            return
        maybe_crash("after_checkpoint")
        if self._published is not None and self._published is not self.predictor_:
            self.predictor_ = self._published
        # Announce before committing: a crash in between announces again on restart (see
        # ``restore``), while a commit first would lose the announcement for good.
        if self.predictor_ is not None and self.announced_version_ < self.model_version_:
            self._announce()
        try:
            self._commit()
        except KafkaError as e:  # broker away or a rebalance: the checkpoint stands, commit later
            self.ready_reason_ = f"offset commit failing: {e}"
            log.warning("committing offsets failed (%s); retrying in 2 s", e)
            self._next_checkpoint_try = time.monotonic() + 2.0
            return
        self._checkpoint_due = False
        self.ready_reason_ = ""

    def _commit(self) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        offsets = {
            TopicPartition(self.cfg.topic, p): OffsetAndMetadata(o, "", -1)
            for p, o in self.positions_.items()
        }
        if offsets:
            self.consumer.commit(offsets)

    def _announce(self) -> None:
        report = self.learner.spacenet.capacity()
        event = {
            "model_version": self.model_version_,
            "tasks_learned": report.tasks_learned,
            "classes": sorted(self.learner.spacenet.label_to_unit_),
            "final_accuracy": self.accuracy_.final_accuracy() if self.accuracy_.n_trained else None,
            "accuracy": self.accuracy_.as_dict(),
            "capacity": report.as_dict(),
            "time": time.time(),
        }
        self.producer.send(
            self.cfg.models_topic, key=str(self.model_version_).encode(), value=json.dumps(event).encode()
        )
        self.producer.flush()  # on the topic before the offsets it covers are committed
        self.announced_version_ = self.model_version_
        self.m.model_published(self.model_version_)
        log.info("published model version %d", self.model_version_)

    def _payload(self) -> dict[str, Any]:
        return {
            "format": 1,
            "model_version": self.model_version_,
            "learner": self.learner.state_dict(),
            "detector": json.dumps(self.detector.state_dict()),
            "positions": {str(p): o for p, o in self.positions_.items()},
            **self.pending.state_dict(),
            **self.buffer.state_dict(),
            "accuracy": json.dumps(self.accuracy_.as_dict()),
        }

    def restore(self) -> None:
        """Resume from the newest complete checkpoint, if any."""
        found = self.store.latest()
        for torn in self.store.skipped_:
            log.warning("ignored incomplete checkpoint %s", torn)
        if found is None:
            log.info("no checkpoint in %s: starting fresh", self.store.directory)
            return
        version, ck = found
        self.learner.load_state_dict(ck["learner"])
        self.detector.load_state_dict(json.loads(ck["detector"]))
        self.detector.restart_clock(time.monotonic())  # the clock of another process
        self.positions_ = {int(p): int(o) for p, o in ck["positions"].items()}
        self.pending.load_state_dict(ck)
        self.buffer.load_state_dict(ck)
        self.accuracy_ = AccuracyMatrix.from_dict(json.loads(ck["accuracy"]))
        self.model_version_ = int(ck["model_version"])
        self.predictor_ = self._published = self.learner.frozen_copy(self.model_version_)
        self.m.model_published(self.model_version_)
        self.tm.snapshot(self.learner.spacenet, self.accuracy_, self.model_version_)
        log.info("resumed from checkpoint %d at positions %s", version, self.positions_)
        if self._committed_behind():
            # The last run died between writing this checkpoint and committing its offsets,
            # so maybe before announcing its model: announce it (again) and commit.
            log.info("offsets of checkpoint %d were not committed: announcing and committing", version)
            self._checkpoint_due = True
        else:
            self.announced_version_ = self.model_version_

    def _committed_behind(self) -> bool:
        """Whether the group's committed offsets are behind ``positions_`` (unknown: True)."""
        from kafka.structs import TopicPartition

        try:
            for partition, position in self.positions_.items():
                committed = self.consumer.committed(TopicPartition(self.cfg.topic, partition))
                if committed is None or committed < position:
                    return True
        except KafkaError as e:
            log.warning("could not read the committed offsets: %s", e)
            return True
        return False

    def seek_assigned(self, assigned: list[Any]) -> None:
        """Rebalance hook: start each partition at the checkpoint's position."""
        for tp in assigned:
            self.m.partition_assigned(tp.topic, tp.partition)
            if tp.partition in self.positions_:
                self.consumer.seek(tp, self.positions_[tp.partition])

    def _shutdown(self) -> None:
        self.learner.stop_.set()
        if self._job is not None:
            self._job.result()  # training notices the stop flag at its next step
        self._executor.shutdown(wait=True)
        self.producer.flush()
        self.consumer.close(autocommit=False)
        log.info("stopped; last checkpoint is model version %d", self.model_version_)

    # ---------------------------------------------------------------- probes
    @property
    def positions_(self) -> dict[int, int]:
        """The offset after the last message handled, per partition."""
        return self.ingest.positions_

    @positions_.setter
    def positions_(self, positions: dict[int, int]) -> None:
        self.ingest.positions_ = positions

    @property
    def healthy(self) -> bool:
        """Alive: the loop runs (a failing checkpoint is not fatal: see ``ready``)."""
        return not self.stop_.is_set()

    @property
    def ready(self) -> tuple[bool, str]:
        return (not self.ready_reason_, self.ready_reason_ or "ok")
