"""Boundary detection on synthetic label streams with known change points."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spacenet.stream.boundary import (
    Assignments,
    BoundaryDetector,
    Event,
    EventKind,
    Marker,
    Outcome,
    Reason,
)

SPLIT = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def decided(res: Assignments) -> tuple[int, list[int], list[int], list[Event]]:
    """What one ``observe`` decided, comparable between detectors."""
    return res.first_seq, res.outcome.tolist(), res.task.tolist(), res.events


def class_incremental(rng: np.random.Generator, tasks=SPLIT, per_task: int = 1000) -> np.ndarray:
    """Each task's classes interleaved at random, tasks one after the other."""
    return np.concatenate([rng.choice(np.array(cs), size=per_task) for cs in tasks]).astype(np.int64)


@dataclass
class Caller:
    """What the service does with Assignments: keeps pending records, resolves them."""

    final: dict[int, tuple[Outcome, int]] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)

    def take(self, res: Assignments) -> None:
        pos = 0
        seqs, outcomes, tasks = res.seqs.tolist(), res.outcome.tolist(), res.task.tolist()

        def route(upto: int) -> None:
            for seq, o, t in zip(seqs[pos:upto], outcomes[pos:upto], tasks[pos:upto], strict=True):
                assert seq not in self.final and seq not in self.pending
                if o == Outcome.PENDING:
                    assert t == -1
                    self.pending.add(seq)
                else:
                    assert o in (Outcome.TRAIN, Outcome.LATE) and t >= 0
                    self.final[seq] = (Outcome(o), t)

        for ev in res.events:
            assert pos <= ev.index <= len(seqs)
            route(ev.index)
            pos = ev.index
            self.take_event(ev)
        route(len(seqs))

    def take_event(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.kind in (EventKind.RELEASED, EventKind.EXPIRED):
            outcome = Outcome.TRAIN if ev.kind is EventKind.RELEASED else Outcome.NOISE
            for seq in ev.seqs:
                self.pending.remove(seq)  # only records already handed over as pending
                self.final[seq] = (outcome, -1 if ev.task is None else ev.task)

    def kinds(self, kind: EventKind) -> list[Event]:
        return [e for e in self.events if e.kind is kind]

    def reasons(self, kind: EventKind) -> list[tuple[int | None, Reason | None]]:
        return [(e.task, e.reason) for e in self.kinds(kind)]


def tasks_of(det: BoundaryDetector) -> dict[int, list[int]]:
    return {t: sorted(cs) for t, cs in det.task_classes_.items()}


def drive(det: BoundaryDetector, labels: np.ndarray, batch: int = 64, caller: Caller | None = None) -> Caller:
    caller = caller or Caller()
    for start in range(0, len(labels), batch):
        caller.take(det.observe(labels[start : start + batch]))
    return caller


def test_clean_split_mnist_order_gives_five_tasks_of_two_classes() -> None:
    labels = class_incremental(np.random.default_rng(0))
    det = BoundaryDetector()
    caller = drive(det, labels)
    assert tasks_of(det) == dict(enumerate(map(list, SPLIT)))
    assert caller.reasons(EventKind.OPENED) == [(t, Reason.NEW_CLASS) for t in range(5)]
    assert caller.reasons(EventKind.CLOSED) == [(t, Reason.NEXT_TASK) for t in range(4)]
    assert det.current_task_ == 4 and not caller.pending
    # every record trains in its own task: pending ones are released into the new task
    expected = np.repeat(np.arange(5), 1000)
    assert [caller.final[s] for s in range(len(labels))] == [(Outcome.TRAIN, t) for t in expected.tolist()]


def test_noisy_labels_still_give_exactly_the_right_tasks() -> None:
    rng = np.random.default_rng(1)
    labels = class_incremental(rng)
    noisy = rng.random(len(labels)) < 0.01
    labels[noisy] = rng.integers(0, 10, size=int(noisy.sum()))
    det = BoundaryDetector()
    caller = drive(det, labels, batch=100)
    assert tasks_of(det) == dict(enumerate(map(list, SPLIT)))
    assert len(caller.kinds(EventKind.OPENED)) == 5
    assert len(caller.final) + len(caller.pending) == len(labels)
    # clean records train in their task; noise of earlier classes is late, of later ones noise
    true_task = np.repeat(np.arange(5), 1000)
    for seq in np.flatnonzero(~noisy).tolist():
        assert caller.final[seq] == (Outcome.TRAIN, true_task[seq])
    outcomes = {caller.final[s][0] for s in np.flatnonzero(noisy).tolist() if s in caller.final}
    assert outcomes <= {Outcome.TRAIN, Outcome.LATE, Outcome.NOISE} and Outcome.NOISE in outcomes


def test_tasks_of_ten_classes_with_label_noise() -> None:
    rng = np.random.default_rng(7)
    tasks = [tuple(range(0, 10)), tuple(range(10, 20)), tuple(range(20, 30))]
    labels = class_incremental(rng, tasks, per_task=2500)
    noisy = rng.random(len(labels)) < 0.03
    labels[noisy] = rng.integers(0, 30, size=int(noisy.sum()))
    det = BoundaryDetector()
    drive(det, labels, batch=250)
    assert tasks_of(det) == dict(enumerate(map(list, tasks)))


def test_a_single_mislabeled_record_opens_nothing() -> None:
    det = BoundaryDetector(min_count=5, window=50)
    labels = np.array([0] * 30 + [9] + [0] * 100)
    caller = drive(det, labels, batch=7)
    assert det.task_classes_ == {0: [0]}
    assert caller.final[30] == (Outcome.NOISE, -1)
    (expired,) = caller.kinds(EventKind.EXPIRED)
    assert expired.seqs == (30,) and expired.reason is Reason.NOISE


def test_classes_arriving_a_few_records_apart_form_one_task() -> None:
    rng = np.random.default_rng(2)
    first = np.zeros(60, np.int64)  # class 0 alone for 60 records...
    mixed = rng.choice(np.array([0, 1, 2]), size=600)  # ...then 1 and 2 join it
    later = rng.choice(np.array([3, 4]), size=600)
    det = BoundaryDetector()
    drive(det, np.concatenate([first, mixed, later]))
    assert tasks_of(det) == {0: [0, 1, 2], 1: [3, 4]}


def test_group_window_separates_tasks_that_start_far_apart() -> None:
    labels = np.array([0] * 300 + [1] * 300)
    det = BoundaryDetector(min_count=10, group_window=100)
    caller = drive(det, labels)
    assert det.task_classes_ == {0: [0], 1: [1]}
    (closed,) = caller.kinds(EventKind.CLOSED)
    assert closed.task == 0 and closed.reason is Reason.NEXT_TASK and closed.classes == (0,)


def test_a_reappearing_class_is_late_and_opens_no_task() -> None:
    rng = np.random.default_rng(3)
    labels = np.concatenate([class_incremental(rng, SPLIT[:2], 500), np.zeros(200, np.int64)])
    det = BoundaryDetector()
    caller = drive(det, labels)
    assert sorted(det.task_classes_) == [0, 1] and det.current_task_ == 1
    assert all(caller.final[s] == (Outcome.LATE, 0) for s in range(1000, 1200))


def test_markers_agreeing_with_the_detector_report_no_disagreement() -> None:
    rng = np.random.default_rng(4)
    det, caller = BoundaryDetector(), Caller()
    for t, cs in enumerate(SPLIT[:3]):
        caller.take(det.observe(np.empty(0), Marker.TASK_START, t))
        drive(det, rng.choice(np.array(cs), size=700), caller=caller)
        caller.take(det.observe(np.empty(0), Marker.TASK_END, t))
    assert det.disagreements_ == {} and det.current_task_ is None
    assert caller.reasons(EventKind.CLOSED) == [(t, Reason.MARKER) for t in range(3)]
    assert tasks_of(det) == dict(enumerate(map(list, SPLIT[:3])))


def test_markers_that_disagree_with_the_detector_win_and_are_counted() -> None:
    rng = np.random.default_rng(5)
    det, caller = BoundaryDetector(), Caller()
    caller.take(det.observe(rng.choice([0, 1], size=100), Marker.TASK_START, 10))
    drive(det, rng.choice(np.array([0, 1]), size=900), caller=caller)
    drive(det, rng.choice(np.array([2, 3]), size=1000), caller=caller)  # no marker: stays in task 10
    caller.take(det.observe(rng.choice([4, 5], size=100), Marker.TASK_START, 11))
    drive(det, rng.choice(np.array([4, 5]), size=400), caller=caller)
    caller.take(det.observe(rng.choice([4, 5], size=100), Marker.TASK_START, 12))  # mid-task marker
    drive(det, rng.choice(np.array([4, 5]), size=400), caller=caller)
    caller.take(det.observe(np.empty(0), Marker.TASK_END, 99))  # wrong id: still closes task 12
    assert tasks_of(det) == {10: [0, 1, 2, 3], 11: [4, 5], 12: []}
    assert det.disagreements_ == {
        "unannounced_class": 1,  # classes 2 and 3 arrived together: one missed boundary
        "marker_without_new_class": 1,
        "marker_task_mismatch": 1,
    }
    assert [e.reason for e in caller.kinds(EventKind.OPENED)] == [Reason.MARKER] * 3
    assert det.current_task_ is None
    # after the marker for task 12, classes 4 and 5 belong to closed task 11: evaluation only
    assert {caller.final[s] for s in range(2500, 3000)} == {(Outcome.LATE, 11)}


def test_classes_confirmed_between_end_and_start_markers_wait_for_the_start() -> None:
    det, caller = BoundaryDetector(min_count=5), Caller()
    caller.take(det.observe(np.zeros(50), Marker.TASK_START, 0))
    caller.take(det.observe(np.empty(0), Marker.TASK_END, 0))
    caller.take(det.observe(np.ones(30)))
    assert det.current_task_ is None and len(caller.pending) == 30
    caller.take(det.observe(np.ones(10), Marker.TASK_START, 1))
    assert det.task_classes_ == {0: [0], 1: [1]} and not caller.pending
    assert {caller.final[s] for s in range(50, 90)} == {(Outcome.TRAIN, 1)}


def test_idle_timeout_closes_the_task() -> None:
    det = BoundaryDetector(min_count=3, idle_timeout_s=10.0)
    caller = Caller()
    caller.take(det.observe(np.zeros(20), now=100.0))
    assert det.tick(105.0) == [] and det.current_task_ == 0
    (closed,) = det.tick(110.0)
    assert (closed.kind, closed.task, closed.reason) == (EventKind.CLOSED, 0, Reason.TIMEOUT)
    res = det.observe(np.zeros(5), now=111.0)
    assert res.outcome.tolist() == [Outcome.LATE] * 5 and res.events == []
    # a gap seen by observe itself also closes, before the batch's records
    det2 = BoundaryDetector(min_count=3, idle_timeout_s=10.0)
    det2.observe(np.zeros(20), now=0.0)
    res2 = det2.observe(np.zeros(2), now=60.0)
    assert [(e.kind, e.index, e.reason) for e in res2.events] == [(EventKind.CLOSED, 0, Reason.TIMEOUT)]
    assert res2.outcome.tolist() == [Outcome.LATE] * 2


def test_record_limit_closes_the_task() -> None:
    det = BoundaryDetector(min_count=5, max_task_records=100)
    caller = drive(det, np.array([0] * 150 + [1] * 50), batch=32)
    (closed,) = caller.kinds(EventKind.CLOSED)
    assert (closed.task, closed.reason) == (0, Reason.RECORD_LIMIT)
    train0 = [s for s, v in caller.final.items() if v == (Outcome.TRAIN, 0)]
    assert train0 == list(range(100))
    assert {caller.final[s] for s in range(100, 150)} == {(Outcome.LATE, 0)}
    assert det.task_classes_ == {0: [0], 1: [1]}


def test_state_round_trip_mid_stream_gives_identical_behaviour() -> None:
    rng = np.random.default_rng(6)
    labels = class_incremental(rng, SPLIT[:3], 600)
    labels[rng.random(len(labels)) < 0.02] = 9
    cut = 1210  # just after task 2's records begin: some of them are pending
    params = dict(min_count=20, window=500, group_window=150, idle_timeout_s=5.0, max_task_records=550)
    whole = BoundaryDetector(**params)
    first = drive(whole, labels[:cut], batch=50)
    assert first.pending  # the cut falls while records are pending
    state = json.loads(json.dumps(whole.state_dict()))
    restored = BoundaryDetector(**params)
    restored.load_state_dict(state)
    assert restored.state_dict() == whole.state_dict()
    for i, start in enumerate(range(cut, len(labels), 37)):
        batch, now = labels[start : start + 37], float(i)
        a, b = whole.observe(batch, now=now), restored.observe(batch, now=now)
        assert decided(a) == decided(b)
    assert whole.state_dict() == restored.state_dict()


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        BoundaryDetector(min_count=0)
    with pytest.raises(ValueError):
        BoundaryDetector(min_count=20, window=10)
    with pytest.raises(ValueError):
        BoundaryDetector(max_task_records=0)


def steps_of(max_labels: int, plain: int) -> st.SearchStrategy[tuple[list[int], Marker | None, int | None]]:
    """One ``observe`` call: up to ``max_labels`` labels of 6 classes; a start or end marker in
    2 of ``plain + 2`` calls; a task id or none."""
    return st.tuples(
        st.lists(st.integers(0, 5), max_size=max_labels),
        st.sampled_from([None] * plain + [Marker.TASK_START, Marker.TASK_END]),
        st.one_of(st.none(), st.integers(0, 3)),
    )


step = steps_of(12, plain=3)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(step, max_size=30),
    min_count=st.integers(1, 4),
    window=st.integers(4, 12),
    group_window=st.integers(0, 6),
    limit=st.one_of(st.none(), st.integers(1, 8)),
)
def test_every_record_gets_exactly_one_outcome(steps, min_count, window, group_window, limit) -> None:
    det = BoundaryDetector(min_count, window, group_window, max_task_records=limit)
    caller, total = Caller(), 0
    for labels, marker, task in steps:
        caller.take(det.observe(np.array(labels, np.int64), marker, task))
        total += len(labels)
    # Caller.take asserts each record is handed over once and resolved at most once
    assert set(caller.final) | caller.pending == set(range(total))
    assert not set(caller.final) & caller.pending
    assert caller.pending == set(det.pending_seqs())
    for seq, (outcome, task) in caller.final.items():
        assert (task == -1) == (outcome is Outcome.NOISE), seq
    # pending records never outlive the window
    assert all(seq > total - 1 - window for seq in caller.pending)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(step, min_size=1, max_size=24),
    cut=st.integers(0, 24),
    limit=st.one_of(st.none(), st.integers(1, 8)),
)
@example(  # a start marker releases two confirmed classes: in stream order, restored or not
    steps=[([], None, None)] * 8
    + [
        ([], Marker.TASK_END, None),
        ([3], None, None),
        ([0, 0, 0, 0, 0, 0, 3, 3], None, None),
        ([], Marker.TASK_START, None),
    ],
    cut=11,
    limit=None,
)
def test_state_round_trip_at_any_point(steps, cut, limit) -> None:
    params = dict(min_count=2, window=8, group_window=3, idle_timeout_s=2.5, max_task_records=limit)
    whole, restored = BoundaryDetector(**params), BoundaryDetector(**params)
    for i, (labels, marker, task) in enumerate(steps):
        batch = np.array(labels, np.int64)
        if i == cut:
            fresh = BoundaryDetector(**params)
            fresh.load_state_dict(json.loads(json.dumps(restored.state_dict())))
            restored = fresh
        assert whole.tick(i - 0.5) == restored.tick(i - 0.5)
        a = whole.observe(batch, marker, task, now=float(i))
        b = restored.observe(batch, marker, task, now=float(i))
        assert decided(a) == decided(b)


