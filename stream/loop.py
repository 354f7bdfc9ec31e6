"""The poll loop of ``spacenet serve``: one consumer driving one or many stream units.

One thread owns the training consumer and runs ``step()`` until stopped. Polled messages
go to the backlog of the ``StreamUnit`` that covers their partition, which routes them
(``unit.handle``). When a unit closes a task, its partitions are paused and a worker
thread trains it (``unit.train``) while this thread keeps polling, so the group membership
holds; then ``unit.finish`` takes the result in and the partitions resume. After each
task, learned or refused, every unit is checkpointed (``unit.state_dict()``),
then each new model is published (served, and announced on the models topic, flushed),
then the offsets the checkpoints cover are committed:

    checkpoint -> announce -> commit

so a crash anywhere replays records, never loses or re-learns them, and a restart that
finds a checkpoint's offsets not committed announces its model again (announcements are
at least once, keyed by version). On start each unit is restored from its newest
complete checkpoint, and assigned partitions are sought to its positions.

The idle timeout closes a unit's open task only while the loop owns the unit's
partitions, the broker answers and they are read to their end: a restart, a rebalance or
a broker outage is not an idle stream.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from spacenet.stream.checkpoint import CheckpointError, CheckpointStore
from spacenet.stream.config import ServiceConfig, state_path
from spacenet.stream.faults import maybe_crash
from spacenet.stream.ingest import Closed
from spacenet.stream.learner import TrainingAbandoned
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.unit import StreamUnit, TaskResult

log = logging.getLogger(__name__)
CAUGHT_UP_TIMEOUT_MS = 5000  # how long an idle-timeout check waits for the broker
CHECKPOINT_RETRY_S, COMMIT_RETRY_S = 10.0, 2.0
Work = Iterator[tuple[StreamUnit, Closed]]  # a unit's ingest, yielding the tasks it closes


def checkpoint_dir(cfg: ServiceConfig, unit: StreamUnit) -> Path:
    """Where ``unit``'s checkpoints go: ``checkpoints/`` (``checkpoints/partition-N`` for a
    unit of one partition) under the state dir."""
    root = state_path(cfg) / "checkpoints"
    return root if unit.partition is None else root / f"partition-{unit.partition}"


class Loop:
    """Polls ``consumer``, drives ``units``, trains one task at a time, checkpoints, publishes
    through ``producer`` and commits. The Kafka clients are kafka-python's (``runtime.py``)."""

    def __init__(
        self,
        cfg: ServiceConfig,
        consumer: Any,
        producer: Any,
        telemetry: Telemetry,
        units: Sequence[StreamUnit],
    ) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.producer = producer
        self.tm = telemetry
        self.m = telemetry.metrics
        self.units = list(units)
        self.stores = {
            unit: CheckpointStore(checkpoint_dir(cfg, unit), keep=cfg.keep_checkpoints) for unit in self.units
        }
        self.stop_ = threading.Event()
        self.ready_reason_ = "starting"
        self._backlogs: dict[StreamUnit, collections.deque[Any]] = {
            unit: collections.deque() for unit in self.units
        }
        self._announced: dict[StreamUnit, int] = {}  # newest model version known to be on the topic
        self._work: Work | None = None
        self._job: tuple[StreamUnit, Future[TaskResult]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spacenet-train")
        self._checkpoint_due = False
        self._next_checkpoint_try = 0.0

    # ------------------------------------------------------------------ main loop
    def run(self, restored: bool = False) -> int:
        """Until ``stop_`` is set; returns the process exit code. ``restored``: the caller
        already called ``restore()`` (before subscribing, so that partition assignment can
        seek to the checkpoints' positions)."""
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
        """One turn: wait on training, or route messages, or checkpoint, or poll."""
        if self._job is not None:
            self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms)  # paused: keeps the membership
            unit, job = self._job
            if job.done():
                self._finish_training(unit, job.result())
            return
        if self._work is not None:
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
        if not any(self._backlogs.values()):
            polled = self.consumer.poll(
                timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records
            )
            for tp, messages in polled.items():
                self._backlogs[self.unit_for(tp.partition)].extend(messages)
            self.tm.lag(self.consumer, self.positions_)
            self.m.batch()
            if not any(self._backlogs.values()):
                self._tick(time.monotonic())
                return
        unit = next(u for u in self.units if self._backlogs[u])
        self._work = ((unit, closed) for closed in unit.handle(self._backlogs[unit]))

    def unit_for(self, partition: int) -> StreamUnit:
        for unit in self.units:
            if unit.covers(partition):
                return unit
        raise RuntimeError(f"no stream unit covers partition {partition} of {self.cfg.topic}")

    def _partitions(self, unit: StreamUnit) -> list[Any]:
        """The assigned partitions ``unit`` learns from."""
        return [tp for tp in self.consumer.assignment() if unit.covers(tp.partition)]

    def _tick(self, now: float) -> None:
        """The idle timeout of each unit whose partitions are owned, reachable and read to
        their end. Any other pause (starting, rebalancing, waiting for a dead member's session
        to expire, an unreachable broker, records still to fetch) restarts its clock instead."""
        ticks = []
        for unit in self.units:
            partitions = self._partitions(unit)
            if not partitions or (unit.timeout_due(now) and not self._caught_up(partitions)):
                unit.restart_clock(now)
            else:
                ticks.append((unit, unit.tick(now)))
        if ticks:
            self._work = ((unit, closed) for unit, closing in ticks for closed in closing)

    def _caught_up(self, partitions: list[Any]) -> bool:
        """Whether the broker answers and every partition is read to its end."""
        try:
            ends = self.consumer.end_offsets(partitions, timeout_ms=CAUGHT_UP_TIMEOUT_MS)
            return all(
                self.consumer.position(tp, timeout_ms=CAUGHT_UP_TIMEOUT_MS) >= ends[tp] for tp in partitions
            )
        except KafkaError as e:
            log.warning("the broker did not answer (%s): the open task stays open", e)
            return False

    def _advance(self) -> None:
        assert self._work is not None
        try:
            unit, closed = next(self._work)
        except StopIteration:
            self._work = None
            return
        self._start_training(unit, closed)

    # ---------------------------------------------------------------- training
    def _start_training(self, unit: StreamUnit, closed: Closed) -> None:
        self.consumer.pause(*self._partitions(unit))
        self.m.training_started()
        self._job = unit, self._executor.submit(unit.train, closed)

    def _finish_training(self, unit: StreamUnit, result: TaskResult) -> None:
        self._job = None
        unit.finish(result)
        if isinstance(result.error, TrainingAbandoned):
            log.warning("training of task %d abandoned for shutdown; it replays on restart", result.task)
            self.stop_.set()
            return
        self.consumer.resume(*self._partitions(unit))
        unit.restart_clock(time.monotonic())  # training time is not idle stream time
        self._checkpoint_due = True

    # --------------------------------------------------- checkpoint, commit, publish
    def _checkpoint_and_publish(self) -> None:
        self.producer.flush()  # dead letters are durable before their offsets are committed
        try:
            with self.m.checkpoint():
                for unit in self.units:
                    self.stores[unit].save(unit.model_version_, unit.state_dict())
        except CheckpointError as e:
            self.ready_reason_ = f"checkpoint failing: {e}"
            log.error("%s; offsets stay uncommitted, retrying in %.0f s", e, CHECKPOINT_RETRY_S)
            self._next_checkpoint_try = time.monotonic() + CHECKPOINT_RETRY_S
            return
        maybe_crash("after_checkpoint")
        for unit in self.units:
            unit.publish()
            # Announce before committing: a crash in between announces again on restart (see
            # ``restore``), while a commit first would lose the announcement for good.
            if unit.predictor_ is not None and self._announced.get(unit, 0) < unit.model_version_:
                self._announce(unit)
        try:
            self._commit()
        except KafkaError as e:  # broker away or a rebalance: the checkpoint stands, commit later
            self.ready_reason_ = f"offset commit failing: {e}"
            log.warning("committing offsets failed (%s); retrying in %.0f s", e, COMMIT_RETRY_S)
            self._next_checkpoint_try = time.monotonic() + COMMIT_RETRY_S
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

    def _announce(self, unit: StreamUnit) -> None:
        version = unit.model_version_
        event = unit.announcement()
        self.producer.send(self.cfg.models_topic, key=str(version).encode(), value=json.dumps(event).encode())
        self.producer.flush()  # on the topic before the offsets it covers are committed
        self._announced[unit] = version
        self.m.model_published(version)
        log.info("published model version %d", version)

    def restore(self) -> None:
        """Resume each unit from its newest complete checkpoint, if any."""
        for unit in self.units:
            store = self.stores[unit]
            found = store.latest()
            for torn in store.skipped_:
                log.warning("ignored incomplete checkpoint %s", torn)
            if found is None:
                log.info("no checkpoint in %s: starting fresh", store.directory)
                continue
            version, state = found
            unit.load_state_dict(state)
            log.info("resumed from checkpoint %d at positions %s", version, unit.positions_)
            if self._committed_behind(unit.positions_):
                # The last run died between writing this checkpoint and committing its offsets,
                # so maybe before announcing its model: announce it (again) and commit.
                log.info("offsets of checkpoint %d were not committed: announcing and committing", version)
                self._checkpoint_due = True
            else:
                self._announced[unit] = unit.model_version_

    def _committed_behind(self, positions: dict[int, int]) -> bool:
        """Whether the group's committed offsets are behind ``positions`` (unknown: True)."""
        from kafka.structs import TopicPartition

        try:
            for partition, position in positions.items():
                committed = self.consumer.committed(TopicPartition(self.cfg.topic, partition))
                if committed is None or committed < position:
                    return True
        except KafkaError as e:
            log.warning("could not read the committed offsets: %s", e)
            return True
        return False

    def on_assigned(self, assigned: list[Any]) -> None:
        """Rebalance hook: start each partition at its unit's checkpointed position."""
        for tp in assigned:
            self.m.partition_assigned(tp.topic, tp.partition)
            positions = self.unit_for(tp.partition).positions_
            if tp.partition in positions:
                self.consumer.seek(tp, positions[tp.partition])

    def stop(self) -> None:
        """Stop after the current step; a training in progress is abandoned (signal-safe)."""
        self.stop_.set()
        for unit in self.units:
            unit.stop()

    def _shutdown(self) -> None:
        for unit in self.units:
            unit.stop()
        if self._job is not None:
            self._job[1].result()  # training notices the stop flag at its next step
        self._executor.shutdown(wait=True)
        self.producer.flush()
        self.consumer.close(autocommit=False)
        for unit in self.units:
            unit.close()
            log.info("stopped; last checkpoint is model version %d", unit.model_version_)

    # ---------------------------------------------------------------- probes
    @property
    def positions_(self) -> dict[int, int]:
        """The offset after the last message handled, per partition, over every unit."""
        return {p: o for unit in self.units for p, o in unit.positions_.items()}

    @property
    def healthy(self) -> bool:
        """Alive: the loop runs (a failing checkpoint is not fatal: see ``ready``)."""
        return not self.stop_.is_set()

    @property
    def ready(self) -> tuple[bool, str]:
        return (not self.ready_reason_, self.ready_reason_ or "ok")
