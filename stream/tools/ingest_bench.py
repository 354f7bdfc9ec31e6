"""``spacenet ingest-bench``: our ingest path against a plain kafka-python consumer loop.

Produces split MNIST (or its first ``--records``) into a fresh topic (without task markers
unless ``--markers``: boundaries are detected, as in the demo), then reads the whole topic
``--repeats`` times with each of two loops, alternating which goes first:

* **plain**: poll, and touch each value (its length and last byte); the floor any consumer
  written with kafka-python pays.
* **ours**: the same loop, handing each poll to the service's own ingest path
  (``stream/ingest.py``, configured as ``spacenet serve`` is by default): decode with full
  validation of every message, boundary detection, routing into the ``TaskBuffer`` with its
  held-out samples (spill folder in a temporary dir). Only training is left out: where the
  service would train a closed task, the buffer is just cleared.

Both loops use one and the same consumer configuration, ``CONSUMER_CONFIG``: the one
``spacenet serve`` gives its training consumer (fetch sizes, poll size, no auto commit) and
kafka-python's defaults for everything else, record CRC checks included (cheap with the
``crc32c`` C extension; ``--no-check-crcs`` turns them off in both loops). Each run uses a
fresh consumer group, partitions assigned directly (no group join inside the timing) and
seeked to the start; the clock runs from the first poll until the end offset (read before
the clock starts) has been consumed. One untimed pass of each warms caches first.
Reported: records/s and MB/s (message value bytes / 1e6) from each path's median time, the
ratio ours/plain (target >= 0.8), the same ratio from the process's CPU time (less sensitive
to other load on the host; the broker runs in another process), and the peak RSS of the
process during each path's runs (Linux ``VmHWM``, reset before each run; ``rss_growth_bytes``
is the peak minus the RSS at the run's start) and overall.

    $ spacenet ingest-bench --bootstrap 127.0.0.1:9092 --repeats 3 --out ingest.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from spacenet.strategy.rss import peak_rss_bytes, reset_peak_rss, rss_bytes
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.ingest import Ingest
from spacenet.stream.kafka_config import KafkaSettings, ensure_topics, training_consumer_options
from spacenet.stream.learner import Predictor, build_model
from spacenet.stream.observability.metrics import ServiceMetrics
from spacenet.stream.prequential import Prequential
from spacenet.stream.tools.produce import (
    TOPIC_CONFIGS,
    DatasetError,
    ProduceSummary,
    load_dataset,
    make_producer,
    produce_stream,
)

TARGET_RATIO = 0.8
SHAPE = (1, 28, 28)
_SERVICE = ServiceConfig()
# The consumer settings of both loops: those `spacenet serve` opens its training consumer with,
# and kafka-python's defaults for the rest. CRCs are checked, as by default in the service;
# kafka-python does that in C with the `crc32c` extension installed.
CONSUMER_CONFIG: dict[str, Any] = {**training_consumer_options(_SERVICE), "check_crcs": True}
RUN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Run:
    path: str
    seconds: float
    cpu_seconds: float  # this process's CPU time over the same interval (all its threads)
    messages: int
    records: int
    bytes: int
    rss_start_bytes: int
    peak_rss_bytes: int | None  # None where the peak cannot be reset (not Linux)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds


class PlainSink:
    """Touches each value of a poll's records: its length and last byte."""

    def __init__(self, records_per_topic: int) -> None:
        self.records, self.messages, self.bytes, self.checksum = records_per_topic, 0, 0, 0

    def __call__(self, records: Sequence[Any]) -> None:
        for record in records:
            value = record.value
            self.messages += 1
            self.bytes += len(value)
            if value:
                self.checksum ^= value[-1]


