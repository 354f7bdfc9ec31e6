"""Many streams, many instances (issue 14), against the real broker: a learner per partition
of the training topic, prediction requests answered by their partition's learner, state in
the changelog topic, and streams handed over between ``spacenet serve`` processes.

Each stream learns its own class order (``tests/support/streams.py``). "Learned exactly
once" is judged by offsets and steps: the stream's checkpoint in the changelog is at the
end of its partition, its announcements add each task's classes once, in order, and its
model's optimizer steps (carried in its checkpoint across owners) are those of each task
trained once on all its records but its held-out sample.

The three-process test with a ``kill -9`` is marked ``scale`` and runs with ``make
test-scale`` (75-96 s here), not in the default ``make test``. The tests print how long
the hand-overs took (run with ``-s``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spacenet.stream import wire
from spacenet.stream.changelog import Manifest, live_view, stream_of
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import SOURCE_HEADER
from spacenet.stream.predict import MODEL_VERSION_HEADER, STREAM_HEADER, decode_reply
from tests.support import poison
from tests.support.service import (
    FAST_SETTINGS,
    Message,
    Samples,
    ServiceProcess,
    ServiceThread,
    TopicFollower,
    create_topics,
    eventually,
    header,
    make_producer,
    models_topic,
    read_topic,
    reject_reasons,
    send_all,
    service_settings,
    start_assigned,
    synthetic_images,
    unique_name,
)
from tests.support.streams import (
    StreamEvents,
    expected_steps,
    handovers,
    owned,
    stream_classes,
    stream_labels,
    stream_messages,
    stream_tasks,
)

EPOCHS, BATCH = int(FAST_SETTINGS["epochs"]), int(FAST_SETTINGS["batch_size"])
TASKS, PER_CLASS = 3, 60
RECORDS = TASKS * 2 * PER_CLASS  # of each stream
# Each task closes at its last record (no idle timeout): runs are comparable record for record.
SETTINGS = {"idle_timeout_s": 0, "max_task_records": 2 * PER_CLASS}
CONSUMED = "spacenet_records_consumed_total"


@pytest.fixture(scope="module")
def producer(kafka_bootstrap: str) -> Iterator[Any]:
    p = make_producer(kafka_bootstrap)
    yield p
    p.close(timeout=10)


def streams(partitions: int) -> dict[int, list[Message]]:
    return {p: stream_messages(p, stream_labels(p, TASKS, PER_CLASS)) for p in range(partitions)}


def consumed_in(samples: Samples, topic: str, partition: int) -> float:
    """Records of ``partition`` that one process consumed, by its metrics."""
    return samples.get((CONSUMED, frozenset({"topic": topic, "partition": str(partition)}.items())), 0.0)


def consumed(runs: list[ServiceProcess], topic: str, partition: int) -> float:
    """Records of ``partition`` the living ``runs`` consumed, together."""
    return sum(consumed_in(run.metrics(), topic, partition) for run in runs if run.alive)


def wait_learned(
    models: TopicFollower, streams: int, tasks: int, alive: Any, timeout_s: float
) -> StreamEvents:
    def done(messages: list[Any]) -> bool:
        events = StreamEvents.of(messages)
        return all(events.learned(p) >= tasks for p in range(streams))

    models.wait_until(done, timeout_s, alive, what=f"{tasks} tasks learned by each of {streams} streams")
    return StreamEvents.of(models.messages)


def assert_learned_exactly_once(bootstrap: str, topic: str, events: StreamEvents, partitions: int) -> None:
    """Every stream learned its tasks once, in order, from all its records (steps), and the
    changelog holds one current checkpoint per stream, at the end of its partition."""
    changelog = ServiceConfig(topic=topic).changelog_topic
    for p in range(partitions):
        assert events.tasks(p) == stream_tasks(p, TASKS), p
        last = events.last(p)
        assert last["steps"] == expected_steps(last, [2 * PER_CLASS] * TASKS, EPOCHS, BATCH), p
        live = {k: v for k, v in live_view(read_topic(bootstrap, changelog, p)).items() if stream_of(k) == p}
        manifest = Manifest.decode(live[str(p).encode()])
        assert sorted(live) == sorted([str(p).encode(), *manifest.chunk_keys()]), p
        assert manifest.chunks > 1  # the tests' changelog topics take small messages
        end = len(read_topic(bootstrap, topic, p))
        assert manifest.positions == {p: end} and manifest.model_version == TASKS, p


# ------------------------------------------------------------------ one process, three streams
def test_bad_input_on_one_stream_is_dead_lettered_there_and_the_others_learn_untouched(
    kafka_bootstrap: str, producer: Any, tmp_path: Path
) -> None:
    topic = unique_name("streams-bad")
    create_topics(kafka_bootstrap, topic, partitions=3)
    torch.manual_seed(0)
    data = streams(3)
    labels = np.array([0, 1, 2])
    bad = [poison.random_bytes(b"\x00 not arrow"), poison.wrong_shape(labels, 14), poison.empty(True)]
    data[1] = [*data[1][:5], *bad[:2], *data[1][5:12], bad[2], *data[1][12:]]
    settings = service_settings(topic, kafka_bootstrap, tmp_path / "state", **SETTINGS)
    svc = start_assigned(lambda: ServiceThread(settings))
    try:
        with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
            offsets = {p: send_all(producer, topic, messages, partition=p) for p, messages in data.items()}
            events = wait_learned(models, 3, TASKS, lambda: svc.alive, 180)
        assert svc.runtime.loop is not None and sorted(svc.runtime.loop.streams) == [0, 1, 2]
        for p in range(3):
            assert svc.sample(CONSUMED, topic=topic, partition=str(p)) == RECORDS, p
        dlq = read_topic(kafka_bootstrap, f"{topic}.dlq")
        assert reject_reasons(dlq) == {m.kind: 1 for m in bad}
        bad_offsets = [o for o, m in zip(offsets[1], data[1], strict=True) if m.records == 0]
        sources = sorted(header(m, SOURCE_HEADER) for m in dlq)
        assert sources == sorted(f"{topic}:1:{o}".encode() for o in bad_offsets)
        assert_learned_exactly_once(kafka_bootstrap, topic, events, 3)

        # Requests on partition p are answered by stream p's model, and say so.
        for p in (0, 2):
            labels = np.repeat(stream_classes(p, TASKS), 4)
            value = wire.encode(synthetic_images(labels, seed=50 + p), labels)
            with TopicFollower(kafka_bootstrap, f"{topic}.predictions", partition=p) as replies:
                send_all(producer, f"{topic}.requests", [Message(value, f"q{p}".encode())], partition=p)
                (reply,) = replies.wait_until(lambda m: len(m) >= 1, 60, lambda: svc.alive, "a reply")
            assert header(reply, STREAM_HEADER) == str(p).encode() and reply.key == f"q{p}".encode()
            assert header(reply, MODEL_VERSION_HEADER) == b"3"
            got = decode_reply(reply.value)
            assert set(got["prediction"].tolist()) <= set(stream_classes(p, TASKS))
            assert (got["prediction"] == got["label"]).mean() > 0.5
    finally:
        svc.stop()


# ------------------------------------------------------------------ graceful scale-up
def test_a_second_process_takes_streams_over_without_losing_or_repeating_a_record(
    kafka_bootstrap: str, producer: Any, tmp_path: Path
) -> None:
    """Process A learns four streams; half-way (task 0 learned, task 1 half buffered) process
    B joins: A checkpoints the streams it hands over, B restores them from the changelog and
    goes on from exactly where A stopped."""
    topic, partitions = unique_name("streams-up"), 4
    create_topics(kafka_bootstrap, topic, partitions=partitions)
    data = streams(partitions)
    half = 2 * PER_CLASS * 3 // 2 // 20  # messages: task 0 and half of task 1
    settings = service_settings(topic, kafka_bootstrap, tmp_path / "a", session_timeout_ms=10_000, **SETTINGS)
    everything = set(range(partitions))
    with (
        TopicFollower(kafka_bootstrap, models_topic(topic)) as models,
        start_assigned(lambda: ServiceProcess(settings, tmp_path / "a.log")) as a,
    ):
        eventually(lambda: owned(a.log_text()) == everything, 60, "A takes all", lambda: a.alive)
        for p, messages in data.items():
            send_all(producer, topic, messages[:half], partition=p)
        wait_learned(models, partitions, 1, lambda: a.alive, 120)
        for p in data:
            sent = sum(m.records for m in data[p][:half])
            a.wait_for_sample(CONSUMED, lambda v, n=sent: v == n, 60, topic=topic, partition=str(p))

        with ServiceProcess({**settings, "state_dir": str(tmp_path / "b")}, tmp_path / "b.log") as b:
            halves = lambda: len(owned(b.log_text())) == partitions // 2  # noqa: E731
            eventually(halves, 120, "B takes half", lambda: b.alive)
            moved = owned(b.log_text())
            assert owned(a.log_text()) == everything - moved
            for p, messages in data.items():
                send_all(producer, topic, messages[half:], partition=p)
            events = wait_learned(models, partitions, TASKS, lambda: a.alive and b.alive, 180)
            samples = {name: run.metrics() for name, run in (("a", a), ("b", b))}
            assert b.stop(signal.SIGTERM) == 0, b.log_tail()
        assert a.stop(signal.SIGTERM) == 0, a.log_tail()

    for p in range(partitions):
        counts = [consumed_in(samples[n], topic, p) for n in "ab"]
        assert sum(counts) == RECORDS, (p, counts)  # none lost, none read twice
        assert (counts[1] > 0) == (p in moved)
    assert_learned_exactly_once(kafka_bootstrap, topic, events, partitions)
    handed = [h for h in handovers((tmp_path / "a.log").read_text()) if h.what == "handed over"]
    out = {h.stream: h for h in reversed(handed)}  # each stream's first (B's stop gave them back)
    into = [h for h in handovers((tmp_path / "b.log").read_text()) if h.stream in moved]
    for p in moved:
        taken = next(h for h in into if h.stream == p and h.what == "taken on")
        first = next(h for h in into if h.stream == p and h.what == "first message")
        assert out[p].offset == taken.offset == first.offset == half, (out[p], taken, first)
        revoked = out[p].at - out[p].seconds
        print(f"hand-over of stream {p}: {taken.at - revoked:.2f} s from revocation to restored at B")


# ------------------------------------------------------------------ three processes, one killed
@pytest.mark.scale
@pytest.mark.timeout(900)
def test_three_processes_learn_six_streams_through_a_kill_9(
    kafka_bootstrap: str, producer: Any, tmp_path: Path
) -> None:
    """Three processes in one group share six streams. When every stream has learned its
    first task and holds half of its second, the process with the most streams gets
    SIGKILL; after its session times out, the others restore its streams from the changelog
    and replay what it had not checkpointed. Each stream must end learned exactly once,
    with the accuracy of a single-process run of the same stream (within 1 point)."""
    partitions = 6
    data = streams(partitions)
    half = 2 * PER_CLASS * 3 // 2 // 20  # messages: task 0 and half of task 1

    reference_topic = unique_name("streams-ref")
    create_topics(kafka_bootstrap, reference_topic, partitions=partitions)
    torch.manual_seed(0)
    ref = start_assigned(
        lambda: ServiceThread(
            service_settings(reference_topic, kafka_bootstrap, tmp_path / "ref", **SETTINGS)
        )
    )
    try:
        with TopicFollower(kafka_bootstrap, models_topic(reference_topic)) as models:
            for p, messages in data.items():
                send_all(producer, reference_topic, messages, partition=p)
            reference = wait_learned(models, partitions, TASKS, lambda: ref.alive, 300)
    finally:
        ref.stop()

    topic = unique_name("streams-kill")
    create_topics(kafka_bootstrap, topic, partitions=partitions)
    runs: list[ServiceProcess] = []

    def process(i: int) -> ServiceProcess:
        state = tmp_path / f"p{i}"
        settings = service_settings(topic, kafka_bootstrap, state, session_timeout_ms=10_000, **SETTINGS)
        return ServiceProcess(settings, tmp_path / f"p{i}.log")

    try:
        for i in range(3):  # one by one: each takes streams over from those before it
            runs.append(start_assigned(lambda i=i: process(i)))

        def spread() -> bool:
            mine = [owned(run.log_text()) for run in runs]
            return all(mine) and sorted(p for streams in mine for p in streams) == list(range(partitions))

        eventually(spread, 240, "six streams over three processes", lambda: all(r.alive for r in runs))
        with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
            for p, messages in data.items():
                send_all(producer, topic, messages[:half], partition=p)
            wait_learned(models, partitions, 1, lambda: all(r.alive for r in runs), 180)
            for p in data:  # what the victim's streams hold past their checkpoint is lost with it
                eventually(lambda p=p: consumed(runs, topic, p) == RECORDS // 2, 60, "half of each stream")
            victim = max(runs, key=lambda run: len(owned(run.log_text())))
            orphaned = owned(victim.log_text())
            victim.stop(signal.SIGKILL)
            killed_at = time.time()
            for p, messages in data.items():
                send_all(producer, topic, messages[half:], partition=p)
            survivors = [run for run in runs if run is not victim]
            events = wait_learned(models, partitions, TASKS, lambda: all(r.alive for r in survivors), 300)
        for run in survivors:
            assert run.stop(signal.SIGTERM) == 0, run.log_tail()
    finally:
        for run in runs:
            if run.alive:
                run.stop(signal.SIGKILL)

    assert_learned_exactly_once(kafka_bootstrap, topic, events, partitions)
    differences = []
    for p in range(partitions):
        got, want = events.last(p)["final_accuracy"], reference.last(p)["final_accuracy"]
        assert abs(got - want) <= 0.01, (p, got, want)
        differences.append(abs(got - want))
    print(f"final held-out accuracy vs. one process: largest difference {max(differences):.6f}")
    taken = [h for run in survivors for h in handovers(run.log_text()) if h.stream in orphaned]
    for p in orphaned:
        first = min(h.at for h in taken if h.stream == p and h.what == "first message" and h.at > killed_at)
        print(f"stream {p}: first message at its new owner {first - killed_at:.1f} s after the kill")
