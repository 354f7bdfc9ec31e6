"""The streaming service against the real broker (issue 4): boundaries, dead letters,
restarts, predictions and spilling, on small synthetic streams with known answers.

Most tests run the service in a thread (``ServiceThread``: no interpreter start-up);
the restart tests run ``spacenet serve`` as child processes, so they can SIGTERM or
SIGKILL it. Every stream is uint8 1x28x28 images whose class lights its own block
(``synthetic_images``): a small MLP learns each task in a few steps, so a task learned
from the right records scores near 1.0 on its held-out sample.

What the models topic says is the ground truth for "which tasks were learned": each
event lists every class the model knows, so the classes each event adds are the
classes of the task it learned.
"""

from __future__ import annotations

import itertools
import math
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spacenet.stream import wire
from spacenet.stream.boundary import BoundaryDetector, EventKind
from spacenet.stream.checkpoint import CheckpointStore
from spacenet.stream.dead_letters import DETAIL_HEADER, SOURCE_HEADER
from spacenet.stream.predict import MODEL_VERSION_HEADER, REQUEST_HEADER, decode_reply
from spacenet.stream.records import unpack
from spacenet.stream.tools.produce import TaskPlan, iter_messages
from tests.support.service import (
    FAST_SETTINGS,
    Message,
    ServiceProcess,
    ServiceThread,
    TopicFollower,
    chunk,
    committed_offset,
    create_topics,
    eventually,
    header,
    make_producer,
    model_events,
    models_topic,
    reject_reasons,
    send_all,
    service_settings,
    shuffled_task,
    start_assigned,
    synthetic_images,
    unique_name,
    wait_for_models,
)

EPOCHS = int(FAST_SETTINGS["epochs"])
BATCH = int(FAST_SETTINGS["batch_size"])
CLEAN_TASKS = [[0, 1], [2, 3], [4, 5]]
PER_CLASS = 150


@pytest.fixture(scope="module")
def producer(kafka_bootstrap: str) -> Iterator[Any]:
    p = make_producer(kafka_bootstrap)
    yield p
    p.close(timeout=10)


@dataclass
class Run:
    """One service run over one stream: what it published, and its registry."""

    topic: str
    service: ServiceThread
    events: list[dict[str, Any]]
    offsets: list[int]

    def sample(self, name: str, **labels: str) -> float:
        value = self.service.sample(name, **labels)
        assert value is not None, f"{name}{labels} is not exported"
        return value

    def routed(self, outcome: str) -> float:
        return self.sample("spacenet_records_routed_total", outcome=outcome)

    def boundaries(self) -> dict[str, float]:
        reasons = ("marker", "new_class", "next_task", "timeout", "record_limit", "other")
        counts = {r: self.sample("spacenet_task_boundaries_total", reason=r) for r in reasons}
        return {r: n for r, n in counts.items() if n}


def learned_tasks(events: Sequence[dict[str, Any]]) -> list[list[int]]:
    return [sorted(e["new_classes"]) for e in events]


def expected_steps(events: Sequence[dict[str, Any]], task_records: Sequence[int]) -> int:
    """Optimizer steps when task ``j`` trains on all its records but its held-out sample
    (``n_samples[j][j]`` of the last event), each once per epoch: a step count that
    only matches when no record was lost, duplicated or trained twice."""
    held_out = events[-1]["accuracy"]["n_samples"]
    return sum(EPOCHS * math.ceil((n - held_out[-1][j]) / BATCH) for j, n in enumerate(task_records))


def start_service(
    bootstrap: str, topic: str, state_dir: Path, **overrides: Any
) -> tuple[ServiceThread, TopicFollower]:
    create_topics(bootstrap, topic)
    # The service draws its initial weights from torch's global generator (cfg.seed only
    # seeds training): seed it, so runs of the same stream are comparable.
    torch.manual_seed(0)
    torch.set_num_threads(1)
    settings = service_settings(topic, bootstrap, state_dir, **overrides)
    svc = start_assigned(lambda: ServiceThread(settings))
    return svc, TopicFollower(bootstrap, models_topic(topic))


