"""The service's ingest path: decode, validate, detect task boundaries, route into the buffer.

``Ingest.handle`` takes Kafka messages from the front of a backlog. A message that does
not decode or validate goes to the dead-letter callback with its reason. The records of
one that does are fed to the boundary detector and routed: training records into the
``TaskBuffer``, pending ones to the ``PendingStore``, late ones into their task's
held-out sample. When a task closes, ``handle`` yields ``(task, classes)`` so that the
caller can train on the buffer; when resumed it clears the buffer and stops after that
message, so that the caller may checkpoint between messages.

Most messages take a fast path. Messages are decoded in chunks of ``CHUNK_MESSAGES``; when
all of a chunk's records train the open task (``BoundaryDetector.trains_all``), the
detector observes them in one call. Records that train the open task are gathered and
added to the buffer together, before anything else touches the buffer (a message with an
event, a yield, a size bound, the end of ``handle``). ``spacenet ingest-bench`` measures
this path against a plain kafka-python consumer.

    >>> from collections import deque
    >>> from prometheus_client import CollectorRegistry
    >>> from spacenet.stream.observability.metrics import ServiceMetrics
    >>> metrics = ServiceMetrics(CollectorRegistry())
    >>> ingest = Ingest(
    ...     "records", wire.WireLimits(expected_shape=(1, 2, 2)), BoundaryDetector(min_count=2),
    ...     TaskBuffer((1, 2, 2), "uint8", holdout_fraction=0.0), PendingStore(),
    ...     metrics, DeadLetters(print, "records.dlq", metrics))
    >>> Message = collections.namedtuple("Message", "topic partition offset key value headers")
    >>> value = wire.encode(np.zeros((4, 1, 2, 2), np.uint8), [3, 3, 3, 3])
    >>> backlog = deque([Message("records", 0, 7, None, value, wire.make_headers())])
    >>> list(ingest.handle(backlog)), len(ingest.buffer), ingest.positions_
    ([], 4, {0: 8})
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from spacenet.stream import wire
from spacenet.stream.boundary import Assignments, BoundaryDetector, Event, EventKind, Outcome
from spacenet.stream.buffer import TaskBuffer
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.faults import maybe_crash
from spacenet.stream.observability.metrics import ServiceMetrics
from spacenet.stream.records import ROW_BITS, PendingStore, Records, record_ids

log = logging.getLogger(__name__)
STASH_BYTES = 16 << 20  # fast-path records gathered before they go into the buffer
CHUNK_MESSAGES = 32  # messages decoded, then checked by the detector together
Closed = tuple[int, tuple[int, ...]]  # a task that closed with training records, and its classes
Decoding = tuple[wire.Decoded | wire.WireError, float]  # a message or why not, and the seconds taken


class Ingest:
    """Routes one stream's messages; ``positions_`` is the offset after the last message
    handled, per partition (what a checkpoint may commit). ``stream`` labels its per-stream
    series (``spacenet_current_task``)."""

    positions_: dict[int, int]

    def __init__(
        self,
        topic: str,
        limits: wire.WireLimits,
        detector: BoundaryDetector,
        buffer: TaskBuffer,
        pending: PendingStore,
        metrics: ServiceMetrics,
        dead_letters: DeadLetters,
        dtype: str = "uint8",
        stream: str = "0",
    ) -> None:
        self.topic = topic
        self.stream = stream
        self.decoder = wire.Decoder(limits)  # its ``limits`` are the ingest's
        self.detector = detector
        self.buffer = buffer
        self.pending = pending
        self.m = metrics
        self.dead_letters = dead_letters
        self.dtype = np.dtype(dtype)
        self.positions_ = {}
        # Called with (offset, features, labels) of each labelled data message as it is
        # decoded, before its records are routed (the prequential score: StreamUnit).
        self.on_labeled: Callable[[int, npt.NDArray[Any], npt.NDArray[np.int64]], None] | None = None
        self._stash: list[tuple[npt.NDArray[Any], npt.NDArray[np.int64], int, int]] = []
        self._stash_bytes = 0

    @classmethod
    def from_config(
        cls,
        cfg: ServiceConfig,
        metrics: ServiceMetrics,
        dead_letters: DeadLetters,
        spill_dir: Path,
        stream: str,
    ) -> Ingest:
        """The ingest of ``stream`` in ``spacenet serve`` with these settings, spilling into ``spill_dir``."""
        limits = wire.WireLimits(
            max_message_bytes=cfg.max_message_bytes,
            max_records=min(cfg.max_records_per_message, 1 << ROW_BITS),
            expected_shape=tuple(cfg.input_shape),
            num_classes_max=None,
        )
        detector = BoundaryDetector(
            cfg.min_count,
            cfg.window,
            cfg.group_window,
            cfg.idle_timeout_s or None,
            cfg.max_task_records or None,
        )
        buffer = TaskBuffer(
            cfg.input_shape,
            dtype="uint8",
            max_memory_bytes=cfg.max_buffer_bytes,
            spill_dir=spill_dir,
            holdout_fraction=cfg.holdout_fraction,
            holdout_max_per_task=cfg.holdout_max_per_task,
            holdout_max_records=cfg.holdout_max_records,
            seed=cfg.seed,
        )
        return cls(cfg.topic, limits, detector, buffer, PendingStore(), metrics, dead_letters, stream=stream)

    def handle(self, backlog: collections.deque[Any]) -> Iterator[Closed]:
        """Handle messages from the front of ``backlog`` until it is empty or a message
        closed a task (after which the caller may checkpoint); yields each closed task."""
        while backlog:
            chunk = [backlog.popleft() for _ in range(min(CHUNK_MESSAGES, len(backlog)))]
            decoded = [self._decode(msg) for msg in chunk]
            # Runs of the chunk to try the fast path on; a run that fails is halved, down to
            # single messages, so one message with an event costs a few tries, not a slow chunk.
            runs = [(0, len(chunk))]
            while runs:
                lo, hi = runs.pop()
                if self._all_train(chunk[lo:hi], decoded[lo:hi]):
                    continue
                if hi - lo > 1:
                    mid = (lo + hi) // 2
                    runs += [(mid, hi), (lo, mid)]  # the first half first
                    continue
                msg = chunk[lo]
                closed = False
                for task in self._message(msg, *decoded[lo]):
                    closed = True
                    yield task
                self.positions_[msg.partition] = msg.offset + 1
                maybe_crash("buffering")
                if closed:  # the caller checkpoints after this message: the rest waits
                    backlog.extendleft(reversed(chunk[lo + 1 :]))
                    self._flush()
                    return
        self._flush()

    def events(self, events: list[Event]) -> Iterator[Closed]:
        """Act on detector events in order (``tick``'s, or those of a message's records)."""
        for event in events:
            kind = event.kind
            if kind == EventKind.OPENED:
                self._ensure_open(int(event.task))  # type: ignore[arg-type]
                reason = event.reason.value if event.reason else "new_class"
                self.m.task_opened(self.stream, int(event.task), reason)  # type: ignore[arg-type]
                log.info("stream %s: task %s opened (%s)", self.stream, event.task, event.reason)
            elif kind == EventKind.RELEASED:
                recs = self.pending.take(event.seqs)
                self._ensure_open(int(event.task))  # type: ignore[arg-type]
                self.buffer.add(recs)
            elif kind == EventKind.EXPIRED:
                recs = self.pending.take(event.seqs)
                self.dead_letters.records(recs, "unconfirmed_class", self.topic)
                self.m.routed("noise", len(recs))
            elif kind == EventKind.DISAGREEMENT:
                log.warning("markers and detector disagree: %s (task %s)", event.reason, event.task)
                self.m.disagreement()
            elif kind == EventKind.CLOSED:
                log.info(
                    "stream %s: task %s closed (%s), classes %s, %d records",
                    self.stream,
                    event.task,
                    event.reason,
                    list(event.classes),
                    len(self.buffer),
                )
                if event.reason is not None and event.reason.value in ("timeout", "record_limit"):
                    self.m.boundary(event.reason.value)
                if len(self.buffer):
                    yield int(event.task), tuple(int(c) for c in event.classes)  # type: ignore[arg-type]
                self.buffer.clear()

    # ------------------------------------------------------------------ messages
    def _decode(self, msg: Any) -> Decoding:
        """The decoded message or why it was rejected, and the seconds that took."""
        t0 = time.perf_counter()
        try:
            decoded = self.decoder(msg.value, msg.headers)
            if not decoded.is_control and decoded.values.dtype != self.dtype:
                raise wire.WireError(wire.RejectReason.DTYPE, f"this service is configured for {self.dtype}")
        except wire.WireError as e:
            return e, time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        if self.on_labeled is not None and decoded.labels is not None and decoded.num_records:
            self.on_labeled(msg.offset, decoded.values, decoded.labels)
        return decoded, seconds

    def _all_train(
        self, chunk: list[Any], decoded: list[tuple[wire.Decoded | wire.WireError, float]]
    ) -> bool:
        """The fast path for a chunk of messages: when every one decoded, carries no marker
        and the detector says all their records train the open task, observe them in one
        call and stash their records. False (nothing done) otherwise."""
        good = [
            (d.values, d.labels, seconds)
            for d, seconds in decoded
            if isinstance(d, wire.Decoded) and d.marker is None and d.num_records and d.labels is not None
        ]
        if len(good) < len(chunk) or self.buffer.task_ != self.detector.current_task_:
            return False
        labels = np.concatenate([y for _, y, _ in good])
        now = time.monotonic()
        if not self.detector.trains_all(labels, now):
            return False
        self.detector.observe(labels, now=now)
        counts: dict[tuple[str, int], list[int]] = {}  # (topic, partition) -> [messages, records]
        for msg, (x, y, seconds) in zip(chunk, good, strict=True):
            count = counts.get((msg.topic, msg.partition))
            if count is None:
                count = counts[msg.topic, msg.partition] = [0, 0]
            count[0] += 1
            count[1] += len(y)
            self.m.decoded(seconds)
            self._stash_records(x, y, msg.offset, msg.partition)
            self.positions_[msg.partition] = msg.offset + 1
            maybe_crash("buffering")
        for (topic, partition), (messages, records) in counts.items():
            self.m.consumed(topic, partition, records, messages=messages)
        return True

    def _message(self, msg: Any, decoded: wire.Decoded | wire.WireError, seconds: float) -> Iterator[Closed]:
        if isinstance(decoded, wire.WireError):
            self.dead_letters.message(msg, decoded.reason.value, decoded.detail)
            self.m.rejected(decoded.reason.value, seconds)
            return
        self.m.consumed(msg.topic, msg.partition, decoded.num_records, seconds)
        labels = decoded.labels if decoded.labels is not None else np.zeros(0, np.int64)
        res = self.detector.observe(
            labels, marker=decoded.marker, marker_task=decoded.marker_task, now=time.monotonic()
        )
        n = len(labels)
        if n and not res.events and self.buffer.task_ == res.task[0] and not res.outcome.any():
            self._stash_records(decoded.values, labels, msg.offset, msg.partition)  # all TRAIN
            return
        self._flush()  # the buffer in stream order before anything else touches it
        features = decoded.values if n else np.zeros((0, *self.buffer.feature_shape), self.dtype)
        partitions = np.full(n, msg.partition, np.int32)
        recs = Records(features, labels, partitions, record_ids([msg.offset], [n]))
        cursor = 0
        for event in res.events:
            self._route(res, recs, cursor, event.index)
            cursor = event.index
            yield from self.events([event])
        self._route(res, recs, cursor, n)

    def _stash_records(
        self, values: npt.NDArray[Any], labels: npt.NDArray[np.int64], offset: int, partition: int
    ) -> None:
        """Keep training records of the open task for the next ``_flush``."""
        self._stash.append((values, labels, offset, partition))
        self._stash_bytes += values.nbytes
        if self._stash_bytes >= STASH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Add the stashed fast-path records to the buffer, in one call."""
        if not self._stash:
            return
        stash, self._stash, self._stash_bytes = self._stash, [], 0
        counts = [len(labels) for _, labels, _, _ in stash]
        self.buffer.add_blocks(
            [values for values, *_ in stash],
            np.concatenate([labels for _, labels, _, _ in stash]),
            np.repeat(np.array([partition for *_, partition in stash], np.int32), counts),
            record_ids([offset for *_, offset, _ in stash], counts),
        )
        self.m.routed("train", sum(counts))

    def _route(self, res: Assignments, recs: Records, lo: int, hi: int) -> None:
        """Route records ``lo:hi`` of a message by their outcomes in ``res``."""
        if hi <= lo:
            return
        outcome, tasks = res.outcome[lo:hi], res.task[lo:hi]
        sl = np.arange(lo, hi)
        train = sl[outcome == Outcome.TRAIN]
        if train.size:
            self._ensure_open(int(tasks[train[0] - lo]))
            self.buffer.add(recs.take(train))
            self.m.routed("train", int(train.size))
        pend = sl[outcome == Outcome.PENDING]
        if pend.size:
            self.pending.put(res.first_seq + pend, recs.take(pend))
            self.m.routed("pending", int(pend.size))
        late = sl[outcome == Outcome.LATE]
        for task in np.unique(tasks[late - lo]).tolist() if late.size else []:
            rows = late[tasks[late - lo] == task]
            self.buffer.add_late(int(task), recs.take(rows))
            self.m.routed("late", int(rows.size))

    def _ensure_open(self, task: int) -> None:
        if self.buffer.task_ != task:
            self.buffer.start_task(task)
