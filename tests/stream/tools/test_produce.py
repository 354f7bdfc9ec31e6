"""`spacenet produce` against the real broker, its planning helpers, and KafkaSettings."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spacenet.stream import wire
from spacenet.stream.kafka_config import KafkaSettings, ensure_topics
from spacenet.stream.tools.produce import iter_messages, load_dataset, main, plan_tasks
from tests.support.service import read_topic

LIMITS = wire.WireLimits()


# ---- helpers --------------------------------------------------------------------------
def decode_all(records: list[Any], limits: wire.WireLimits = LIMITS) -> list[wire.Decoded]:
    return [wire.decode(r.value, r.headers, limits) for r in records]


def check_stream(
    decoded: list[wire.Decoded], task_classes: list[list[int]], per_message: int, markers: bool
) -> None:
    """Tasks in order, each message within one task, markers on first/last, sizes respected."""
    data = [d for d in decoded if not d.is_control]
    assert all(1 <= d.num_records <= per_message for d in data)
    tasks_seen: list[int] = []
    for d in data:
        labels = set(d.labels.tolist())
        owner = [k for k, classes in enumerate(task_classes) if labels <= set(classes)]
        assert len(owner) == 1, f"message mixes tasks: {labels}"
        if not tasks_seen or tasks_seen[-1] != owner[0]:
            tasks_seen.append(owner[0])
    assert tasks_seen == list(range(len(task_classes))), "a task came back after a later one"
    if not markers:
        assert all(d.marker is None for d in decoded) and len(data) == len(decoded)
        return
    for k in range(len(task_classes)):
        in_task = [
            d
            for d in decoded
            if (d.is_control and d.marker_task == k)
            or (not d.is_control and set(d.labels.tolist()) <= set(task_classes[k]))
        ]
        assert in_task[0].marker is wire.Marker.TASK_START and in_task[0].marker_task == k
        assert in_task[-1].marker is wire.Marker.TASK_END and in_task[-1].marker_task == k
        assert all(d.marker is None for d in in_task[1:-1])


def synthetic(n_per_class: int, classes: list[int], width: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose features encode their row number, so each record can be identified."""
    labels = np.repeat(np.array(classes), n_per_class)
    rows = np.arange(len(labels))
    features = np.stack([(rows + j) % 256 for j in range(width)], axis=1)
    return features, labels


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- pure planning --------------------------------------------------------------------
def test_plan_tasks_groups_classes_interleaves_them_in_dataset_order_and_is_seeded() -> None:
    labels = np.repeat(np.arange(5), 10)
    plans = plan_tasks(labels, classes_per_task=2, class_order=[4, 0, 3, 1, 2], seed=7, limit_per_class=4)
    assert [p.classes for p in plans] == [(4, 0), (3, 1), (2,)]
    for plan in plans:
        assert sorted(labels[plan.rows].tolist()) == sorted(np.repeat(plan.classes, 4).tolist())
    assert labels[plans[0].rows].tolist() != sorted(labels[plans[0].rows].tolist())  # classes interleaved
    for plan in plans:  # each class in dataset order
        for c in plan.classes:
            rows = plan.rows[labels[plan.rows] == c]
            assert rows.tolist() == np.flatnonzero(labels == c)[:4].tolist()
    again = plan_tasks(labels, classes_per_task=2, class_order=[4, 0, 3, 1, 2], seed=7, limit_per_class=4)
    assert all((a.rows == b.rows).all() for a, b in zip(plans, again, strict=True))
    with pytest.raises(ValueError, match="distinct classes"):
        plan_tasks(labels, class_order=[0, 0])
    with pytest.raises(ValueError, match="distinct classes"):
        plan_tasks(labels, class_order=[9])


def test_one_message_task_gets_its_end_marker_on_a_control_message() -> None:
    features, labels = synthetic(3, [0, 1, 2])
    plans = plan_tasks(labels, classes_per_task=1)
    msgs = list(iter_messages(features.astype(np.uint8), labels, plans, records_per_message=3, markers=True))
    assert [(m.records, m.key) for m in msgs[:2]] == [(3, b"0:0"), (0, b"0:3")]
    decoded = [wire.decode(m.value, m.headers, LIMITS) for m in msgs]
    assert [(d.marker, d.marker_task, d.is_control) for d in decoded[:2]] == [
        (wire.Marker.TASK_START, 0, False),
        (wire.Marker.TASK_END, 0, True),
    ]
    assert len(msgs) == 6


