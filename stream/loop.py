"""The poll loop of ``spacenet serve``: one consumer, one stream unit per assigned partition.

A stream is a partition of the training topic. One thread owns the training consumer and
runs ``step()`` until stopped. When the group assigns the process a partition, the loop
pauses it, restores its ``StreamUnit`` from the state store (the changelog topic,
``state_store.py``), seeks it to the unit's positions and resumes it: nothing of it is
consumed before its state is back. Polled messages go to the backlog of their partition's
unit, which routes them (``unit.handle``). When a unit closes a task, its partition is
paused and the task waits for the one training thread (``unit.train``); meanwhile this
thread keeps polling and handling the other streams, so neither the group membership nor
the other streams wait for a training. Then ``unit.finish`` takes the result in, the
partition resumes, and that stream is checkpointed, its new model published (served, and
announced on the models topic, flushed), then its offsets committed:

    checkpoint -> announce -> commit

so a crash anywhere replays records, never loses or re-learns them, and a process that
finds a checkpoint's offsets not committed announces its model again (announcements are
at least once, keyed by stream and carrying the version).

Hand-over. When the group moves a partition away (``on_revoked``, called by the consumer
inside ``poll``), the stream's current step is finished or abandoned: a training in
progress is stopped at its next step, a task waiting for training is dropped. A stream left
consistent (between messages) with records handled since its checkpoint is checkpointed
there and then, before the new owner can restore it; otherwise its last checkpoint stands
and the new owner replays from it. Either way the unit is dropped: nothing here uses it
again. A process that is stopping, or that lost its membership (``on_lost``), writes nothing.

The idle timeout closes a stream's open task only while the loop owns its partition, the
broker answers and the partition is read to its end: a restart, a rebalance or a broker
outage is not an idle stream.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka.errors import KafkaError

from spacenet.stream.checkpoint import CheckpointError
from spacenet.stream.config import ServiceConfig
from spacenet.stream.faults import maybe_crash
from spacenet.stream.ingest import Closed
from spacenet.stream.learner import Predictor, TrainingAbandoned
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.state_store import StateStore
from spacenet.stream.unit import StreamUnit, TaskResult

log = logging.getLogger(__name__)
CAUGHT_UP_TIMEOUT_MS = 5000  # how long an idle-timeout check waits for the broker
CHECKPOINT_RETRY_S, COMMIT_RETRY_S, RESTORE_RETRY_S = 10.0, 2.0, 5.0


class Serving(Protocol):
    """Where the loop says which model answers each stream's prediction requests."""

    def serve(self, stream: int, predictor: Predictor | None) -> None: ...
    def release(self, stream: int) -> None: ...


@dataclass(eq=False)
class Stream:
    """An assigned partition, its unit, and what the loop keeps for it."""

    unit: StreamUnit
    tp: Any  # its TopicPartition
    backlog: collections.deque[Any] = field(default_factory=collections.deque)
    work: Iterator[Closed] | None = None  # its ingest (or idle tick), suspended at a closed task
    closed: Closed | None = None  # the closed task, while it waits for or is in training
    due: bool = False  # a checkpoint -> announce -> commit is due
    stored: bool = True  # the store holds the unit as it is (nothing handled or trained since)
    checkpointed: dict[int, int] = field(default_factory=dict)  # positions of its newest checkpoint
    announced: int = 0  # the newest model version known to be on the models topic
    started: bool = False  # it has handled a message since it was taken on

    @property
    def partition(self) -> int:
        return int(self.tp.partition)

    @property
    def quiet(self) -> bool:
        """Between messages, no task closed: its unit is consistent and may be checkpointed."""
        return self.work is None and self.closed is None

    def uncheckpointed(self) -> int:
        """Messages handled since its newest checkpoint."""
        return sum(o - self.checkpointed.get(p, o) for p, o in self.unit.positions_.items())


