"""Layered task-boundary detection for a labeled class-incremental stream.

Records are fed in stream order, in batches. The detector numbers them itself: record
``seq`` is its position in the stream (0, 1, 2, ...; ``Assignments.first_seq`` gives the
first of a batch), which the caller maps to its own ids, e.g. Kafka (partition, offset).
Each record gets an immediate outcome: ``TRAIN`` in a task, ``LATE`` (its class belongs
to a task that is not open: evaluation only) or ``PENDING`` (its label is a candidate new
class). The caller keeps pending records by ``seq``; each is later resolved by exactly
one event: ``RELEASED`` (class confirmed: train it in ``event.task``, never in an older
task) or ``EXPIRED`` (the label did not reach ``min_count`` within ``window`` records:
noise). Events are ordered and carry ``index``: they happen after ``records[:index]`` of
the batch and before ``records[index:]``, so a task's ``CLOSED`` event comes after its
last training record and before the next task's first. At most ``window`` records are
pending at any time. ``state_dict()`` lists the pending ``seq`` numbers but not the
records: a checkpoint must keep those records too, or not commit their offsets.

Layers: (1) a task-start / task-end marker is authoritative. Once any marker has been
seen the detector opens no task itself: a confirmed new class joins the open marker
task, or waits (pending) for the next start marker. A ``DISAGREEMENT`` event, counted
in ``disagreements_``, reports a class starting ``group_window`` or more records away
from its marker (the detector would have opened a task there; once per missed
boundary), a marker task where no class starts near the marker (reported when it
closes or ``window`` records after the marker), and an end marker naming a task that
is not open. A repeated start for the open task changes nothing. (2) Otherwise a label
never seen before opens a task once it has ``min_count`` records within the last
``window`` records; a class starts at the median of its first ``min_count`` records,
and classes starting within ``group_window`` records of the opening class join its
task. (3) A task closes when the next opens, on an end marker, after
``idle_timeout_s`` without records, or once it has ``max_task_records`` training
records (records released together may take it past the limit). (4) A known class
never opens a task: while its task is closed, its records are ``LATE``.

    >>> det = BoundaryDetector(min_count=2, window=10, group_window=3)
    >>> a = det.observe(np.array([7, 7, 8, 8, 7]))
    >>> [Outcome(o).name for o in a.outcome]
    ['PENDING', 'PENDING', 'PENDING', 'PENDING', 'TRAIN']
    >>> [(e.kind.value, e.index, e.task, e.classes, e.seqs) for e in a.events]
    [('opened', 2, 0, (), ()), ('released', 2, 0, (7,), (0, 1)), ('released', 4, 0, (8,), (2, 3))]
    >>> det.task_classes_
    {0: [7, 8]}
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class Marker(enum.StrEnum):
    """An explicit task boundary, as the ``spacenet-marker`` header carries it (``wire.Marker``
    is this enum): TASK_START applies before a batch's records, TASK_END after them."""

    TASK_START = "task-start"
    TASK_END = "task-end"


class Outcome(enum.IntEnum):
    """What to do with one record. NOISE is only ever reached through an EXPIRED event."""

    TRAIN = 0
    PENDING = 1
    LATE = 2
    NOISE = 3


class EventKind(enum.StrEnum):
    OPENED = "opened"
    CLOSED = "closed"
    RELEASED = "released"
    EXPIRED = "expired"
    DISAGREEMENT = "disagreement"


class Reason(enum.StrEnum):
    """Why an event happened: a bounded set, usable as a metrics label."""

    MARKER = "marker"  # opened / closed by a marker
    NEW_CLASS = "new_class"  # opened by, or released because of, a confirmed class
    NEXT_TASK = "next_task"  # closed because the detector opened the next task
    TIMEOUT = "timeout"
    RECORD_LIMIT = "record_limit"
    NOISE = "noise"  # expired pending records
    UNANNOUNCED_CLASS = "unannounced_class"  # detector would open a task; markers did not
    MARKER_WITHOUT_NEW_CLASS = "marker_without_new_class"  # marker task with no new class
    MARKER_TASK_MISMATCH = "marker_task_mismatch"  # end marker for a task that is not open


