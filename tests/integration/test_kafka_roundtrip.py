"""Arrow IPC messages through the real broker: kafka-python both ways, then kcat (librdkafka).

The encoder here is a deliberately tiny stand-in for the wire format (stream/wire.py):
it checks the broker and the clients, not the service's format.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid

import numpy as np
import pyarrow as pa
import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from tests.support.service import read_topic

FEATURES = 784
SCHEMA = pa.schema([("features", pa.list_(pa.uint8(), FEATURES)), ("label", pa.int64())])
BATCH_SIZES = (1, 3, 16, 2)


def encode(features: np.ndarray, labels: np.ndarray) -> bytes:
    """One Arrow IPC stream holding one record batch."""
    flat = pa.array(features.reshape(-1), type=pa.uint8())
    columns = [pa.FixedSizeListArray.from_arrays(flat, FEATURES), pa.array(labels, type=pa.int64())]
    batch = pa.record_batch(columns, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def decode(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    reader = pa.ipc.open_stream(data)
    assert reader.schema.equals(SCHEMA)
    batches = list(reader)
    assert len(batches) == 1
    batch = batches[0]
    features = batch.column("features").flatten().to_numpy().reshape(batch.num_rows, FEATURES)
    return features, batch.column("label").to_numpy()


@pytest.fixture
def batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (
            rng.integers(0, 256, size=(n, FEATURES), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.int64),
        )
        for n in BATCH_SIZES
    ]


def _create_topic(bootstrap: str) -> str:
    topic = f"roundtrip-{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tests-admin")
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        assert topic in admin.list_topics()
    finally:
        admin.close()
    return topic


def _read_with_kcat(bootstrap: str, topic: str) -> list[tuple[int, bytes, bytes]]:
    """(offset, key, value) of every message, read by kcat in a binary-safe framing.

    Each message is printed as ``<offset> <size> <key>\\n`` then its size as a 4-byte
    big-endian integer (``%R``) and the raw value bytes.
    """
    kcat = shutil.which("kcat")
    assert kcat is not None, "kcat (Debian package 'kcat') is needed as an independent client"
    out = subprocess.run(
        [kcat, "-q", "-b", bootstrap, "-C", "-t", topic, "-p", "0", "-o", "beginning", "-e",
         "-m", "30", "-f", "%o %S %k\n%R%s"],
        capture_output=True, timeout=90, check=True,
    ).stdout  # fmt: skip
    messages = []
    pos = 0
    while pos < len(out):
        end = out.index(b"\n", pos)
        offset, size, key = out[pos:end].split(b" ")
        (framed,) = struct.unpack(">i", out[end + 1 : end + 5])
        assert framed == int(size)
        value = out[end + 5 : end + 5 + framed]
        assert len(value) == framed, "kcat output ended inside a message"
        messages.append((int(offset), key, value))
        pos = end + 5 + framed
    return messages


def test_arrow_batches_roundtrip_through_kafka_python_and_kcat(
    kafka_bootstrap: str, batches: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    topic = _create_topic(kafka_bootstrap)
    payloads = [encode(features, labels) for features, labels in batches]
    keys = [f"batch-{i}".encode() for i in range(len(payloads))]

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in zip(keys, payloads, strict=True)]
        producer.flush(timeout=60)
        offsets = [f.get(timeout=60).offset for f in futures]
    finally:
        producer.close()
    assert offsets == list(range(len(payloads)))

    records = read_topic(kafka_bootstrap, topic)
    assert [r.offset for r in records] == offsets
    assert [r.key for r in records] == keys
    assert [r.value for r in records] == payloads
    for record, (features, labels) in zip(records, batches, strict=True):
        got_features, got_labels = decode(record.value)
        assert got_features.dtype == np.uint8 and got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_features, features)
        np.testing.assert_array_equal(got_labels, labels)

    by_kcat = _read_with_kcat(kafka_bootstrap, topic)
    assert [m[0] for m in by_kcat] == offsets
    assert [m[1] for m in by_kcat] == keys
    assert [len(m[2]) for m in by_kcat] == [len(p) for p in payloads]
    assert [m[2] for m in by_kcat] == payloads
