"""Fault injection against the real broker (issue 7): the service is crashed, starved,
flooded with poison, run out of capacity and of disk, and its broker is restarted under
it; each test checks that it recovers without losing or re-learning anything.

Crashes use ``SPACENET_CRASH_AT=<point>[:<n>]`` (``stream/faults.py``): the process
dies with ``os._exit(137)`` at the n-th time it reaches the point, as abruptly as
SIGKILL. Those tests run ``spacenet serve`` as child processes with the same state dir
and group across runs, and ``session_timeout_ms=10000`` so that a restarted run gets
the dead run's partitions after about 10 s (mostly hidden by the interpreter start-up).
The other tests run the service in a thread (``ServiceThread``). A broker restart needs
a broker of its own (``LocalKafka.start(keep_data=True)``), not the session's.

Exactly-once learning is judged on the models topic (every task learned once, in order:
one model version each, adding that task's classes) and on counts that only match when
no record was lost, duplicated or trained twice: the records the last run consumed plus
those its checkpoint carried equal the records of the tasks it learned, and its optimizer
steps equal ``EPOCHS * ceil(training records / BATCH)`` summed over those tasks.

Recovery times (restart to the first model the new run publishes, broker restart to
lag 0, repaired disk to a committed checkpoint) are printed at the end of the module
(run with ``-s``); no test asserts a duration.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from spacenet.stream import wire
from spacenet.stream.changelog import Manifest, live_view
from spacenet.stream.checkpoint import CheckpointStore
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import REASON_HEADER, SOURCE_HEADER
from spacenet.stream.faults import ENV as CRASH_ENV
from spacenet.stream.predict import MODEL_VERSION_HEADER
from spacenet.stream.records import unpack
from spacenet.stream.tools import local_kafka
from tests.support import REPO_ROOT, poison
from tests.support.service import (
    FAST_SETTINGS,
    TAKEN_ON,
    Message,
    Samples,
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
    read_topic,
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
TASKS = [[0, 1], [2, 3], [4, 5]]
PER_CLASS = 150
PER_MESSAGE = 25
RECORDS = len(TASKS) * 2 * PER_CLASS
CRASHED = 137  # os._exit(137) in stream/faults.py
ACCURACY_TOLERANCE = 0.05  # held-out accuracy after a crash vs. the uninterrupted run
RULES = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "rules" / "spacenet.yml").read_text())
RULE_TESTS = REPO_ROOT / "deploy" / "prometheus" / "tests" / "spacenet_test.yml"


# ------------------------------------------------------------------------------ helpers
@dataclass
class Recoveries:
    """Recovery times measured by the tests, printed when the module ends."""

    seconds: dict[str, float] = field(default_factory=dict)

    def record(self, what: str, seconds: float) -> None:
        self.seconds[what] = seconds
        print(f"recovery: {what}: {seconds:.1f}s")


@pytest.fixture(scope="module")
def recoveries() -> Iterator[Recoveries]:
    found = Recoveries()
    yield found
    if found.seconds:
        lines = "\n".join(f"  {what}: {s:.1f}s" for what, s in found.seconds.items())
        worst = max(found.seconds.items(), key=lambda item: item[1])
        print(f"\nrecovery times:\n{lines}\n  worst: {worst[0]} ({worst[1]:.1f}s)")


@pytest.fixture(scope="module")
def producer(kafka_bootstrap: str) -> Iterator[Any]:
    p = make_producer(kafka_bootstrap)
    yield p
    p.close(timeout=10)


def clean_stream(seed: int = 0) -> list[Message]:
    """Three tasks of two classes, ``PER_CLASS`` records each, no markers."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([shuffled_task(c, PER_CLASS, rng) for c in TASKS])
    return chunk(synthetic_images(labels, seed), labels, per_message=PER_MESSAGE)


def learned_tasks(events: Sequence[dict[str, Any]]) -> list[list[int]]:
    return [sorted(e["new_classes"]) for e in events]


