"""`spacenet ingest-bench`: the harness end to end on a small topic, and its ingest sink."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spacenet.stream import wire
from spacenet.stream.config import ServiceConfig
from spacenet.stream.tools.ingest_bench import CONSUMER_CONFIG, IngestSink, PlainSink, _parser, main


def fake_record(offset: int, value: bytes, headers: list[tuple[str, bytes]]) -> SimpleNamespace:
    return SimpleNamespace(topic="t", partition=0, offset=offset, key=None, value=value, headers=headers)


def test_ingest_sink_runs_the_service_ingest_detecting_tasks_without_markers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # two tasks of 600 records: the service's default group window joins classes within 500
    labels = np.concatenate([rng.permutation(np.repeat(pair, 300)) for pair in ([0, 1], [2, 3])])
    images = rng.integers(0, 256, (1200, 1, 28, 28), dtype=np.uint8)
    values = [wire.encode(images[i : i + 20], labels[i : i + 20]) for i in range(0, 1200, 20)]
    values.insert(12, b"not arrow")
    records = [fake_record(i, value, wire.make_headers()) for i, value in enumerate(values)]
    sink = IngestSink("t", str(tmp_path), max_memory_bytes=1 << 20)
    sink(records[:40])  # one poll spanning the task boundary
    assert [(t, sorted(c)) for t, c in sink.closed] == [(0, [0, 1])] and sink.ingest.buffer.task_ == 1
    sink(records[40:])
    assert (sink.messages, sink.records, sink.rejected) == (61, 1200, 1)
    buffer = sink.ingest.buffer
    assert buffer.holdout_tasks == [0, 1] and not len(sink.ingest.pending)
    kept = np.concatenate([b.labels for b in buffer.iter_batches()] + [buffer.holdout(1).labels])
    assert sorted(kept.tolist()) == [2] * 300 + [3] * 300  # task 0's training records were cleared
    ids = np.concatenate([b.ids for b in buffer.iter_batches()] + [buffer.holdout(1).ids])
    assert len(set(ids.tolist())) == 600  # one stable id per record

    plain = PlainSink(1200)
    plain(records)
    assert plain.messages == 61 and plain.bytes == sum(len(v) for v in values)


def test_ingest_bench_harness_writes_both_rates(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ingest.json"
    code = main(["--bootstrap", kafka_bootstrap, "--records", "2000", "--repeats", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "ratio ours/plain" in printed and "records/s" in printed
    report = json.loads(out.read_text())
    assert report["records"] == 2000 and report["records_per_message"] == 64
    assert 32 <= report["messages"] <= 36  # 2000 / 64, rounded up within each of 5 tasks
    for path in ("plain", "ours"):
        stats = report[path]
        assert stats["records_per_s"] > 0 and stats["mb_per_s"] > 0 and stats["median_seconds"] > 0
        assert len(stats["runs"]) == 1 and stats["runs"][0]["records"] == 2000
        assert stats["runs"][0]["messages"] == report["messages"]
    assert report["ratio"] > 0 and report["target_ratio"] == 0.8 and report["cpu_ratio"] > 0
    assert isinstance(report["meets_target"], bool)
    assignors = {"partition_assignment_strategy": ["cooperative-sticky"]}  # by name in the JSON report
    assert report["consumer_config"] == {**CONSUMER_CONFIG, **assignors}
    assert report["consumer_config"]["check_crcs"] is True
    assert report["process_peak_rss_bytes"] > 0
    for path in ("plain", "ours"):
        assert report[path]["median_cpu_seconds"] > 0 and report[path]["runs"][0]["cpu_seconds"] > 0
    assert "record CRCs checked in both loops" in printed


def test_both_loops_consume_as_the_service_does_crc_checks_included() -> None:
    service = ServiceConfig()
    assert CONSUMER_CONFIG["max_poll_records"] == service.max_poll_records
    assert CONSUMER_CONFIG["max_partition_fetch_bytes"] >= service.max_message_bytes
    assert CONSUMER_CONFIG["enable_auto_commit"] is False and CONSUMER_CONFIG["check_crcs"] is True
    assert _parser().parse_args([]).check_crcs is True
    assert _parser().parse_args(["--no-check-crcs"]).check_crcs is False


def test_ingest_bench_refuses_an_existing_topic_and_an_unreachable_broker(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from spacenet.stream.kafka_config import KafkaSettings, ensure_topics

    topic = "ingest-bench-existing"
    ensure_topics(KafkaSettings(bootstrap=kafka_bootstrap), [topic])
    assert main(["--bootstrap", kafka_bootstrap, "--topic", topic, "--records", "10"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["--bootstrap", "127.0.0.1:9", "--records", "10", "--timeout", "1"]) == 2
    assert "no Kafka broker reachable" in capsys.readouterr().err