def test_markers_may_be_given_as_decoded_from_the_wire() -> None:
    from spacenet.stream import wire

    det = BoundaryDetector(min_count=2)
    det.observe([3, 3], wire.Marker.TASK_START, 5)
    det.observe([], "task-end", 5)
    assert det.task_classes_ == {5: [3]} and det.current_task_ is None and det.markers_in_use_


def test_restart_clock_keeps_a_pause_from_closing_the_task() -> None:
    det = BoundaryDetector(min_count=2, window=10, group_window=3, idle_timeout_s=5.0)
    det.observe(np.array([1, 1, 1]), now=0.0)
    det.restart_clock(100.0)  # e.g. the service trained a task from t=0 to t=100
    assert det.tick(104.0) == []
    assert [e.reason.value for e in det.tick(106.0) if e.reason is not None] == ["timeout"]


long_step = steps_of(40, plain=4)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(long_step, max_size=30),
    min_count=st.integers(1, 4),
    window=st.integers(4, 30),
    group_window=st.integers(0, 12),
    limit=st.one_of(st.none(), st.integers(1, 40)),
)
def test_bulk_runs_decide_exactly_as_record_by_record(steps, min_count, window, group_window, limit) -> None:
    """``observe`` assigns runs of the open task's classes in one step; every outcome, task,
    event (with its index) and the state afterwards must equal the one-record-at-a-time path."""
    bulk = BoundaryDetector(min_count, window, group_window, 2.5, limit)
    single = BoundaryDetector(min_count, window, group_window, 2.5, limit)
    single._bulk = False
    for i, (labels, marker, task) in enumerate(steps):
        batch = np.array(labels, np.int64)
        a = bulk.observe(batch, marker, task, now=float(i))
        b = single.observe(batch, marker, task, now=float(i))
        assert decided(a) == decided(b)
    assert bulk.state_dict() == single.state_dict()