def steps_for(events: Sequence[dict[str, Any]], tasks: Sequence[int], records: int = 2 * PER_CLASS) -> int:
    """Optimizer steps to learn ``tasks`` (of ``records`` records each) on all their records
    but the held-out sample, once per epoch."""
    held_out = events[-1]["accuracy"]["n_samples"][-1]
    return sum(EPOCHS * math.ceil((records - held_out[j]) / BATCH) for j in tasks)


def value(metrics: Samples, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def carried(checkpoint: Mapping[str, Any], tasks: Sequence[int]) -> int:
    """Records a checkpoint holds that were observed but not learned: pending, the open
    task's, and the held-out samples of ``tasks`` (those not learned yet)."""
    held_out = [checkpoint["holdout"][str(t)] for t in tasks if str(t) in checkpoint["holdout"]]
    return sum(len(unpack(p)) for p in (checkpoint["pending"], checkpoint["open_records"], *held_out))


def avalanche_import_bytes() -> int:
    """Resident memory that importing Avalanche adds to a process that has imported torch (the
    service does it when it first trains), measured in a fresh interpreter."""
    code = (
        "import psutil, torch; p = psutil.Process(); a = p.memory_info().rss; "
        "import avalanche.training; print(p.memory_info().rss - a)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def diagonal(event: Mapping[str, Any]) -> list[float]:
    matrix = event["accuracy"]["accuracy"]
    return [matrix[j][j] for j in range(len(matrix))]


def training_assigned(run: ServiceProcess, topic: str, timeout_s: float = 90) -> bool:
    """Whether ``run`` took its stream on (or exited first)."""
    try:
        eventually(lambda: TAKEN_ON in run.log_text(), timeout_s, "assignment", lambda: run.alive)
    except AssertionError:  # it exited (crashed) before the line was seen
        return True
    except TimeoutError:
        return False
    return True


def crash_run(settings: Mapping[str, str], log: Path, crash_at: str, timeout_s: float = 240) -> None:
    """Run ``spacenet serve`` with ``SPACENET_CRASH_AT=crash_at`` until it crashes there.

    Not through ``start_assigned``: the crash may come before both consumers are seen
    assigned. A start whose training consumer got no partition (the kafka-python join
    bug ``start_assigned`` describes) has consumed nothing: it is stopped and made again.
    """
    for _ in range(3):
        run = ServiceProcess(settings, log, env={CRASH_ENV: crash_at}).start()
        assert run.proc is not None
        if not training_assigned(run, settings["topic"]):
            run.stop(signal.SIGTERM)
            continue
        try:
            code = run.proc.wait(timeout=timeout_s)
        finally:
            if run.alive:
                run.stop(signal.SIGKILL)
        assert code == CRASHED, f"expected the crash at {crash_at}, exit {code}:\n{run.log_tail()}"
        return
    raise AssertionError("the service got no partition assignment in 3 starts")


def latest_checkpoint(state: Path) -> tuple[int, dict[str, Any], CheckpointStore]:
    store = CheckpointStore(state / "checkpoints" / "partition-0")
    found = store.latest()
    assert found is not None, "no complete checkpoint"
    return found[0], found[1], store


@dataclass
class Finished:
    """What the last (uncrashed) run of a crash scenario did."""

    events: list[dict[str, Any]]
    metrics: Samples
    first_model_s: float  # from its start to the first model it published


def finish_run(
    settings: Mapping[str, str], log: Path, models: TopicFollower, published_before: int
) -> Finished:
    """Start the service without a crash point and let it learn every task."""
    started = time.monotonic()
    with start_assigned(lambda: ServiceProcess(settings, log)) as run:
        models.wait_until(
            lambda m: len(m) > published_before, 240, lambda: run.alive, "the first model of the last run"
        )
        first_model_s = time.monotonic() - started
        wait_for_models(models, len(TASKS), run, timeout_s=240)
        metrics = run.metrics()
        assert run.stop(signal.SIGTERM) == 0, run.log_tail()
    models.poll(timeout_ms=1000)  # anything published twice would show here
    return Finished(model_events(models.messages), metrics, first_model_s)


# --------------------------------------------------------------- the uninterrupted run
@pytest.fixture(scope="module")
def reference(kafka_bootstrap: str, producer: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The model events of an uninterrupted run over ``clean_stream()``, same settings."""
    topic = unique_name("fault-ref")
    create_topics(kafka_bootstrap, topic)
    torch.manual_seed(0)
    settings = service_settings(topic, kafka_bootstrap, tmp_path_factory.mktemp("ref"))
    svc = start_assigned(lambda: ServiceThread(settings))
    try:
        with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
            send_all(producer, topic, clean_stream())
            return wait_for_models(models, len(TASKS), svc, timeout_s=180)
    finally:
        svc.stop()


def assert_matches_reference(events: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    assert learned_tasks(events) == learned_tasks(reference) == TASKS
    assert [e["model_version"] for e in events] == [1, 2, 3]
    assert [e["tasks_learned"] for e in events] == [1, 2, 3]
    assert events[-1]["accuracy"]["n_samples"] == reference[-1]["accuracy"]["n_samples"]
    assert diagonal(events[-1]) == pytest.approx(diagonal(reference[-1]), abs=ACCURACY_TOLERANCE)


def assert_replayed_exactly(
    done: Finished, topic: str, checkpoint: Mapping[str, Any], position: int, tasks: Sequence[int]
) -> None:
    """The last run resumed from ``checkpoint`` (at message ``position``) and learned ``tasks``
    from exactly their records: none skipped, none twice."""
    consumed = value(done.metrics, "spacenet_records_consumed_total", topic=topic, partition="0")
    assert consumed == RECORDS - PER_MESSAGE * position
    assert consumed + carried(checkpoint, tasks) == len(tasks) * 2 * PER_CLASS
    routed = [value(done.metrics, "spacenet_records_routed_total", outcome=o) for o in ("late", "noise")]
    assert routed == [0, 0]
    assert value(done.metrics, "spacenet_training_steps_total") == steps_for(done.events, tasks)


# ------------------------------------------------------------------------------ crashes
@pytest.mark.timeout(600)
def test_crash_while_buffering_then_while_training_learns_every_task_once(
    kafka_bootstrap: str, producer: Any, tmp_path: Path, reference: list[Any], recoveries: Recoveries
) -> None:
    """Run 1 learns task 0 and dies at its 18th message (buffering task 1); run 2 replays
    from the checkpoint and dies at the 5th training step of task 1; run 3 finishes."""
    topic = unique_name("crash-train")
    create_topics(kafka_bootstrap, topic)
    state = tmp_path / "state"
    settings = service_settings(topic, kafka_bootstrap, state, session_timeout_ms=10_000)
    send_all(producer, topic, clean_stream())
    with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
        crash_run(settings, tmp_path / "run1.log", "buffering:18")
        version, ck, _ = latest_checkpoint(state)
        position = int(ck["positions"]["0"])
        assert version == 1 and ck["open_task"] == 1 and position < 18
        assert committed_offset(kafka_bootstrap, settings["group"], topic) == position
        models.wait_until(lambda m: len(m) >= 1, 30, what="model 1")
        assert learned_tasks(model_events(models.messages)) == TASKS[:1]

        crash_run(settings, tmp_path / "run2.log", "training:5")
        assert latest_checkpoint(state)[0] == 1, "a crash inside training must leave no checkpoint"
        assert committed_offset(kafka_bootstrap, settings["group"], topic) == position

        done = finish_run(settings, tmp_path / "run3.log", models, published_before=1)
    recoveries.record("crash while training: restart to next model", done.first_model_s)
    assert_matches_reference(done.events, reference)
    assert_replayed_exactly(done, topic, ck, position, tasks=[1, 2])
    assert committed_offset(kafka_bootstrap, settings["group"], topic) == RECORDS // PER_MESSAGE


@pytest.mark.timeout(600)
def test_crash_during_and_after_a_checkpoint_write_learns_every_task_once(
    kafka_bootstrap: str, producer: Any, tmp_path: Path, reference: list[Any], recoveries: Recoveries
) -> None:
    """Run 1 dies half-way through writing checkpoint 2 to the changelog (task 1 learned; its
    chunks are on the topic, its manifest is not). Run 2 must resume from checkpoint 1,
    learn task 1 again and die right after writing checkpoint 2, before committing; that
    write leaves one current checkpoint (the torn one's chunks deleted). Run 3 resumes from
    checkpoint 2, publishes model 2 (which run 2 never announced) and learns task 2."""
    topic = unique_name("crash-ckpt")
    create_topics(kafka_bootstrap, topic)
    state = tmp_path / "state"
    settings = service_settings(topic, kafka_bootstrap, state, session_timeout_ms=10_000)
    changelog = ServiceConfig(topic=topic).changelog_topic
    send_all(producer, topic, clean_stream())
    with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
        crash_run(settings, tmp_path / "run1.log", "changelog_mid_write:2")
        version, ck1, store = latest_checkpoint(state)
        position1 = int(ck1["positions"]["0"])
        assert version == 1 and store.versions() == [1]  # the cache is written after the changelog
        live = live_view(read_topic(kafka_bootstrap, changelog))
        torn = sorted(k for k in live if k.startswith(b"0/2/"))
        assert torn and Manifest.decode(live[b"0"]).seq == 1

        crash_run(settings, tmp_path / "run2.log", "after_checkpoint:1")
        assert f"taken on at offset {position1} (model version 1" in (tmp_path / "run2.log").read_text()
        version, ck2, _ = latest_checkpoint(state)
        position2 = int(ck2["positions"]["0"])
        assert version == 2 and position2 > position1
        assert committed_offset(kafka_bootstrap, settings["group"], topic) == position1
        live = live_view(read_topic(kafka_bootstrap, changelog))
        manifest = Manifest.decode(live[b"0"])
        assert (manifest.seq, manifest.model_version) == (2, 2)
        assert sorted(live) == sorted([b"0", *manifest.chunk_keys()])
        models.wait_until(lambda m: len(m) >= 1, 30, what="model 1")
        assert learned_tasks(model_events(models.messages)) == TASKS[:1]

        done = finish_run(settings, tmp_path / "run3.log", models, published_before=1)
    assert f"taken on at offset {position2} (model version 2" in (tmp_path / "run3.log").read_text()
    recoveries.record("crash after checkpoint: restart to model announced", done.first_model_s)
    assert_matches_reference(done.events, reference)
    assert_replayed_exactly(done, topic, ck2, position2, tasks=[2])
    assert committed_offset(kafka_bootstrap, settings["group"], topic) == RECORDS // PER_MESSAGE


# ------------------------------------------------------------------------ broker restart
@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Any]:
    """A broker for one test, which it may stop and start again (same port, same data)."""
    broker = local_kafka.LocalKafka(tmp_path / "broker")
    try:
        broker.start()
        yield broker
    finally:
        if broker.running_pid() is not None:
            broker.stop()


def restart_broker(broker: Any, down_s: float) -> float:
    """Stop the broker, leave it down ``down_s`` seconds, start it on its data; returns the
    monotonic time it serves again."""
    broker.stop()
    time.sleep(down_s)
    broker.start(keep_data=True)
    return time.monotonic()


def prediction_requests(n: int, seed: int) -> list[Message]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=(n, 5))
    return [
        Message(wire.encode(synthetic_images(y, seed + i), y), f"req-{i}".encode(), records=len(y))
        for i, y in enumerate(labels)
    ]


@pytest.mark.timeout(420)
def test_broker_restarts_while_consuming_and_while_predicting_lose_nothing(
    own_broker: Any, tmp_path: Path, recoveries: Recoveries
) -> None:
    """The broker goes down (SIGTERM, then a restart on the same data and port) twice:
    right after the first 18 messages are acknowledged, while the service consumes and
    trains them, for 15 s (longer than the 6 s idle timeout: an unreachable broker is not an
    idle stream, so no task may close by timeout; the rest of the stream follows as soon as
    the broker is back); and right after 60 prediction requests
    are acknowledged, while it answers them (60 more are sent while it is down), for 3 s.
    Tasks close at their 300th record; the service must reconnect, learn every task once,
    answer every request once and get its consumer lag back to 0."""
    bootstrap = f"127.0.0.1:{own_broker.port}"
    topic = unique_name("broker-restart")
    create_topics(bootstrap, topic)
    torch.manual_seed(0)
    settings = service_settings(topic, bootstrap, tmp_path / "state", idle_timeout_s=6, max_task_records=300)
    messages, requests = clean_stream(seed=11), prediction_requests(120, seed=12)
    producer = make_producer(bootstrap)
    svc = start_assigned(lambda: ServiceThread(settings))
    try:

        def lag() -> float | None:
            return svc.sample("spacenet_consumer_lag_messages", topic=topic, partition="0")

        def consumed() -> float:
            return svc.sample("spacenet_records_consumed_total", topic=topic, partition="0") or 0.0

        with TopicFollower(bootstrap, models_topic(topic)) as models:
            send_all(producer, topic, messages[:18])
            back = restart_broker(own_broker, down_s=15)
            send_all(producer, topic, messages[18:])  # the stream goes on once the broker is back
            events = wait_for_models(models, len(TASKS), svc, timeout_s=180)
            eventually(lambda: lag() == 0, 120, "consumer lag 0", lambda: svc.alive)
            recoveries.record(
                "broker restart while consuming: to every task learned and lag 0", time.monotonic() - back
            )
            with TopicFollower(bootstrap, f"{topic}.predictions") as replies:
                send_all(producer, f"{topic}.requests", requests[:60])
                own_broker.stop()
                for r in requests[60:]:  # buffered by the producer while the broker is down
                    producer.send(f"{topic}.requests", value=r.value, key=r.key, partition=0)
                time.sleep(3)
                own_broker.start(keep_data=True)
                back = time.monotonic()
                producer.flush(timeout=60)
                replies.wait_until(lambda m: len(m) >= len(requests), 180, lambda: svc.alive, "every reply")
                recoveries.record("broker restart while predicting: to all replies", time.monotonic() - back)
                replies.poll(timeout_ms=2000)  # a reply sent twice would show here
            eventually(lambda: lag() == 0, 120, "consumer lag 0", lambda: svc.alive)
        assert learned_tasks(events) == TASKS
        assert [e["model_version"] for e in events] == [1, 2, 3]
        assert consumed() == RECORDS
        assert svc.sample("spacenet_task_boundaries_total", reason="record_limit") == len(TASKS)
        assert svc.sample("spacenet_task_boundaries_total", reason="timeout") == 0, "the outage closed a task"
        assert svc.sample("spacenet_training_steps_total") == steps_for(events, [0, 1, 2])
        keys = sorted(m.key for m in replies.messages)
        assert keys == sorted(r.key for r in requests), "every request answered exactly once"
        assert committed_offset(bootstrap, settings["group"], topic) == len(messages)
    finally:
        producer.close(timeout=10)
        svc.stop()


# ------------------------------------------------------------------------ stalled stream
@pytest.mark.timeout(300)
def test_a_stalled_stream_closes_its_task_and_a_slow_one_resumes_it(
    kafka_bootstrap: str, producer: Any, tmp_path: Path
) -> None:
    """Task 0 arrives, then nothing for 4x the idle timeout (3 s): the timeout closes and
    learns it, and the silence after that opens nothing. Task 1 then trickles in, one
    message of 50 records a second (slower than the stream so far, faster than the
    timeout): it is learned as one task from all its records, closed by the next timeout."""
    topic = unique_name("stall")
    create_topics(kafka_bootstrap, topic)
    torch.manual_seed(0)
    idle_s = float(FAST_SETTINGS["idle_timeout_s"])
    svc = start_assigned(lambda: ServiceThread(service_settings(topic, kafka_bootstrap, tmp_path / "state")))
    rng = np.random.default_rng(13)
    task0, task1 = (shuffled_task(c, PER_CLASS, rng) for c in TASKS[:2])
    try:

        def boundaries(reason: str) -> float:
            return svc.sample("spacenet_task_boundaries_total", reason=reason) or 0.0

        with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
            send_all(producer, topic, chunk(synthetic_images(task0, 13), task0))
            wait_for_models(models, 1, svc, timeout_s=120)
            assert boundaries("timeout") == 1
            time.sleep(4 * idle_s)
            models.poll()
            assert len(models.messages) == 1 and boundaries("timeout") == 1, "the silence opened a task"
            assert svc.sample("spacenet_current_task", stream="0") == 0

            slow = chunk(synthetic_images(task1, 14), task1, per_message=50, start=len(task0))
            for message in slow:
                send_all(producer, topic, [message])
                time.sleep(idle_s / 3)
            events = wait_for_models(models, 2, svc, timeout_s=120)
        assert learned_tasks(events) == TASKS[:2]
        assert boundaries("timeout") == 2 and boundaries("new_class") == 2
        assert svc.sample("spacenet_records_consumed_total", topic=topic, partition="0") == 4 * PER_CLASS
        assert svc.sample("spacenet_training_steps_total") == steps_for(events, [0, 1])
        assert diagonal(events[-1]) == pytest.approx([1.0, 1.0], abs=0.1)
    finally:
        svc.stop()


# -------------------------------------------------------------------------- poison input
@pytest.mark.timeout(420)
def test_poison_at_volume_is_dead_lettered_while_the_good_stream_is_learned(
    kafka_bootstrap: str, producer: Any, tmp_path: Path
) -> None:
    """400 malformed messages (``poison_batch``, numpy seed 9: every reject reason but
    label_out_of_range, which this service has no limit for) at random places in a good
    stream of two tasks (24 messages). Every bad one must reach the dead-letter topic with
    its reason and source, every good record must be learned, and the process must stay
    up with its resident memory bounded (read from its own /metrics)."""
    topic = unique_name("poison")
    create_topics(kafka_bootstrap, topic)
    settings = service_settings(
        topic, kafka_bootstrap, tmp_path / "state", max_message_bytes=60_000, max_records_per_message=100
    )
    rng = np.random.default_rng(9)
    labels = np.concatenate([shuffled_task(c, PER_CLASS, rng) for c in TASKS[:2]])
    good = chunk(synthetic_images(labels, 9), labels, per_message=PER_MESSAGE)
    bad = poison.poison_batch(rng, 400, max_message_bytes=60_000, max_records=100)
    slots = np.sort(rng.choice(len(good) + len(bad), size=len(good), replace=False))
    messages: list[Message] = list(bad)
    for slot, message in zip(slots.tolist(), good, strict=True):
        messages.insert(slot, message)
    assert [m for m in messages if m.kind == "good"] == good

    def serve() -> ServiceProcess:
        return ServiceProcess(settings, tmp_path / "serve.log")

    with TopicFollower(kafka_bootstrap, models_topic(topic)) as models, start_assigned(serve) as run:
        rss_start = run.wait_for_sample("process_resident_memory_bytes", lambda v: v > 0)
        offsets = send_all(producer, topic, messages)
        events = wait_for_models(models, 2, run, timeout_s=240)
        with TopicFollower(kafka_bootstrap, f"{topic}.dlq") as dlq:
            dlq.wait_until(lambda m: len(m) >= len(bad), 120, lambda: run.alive, "every bad message")
            dlq.poll(timeout_ms=1000)
        metrics = run.metrics()
        rss_end = value(metrics, "process_resident_memory_bytes")
        assert run.alive
        assert run.stop(signal.SIGTERM) == 0, run.log_tail()
    print(
        f"poison: {len(bad)} bad messages among {len(good)} good; RSS {rss_start / 2**20:.0f} MiB at start, "
        f"{rss_end / 2**20:.0f} MiB at the end"
    )

    assert learned_tasks(events) == TASKS[:2]
    assert diagonal(events[-1]) == pytest.approx([1.0, 1.0], abs=0.1)
    assert value(metrics, "spacenet_records_consumed_total", topic=topic, partition="0") == len(labels)
    assert value(metrics, "spacenet_training_steps_total") == steps_for(events, [0, 1])
    sent = {
        f"{topic}:0:{off}".encode(): m for m, off in zip(messages, offsets, strict=True) if m.kind != "good"
    }
    assert len(dlq.messages) == len(sent)
    for letter in dlq.messages:
        message = sent.pop(header(letter, SOURCE_HEADER) or b"")
        assert header(letter, REASON_HEADER) == message.kind.encode()
        assert letter.key == message.key and letter.value == message.value
    assert not sent
    kinds = Counter(m.kind for m in bad)
    for kind, n in kinds.items():
        assert value(metrics, "spacenet_messages_rejected_total", reason=kind) == n, kind
    assert value(metrics, "spacenet_messages_rejected_total", reason="other") == 0
    # Generous: the process holds torch and a small model (a few hundred MiB) and, from its
    # first training on, Avalanche; 400 poison messages of at most ~100 kB must not add more
    # than a fraction of that.
    assert rss_end < 4 * 2**30 and rss_end - rss_start - avalanche_import_bytes() < 256 * 2**20


# ------------------------------------------------------------------- capacity exhaustion
@pytest.mark.timeout(300)
def test_exhausted_capacity_refuses_further_tasks_without_crashing(
    kafka_bootstrap: str, producer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hidden layers of 16 neurons, a task takes 8 and keeps 6: two tasks fit. Of four
    streamed tasks, the last two are refused under ``on_exhausted=error``: their records
    go to the dead-letter topic as ``capacity_exhausted``, an error line and
    ``spacenet_capacity_exhausted_total`` say so, the service keeps running and ready, and
    the first two tasks' model stays the published one. The alert rules cover it."""
    topic = unique_name("capacity")
    create_topics(kafka_bootstrap, topic)
    torch.manual_seed(0)
    settings = service_settings(
        topic,
        kafka_bootstrap,
        tmp_path / "state",
        hidden="16,16",
        n_select=8,
        n_reserve=6,
        on_exhausted="error",
    )
    tasks = [[0, 1], [2, 3], [4, 5], [6, 7]]
    rng = np.random.default_rng(15)
    labels = np.concatenate([shuffled_task(c, 100, rng) for c in tasks])
    svc = start_assigned(lambda: ServiceThread(settings))
    try:
        with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
            send_all(producer, topic, chunk(synthetic_images(labels, 15), labels))

            loop = svc.runtime.loop
            assert loop is not None and 0 in loop.streams
            unit = loop.streams[0].unit
            layers = [*unit.learner.spacenet.layer_names_, "unknown", "other"]

            def refused() -> float:
                counts = (svc.sample("spacenet_capacity_exhausted_total", layer=la) for la in layers)
                return sum(c or 0.0 for c in counts)

            eventually(lambda: refused() == 2, 180, "two refused tasks", lambda: svc.alive)
            eventually(lambda: loop.ready[0], 60, "ready again", lambda: svc.alive)
            models.poll(timeout_ms=1000)
            events = model_events(models.messages)
            with TopicFollower(kafka_bootstrap, f"{topic}.dlq") as dlq:
                dlq.wait_until(lambda m: len(m) >= 2, 60, lambda: svc.alive, "dead letters")
                time.sleep(1)
                dlq.poll(timeout_ms=1000)
        assert learned_tasks(events) == tasks[:2]
        assert svc.sample("spacenet_training_failures_total") == 2
        assert svc.sample("spacenet_tasks_remaining", stream="0") == 0
        assert svc.sample("spacenet_model_version", stream="0") == 2
        assert unit.predictor_ is not None and unit.predictor_.version == 2
        letters = reject_reasons(dlq.messages)
        assert set(letters) == {"capacity_exhausted"}
        # the refused tasks' records, less their held-out samples (kept for evaluation)
        assert 2 * 200 * 0.8 < letters["capacity_exhausted"] <= 2 * 200
        errors = [r.getMessage() for r in caplog.records if "capacity exhausted" in r.getMessage()]
        assert len(errors) == 2 and "task 2" in errors[0] and "task 3" in errors[1], errors
        assert svc.alive
    finally:
        svc.stop()
    alerts = {
        rule["alert"]: rule["expr"] for group in RULES["groups"] for rule in group["rules"] if "alert" in rule
    }
    assert "spacenet_capacity_exhausted_total" in alerts["SpaceNetCapacityExhausted"]
    assert "spacenet_tasks_remaining" in alerts["SpaceNetNoTaskCapacityLeft"]
    assert "SpaceNetCapacityExhausted" in RULE_TESTS.read_text()


# ---------------------------------------------------------------------------- disk full
@pytest.mark.timeout(300)
def test_an_unwritable_checkpoint_dir_keeps_serving_and_commits_nothing_until_repaired(
    kafka_bootstrap: str,
    producer: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    recoveries: Recoveries,
) -> None:
    """After task 0 is checkpointed, the checkpoint dir is replaced by a regular file (a
    chmod would not stop root, which runs these tests). Task 1 is learned but cannot be
    checkpointed: the failure shows in the metric, the log and /readyz; predictions keep
    coming from model 1 and the offsets stay at checkpoint 1. Once the dir is back, the
    next retry checkpoints, commits and publishes model 2."""
    topic = unique_name("disk")
    create_topics(kafka_bootstrap, topic)
    torch.manual_seed(0)
    state = tmp_path / "state"
    settings = service_settings(topic, kafka_bootstrap, state)
    messages = clean_stream(seed=16)
    per_task = 2 * PER_CLASS // PER_MESSAGE
    svc = start_assigned(lambda: ServiceThread(settings))
    try:
        loop = svc.runtime.loop
        assert loop is not None
        with TopicFollower(kafka_bootstrap, models_topic(topic)) as models:
            send_all(producer, topic, messages[:per_task])
            wait_for_models(models, 1, svc, timeout_s=120)
            eventually(
                lambda: committed_offset(kafka_bootstrap, settings["group"], topic) == per_task,
                30,
                "commit 1",
            )
            checkpoints = state / "checkpoints"  # the changelog's local cache: written with it
            checkpoints.rename(state / "checkpoints.saved")
            checkpoints.write_bytes(b"not a directory")

            send_all(producer, topic, messages[per_task : 2 * per_task])
            eventually(
                lambda: (svc.sample("spacenet_checkpoint_failures_total") or 0) >= 1,
                120,
                "a failed checkpoint",
                lambda: svc.alive,
            )
            ready, reason = loop.ready
            assert not ready and "checkpoint failing" in reason
            assert any("offsets stay uncommitted" in r.getMessage() for r in caplog.records)
            assert committed_offset(kafka_bootstrap, settings["group"], topic) == per_task
            models.poll(timeout_ms=1000)
            assert len(models.messages) == 1, "a model was published without its checkpoint"
            with TopicFollower(kafka_bootstrap, f"{topic}.predictions") as replies:
                send_all(producer, f"{topic}.requests", prediction_requests(1, seed=17))
                replies.wait_until(lambda m: len(m) >= 1, 60, lambda: svc.alive, "a reply")
            assert header(replies.messages[0], MODEL_VERSION_HEADER) == b"1"

            checkpoints.unlink()
            (state / "checkpoints.saved").rename(checkpoints)
            repaired = time.monotonic()
            events = wait_for_models(models, 2, svc, timeout_s=120)
            recoveries.record("checkpoint dir repaired: to model 2 published", time.monotonic() - repaired)
        eventually(
            lambda: committed_offset(kafka_bootstrap, settings["group"], topic) == 2 * per_task,
            30,
            "commit 2",
        )
        assert loop.ready == (True, "ok")
        assert learned_tasks(events) == TASKS[:2]
        assert CheckpointStore(checkpoints / "partition-0").versions()[-1] == 2
    finally:
        svc.stop()