# ---- KafkaSettings --------------------------------------------------------------------
def test_kafka_settings_from_env_and_redaction(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2-file\n")
    env = {
        "SPACENET_BOOTSTRAP": "a:9093, b:9093",
        "SPACENET_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "SPACENET_KAFKA_SASL_MECHANISM": "scram-sha-256",
        "SPACENET_KAFKA_SASL_USERNAME": "svc",
        "SPACENET_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "SPACENET_KAFKA_SSL_CAFILE": "/etc/ca.pem",
        "SPACENET_KAFKA_SSL_CHECK_HOSTNAME": "false",
        "SPACENET_KAFKA_BOOTSTRAP_TIMEOUT_MS": "2500",
        "OTHER_SASL_PASSWORD": "ignored",
    }
    s = KafkaSettings.from_env(env=env)
    kwargs = s.client_kwargs()
    assert kwargs["bootstrap_servers"] == ["a:9093", "b:9093"]
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    assert kwargs["sasl_plain_username"] == "svc" and kwargs["sasl_plain_password"] == "hunter2-file"
    assert kwargs["ssl_cafile"] == "/etc/ca.pem" and kwargs["ssl_check_hostname"] is False
    assert kwargs["bootstrap_timeout_ms"] == 2500
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"

    direct = KafkaSettings.from_env(
        env={**env, "SPACENET_KAFKA_SASL_PASSWORD_FILE": "", "SPACENET_KAFKA_SASL_PASSWORD": "pw-direct"},
        bootstrap="c:1",
    )
    assert direct.client_kwargs()["sasl_plain_password"] == "pw-direct"
    assert direct.client_kwargs()["bootstrap_servers"] == ["c:1"]  # an override beats the environment
    assert "pw-direct" not in repr(direct) and "<redacted>" in repr(direct)

    plain = KafkaSettings.from_env(prefix="X_", env={"X_BOOTSTRAP": "h:1"})
    assert plain.client_kwargs() == {
        "bootstrap_servers": ["h:1"],
        "client_id": "spacenet",
        "security_protocol": "PLAINTEXT",
        "bootstrap_timeout_ms": 10_000,
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"bootstrap": "no-port"},
        {"security_protocol": "TLS"},
        {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "GSSAPI",
            "sasl_username": "u",
            "sasl_password": "p",
        },
        {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
        {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "u",
            "sasl_password": "p",
            "sasl_password_file": "/f",
        },
        {"sasl_username": "u"},
    ],
)
def test_kafka_settings_rejects_inconsistent_settings(fields: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        KafkaSettings(**fields)  # type: ignore[arg-type]


def test_unreadable_password_file_is_named_without_content(tmp_path: Path) -> None:
    s = KafkaSettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password_file=str(tmp_path / "missing"),
    )
    with pytest.raises(ValueError, match="missing"):
        s.client_kwargs()


# ---- against the broker ---------------------------------------------------------------
def test_ensure_topics_is_idempotent(kafka_bootstrap: str) -> None:
    settings = KafkaSettings(bootstrap=kafka_bootstrap)
    names = [f"ensure-{uuid.uuid4().hex[:8]}", f"ensure-{uuid.uuid4().hex[:8]}"]
    assert sorted(ensure_topics(settings, names, partitions=2)) == sorted(names)
    assert ensure_topics(settings, [*names, names[0]]) == []