class Loop:
    """Polls ``consumer``, takes streams on and hands them over, trains one task at a time,
    checkpoints through ``store``, publishes through ``producer`` and ``serving``, and commits.
    ``make_unit(partition)`` builds a fresh unit. The Kafka clients are kafka-python's."""

    def __init__(
        self,
        cfg: ServiceConfig,
        consumer: Any,
        producer: Any,
        telemetry: Telemetry,
        make_unit: Callable[[int], StreamUnit],
        store: StateStore,
        serving: Serving | None = None,
    ) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.producer = producer
        self.tm = telemetry
        self.m = telemetry.metrics
        self.make_unit = make_unit
        self.store = store
        self.serving = serving
        self.streams: dict[int, Stream] = {}
        self.stop_ = threading.Event()
        self.ready_reason_ = "starting"
        self._arrived: collections.deque[Any] = collections.deque()  # assigned, paused, to take on
        self._waiting: collections.deque[Stream] = collections.deque()  # closed tasks for the trainer
        self._job: tuple[Stream, Future[TaskResult]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spacenet-train")
        self._next_checkpoint_try = self._next_take_on = 0.0
        self._turn = 0  # round robin over the streams' backlogs
        self._closing = False

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Until ``stop_`` is set; returns the process exit code."""
        self.ready_reason_ = ""
        try:
            while not self.stop_.is_set():
                self.step()
        finally:
            self._shutdown()
        return 0

    def step(self) -> None:
        """One turn: poll, then one of: finish or start a training, take a stream on,
        checkpoint, advance one stream's ingest, or check the idle timeouts."""
        self._poll()
        if self._job is not None and self._job[1].done():
            self._finish_training()
        elif self._job is None and self._waiting:
            self._start_training(self._waiting.popleft())
        elif self._arrived and time.monotonic() >= self._next_take_on:
            self._take_on(self._arrived.popleft())
        elif not self._checkpoint_due() and not self._advance():
            self._tick(time.monotonic())

    def _poll(self) -> None:
        busy = (
            bool(self._arrived)
            or (self._job is None and bool(self._waiting))
            or any(s.closed is None and (s.work is not None or s.backlog) for s in self.streams.values())
        )
        polled = self.consumer.poll(
            timeout_ms=0 if busy else self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records
        )
        for tp, messages in polled.items():
            stream = self.streams.get(tp.partition)
            if stream is None:  # not taken on (yet): fetch these again once it is
                if tp in self.consumer.assignment():
                    self.consumer.seek(tp, messages[0].offset)
                continue
            stream.backlog.extend(messages)
        self.tm.lag(self.consumer, self.positions_)
        self.m.batch()

    def _advance(self) -> bool:
        """Run one stream's ingest until its backlog is empty or a task closes; False when
        no stream can go on."""
        ready = [s for s in self.streams.values() if s.closed is None and (s.work is not None or s.backlog)]
        if not ready:
            return False
        resumed = [s for s in ready if s.work is not None]  # a finished training's message first
        self._turn += 1
        stream = resumed[0] if resumed else ready[self._turn % len(ready)]
        if stream.work is None:
            first = stream.backlog[0].offset
            stream.checkpointed.setdefault(stream.partition, first)
            stream.work = stream.unit.handle(stream.backlog)
            if not stream.started:  # the end of a hand-over, for whoever measures one
                log.info("stream %d: first message since take-on, offset %d", stream.partition, first)
                stream.started = True
        stream.stored = False
        self._next_of(stream)
        self.m.uncheckpointed_messages(stream.unit.stream, stream.uncheckpointed())
        return True

    def _next_of(self, stream: Stream) -> None:
        """Resume ``stream``'s work: a closed task pauses its partition and waits for the trainer."""
        assert stream.work is not None
        try:
            stream.closed = next(stream.work)
        except StopIteration:
            stream.work = None
            return
        self.consumer.pause(stream.tp)
        self._waiting.append(stream)

    def _tick(self, now: float) -> None:
        """The idle timeout of each quiet stream that is read to its end and whose broker
        answers; any other pause (an unreachable broker, records still to fetch) restarts
        its clock instead."""
        for stream in self.streams.values():
            if not (stream.quiet and not stream.backlog and stream.unit.timeout_due(now)):
                continue
            if self._caught_up(stream.tp):
                stream.work = stream.unit.tick(now)
            else:
                stream.unit.restart_clock(now)

    def _caught_up(self, tp: Any) -> bool:
        """Whether the broker answers and ``tp`` is read to its end."""
        try:
            end = self.consumer.end_offsets([tp], timeout_ms=CAUGHT_UP_TIMEOUT_MS)[tp]
            return bool(self.consumer.position(tp, timeout_ms=CAUGHT_UP_TIMEOUT_MS) >= end)
        except KafkaError as e:
            log.warning("the broker did not answer (%s): the open task stays open", e)
            return False

    # ---------------------------------------------------------------- training
    def _start_training(self, stream: Stream) -> None:
        assert stream.closed is not None
        self.m.training_started()
        self._job = stream, self._executor.submit(stream.unit.train, stream.closed)

    def _finish_training(self) -> None:
        assert self._job is not None
        (stream, job), self._job = self._job, None
        result = job.result()
        stream.closed = None
        stream.unit.finish(result)
        if isinstance(result.error, TrainingAbandoned):
            log.warning("training of task %d abandoned for shutdown; it replays on restart", result.task)
            self.stop_.set()
            return
        self.consumer.resume(stream.tp)
        stream.unit.restart_clock(time.monotonic())  # training time is not idle stream time
        stream.due, stream.stored = True, False

    # --------------------------------------------------- checkpoint, commit, publish
    def _checkpoint_due(self) -> bool:
        """Checkpoint -> announce -> commit the quiet streams that are due; False when none
        is or its retry time has not come (a commit needs the group: not before an assignment)."""
        due = [s for s in self.streams.values() if s.due and s.quiet]
        if not due or not self.consumer.assignment() or time.monotonic() < self._next_checkpoint_try:
            return False
        self.producer.flush()  # dead letters are durable before their offsets are committed
        for stream in due:
            if not stream.stored and not self._save(stream):
                self._next_checkpoint_try = time.monotonic() + CHECKPOINT_RETRY_S
                return True
        maybe_crash("after_checkpoint")
        for stream in due:
            self._publish(stream)
        try:
            self._commit(due)
        except KafkaError as e:  # broker away or a rebalance: the checkpoint stands, commit later
            self.ready_reason_ = f"offset commit failing: {e}"
            log.warning("committing offsets failed (%s); retrying in %.0f s", e, COMMIT_RETRY_S)
            self._next_checkpoint_try = time.monotonic() + COMMIT_RETRY_S
            return True
        for stream in due:
            stream.due = False
        self.ready_reason_ = ""
        return True

    def _save(self, stream: Stream) -> bool:
        unit = stream.unit
        try:
            with self.m.checkpoint(unit.stream):
                self.store.save(stream.partition, unit.model_version_, unit.state_dict())
        except CheckpointError as e:
            self.ready_reason_ = f"checkpoint failing: {e}"
            log.error("%s; offsets stay uncommitted, retrying in %.0f s", e, CHECKPOINT_RETRY_S)
            return False
        stream.checkpointed, stream.stored = dict(unit.positions_), True
        self._report_sizes(unit, stream.partition)
        return True

    def _report_sizes(self, unit: StreamUnit, partition: int) -> None:
        """The stream's newest checkpoint's bytes and its held-out store's, to the metrics."""
        self.m.checkpoint_size(unit.stream, self.store.size(partition))
        self.m.holdout_size(unit.stream, unit.buffer.holdout_records, unit.buffer.holdout_bytes)

    def _publish(self, stream: Stream) -> None:
        """Serve the stream's newest model and announce it if the topic lacks it."""
        unit = stream.unit
        unit.publish()
        if self.serving is not None:
            self.serving.serve(stream.partition, unit.predictor_)
        # Announce before committing: a crash in between announces again (see ``_take_on``),
        # while a commit first would lose the announcement for good.
        if unit.predictor_ is not None and stream.announced < unit.model_version_:
            self._announce(stream)

    def _commit(self, streams: list[Stream]) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        offsets = {
            TopicPartition(self.cfg.topic, p): OffsetAndMetadata(o, "", -1)
            for stream in streams
            for p, o in stream.unit.positions_.items()
        }
        if offsets:
            self.consumer.commit(offsets)

    def _announce(self, stream: Stream) -> None:
        unit = stream.unit
        version = unit.model_version_
        event = json.dumps(unit.announcement()).encode()
        # Serving already: the gauge says so before anyone can read the announcement.
        self.m.model_published(unit.stream, version)
        self.producer.send(self.cfg.models_topic, key=unit.stream.encode(), value=event)
        self.producer.flush()  # on the topic before the offsets it covers are committed
        stream.announced = version
        log.info("stream %d: published model version %d", stream.partition, version)

    # ------------------------------------------------------- taking on, handing over
    def on_assigned(self, assigned: list[Any]) -> None:
        """Rebalance hook: pause each new partition until its stream is restored (``step``)."""
        for tp in assigned:
            self.consumer.pause(tp)
            self._arrived.append(tp)
            self.m.partition_assigned(tp.topic, tp.partition)

    def on_revoked(self, revoked: list[Any]) -> None:
        """Rebalance hook: hand each stream over (a consistent checkpoint first, unless stopping)."""
        self._drop(revoked, write=not self._closing)

    def on_lost(self, lost: list[Any]) -> None:
        """Rebalance hook: the group evicted this process; another may own these streams by
        now, so nothing is written for them."""
        self._drop(lost, write=False)

    def _take_on(self, tp: Any) -> None:
        """Restore ``tp``'s stream from the store, seek to its positions and resume it."""
        if tp not in self.consumer.assignment():
            return  # revoked before its turn
        started = time.perf_counter()
        unit = self.make_unit(tp.partition)
        self.m.stream_added(unit.stream)
        try:
            state = self.store.load(tp.partition)
        except (KafkaError, OSError, ValueError, TimeoutError) as e:
            self.tm.drop(unit.stream)
            self.ready_reason_ = f"restoring stream {tp.partition} failing: {e}"
            log.error("restoring stream %d failed (%s); retrying in %.0f s", tp.partition, e, RESTORE_RETRY_S)
            self._arrived.append(tp)
            self._next_take_on = time.monotonic() + RESTORE_RETRY_S
            return
        stream = Stream(unit, tp)
        if state is None:
            self.tm.snapshot(unit.stream, unit.learner.spacenet, None, 0)
        else:
            unit.load_state_dict(state)
            stream.checkpointed = dict(unit.positions_)
            if self._committed_behind(unit.positions_):
                # Its last owner died (or handed it over) after writing this checkpoint and before
                # committing its offsets, so maybe before announcing its model: announce and commit.
                stream.due = True
            else:
                stream.announced = unit.model_version_
            self._report_sizes(unit, tp.partition)
        self.streams[tp.partition] = stream
        if tp.partition in unit.positions_:
            self.consumer.seek(tp, unit.positions_[tp.partition])
        self.consumer.resume(tp)
        if self.serving is not None:
            self.serving.serve(tp.partition, unit.predictor_)
        seconds = time.perf_counter() - started
        self.m.stream_restored(seconds)
        self.ready_reason_ = ""
        log.info(
            "stream %d taken on at offset %s (model version %d, restored in %.2f s)",
            tp.partition,
            unit.positions_.get(tp.partition, "committed"),
            unit.model_version_,
            seconds,
        )

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

    def _drop(self, partitions: list[Any], write: bool) -> None:
        for tp in partitions:
            if tp in self._arrived:
                self._arrived.remove(tp)
            stream = self.streams.pop(tp.partition, None)
            if stream is not None:
                self._hand_over(stream, write)

    def _hand_over(self, stream: Stream, write: bool) -> None:
        """Finish or abandon the stream's step, checkpoint it when that leaves it consistent
        with records handled since its checkpoint, and stop using it. Runs inside the
        consumer's rebalance (its IO thread), so it uses the producer, never the consumer:
        the new owner commits the offsets of this checkpoint (it finds them behind)."""
        started = time.perf_counter()
        unit = stream.unit
        consistent = self._settle(stream)
        wrote = False
        if write and consistent and not stream.stored:
            wrote = self._save(stream)
            if wrote:
                self._publish(stream)
        if self.serving is not None:
            self.serving.release(stream.partition)
        unit.close()
        self.tm.drop(unit.stream)
        self.m.partition_revoked(stream.tp.topic, stream.partition)
        log.info(
            "stream %d handed over at offset %s (%s) in %.2f s",
            stream.partition,
            unit.positions_.get(stream.partition, "committed"),
            "checkpointed" if wrote else "from its last checkpoint",
            time.perf_counter() - started,
        )

    def _settle(self, stream: Stream) -> bool:
        """Finish or abandon ``stream``'s current step; True when its unit is left consistent."""
        if self._job is not None and self._job[0] is stream:
            stream.unit.stop()
            result = self._job[1].result()  # training notices the stop at its next step
            self._job = None
            stream.closed = None
            if isinstance(result.error, TrainingAbandoned):
                return False
            stream.unit.finish(result)  # it ended before it noticed: keep it
            stream.due, stream.stored = True, False
        elif stream in self._waiting:
            self._waiting.remove(stream)
            return False
        if stream.work is not None:  # the rest of the message that closed the task
            try:
                next(stream.work)
            except StopIteration:
                stream.work = None
            else:  # it closed another task: that is the next owner's to train
                return False
        return True

    # ---------------------------------------------------------------- stopping
    def stop(self) -> None:
        """Stop after the current step; a training in progress is abandoned (signal-safe)."""
        self.stop_.set()
        for stream in list(self.streams.values()):
            stream.unit.stop()

    def _shutdown(self) -> None:
        self._closing = True
        for stream in self.streams.values():
            stream.unit.stop()
        if self._job is not None:
            self._job[1].result()  # training notices the stop flag at its next step
        self._executor.shutdown(wait=True)
        self.producer.flush()
        self.consumer.close(autocommit=False)  # hands every stream over (``on_revoked``), writing nothing
        self._drop([stream.tp for stream in self.streams.values()], write=False)  # any it did not

    # ---------------------------------------------------------------- probes
    @property
    def positions_(self) -> dict[int, int]:
        """The offset after the last message handled, per partition, over every stream."""
        return {p: o for stream in self.streams.values() for p, o in stream.unit.positions_.items()}

    @property
    def healthy(self) -> bool:
        """Alive: the loop runs (a failing checkpoint is not fatal: see ``ready``)."""
        return not self.stop_.is_set()

    @property
    def ready(self) -> tuple[bool, str]:
        return (not self.ready_reason_, self.ready_reason_ or "ok")