@pytest.fixture
def run_stream(kafka_bootstrap: str, producer: Any, tmp_path: Path) -> Iterator[Any]:
    """``run_stream(messages, tasks, **settings)``: a fresh service learns the stream until
    ``tasks`` tasks are learned; the service keeps running until the test ends."""
    started: list[tuple[ServiceThread, TopicFollower]] = []

    def run(messages: Sequence[Message], tasks: int, prefix: str = "svc", **overrides: Any) -> Run:
        topic = unique_name(prefix)
        svc, models = start_service(kafka_bootstrap, topic, tmp_path / topic, **overrides)
        started.append((svc, models))
        offsets = send_all(producer, topic, messages)
        events = wait_for_models(models, tasks, svc, timeout_s=120)
        return Run(topic, svc, events, offsets)

    yield run
    for svc, models in started:
        models.close()
        svc.stop()


def clean_stream(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([shuffled_task(c, PER_CLASS, rng) for c in CLEAN_TASKS])
    return synthetic_images(labels, seed), labels


# ------------------------------------------------------------------- one shared clean run
@pytest.fixture(scope="module")
def clean_run(kafka_bootstrap: str, producer: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Three clean tasks of two classes, no markers; the service stays up for the module."""
    topic = unique_name("clean")
    svc, models = start_service(kafka_bootstrap, topic, tmp_path_factory.mktemp("clean"))
    try:
        x, y = clean_stream()
        offsets = send_all(producer, topic, chunk(x, y))
        events = wait_for_models(models, len(CLEAN_TASKS), svc, timeout_s=120)
        yield Run(topic, svc, events, offsets)
    finally:
        models.close()
        svc.stop()


def test_clean_stream_learns_exactly_the_streamed_tasks(clean_run: Run) -> None:
    events = clean_run.events
    assert learned_tasks(events) == CLEAN_TASKS
    assert [e["model_version"] for e in events] == [1, 2, 3]
    assert [e["tasks_learned"] for e in events] == [1, 2, 3]
    assert [sorted(e["classes"]) for e in events] == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]

    # Every task's held-out accuracy, right after it was learned, on trivially separable data.
    matrix = events[-1]["accuracy"]["accuracy"]
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row if a is not None)
    assert [matrix[j][j] for j in range(3)] == pytest.approx([1.0, 1.0, 1.0], abs=0.1)
    assert 0.0 <= events[-1]["final_accuracy"] <= 1.0

    # Each task reserves neurons: the free ones fall after every task, in every hidden layer.
    free = [[layer["free_neurons"] for layer in e["capacity"]["layers"]] for e in events]
    for before, after in itertools.pairwise(free):
        assert all(b > a for b, a in zip(before, after, strict=True)), free

    # One boundary per task opening, plus the idle timeout that closed the last task
    # (next_task closings are implied by the openings and are not counted).
    assert clean_run.boundaries() == {"new_class": 3, "timeout": 1}
    records = 3 * 2 * PER_CLASS
    assert (
        clean_run.sample("spacenet_records_consumed_total", topic=clean_run.topic, partition="0") == records
    )
    assert clean_run.routed("train") + clean_run.routed("pending") == records
    assert clean_run.routed("late") == clean_run.routed("noise") == 0
    assert clean_run.sample("spacenet_training_steps_total") == expected_steps(events, [2 * PER_CLASS] * 3)
    assert clean_run.sample("spacenet_model_version", stream="0") == 3


def test_prediction_replies_carry_the_published_model_version(
    clean_run: Run, kafka_bootstrap: str, producer: Any
) -> None:
    # Fresh images of every learned class (another seed), with labels to score, and
    # one request without labels, which prediction requests may omit.
    rng = np.random.default_rng(7)
    labels = rng.permutation(np.repeat(np.arange(6), 10))
    x = synthetic_images(labels, seed=7)
    requests = [
        Message(wire.encode(x[:30], labels[:30]), b"req-a", records=30),
        Message(wire.encode(x[30:]), b"req-b", records=30),
    ]
    with TopicFollower(kafka_bootstrap, f"{clean_run.topic}.predictions") as replies:
        offsets = send_all(producer, f"{clean_run.topic}.requests", requests)
        replies.wait_until(lambda m: len(m) >= 2, 60, lambda: clean_run.service.alive, "two replies")
    by_key = {m.key: m for m in replies.messages}
    assert sorted(by_key) == [b"req-a", b"req-b"]
    published = str(clean_run.events[-1]["model_version"]).encode()
    for key, offset in zip([b"req-a", b"req-b"], offsets, strict=True):
        msg = by_key[key]
        assert header(msg, MODEL_VERSION_HEADER) == published
        assert header(msg, REQUEST_HEADER) == f"0:{offset}".encode()
        reply = decode_reply(msg.value)
        assert len(reply["prediction"]) == 30
        assert set(reply["prediction"].tolist()) <= set(range(6))
        assert ((reply["score"] > 0) & (reply["score"] <= 1)).all()
    reply_a, reply_b = decode_reply(by_key[b"req-a"].value), decode_reply(by_key[b"req-b"].value)
    assert reply_a["label"].tolist() == labels[:30].tolist()
    assert "label" not in reply_b
    # Sensible: the classes just learned are recognised; older ones mostly (class-
    # incremental, no task id: some forgetting is allowed, chance would be 1/6).
    predicted = np.concatenate([reply_a["prediction"], reply_b["prediction"]])
    last_task = np.isin(labels, CLEAN_TASKS[-1])
    assert (predicted[last_task] == labels[last_task]).mean() >= 0.9
    assert (predicted == labels).mean() >= 0.5


def test_tiny_buffer_spills_to_disk_and_trains_on_every_record(
    clean_run: Run, run_stream: Any, tmp_path: Path
) -> None:
    # The clean stream again with a 20 kB buffer (about 25 records in memory): most of
    # each task goes through spill files. Same records, same seeds, so the outcome must
    # be the clean run's, down to the accuracy matrix and the number of steps.
    x, y = clean_stream()
    run = run_stream(chunk(x, y), 3, prefix="spill", max_buffer_bytes=20000)
    spill_root = tmp_path / run.topic / "spill" / "partition-0"
    assert spill_root.is_dir(), "the buffer never spilled"
    assert learned_tasks(run.events) == CLEAN_TASKS
    assert run.sample("spacenet_training_steps_total") == expected_steps(run.events, [2 * PER_CLASS] * 3)
    assert run.sample("spacenet_training_steps_total") == clean_run.sample("spacenet_training_steps_total")
    assert run.events[-1]["accuracy"] == clean_run.events[-1]["accuracy"]
    assert not any(spill_root.iterdir()), "a learned task's spill files were left behind"


# ------------------------------------------------------------------- boundary detection
def test_noisy_labels_grouped_classes_and_a_returning_class(run_stream: Any, kafka_bootstrap: str) -> None:
    rng = np.random.default_rng(3)
    task_a = shuffled_task([0, 1], PER_CLASS, rng)
    # Class 3 arrives 80 records after class 2 (within group_window=150): one task.
    task_b = np.concatenate([np.full(80, 2), shuffled_task([2, 3], 0, rng)])
    mixed = np.concatenate([np.full(PER_CLASS - 80, 2), np.full(PER_CLASS, 3)])
    rng.shuffle(mixed)
    task_b = np.concatenate([task_b, mixed])
    # Class 0 comes back for 20 records in the middle of the last task: late, no new task.
    task_c = shuffled_task([4, 5], PER_CLASS, rng)
    task_c = np.concatenate([task_c[:150], np.zeros(20, np.int64), task_c[150:]])
    truth = np.concatenate([task_a, task_b, task_c])
    x = synthetic_images(truth, seed=3)  # images show the true class ...
    labels = truth.copy()  # ... about 1 % of labels are random, any of 0..9
    noisy = rng.choice(len(labels), size=len(labels) // 100, replace=False)
    labels[noisy] = rng.integers(0, 10, size=len(noisy))
    n_noise, n_returning = len(noisy), 20

    run = run_stream(chunk(x, labels), 3, prefix="noisy")
    assert learned_tasks(run.events) == CLEAN_TASKS
    assert run.boundaries() == {"new_class": 3, "timeout": 1}
    # The returning class is routed to its closed task's held-out sample; so may some noise.
    assert n_returning <= run.routed("late") <= n_returning + n_noise
    assert run.routed("noise") <= n_noise
    routed = sum(run.routed(outcome) for outcome in ("train", "pending", "late"))
    assert (
        routed == len(labels) == run.sample("spacenet_records_consumed_total", topic=run.topic, partition="0")
    )
    matrix = run.events[-1]["accuracy"]["accuracy"]
    assert [matrix[j][j] for j in range(3)] == pytest.approx([1.0] * 3, abs=0.2)
    # Noise labels that never became a class are dead-lettered once they expire.
    expired = int(run.routed("noise"))
    with TopicFollower(kafka_bootstrap, f"{run.topic}.dlq") as dlq:
        dlq.wait_until(lambda m: len(m) >= expired, 30, what=f"{expired} dead letters")
        dlq.poll(timeout_ms=500)
    assert reject_reasons(dlq.messages) == ({"unconfirmed_class": expired} if expired else {})


def test_markers_win_over_the_detector(run_stream: Any) -> None:
    # Task 0 is class 0 for 200 records, then class 1 for 200: the detector alone would
    # split it (class 1 starts more than group_window=150 records after class 0), but
    # the task-start / task-end markers say it is one task.
    rng = np.random.default_rng(4)
    labels = np.concatenate([np.repeat([0, 1], 200), shuffled_task([2, 3], PER_CLASS, rng)])
    x = synthetic_images(labels, seed=4)
    plans = [
        TaskPlan(0, (0, 1), np.arange(400, dtype=np.intp)),
        TaskPlan(1, (2, 3), np.arange(400, len(labels), dtype=np.intp)),
    ]
    messages = [
        Message(m.value, m.key, tuple(m.headers), m.records)
        for m in iter_messages(x, labels, plans, records_per_message=25, markers=True)
    ]
    cfg = {k: int(FAST_SETTINGS[k]) for k in ("min_count", "window", "group_window")}
    detector = BoundaryDetector(**cfg)
    alone = [e for e in detector.observe(labels).events if e.kind == EventKind.OPENED]
    assert len(alone) == 3, "the stream no longer shows a disagreement"

    run = run_stream(messages, 2, prefix="markers")
    assert learned_tasks(run.events) == [[0, 1], [2, 3]]
    assert run.boundaries() == {"marker": 2}  # the end markers close the tasks: no timeout
    assert run.sample("spacenet_boundary_disagreements_total") >= 1
    assert run.routed("late") == run.routed("noise") == 0


# ------------------------------------------------------------------------ dead letters
def malformed_messages(x: np.ndarray, y: np.ndarray) -> list[Message]:
    """One message of every kind the service must reject, each named by the reason it gets."""
    v1 = tuple(wire.make_headers())
    nan = np.full((2, 1, 28, 28), np.nan, np.float32)
    big = synthetic_images(np.zeros(100, np.int64))  # ~80 kB, over max_message_bytes below
    return [
        Message(b"\x00not an arrow stream", b"bad-undecodable", v1, kind="undecodable"),
        Message(
            wire.encode(x[:2], y[:2]),
            b"bad-version",
            (("spacenet-schema-version", b"2"),),
            kind="schema_version",
        ),
        Message(wire.encode(np.zeros((2, 1, 14, 14), np.uint8), [0, 1]), b"bad-shape", v1, kind="shape"),
        # float32 features are valid wire v1, but this service is configured for uint8
        Message(wire.encode(x[:2].astype(np.float32), y[:2]), b"bad-dtype", v1, kind="dtype"),
        Message(wire.encode(x[:2], [0, -1]), b"bad-negative", v1, kind="label_negative"),
        Message(wire.encode(x[:2]), b"bad-no-label", v1, kind="label_missing"),
        # NaN needs float32; decode rejects non-finite values before the dtype check
        Message(wire.encode(nan, [0, 1]), b"bad-nan", v1, kind="non_finite"),
        Message(wire.encode(big, np.zeros(100, np.int64)), b"bad-too-large", v1, kind="too_large"),
        Message(b"", b"bad-empty", v1, kind="empty"),
        Message(
            wire.encode(x[:2], y[:2]),
            b"bad-marker",
            (*v1, ("spacenet-marker", b"task-middle"), ("spacenet-task", b"1")),
            kind="marker",
        ),
    ]


def test_malformed_messages_go_to_the_dead_letter_topic(run_stream: Any, kafka_bootstrap: str) -> None:
    rng = np.random.default_rng(5)
    y = np.concatenate([shuffled_task(c, PER_CLASS, rng) for c in CLEAN_TASKS[:2]])
    x = synthetic_images(y, seed=5)
    good, bad = chunk(x, y), malformed_messages(x, y)
    messages: list[Message] = []
    for i, message in enumerate(good):  # a bad one after every other good one, in both tasks
        messages.append(message)
        if i % 2 and bad:
            messages.append(bad.pop(0))
    assert not bad

    run = run_stream(messages, 2, prefix="malformed", max_message_bytes=60_000)
    assert learned_tasks(run.events) == CLEAN_TASKS[:2]
    matrix = run.events[-1]["accuracy"]["accuracy"]
    assert [matrix[j][j] for j in range(2)] == pytest.approx([1.0, 1.0], abs=0.1)
    assert run.sample("spacenet_records_consumed_total", topic=run.topic, partition="0") == len(y)
    assert run.service.alive

    sent = [(m, off) for m, off in zip(messages, run.offsets, strict=True) if m.kind != "good"]
    with TopicFollower(kafka_bootstrap, f"{run.topic}.dlq") as dlq:
        dlq.wait_until(lambda m: len(m) >= len(sent), 30, what="every bad message")
    assert len(dlq.messages) == len(sent)
    for (message, offset), letter in zip(sent, dlq.messages, strict=True):
        assert letter.key == message.key
        assert letter.value == message.value, f"{message.kind}: the original bytes"
        assert header(letter, "spacenet-reject-reason") == message.kind.encode()
        assert header(letter, SOURCE_HEADER) == f"{run.topic}:0:{offset}".encode()
        assert header(letter, DETAIL_HEADER)
    for message, _ in sent:
        assert run.sample("spacenet_messages_rejected_total", reason=message.kind) == 1, message.kind
        assert run.sample("spacenet_dead_letter_messages_total", reason=message.kind) == 1, message.kind
    assert run.sample("spacenet_messages_rejected_total", reason="other") == 0


# ------------------------------------------------------------------------------ restart
def _value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def test_restart_after_sigterm_replays_exactly_the_uncommitted_records(
    kafka_bootstrap: str, producer: Any, tmp_path: Path
) -> None:
    """Deterministic boundaries (each task closes at its 300th record, no idle timeout):
    run 1 learns task 0 from a stream of task 0 and the first 100 records of task 1,
    then gets SIGTERM; run 2 (a new process, same state dir and group) finishes."""
    topic = unique_name("restart")
    create_topics(kafka_bootstrap, topic)
    settings = service_settings(
        topic, kafka_bootstrap, tmp_path / "state", idle_timeout_s=0, max_task_records=300
    )
    x, y = clean_stream(seed=6)
    messages = chunk(x, y, per_message=40)  # task 0 ends inside message 7 (records 280..319)
    consumed = "spacenet_records_consumed_total"
    with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
        with start_assigned(lambda: ServiceProcess(settings, tmp_path / "run1.log")) as run1:
            offsets = send_all(producer, topic, messages[:10])
            wait_for_models(models, 1, run1, timeout_s=180)
            run1.wait_for_sample(consumed, lambda v: v == 400, topic=topic, partition="0")
            metrics1 = run1.metrics()
            assert run1.stop(signal.SIGTERM) == 0, run1.log_tail()

        version, ck = CheckpointStore(tmp_path / "state" / "checkpoints" / "partition-0").latest() or (0, {})
        position = int(ck["positions"]["0"])
        # The checkpoint covers message 7 and carries its last 20 records (task 1's: pending,
        # or open if a class got confirmed); messages 8 and 9 were consumed, not committed.
        assert version == 1 and position == 8
        carried = [ck["pending"], ck["open_records"], *([ck["holdout"]["1"]] if "1" in ck["holdout"] else [])]
        assert sum(len(unpack(p)) for p in carried) == 20
        assert committed_offset(kafka_bootstrap, settings["group"], topic) == position

        with start_assigned(lambda: ServiceProcess(settings, tmp_path / "run2.log")) as run2:
            offsets += send_all(producer, topic, messages[10:])
            wait_for_models(models, 3, run2, timeout_s=180)
            metrics2 = run2.metrics()
            assert run2.stop(signal.SIGTERM) == 0, run2.log_tail()
        models.poll(timeout_ms=1000)  # anything published late would show here
        events = model_events(models.messages)

    # Run 2 consumed exactly the records at and after the committed offset.
    replayed = sum(m.records for m, off in zip(messages, offsets, strict=True) if off >= position)
    assert replayed == len(y) - 8 * 40
    assert _value(metrics2, consumed, topic=topic, partition="0") == replayed
    # Every task learned once, in order, from all its records: one model version each.
    assert learned_tasks(events) == CLEAN_TASKS
    assert [e["model_version"] for e in events] == [1, 2, 3]
    assert [e["tasks_learned"] for e in events] == [1, 2, 3]
    boundary = "spacenet_task_boundaries_total"
    assert _value(metrics1, boundary, reason="record_limit") == 1
    assert _value(metrics2, boundary, reason="record_limit") == 2
    assert _value(metrics2, boundary, reason="timeout") == _value(metrics2, boundary, reason="next_task") == 0
    for outcome in ("late", "noise"):
        assert _value(metrics2, "spacenet_records_routed_total", outcome=outcome) == 0
    steps = sum(_value(m, "spacenet_training_steps_total") for m in (metrics1, metrics2))
    assert steps == expected_steps(events, [2 * PER_CLASS] * 3)
    assert committed_offset(kafka_bootstrap, settings["group"], topic) == len(messages)


def test_restart_after_sigkill_keeps_the_restored_task_open_for_its_replay(
    kafka_bootstrap: str, producer: Any, tmp_path: Path
) -> None:
    """Run 1 (idle timeout 3 s, the default detector) learns task 0 and holds the start of
    task 1 open when it is killed. Run 2 must not close that task before the records
    after the checkpoint replay: the downtime is not an idle stream. (After a SIGKILL
    the group waits for the dead member's session, 10 s here, before run 2 is assigned,
    and run 2 owns no partition until then.)"""
    topic = unique_name("sigkill")
    create_topics(kafka_bootstrap, topic)
    settings = service_settings(topic, kafka_bootstrap, tmp_path / "state", session_timeout_ms=10_000)
    x, y = clean_stream(seed=8)
    messages = chunk(x, y)
    with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
        with start_assigned(lambda: ServiceProcess(settings, tmp_path / "run1.log")) as run1:
            send_all(producer, topic, messages[:16])
            wait_for_models(models, 1, run1, timeout_s=180)
            run1.wait_for_sample(
                "spacenet_records_consumed_total", lambda v: v == 400, topic=topic, partition="0"
            )
            run1.stop(signal.SIGKILL)
        _, ck = CheckpointStore(tmp_path / "state" / "checkpoints" / "partition-0").latest() or (0, {})
        position = int(ck["positions"]["0"])
        assert ck["open_task"] == 1 and len(unpack(ck["open_records"])) > 0
        assert committed_offset(kafka_bootstrap, settings["group"], topic) == position

        with ServiceProcess(settings, tmp_path / "run2.log") as run2:
            send_all(producer, topic, messages[16:])

            def sample(name: str, **labels: str) -> float:
                return run2.sample(name, **labels) or 0.0

            def timeouts() -> float:
                return sample("spacenet_task_boundaries_total", reason="timeout")

            def consumed() -> float:
                return sample("spacenet_records_consumed_total", topic=topic, partition="0")

            # Fails fast if the downtime closes the task: a timeout boundary before any record.
            eventually(
                lambda: consumed() > 0 or timeouts() > 0, 180, "a record or a timeout", lambda: run2.alive
            )
            assert timeouts() == 0, "the restored task closed by idle timeout before its records replayed"
            events = wait_for_models(models, 3, run2, timeout_s=180)
            assert learned_tasks(events) == CLEAN_TASKS
            assert consumed() == len(y) - 25 * position
            assert sample("spacenet_records_routed_total", outcome="late") == 0
            assert timeouts() == 1  # the last task's
            assert run2.stop(signal.SIGTERM) == 0, run2.log_tail()