class IngestSink:
    """Our path: the service's own ``Ingest`` (decode and validate every message, detect task
    boundaries, route records into a ``TaskBuffer``), configured as ``spacenet serve`` is by
    default, with its prequential score (``StreamUnit`` scores a sample of the labelled
    records with the served model before they are learned): here by a model of the
    service's shape that knows every class, so every sampled record costs a prediction.
    Where the service would train on a closed task, the sink lets ``Ingest`` go on, which
    clears the buffer."""

    def __init__(
        self,
        topic: str,
        spill_dir: str,
        max_memory_bytes: int,
        scorer: Predictor | None = None,
        prequential_every: int = _SERVICE.prequential_every,
    ) -> None:
        cfg = replace(
            _SERVICE, topic=topic, max_buffer_bytes=max_memory_bytes, prequential_every=prequential_every
        )
        self.registry = CollectorRegistry()
        metrics = ServiceMetrics(self.registry)
        dead_letters = DeadLetters(self._reject, cfg.dead_letter_topic, metrics)
        self.ingest = Ingest.from_config(cfg, metrics, dead_letters, Path(spill_dir), stream="0")
        # The served model (one per process, as in the service: ``measure`` passes the same one
        # to every run); None, or prequential_every 0: no prequential score.
        self.scorer = scorer
        self.prequential: Prequential | None = None
        if scorer is not None and cfg.prequential_every > 0:
            self.prequential = Prequential.from_config(cfg)
            self.ingest.on_labeled = self._score
        self.backlog: collections.deque[Any] = collections.deque()
        self.messages = self.bytes = self.rejected = 0
        self.closed: list[tuple[int, tuple[int, ...]]] = []

    def _score(self, offset: int, features: Any, labels: Any) -> None:
        assert self.prequential is not None and self.scorer is not None
        self.prequential.offer(offset, features, labels, self.scorer)

    def _reject(self, topic: str, **message: Any) -> None:
        self.rejected += 1  # the service sends these to the dead-letter topic

    def __call__(self, records: Sequence[Any]) -> None:
        for record in records:
            self.messages += 1
            self.bytes += len(record.value or b"")
        self.backlog.extend(records)
        while self.backlog:
            self.closed.extend(self.ingest.handle(self.backlog))

    @property
    def records(self) -> int:
        """Records of the messages that decoded (what the service counts as consumed)."""
        return int(
            sum(
                sample.value
                for metric in self.registry.collect()
                if metric.name == "spacenet_records_consumed"
                for sample in metric.samples
                if sample.name == "spacenet_records_consumed_total"
            )
        )


def read_topic(
    settings: KafkaSettings,
    topic: str,
    sink: Callable[[Sequence[Any]], None],
    config: dict[str, Any] = CONSUMER_CONFIG,
) -> tuple[float, float]:
    """Read ``topic`` from the beginning to its current end with a fresh group, handing each
    poll's records of a partition to ``sink``; the wall-clock and process CPU seconds taken."""
    from kafka import KafkaConsumer, TopicPartition

    group = f"spacenet-ingest-bench-{uuid.uuid4().hex[:12]}"
    consumer = KafkaConsumer(**settings.client_kwargs(), group_id=group, **config)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        remaining = {tp for tp in parts if ends[tp] > 0}
        start, cpu_start = time.perf_counter(), time.process_time()
        while remaining:
            for tp, records in consumer.poll(timeout_ms=1000).items():
                sink(records)
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            if time.perf_counter() - start > RUN_TIMEOUT_S:
                raise TimeoutError(
                    f"{topic}: still {len(remaining)} partitions short after {RUN_TIMEOUT_S} s"
                )
        return time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        consumer.close(autocommit=False)


