"""The poll loop's ordering, with a recording consumer and producer in place of Kafka's.

A real ``StreamUnit`` (real learner, buffer, detector, checkpoints on disk: the
``changelog=false`` store) is driven by ``Loop``; only the Kafka clients are stand-ins that
record every call, so the order of what the loop does can be checked: pause -> train ->
resume, checkpoint -> announce -> commit (never a commit before the checkpoint that covers
it is on disk), and a take-on that restores, seeks to the checkpoint, announces again what
was never committed, and goes on exactly as an uninterrupted run. The service against the
real broker (the changelog, hand-overs between processes) is in ``tests/integration``.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kafka.errors import KafkaConnectionError
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from spacenet.stream import wire
from spacenet.stream.checkpoint import CheckpointStore
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.loop import Loop
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.state_store import LocalStates
from spacenet.stream.unit import StreamUnit

TOPIC = "t"
TP = TopicPartition(TOPIC, 0)
Message = collections.namedtuple("Message", "topic partition offset key value headers")
# Three tasks of two classes, four records a message; classes 4 and 5 open task 2 and so
# close task 1; task 2 stays open (no idle timeout).
LABELS = [0, 1, 0, 1, 1, 0, 2, 3, 3, 2, 2, 3, 4, 5, 4, 5]


def stream() -> list[Message]:
    rng = np.random.default_rng(0)
    out = []
    for offset, label in enumerate(LABELS):
        x = rng.integers(0, 30, (4, 1, 2, 2), dtype=np.uint8) + np.uint8(40 * label)
        out.append(Message(TOPIC, 0, offset, None, wire.encode(x, [label] * 4), wire.make_headers()))
    return out


class RecordingConsumer:
    """KafkaConsumer as far as the loop uses it, one partition, every call recorded in ``log``.
    A commit also records the positions of the newest checkpoint on disk at that moment."""

    def __init__(self, messages: list[Message], log: list[tuple[Any, ...]], checkpoints: Path) -> None:
        self.messages, self.log, self.checkpoints = messages, log, checkpoints
        self.next = 0
        self.paused: set[TopicPartition] = set()
        self.committed_: dict[TopicPartition, int] = {}
        self.fail_commits = False

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Message]]:
        self.log.append(("poll", TP in self.paused))
        if TP in self.paused or self.next >= len(self.messages):
            time.sleep(0.001)  # as a poll that waits: the loop is not a busy spin here
            return {}
        batch = self.messages[self.next : self.next + (max_records or 500)]
        self.next += len(batch)
        return {TP: batch}

    def pause(self, *partitions: TopicPartition) -> None:
        self.log.append(("pause",))
        self.paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.log.append(("resume",))
        self.paused -= set(partitions)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.log.append(("seek", offset))
        self.next = offset

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        if self.fail_commits:
            self.log.append(("commit failed",))
            raise KafkaConnectionError("broker away")
        found = CheckpointStore(self.checkpoints).latest()
        on_disk = None if found is None else int(found[1]["positions"]["0"])
        self.log.append(("commit", offsets[TP].offset, on_disk))
        self.committed_.update({tp: meta.offset for tp, meta in offsets.items()})

    def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_.get(tp)

    def end_offsets(self, partitions: list[TopicPartition], timeout_ms: int | None = None) -> dict[Any, int]:
        return {tp: len(self.messages) for tp in partitions}

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return self.next

    def close(self, autocommit: bool = True) -> None:
        self.log.append(("close",))


class RecordingProducer:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"", headers: Any = None) -> None:
        self.log.append(("send", topic, key, value))

    def flush(self, timeout: float | None = None) -> None:
        self.log.append(("flush",))


class Run:
    """One process's worth: a unit and its loop over ``consumer``, sharing ``state_dir``."""

    def __init__(self, state_dir: Path, consumer: RecordingConsumer) -> None:
        cfg = ServiceConfig(
            topic=TOPIC,
            input_shape=(1, 2, 2),
            hidden=(12, 12),
            n_select=4,
            n_reserve=2,
            connections=(0.5, 0.5, 0.5),
            epochs=2,
            batch_size=8,
            lr=0.1,
            min_count=2,
            window=40,
            group_window=12,
            holdout_fraction=0.25,
            device="cpu",
            state_dir=str(state_dir),
        )
        self.log = consumer.log
        self.consumer = consumer
        self.producer = RecordingProducer(self.log)
        tm = Telemetry(CollectorRegistry())
        dead_letters = DeadLetters(self.producer.send, cfg.dead_letter_topic, tm.metrics)

        def make_unit(partition: int) -> StreamUnit:
            self.unit = unit = StreamUnit(cfg, tm, dead_letters, partition)
            train = unit.train

            def recorded_train(closed: Any) -> Any:
                self.log.append(("train", closed[0]))
                result = train(closed)
                self.log.append(("trained", closed[0]))
                return result

            unit.train = recorded_train  # type: ignore[method-assign]
            return unit

        self.loop = Loop(cfg, consumer, self.producer, tm, make_unit, LocalStates(state_dir / "checkpoints"))

    def until(self, done: Callable[[], bool], max_steps: int = 20_000) -> None:
        for _ in range(max_steps):
            if done():
                return
            self.loop.step()
        raise AssertionError(f"not done after {max_steps} steps; last calls: {self.log[-8:]}")

    def models(self) -> list[dict[str, Any]]:
        return [json.loads(e[3]) for e in self.log if e[0] == "send" and e[1] == f"{TOPIC}.models"]

    def stop(self) -> None:
        self.loop.stop()
        self.loop.run()  # returns at once: shuts down


