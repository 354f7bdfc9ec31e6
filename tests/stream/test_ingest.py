"""``Ingest`` without Kafka: its chunked fast path routes every record as the message-by-message
path does, on streams with boundaries, noise, late records, markers and malformed messages."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from spacenet.stream import wire
from spacenet.stream.boundary import BoundaryDetector
from spacenet.stream.buffer import TaskBuffer
from spacenet.stream.dead_letters import DETAIL_HEADER, REASON_HEADER, DeadLetters
from spacenet.stream.ingest import Ingest
from spacenet.stream.observability.metrics import ServiceMetrics
from spacenet.stream.records import PendingStore

SHAPE = (1, 2, 2)
TOPIC = "records"
Message = collections.namedtuple("Message", "topic partition offset key value headers")


def _stream(rng: np.random.Generator, *, noise: bool, late: bool, bad: bool, markers: bool) -> list[Message]:
    """Three tasks of two classes, messages of 1 to 9 records; optionally single noisy labels,
    a closed task's class coming back, malformed messages and explicit markers."""
    messages: list[Message] = []

    def send(value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        messages.append(Message(TOPIC, 0, len(messages), None, value, headers or wire.make_headers()))

    for task, classes in enumerate([(0, 1), (2, 3), (4, 5)]):
        if markers:
            send(b"", wire.make_headers(wire.Marker.TASK_START, task))
        labels = rng.choice(classes, size=int(rng.integers(150, 250)))
        if noise and task:
            labels[int(rng.integers(0, 40))] = 9  # seen once: never confirmed as a class
        if late and task == 2:
            labels[int(rng.integers(60, 120))] = 1  # task 0's class again: a late record
        at = 0
        while at < len(labels):
            n = int(rng.integers(1, 10))
            chunk = labels[at : at + n]
            send(wire.encode(rng.integers(0, 256, (len(chunk), *SHAPE), dtype=np.uint8), chunk))
            if bad and rng.random() < 0.05:
                send(rng.bytes(int(rng.integers(0, 64))))  # undecodable (or empty)
            at += n
        if markers:
            send(b"", wire.make_headers(wire.Marker.TASK_END, task))
    return messages


def _run(messages: list[Message], poll: int, patch: Callable[[Ingest], None] | None = None) -> dict[str, Any]:
    """Feed ``messages`` ``poll`` at a time; what the ingest made of them."""
    registry = CollectorRegistry()
    dead: list[tuple[str, str]] = []

    def send(topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        named = dict(headers)
        dead.append((named[REASON_HEADER].decode(), named[DETAIL_HEADER].decode()))

    metrics = ServiceMetrics(registry)
    ingest = Ingest(
        TOPIC,
        wire.WireLimits(expected_shape=SHAPE),
        BoundaryDetector(min_count=8, window=60, group_window=30),
        TaskBuffer(SHAPE, "uint8", holdout_fraction=0.2, holdout_max_per_task=25, seed=3),
        PendingStore(),
        metrics,
        DeadLetters(send, f"{TOPIC}.dlq", metrics),
    )
    if patch is not None:
        patch(ingest)
    closed: list[Any] = []
    backlog: collections.deque[Any] = collections.deque()
    for lo in range(0, len(messages), poll):
        backlog.extend(messages[lo : lo + poll])
        while backlog:
            before = len(closed)
            for task, classes in ingest.handle(backlog):  # what training would see
                batches = list(ingest.buffer.iter_batches())
                ids = np.concatenate([b.ids for b in batches])
                x = np.concatenate([b.features for b in batches])
                closed.append([task, classes, ids.tolist(), x.tobytes()])
            if len(closed) > before:  # handle returned after the closing message: the checkpoint
                closed[-1].append(dict(ingest.positions_))
    holdout = {t: ingest.buffer.holdout(t) for t in ingest.buffer.holdout_tasks}
    values = {  # every series but clock readings; of timings, how many there were
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith(("_created", "_sum", "_bucket", "timestamp_seconds", "start_time_seconds"))
    }
    return {
        "closed": closed,
        "open": (ingest.buffer.task_, [b.ids.tolist() for b in ingest.buffer.iter_batches()]),
        "holdout": {t: (h.ids.tolist(), h.labels.tolist(), h.features.tobytes()) for t, h in holdout.items()},
        "positions": ingest.positions_,
        "dead": dead,
        "metrics": values,
    }


def _message_by_message(ingest: Ingest) -> None:
    ingest._all_train = lambda chunk, decoded: False  # type: ignore[method-assign]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    noise=st.booleans(),
    late=st.booleans(),
    bad=st.booleans(),
    markers=st.booleans(),
    poll=st.sampled_from([1, 7, 50, 500]),
)
def test_the_fast_path_routes_every_record_as_message_by_message(
    seed: int, noise: bool, late: bool, bad: bool, markers: bool, poll: int
) -> None:
    messages = _stream(np.random.default_rng(seed), noise=noise, late=late, bad=bad, markers=markers)
    expected = _run(messages, poll, _message_by_message)
    got = _run(messages, poll)
    assert got == expected
    tasks = [task for task, *_ in got["closed"]]
    if markers:  # the last task's end marker closes it
        assert tasks == [0, 1, 2] and got["open"] == (None, [])
    else:  # the last task stays open: nothing closed it
        assert tasks == [0, 1] and got["open"][0] == 2
    assert got["positions"] == {0: len(messages)}


def test_the_fast_path_is_taken_and_noise_late_and_bad_records_are_routed() -> None:
    messages = _stream(np.random.default_rng(0), noise=True, late=True, bad=True, markers=False)
    calls = collections.Counter()

    def count(ingest: Ingest) -> None:
        fast, slow = ingest._all_train, ingest._message

        def all_train(chunk: Any, decoded: Any) -> bool:
            taken = fast(chunk, decoded)
            calls["fast" if taken else "refused"] += len(chunk) if taken else 0
            return taken

        def message(msg: Any, decoded: Any, seconds: float) -> Any:
            calls["slow"] += 1
            return slow(msg, decoded, seconds)

        ingest._all_train = all_train  # type: ignore[method-assign]
        ingest._message = message  # type: ignore[method-assign]

    got = _run(messages, 100, count)
    assert calls["fast"] + calls["slow"] == len(messages)
    assert calls["slow"] < len(messages) / 4  # most messages take the fast path
    reasons = collections.Counter(reason for reason, _ in got["dead"])
    assert reasons["unconfirmed_class"] == 2  # the noisy label of tasks 1 and 2
    assert sum(v for k, v in got["metrics"].items() if k[0] == "spacenet_messages_rejected_total") == sum(
        reasons[r.value] for r in wire.RejectReason
    )
    assert got["metrics"][("spacenet_records_routed_total", (("outcome", "late"),))] == 1


@pytest.mark.parametrize("poll", [3, 1000])
def test_a_closed_task_hands_back_the_rest_of_its_chunk(poll: int) -> None:
    messages = _stream(np.random.default_rng(1), noise=False, late=False, bad=False, markers=True)
    got = _run(messages, poll)
    # handle() returned right after each end marker's message, for the caller to checkpoint.
    ends = [m.offset for m in messages if dict(m.headers).get(wire.MARKER_HEADER) == b"task-end"]
    assert [positions[0] for *_, positions in got["closed"]] == [end + 1 for end in ends]