def measure(
    settings: KafkaSettings,
    topic: str,
    records: int,
    repeats: int,
    max_memory_bytes: int,
    config: dict[str, Any] = CONSUMER_CONFIG,
    prequential_every: int = _SERVICE.prequential_every,
) -> dict[str, list[Run]]:
    """``repeats`` timed runs of each path after one untimed warm-up run of each."""
    runs: dict[str, list[Run]] = {"plain": [], "ours": []}
    scorer = None  # a model of the service's shape that knows every class: each sampled record costs one
    if prequential_every > 0:
        scorer = Predictor(build_model(_SERVICE), torch.arange(_SERVICE.num_outputs), None, {}, version=0)
    with tempfile.TemporaryDirectory(prefix="spacenet-ingest-bench-") as spill:

        def one(path: str) -> Run:
            sink: PlainSink | IngestSink = (
                PlainSink(records)
                if path == "plain"
                else IngestSink(topic, spill, max_memory_bytes, scorer, prequential_every)
            )
            gc.collect()
            resettable = reset_peak_rss()
            rss_start = rss_bytes() or 0
            seconds, cpu_seconds = read_topic(settings, topic, sink, config)
            peak = peak_rss_bytes() if resettable else None
            if isinstance(sink, IngestSink):
                if sink.rejected or sink.records != records:
                    raise RuntimeError(
                        f"ours read {sink.records} of {records} records, {sink.rejected} rejected"
                    )
                if sink.prequential is not None and not sink.prequential.scored:
                    raise RuntimeError("ours scored no record prequentially: the comparison would flatter it")
                sink.ingest.buffer.clear()
            return Run(path, seconds, cpu_seconds, sink.messages, sink.records, sink.bytes, rss_start, peak)

        one("plain")  # warm-up, not reported
        one("ours")
        for r in range(repeats):
            for path in ("plain", "ours") if r % 2 == 0 else ("ours", "plain"):
                runs[path].append(one(path))
    return runs


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    seconds = statistics.median(r.seconds for r in runs)
    records, nbytes = runs[0].records, runs[0].bytes
    peaks = [r.peak_rss_bytes for r in runs if r.peak_rss_bytes is not None]
    growth = [r.peak_rss_bytes - r.rss_start_bytes for r in runs if r.peak_rss_bytes is not None]
    return {
        "records_per_s": records / seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
        "median_seconds": seconds,
        "median_cpu_seconds": statistics.median(r.cpu_seconds for r in runs),
        "peak_rss_bytes": max(peaks) if peaks else None,
        "rss_growth_bytes": max(growth) if growth else None,  # peak minus RSS at the run's start
        "runs": [{**asdict(r), "records_per_s": r.records_per_s, "mb_per_s": r.mb_per_s} for r in runs],
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spacenet ingest-bench",
        description="Measure our ingest path (decode, validate, TaskBuffer) against plain kafka-python.",
    )
    p.add_argument("--bootstrap", help="host:port[,...] (default: $SPACENET_BOOTSTRAP, else 127.0.0.1:9092)")
    p.add_argument("--topic", help="a topic that does not exist yet (default: a fresh random name)")
    p.add_argument("--records", type=int, default=60_000, help="the first N split-MNIST training records")
    p.add_argument("--records-per-message", type=int, default=64)
    p.add_argument(
        "--markers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="produce explicit task markers (default: no, boundaries are detected, as in the demo)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--data-root", help="dataset root (default: $SPACENET_DATA or the user cache)")
    p.add_argument("--max-memory-mb", type=float, default=256, help="TaskBuffer memory before it spills")
    p.add_argument(
        "--prequential-every",
        type=int,
        default=_SERVICE.prequential_every,
        help="ours scores a sample of every Nth message as the service does (0: off; default: the service's)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to reach the broker")
    p.add_argument(
        "--check-crcs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="verify record CRCs in both loops (default: yes, as the service does)",
    )
    return p


def _fail(message: str) -> int:
    print(f"spacenet ingest-bench: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

    if args.records < 1 or args.repeats < 1:
        return _fail("--records and --repeats must be at least 1")
    timeout_ms = max(1, int(args.timeout * 1000))
    topic = args.topic or f"spacenet-ingest-bench-{uuid.uuid4().hex[:12]}"
    try:
        settings = KafkaSettings.from_env(bootstrap=args.bootstrap, bootstrap_timeout_ms=timeout_ms)
        features, labels, _ = load_dataset("split_mnist", data_root=args.data_root)
        features, labels = features[: args.records], labels[: args.records]
        if topic not in ensure_topics(settings, [topic], configs=TOPIC_CONFIGS):
            return _fail(f"topic {topic!r} exists already; the benchmark needs a fresh one")
        producer = make_producer(settings, timeout_ms)
    except (ValueError, DatasetError) as e:
        return _fail(str(e))
    except (KafkaTimeoutError, KafkaConnectionError) as e:
        return _fail(f"no Kafka broker reachable at {settings.bootstrap} within {args.timeout:g} s ({e})")
    except KafkaError as e:
        return _fail(f"cannot create topic {topic!r}: {e}")
    try:
        produced = produce_stream(
            producer,
            topic,
            features,
            labels,
            records_per_message=args.records_per_message,
            markers=args.markers,
        )
    finally:
        producer.close(timeout=10)
    del features, labels
    print(produced.describe())
    config = {**CONSUMER_CONFIG, "check_crcs": args.check_crcs}
    runs = measure(
        settings,
        topic,
        produced.records,
        args.repeats,
        int(args.max_memory_mb * 2**20),
        config,
        args.prequential_every,
    )
    report = _report(args, settings, topic, produced, config, runs)
    print(_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _report(
    args: argparse.Namespace,
    settings: KafkaSettings,
    topic: str,
    produced: ProduceSummary,
    config: dict[str, Any],
    runs: Any,
) -> dict[str, Any]:
    from kafka import __version__ as kafka_version
    from kafka.record import util as record_util

    plain, ours = summarize(runs["plain"]), summarize(runs["ours"])
    ratio = ours["records_per_s"] / plain["records_per_s"]
    # The same ratio from CPU time: what our code adds, less sensitive to other load on the host.
    cpu_ratio = plain["median_cpu_seconds"] / ours["median_cpu_seconds"]
    return {
        "bootstrap": settings.bootstrap,
        "topic": topic,
        "records": produced.records,
        "messages": produced.messages,
        "bytes": produced.bytes,
        "records_per_message": args.records_per_message,
        "repeats": args.repeats,
        "prequential_every": args.prequential_every,  # ours scores a sample as the service does (0: off)
        "produce_seconds": produced.seconds,
        "consumer_config": {  # both loops; an assignor by its protocol name
            k: [a.name for a in v] if k == "partition_assignment_strategy" else v for k, v in config.items()
        },
        "plain": plain,
        "ours": ours,
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        # ru_maxrss, not VmHWM: each run resets VmHWM, never the lifetime peak
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "python": platform.python_version(),
        "kafka_python": kafka_version,
        # without the optional `crc32c` C extension kafka-python computes CRC32C in pure Python
        "crc32c_extension": getattr(record_util, "crc32c_c", None) is not None,
        "host": platform.node(),
    }


def _table(report: dict[str, Any]) -> str:
    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.0f} MiB"

    head = ("path", "records/s", "MB/s", "median s", "CPU s", "peak RSS", "growth")
    rows = [
        " ".join(f"{h:{w}}" for h, w in zip(head, ("<6", ">12", ">8", ">9", ">7", ">10", ">9"), strict=True))
    ]
    for path in ("plain", "ours"):
        r = report[path]
        rows.append(
            f"{path:<6} {r['records_per_s']:>12,.0f} {r['mb_per_s']:>8.1f} {r['median_seconds']:>9.3f} "
            f"{r['median_cpu_seconds']:>7.3f} {mib(r['peak_rss_bytes']):>10} {mib(r['rss_growth_bytes']):>9}"
        )
    verdict = "meets" if report["meets_target"] else "BELOW"
    rows.append(f"ratio ours/plain: {report['ratio']:.3f} ({verdict} the {report['target_ratio']} target)")
    rows.append(f"same ratio in process CPU time: {report['cpu_ratio']:.3f}")
    crcs = "checked" if report["consumer_config"]["check_crcs"] else "NOT checked"
    native = "C extension" if report["crc32c_extension"] else "pure Python: no crc32c extension"
    rows.append(f"record CRCs {crcs} in both loops (CRC32C: {native})")
    rows.append(f"process peak RSS: {mib(report['process_peak_rss_bytes'])}")
    return "\n".join(rows)