def start(state_dir: Path, consumer: RecordingConsumer) -> Run:
    """A run that was just assigned the partition and took its stream on (restored it)."""
    torch.manual_seed(0)
    run = Run(state_dir, consumer)
    run.loop.on_assigned([TP])
    run.until(lambda: 0 in run.loop.streams)
    assert calls(run.log, "pause", "resume") == [(0, ("pause",)), (len(run.log) - 1, ("resume",))]
    run.log.append(("taken on",))
    return run


def checkpoints(state_dir: Path) -> Path:
    return state_dir / "checkpoints" / "partition-0"


def calls(log: list[tuple[Any, ...]], *kinds: str) -> list[tuple[int, tuple[Any, ...]]]:
    return [(i, e) for i, e in enumerate(log) if e[0] in kinds]


def test_training_pauses_the_partition_and_keeps_polling(tmp_path: Path) -> None:
    run = start(tmp_path, RecordingConsumer(stream(), [], checkpoints(tmp_path)))
    run.until(lambda: len(run.models()) == 2 and run.loop.streams[0].quiet)
    log = run.log[run.log.index(("taken on",)) :]
    trains = calls(log, "train", "trained")
    assert [e for _, e in trains] == [("train", 0), ("trained", 0), ("train", 1), ("trained", 1)]
    pauses, resumes = calls(log, "pause"), calls(log, "resume")
    assert len(pauses) == len(resumes) == 2
    for (paused_at, _), (resumed_at, _), (start_at, _), (end_at, _) in zip(
        pauses, resumes, trains[0::2], trains[1::2], strict=True
    ):
        assert paused_at < start_at < end_at < resumed_at
        polls = [e for _, e in calls(log[paused_at:resumed_at], "poll")]
        assert polls and all(paused for _, paused in polls)  # the membership is kept, nothing read
    assert all(not e[1] for e in log[: pauses[0][0]] if e[0] == "poll")


def test_offsets_are_committed_only_after_the_checkpoint_and_the_announcement(tmp_path: Path) -> None:
    run = start(tmp_path, RecordingConsumer(stream(), [], checkpoints(tmp_path)))
    run.until(lambda: len(calls(run.log, "commit")) == 2)
    log = run.log
    commits = calls(log, "commit")
    announced = [(i, e) for i, e in calls(log, "send") if e[1] == f"{TOPIC}.models"]
    assert [e[2] for _, e in announced] == [b"0", b"0"]  # keyed by stream
    assert [m["model_version"] for m in run.models()] == [1, 2] and run.models()[0]["stream"] == 0
    for (commit_at, (_, offset, on_disk)), (sent_at, _), (trained_at, _) in zip(
        commits, announced, calls(log, "trained"), strict=True
    ):
        assert trained_at < sent_at < commit_at
        assert on_disk == offset  # the checkpoint that covers the commit was on disk before it
        assert calls(log[sent_at:commit_at], "flush"), "the announcement was flushed before the commit"
    # each task closed at the message that opened the next: positions 7 and 13
    assert [offset for _, (_, offset, _) in commits] == [7, 13]
    assert run.unit.predictor_ is not None and run.unit.predictor_.version == 2
    run.stop()
    assert log[-1] == ("close",)