@dataclass(frozen=True)
class Event:
    """A boundary event; ``seqs`` lists the records a RELEASED / EXPIRED event resolves,
    ``classes`` the class a RELEASED event confirms or all classes of a CLOSED task."""

    kind: EventKind
    index: int
    task: int | None = None
    reason: Reason | None = None
    classes: tuple[int, ...] = ()
    seqs: tuple[int, ...] = ()


@dataclass
class Assignments:
    """One batch's immediate outcomes (``Outcome`` codes) and tasks (-1 when pending)."""

    first_seq: int
    outcome: npt.NDArray[np.int8]
    task: npt.NDArray[np.int64]
    events: list[Event] = field(default_factory=list)

    @property
    def seqs(self) -> npt.NDArray[np.int64]:
        return np.arange(self.first_seq, self.first_seq + len(self.outcome), dtype=np.int64)


class BoundaryDetector:
    """Decides, record by record, which task a labeled record trains (see module doc).

    Defaults, checked on simulated streams: a label needs 20 records in the last 1000
    (a 2 % share) to become a class, which a 5 % uniform label noise over 10 classes
    does not reach, while tasks of up to 20 equally frequent classes (5 % each) do. A
    class starts where the median of its first ``min_count`` records lies; classes
    starting within 500 records of each other form one task, wide enough for 20 classes
    a task, so tasks must begin at least 500 records apart. Tasks of more or rarer
    classes need a larger ``window`` and ``group_window``.
    """

    n_seen_: int  # records observed; the next record's seq
    task_classes_: dict[int, list[int]]  # task id -> its classes, in confirmation order
    class_task_: dict[int, int]  # class -> the task it belongs to
    current_task_: int | None  # the open task, None between tasks
    anchor_: int  # where the open task's records began: its group window is measured from here
    task_records_: int  # training records of the open task (released ones included)
    markers_in_use_: bool
    last_time_: float | None  # `now` of the last batch with records or a marker
    disagreements_: dict[str, int]  # Reason value -> count

    def __init__(
        self,
        min_count: int = 20,
        window: int = 1000,
        group_window: int = 500,
        idle_timeout_s: float | None = None,
        max_task_records: int | None = None,
    ) -> None:
        if not 1 <= min_count <= window:
            raise ValueError(f"need 1 <= min_count <= window, got {min_count}, {window}")
        if group_window < 0 or (max_task_records is not None and max_task_records < 1):
            raise ValueError("group_window must be >= 0 and max_task_records >= 1")
        self.min_count = min_count
        self.window = window
        self.group_window = group_window
        self.idle_timeout_s = idle_timeout_s
        self.max_task_records = max_task_records
        self.load_state_dict({})

    # ---- public API -------------------------------------------------------------------
    def observe(
        self,
        labels: npt.ArrayLike,
        marker: Marker | str | None = None,
        marker_task: int | None = None,
        now: float | None = None,
    ) -> Assignments:
        """Assign the next records; ``marker`` (with optional task id) applies to this
        batch, which may be empty for a bare control event; ``now`` feeds the timeout."""
        array = np.asarray(labels, dtype=np.int64).reshape(-1)
        values = array.tolist()
        marker = None if marker is None else Marker(marker)
        n = len(values)
        out = Assignments(self.n_seen_, np.empty(n, np.int8), np.full(n, -1, np.int64))
        if now is not None:
            self._check_timeout(now, out)
            if n or marker is not None:
                self.last_time_ = now
        if marker is Marker.TASK_START:
            self._start_marker(marker_task, out)
        other: npt.NDArray[np.bool_] | None = None  # per record: not of the open task's classes
        other_of: tuple[int, int] | None = None  # the (task, number of classes) of ``other``
        i = 0
        while i < n:
            task = self.current_task_
            if self._bulk and task is not None and self.class_task_.get(values[i]) == task:
                classes = self.task_classes_[task]
                if other_of != (task, len(classes)):  # classes only ever join a task
                    other = _not_in(array, classes)
                    other_of = (task, len(classes))
                assert other is not None
                k = self._train_run(i, other, out)
                if k:
                    i += k
                    continue
            self._one(i, values[i], out)
            i += 1
        if marker is Marker.TASK_END:
            self._end_marker(marker_task, n, out)
        self._flush_expired(n, out)
        return out

    def trains_all(self, labels: npt.NDArray[np.int64], now: float | None = None) -> bool:
        """Whether ``observe(labels, now=now)`` (no marker) would make every record a TRAIN
        record of the open task and emit no event; False when unsure. Changes nothing.

        >>> det = BoundaryDetector(min_count=1, window=10, group_window=3)
        >>> _ = det.observe(np.array([4]))
        >>> det.trains_all(np.array([4, 4])), det.trains_all(np.array([4, 5]))
        (True, False)
        """
        task, n = self.current_task_, len(labels)
        if task is None or not n or self._expired or (now is not None and self.timeout_due(now)):
            return False
        last = self.n_seen_ + n - 1
        if self._await_class_until is not None and last >= self._await_class_until:
            return False
        if self.max_task_records is not None and self.task_records_ + n >= self.max_task_records:
            return False
        for seq, label in self._order:  # released labels stay listed until their records age out
            if seq > last - self.window:
                break
            if label in self._pending:
                return False  # a pending record would expire
        return not _not_in(labels, self.task_classes_[task]).any()

    def tick(self, now: float) -> list[Event]:
        """Close the open task if no record arrived for ``idle_timeout_s`` seconds."""
        out = Assignments(self.n_seen_, np.empty(0, np.int8), np.empty(0, np.int64))
        self._check_timeout(now, out)
        return out.events

    def timeout_due(self, now: float) -> bool:
        """Whether ``tick(now)`` would close the open task for idleness."""
        timeout, last = self.idle_timeout_s, self.last_time_
        return not (timeout is None or last is None or self.current_task_ is None) and now - last >= timeout

    def restart_clock(self, now: float) -> None:
        """Count idle time from ``now``: after a pause the stream did not cause (the
        caller stopped consuming to train a task, or the process restarted), so that
        the pause itself never closes a task by timeout."""
        if self.last_time_ is not None:
            self.last_time_ = now

    def pending_seqs(self) -> list[int]:
        """Records still pending, in stream order."""
        return sorted(s for seqs in self._pending.values() for s in seqs)

    def state_dict(self) -> dict[str, Any]:
        """Learned state as JSON-able plain types (parameters are not included)."""
        pending = sorted((s, label) for label, seqs in self._pending.items() for s in seqs)
        return {
            "version": 1,
            "n_seen": self.n_seen_,
            "tasks": [[t, list(c)] for t, c in self.task_classes_.items()],
            "current_task": self.current_task_,
            "anchor": self.anchor_,
            "task_records": self.task_records_,
            "markers_in_use": self.markers_in_use_,
            "last_time": self.last_time_,
            "disagreements": dict(self.disagreements_),
            "pending": [list(p) for p in pending],
            "shadow_anchor": self._shadow_anchor,
            "await_class_until": self._await_class_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; an empty dict resets to a fresh detector."""
        self.n_seen_ = int(state.get("n_seen", 0))
        self.task_classes_ = {int(t): [int(c) for c in cs] for t, cs in state.get("tasks", [])}
        self.class_task_ = {c: t for t, cs in self.task_classes_.items() for c in cs}
        self.current_task_ = state.get("current_task")
        self.anchor_ = int(state.get("anchor", 0))
        self.task_records_ = int(state.get("task_records", 0))
        self.markers_in_use_ = bool(state.get("markers_in_use", False))
        self.last_time_ = state.get("last_time")
        self.disagreements_ = dict(state.get("disagreements", {}))
        self._pending: dict[int, deque[int]] = {}
        self._order: deque[tuple[int, int]] = deque()  # (seq, label) of pending, for expiry
        for seq, label in state.get("pending", []):
            self._pending.setdefault(int(label), deque()).append(int(seq))
            self._order.append((int(seq), int(label)))
        self._expired: list[int] = []
        self._shadow_anchor: int | None = state.get("shadow_anchor")  # last boundary markers missed
        self._await_class_until: int | None = state.get("await_class_until")

    # ---- records ----------------------------------------------------------------------
    _bulk = True  # tests turn it off to check the bulk path against record-by-record

    def _train_run(self, i: int, other: npt.NDArray[np.bool_], out: Assignments) -> int:
        """Assign records ``i, i + 1, ...`` of the open task's classes to it in one step, as
        ``_one`` would one by one; stop before a record of another class and before any
        record at which ``_one`` would emit an event (the await deadline, the record
        limit). Expiry of pending records in between needs no record order: expired seqs
        are only reported at the next event or at the end of the batch. Returns how many."""
        task = self.current_task_
        assert task is not None
        rest = other[i:]
        k = int(np.argmax(rest)) if rest.any() else len(rest)  # the run of the open task's classes
        seq = self.n_seen_
        if self._await_class_until is not None:
            k = min(k, self._await_class_until - seq)
        if self.max_task_records is not None:
            k = min(k, self.max_task_records - self.task_records_ - 1)
        if k <= 0:
            return 0
        self._expire(seq + k - 1)
        out.outcome[i : i + k] = Outcome.TRAIN
        out.task[i : i + k] = task
        self.n_seen_ = seq + k
        self.task_records_ += k
        return k

    def _expire(self, seq: int) -> None:
        """Pending records that fell out of the window by record ``seq`` expire."""
        while self._order and self._order[0][0] <= seq - self.window:
            old_seq, old_label = self._order.popleft()
            if old_label in self._pending:  # otherwise already released
                self._pending[old_label].popleft()
                self._expired.append(old_seq)
                if not self._pending[old_label]:
                    del self._pending[old_label]

    def _one(self, i: int, label: int, out: Assignments) -> None:
        seq = self.n_seen_
        self.n_seen_ = seq + 1
        self._expire(seq)
        if self._await_class_until is not None and seq >= self._await_class_until:
            self._no_new_class(i, out)
        task = self.class_task_.get(label)
        if task is None:
            out.outcome[i] = Outcome.PENDING
            self._pending.setdefault(label, deque()).append(seq)
            self._order.append((seq, label))
            if len(self._pending[label]) >= self.min_count:
                self._confirm(label, i + 1, out)
            return
        out.task[i] = task
        if task != self.current_task_:
            out.outcome[i] = Outcome.LATE
            return
        out.outcome[i] = Outcome.TRAIN
        self.task_records_ += 1
        self._check_limit(i + 1, out)

    def _confirm(self, label: int, index: int, out: Assignments) -> None:
        seqs = self._pending[label]
        start = seqs[len(seqs) // 2]  # where the class began: one stray early record barely moves it
        if not self.markers_in_use_:
            if self.current_task_ is None or abs(start - self.anchor_) >= self.group_window:
                self._open(max(self.task_classes_, default=-1) + 1, Reason.NEW_CLASS, index, out, start)
            self._release(label, index, out)
        elif self.current_task_ is not None:
            self._claim(label, start, index, out)
        # else: markers are in use and no task is open: it waits for a start marker

    def _claim(self, label: int, start: int, index: int, out: Assignments) -> None:
        """Marker mode: the class joins the marker's task; note where the detector differs."""
        if abs(start - self.anchor_) < self.group_window:
            self._await_class_until = None  # the marker announced this class
        elif self._shadow_anchor is None or abs(start - self._shadow_anchor) >= self.group_window:
            self._shadow_anchor = start  # classes starting near this one are the same missed boundary
            self._disagree(Reason.UNANNOUNCED_CLASS, self.current_task_, index, out)
        self._release(label, index, out)

    # ---- task life cycle --------------------------------------------------------------
    def _open(self, task: int, reason: Reason, index: int, out: Assignments, anchor: int) -> None:
        if self.current_task_ is not None:
            self._close(Reason.MARKER if reason is Reason.MARKER else Reason.NEXT_TASK, index, out)
        self.current_task_ = task
        self.task_classes_.setdefault(task, [])
        self.anchor_ = anchor
        self.task_records_ = 0
        self._emit(out, Event(EventKind.OPENED, index, task, reason))
        if reason is Reason.MARKER:
            self._await_class_until = self.n_seen_ + self.window
            confirmed = [lb for lb, seqs in self._pending.items() if len(seqs) >= self.min_count]
            # In stream order (a class's first pending record), as a restored detector has them
            for label in sorted(confirmed, key=lambda lb: self._pending[lb][0]):
                if self.current_task_ is None:  # the record limit closed it already
                    break
                seqs = self._pending[label]
                self._claim(label, seqs[len(seqs) // 2], index, out)  # confirmed while no task was open

    def _release(self, label: int, index: int, out: Assignments) -> None:
        task = self.current_task_
        assert task is not None
        seqs = tuple(self._pending.pop(label))
        self.class_task_[label] = task
        self.task_classes_[task].append(label)
        self.task_records_ += len(seqs)
        self._emit(out, Event(EventKind.RELEASED, index, task, Reason.NEW_CLASS, (label,), seqs))
        self._check_limit(index, out)

    def _close(self, reason: Reason, index: int, out: Assignments) -> None:
        if self._await_class_until is not None:
            self._no_new_class(index, out)
        task = self.current_task_
        assert task is not None
        self.current_task_ = None
        classes = tuple(self.task_classes_[task])
        self._emit(out, Event(EventKind.CLOSED, index, task, reason, classes))

    def _check_limit(self, index: int, out: Assignments) -> None:
        limit = self.max_task_records
        if limit is not None and self.current_task_ is not None and self.task_records_ >= limit:
            self._close(Reason.RECORD_LIMIT, index, out)

    def _check_timeout(self, now: float, out: Assignments) -> None:
        if self.timeout_due(now):
            self._close(Reason.TIMEOUT, 0, out)

    def _start_marker(self, task: int | None, out: Assignments) -> None:
        self.markers_in_use_ = True
        if task is None:
            task = max(self.task_classes_, default=-1) + 1
        if task != self.current_task_:  # a repeated start (e.g. a replay) changes nothing
            self._open(task, Reason.MARKER, 0, out, self.n_seen_)

    def _end_marker(self, task: int | None, index: int, out: Assignments) -> None:
        self.markers_in_use_ = True
        if task is not None and task != self.current_task_:
            self._disagree(Reason.MARKER_TASK_MISMATCH, task, index, out)
        if self.current_task_ is not None:
            self._close(Reason.MARKER, index, out)

    # ---- reporting --------------------------------------------------------------------
    def _no_new_class(self, index: int, out: Assignments) -> None:
        self._await_class_until = None
        self._disagree(Reason.MARKER_WITHOUT_NEW_CLASS, self.current_task_, index, out)

    def _disagree(self, reason: Reason, task: int | None, index: int, out: Assignments) -> None:
        self.disagreements_[reason.value] = self.disagreements_.get(reason.value, 0) + 1
        self._emit(out, Event(EventKind.DISAGREEMENT, index, task, reason))

    def _emit(self, out: Assignments, event: Event) -> None:
        self._flush_expired(event.index, out)  # keep events in stream order
        out.events.append(event)

    def _flush_expired(self, index: int, out: Assignments) -> None:
        if self._expired:
            seqs, self._expired = tuple(self._expired), []
            out.events.append(Event(EventKind.EXPIRED, index, None, Reason.NOISE, (), seqs))


def _not_in(values: npt.NDArray[np.int64], classes: list[int]) -> npt.NDArray[np.bool_]:
    """``~np.isin(values, classes)``; for a few classes, comparisons are several times faster."""
    if len(classes) > 16:
        return ~np.isin(values, classes)
    out = np.ones(len(values), bool)
    for c in classes:
        out &= values != c
    return out