def test_bulk_runs_on_a_long_noisy_stream_match_record_by_record() -> None:
    rng = np.random.default_rng(3)
    labels = class_incremental(rng)
    noisy = np.where(rng.random(len(labels)) < 0.05, rng.integers(0, 10, len(labels)), labels)
    bulk, single = BoundaryDetector(), BoundaryDetector(max_task_records=None)
    single._bulk = False
    for lo in range(0, len(noisy), 500):
        a, b = bulk.observe(noisy[lo : lo + 500]), single.observe(noisy[lo : lo + 500])
        assert decided(a) == decided(b)
    assert bulk.state_dict() == single.state_dict() and len(bulk.task_classes_) == 5


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(long_step, max_size=30),
    probe=st.lists(st.integers(0, 5), max_size=40),
    min_count=st.integers(1, 4),
    window=st.integers(4, 30),
    limit=st.one_of(st.none(), st.integers(1, 40)),
)
def test_trains_all_is_true_only_when_observe_trains_everything(
    steps, probe, min_count, window, limit
) -> None:
    """``trains_all`` lets the service skip per-message work: where it says True, observing the
    batch must train every record in the open task and emit nothing; it must change nothing."""
    det = BoundaryDetector(min_count, window, 3, 2.5, limit)
    for i, (labels, marker, task) in enumerate(steps):
        det.observe(np.array(labels, np.int64), marker, task, now=float(i))
        batch = np.array(probe, np.int64)
        before = det.state_dict()
        says = det.trains_all(batch, now=i + 0.5)
        assert det.state_dict() == before
        if says:
            out = det.observe(batch, now=i + 0.5)
            assert not out.events and (out.outcome == Outcome.TRAIN).all()
            assert set(out.task.tolist()) == {det.current_task_}


def test_trains_all_holds_for_most_of_a_clean_stream() -> None:
    """On split MNIST's label order the fast path covers all but the messages near boundaries."""
    labels = class_incremental(np.random.default_rng(0), per_task=12000)
    det, fast = BoundaryDetector(), 0
    for lo in range(0, len(labels), 64):
        batch = labels[lo : lo + 64]
        fast += det.trains_all(batch)
        det.observe(batch)
    assert fast >= len(labels) // 64 - 5 * 20