def test_a_failed_commit_keeps_the_checkpoint_and_a_restart_announces_again_and_commits(
    tmp_path: Path,
) -> None:
    # The uninterrupted run, for reference.
    reference = start(tmp_path / "reference", RecordingConsumer(stream(), [], tmp_path / "unused"))
    reference.until(lambda: len(calls(reference.log, "commit")) == 2)
    want = reference.unit.state_dict()

    state = tmp_path / "state"
    first = start(state, RecordingConsumer(stream(), [], checkpoints(state)))
    first.consumer.fail_commits = True
    first.until(lambda: calls(first.log, "commit failed") != [])
    assert not first.loop.ready[0] and "offset commit failing" in first.loop.ready[1]
    first.stop()
    version, checkpoint = CheckpointStore(checkpoints(state)).latest() or (0, {})
    assert version == 1 and checkpoint["positions"] == {"0": 7}

    second = start(state, RecordingConsumer(stream(), [], checkpoints(state)))
    assert second.unit.model_version_ == 1 and second.unit.positions_ == {0: 7}
    assert [e for _, e in calls(second.log, "seek")] == [("seek", 7)]
    second.until(lambda: len(calls(second.log, "commit")) == 2)
    log = second.log
    (first_commit_at, first_commit) = calls(log, "commit")[0]
    assert first_commit[1:] == (7, 7)  # before handling anything: the checkpoint restored
    models = [(i, e) for i, e in calls(log, "send") if e[1] == f"{TOPIC}.models"]
    assert json.loads(models[0][1][3])["model_version"] == 1 and models[0][0] < first_commit_at
    assert not calls(log[:first_commit_at], "train")
    # The restored run goes on as the uninterrupted one: same model, same held-out samples.
    got = second.unit.state_dict()
    got_layers, want_layers = (s["learner"]["plugin"]["spacenet"]["layers"] for s in (got, want))
    layers = zip(got_layers, want_layers, strict=True)
    for mine, theirs in layers:  # used connections, their weights and owners, biases, reservations
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert got["holdout"].keys() == want["holdout"].keys()
    for task, packed in want["holdout"].items():
        assert torch.equal(got["holdout"][task], packed)  # the same records, packed alike
    assert got["holdout_seen"] == want["holdout_seen"]
    assert [m["accuracy"] for m in second.models()[1:]] == [m["accuracy"] for m in reference.models()[1:]]


@pytest.mark.parametrize("committed", [True, False])
def test_a_restart_announces_only_what_was_not_committed(tmp_path: Path, committed: bool) -> None:
    first = start(tmp_path, RecordingConsumer(stream()[:8], [], checkpoints(tmp_path)))
    first.until(lambda: len(calls(first.log, "commit")) == 1)
    first.stop()
    consumer = RecordingConsumer(stream()[:8], [], checkpoints(tmp_path))
    if committed:
        consumer.committed_ = dict(first.consumer.committed_)
    second = start(tmp_path, consumer)
    second.until(lambda: second.consumer.next == 8 and second.loop.streams[0].quiet, max_steps=2000)
    for _ in range(50):
        second.loop.step()
    assert [m["model_version"] for m in second.models()] == ([] if committed else [1])


class TwoPartitions(RecordingConsumer):
    """Two partitions carrying the same stream, each with its own position and pause."""

    def __init__(self, log: list[tuple[Any, ...]], checkpoints: Path) -> None:
        super().__init__(stream(), log, checkpoints)
        self.tps = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]
        self.nexts = dict.fromkeys(self.tps, 0)

    def assignment(self) -> set[TopicPartition]:
        return set(self.tps)

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Message]]:
        self.log.append(("poll", frozenset(tp.partition for tp in self.paused)))
        out = {}
        for tp in self.tps:
            if tp not in self.paused and self.nexts[tp] < len(self.messages):
                out[tp] = [m._replace(partition=tp.partition) for m in self.messages[self.nexts[tp] :]]
                self.nexts[tp] = len(self.messages)
        if not out:
            time.sleep(0.001)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.nexts[tp] = offset

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.log.append(("commit", {tp.partition: meta.offset for tp, meta in offsets.items()}))


def test_a_stream_in_training_holds_up_neither_polling_nor_the_other_streams(tmp_path: Path) -> None:
    consumer = TwoPartitions([], tmp_path / "unused")
    run = Run(tmp_path, consumer)
    run.loop.on_assigned(consumer.tps)
    run.until(lambda: sorted(run.loop.streams) == [0, 1])
    first, second = run.loop.streams[0], run.loop.streams[1]
    gate = threading.Event()
    train = first.unit.train

    def held(closed: Any) -> Any:
        assert gate.wait(60), "never released"
        return train(closed)

    first.unit.train = held  # type: ignore[method-assign]
    # While stream 0's first task trains (held), stream 1 reads on to the end of a task of
    # its own (the first, or the second if it had the trainer first), which then waits for
    # the trainer, its partition paused too.
    run.until(lambda: run.loop._job is not None and run.loop._job[0] is first and second.closed is not None)
    assert second.unit.positions_[1] in (6, 12) and consumer.paused == set(consumer.tps)
    held_since = len(run.log)
    for _ in range(20):
        run.loop.step()
    assert [e for e in run.log[held_since:] if e[0] == "poll"], "polling stopped during the training"
    gate.set()
    run.until(lambda: {p: o for _, e in calls(run.log, "commit") for p, o in e[1].items()} == {0: 13, 1: 13})
    commits = [e[1] for _, e in calls(run.log, "commit")]
    assert sorted(commits, key=lambda c: sorted(c.items())) == [{0: 7}, {0: 13}, {1: 7}, {1: 13}]
    for p in (0, 1):
        assert [m["model_version"] for m in run.models() if m["stream"] == p] == [1, 2]