def test_produce_parquet_file_with_markers(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = [7, 3, 5, 1, 9]  # file order of first appearance: 7, 3, 5, 1, 9
    features, labels = synthetic(23, classes)
    table = pa.table({"features": pa.array(features.tolist(), pa.list_(pa.int64())), "label": labels})
    path = tmp_path / "data.parquet"
    pq.write_table(table.replace_schema_metadata({"shape": "2,3"}), path)
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    argv = [
        "--dataset",
        str(path),
        "--topic",
        topic,
        "--bootstrap",
        kafka_bootstrap,
        "--records-per-message",
        "5",
        "--markers",
        "--seed",
        "1",
    ]
    code, out, _ = run_main(argv, capsys)
    assert code == 0, out
    assert "115 records" in out and "3 tasks" in out

    decoded = decode_all(read_topic(kafka_bootstrap, topic))
    task_classes = [[7, 3], [5, 1], [9]]
    check_stream(decoded, task_classes, per_message=5, markers=True)
    data = [d for d in decoded if not d.is_control]
    assert len(data) == 10 + 10 + 5 and len(decoded) == len(data)  # ceil(46/5)=10, 10, ceil(23/5)=5
    assert all(d.shape == (2, 3) and d.features.dtype.is_floating_point is False for d in data)
    got = np.concatenate([d.features.numpy().reshape(d.num_records, 6) for d in data])
    got_labels = np.concatenate([d.labels for d in data])
    ids = got[:, 0].astype(np.int64)  # rows < 256 here, so feature 0 is the row number
    assert sorted(ids.tolist()) == list(range(len(labels)))  # every record exactly once
    np.testing.assert_array_equal(got, features[ids])
    np.testing.assert_array_equal(got_labels, labels[ids])


def test_produce_arrow_file_float_features_without_markers(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = synthetic(9, [2, 0, 1], width=4)
    values = pa.array((features.reshape(-1) / 10).astype(np.float32))
    column = pa.FixedSizeListArray.from_arrays(values, 4)
    table = pa.table({"features": column, "label": pa.array(labels, pa.int32())})
    path = tmp_path / "data.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    argv = [
        "--dataset",
        str(path),
        "--topic",
        topic,
        "--bootstrap",
        kafka_bootstrap,
        "--records-per-message",
        "4",
        "--classes-per-task",
        "1",
        "--class-order",
        "1,2,0",
        "--shape",
        "2,2",
    ]
    code, out, _ = run_main(argv, capsys)
    assert code == 0 and "27 records" in out

    decoded = decode_all(read_topic(kafka_bootstrap, topic))
    check_stream(decoded, [[1], [2], [0]], per_message=4, markers=False)
    assert len(decoded) == 3 * 3  # ceil(9/4) per task
    assert all(d.features.dtype.is_floating_point and d.shape == (2, 2) for d in decoded)
    assert sum(d.num_records for d in decoded) == 27


def test_produce_split_mnist_subset(kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = f"produce-mnist-{uuid.uuid4().hex[:8]}"
    argv = [
        "--dataset",
        "split_mnist",
        "--topic",
        topic,
        "--bootstrap",
        kafka_bootstrap,
        "--limit-per-class",
        "30",
        "--records-per-message",
        "16",
        "--markers",
        "--test",
    ]
    code, out, _ = run_main(argv, capsys)
    assert code == 0 and "300 records" in out and "5 tasks" in out

    limits = wire.WireLimits(expected_shape=(1, 28, 28), num_classes_max=10)
    records = read_topic(kafka_bootstrap, topic)
    decoded = decode_all(records, limits)
    check_stream(decoded, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], per_message=16, markers=True)
    assert len(decoded) == 5 * 4  # ceil(60/16) messages per task
    assert records[0].key == b"0:0" and records[1].key == b"0:16"
    images, labels, _ = load_dataset("split_mnist", train=False)
    expected = {
        (int(y), img.tobytes())
        for c in range(10)
        for y, img in zip(labels[labels == c][:30], images[labels == c][:30], strict=True)
    }
    got = [(int(y), x.numpy().tobytes()) for d in decoded for y, x in zip(d.labels, d.features, strict=True)]
    assert all(d.features.dtype == torch.uint8 for d in decoded)  # raw pixels, not normalised
    assert len(got) == 300 and set(got) == expected


def test_clear_errors_for_a_missing_dataset_and_an_unreachable_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(
        ["--dataset", str(tmp_path / "nope.parquet"), "--topic", "t", "--bootstrap", "127.0.0.1:9"], capsys
    )
    assert code == 2 and "no dataset" in err

    features, labels = synthetic(2, [0, 1])
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"features": features.tolist(), "label": labels}), path)
    start = time.monotonic()
    code, _, err = run_main(
        ["--dataset", str(path), "--topic", "t", "--bootstrap", "127.0.0.1:9", "--timeout", "1"], capsys
    )
    assert code == 2 and "no Kafka broker reachable at 127.0.0.1:9" in err
    assert time.monotonic() - start < 20

    pq.write_table(pa.table({"pixels": features.tolist(), "label": labels}), path)
    code, _, err = run_main(["--dataset", str(path), "--topic", "t", "--bootstrap", "127.0.0.1:9"], capsys)
    assert code == 2 and "needs columns 'features' and 'label'" in err


def test_bootstrap_is_read_from_the_one_variable_serve_reads(caplog: pytest.LogCaptureFixture) -> None:
    assert KafkaSettings.from_env(env={"SPACENET_BOOTSTRAP": "a:1"}).bootstrap == "a:1"
    with caplog.at_level(logging.WARNING, logger="spacenet.stream.kafka_config"):
        legacy = KafkaSettings.from_env(env={"SPACENET_KAFKA_BOOTSTRAP": "b:2"})
        both = KafkaSettings.from_env(env={"SPACENET_BOOTSTRAP": "a:1", "SPACENET_KAFKA_BOOTSTRAP": "b:2"})
    assert legacy.bootstrap == "b:2" and both.bootstrap == "a:1"
    assert [r.getMessage().split(" is deprecated")[0] for r in caplog.records] == [
        "SPACENET_KAFKA_BOOTSTRAP"
    ] * 2
    assert "SPACENET_BOOTSTRAP wins" in caplog.records[1].getMessage()
