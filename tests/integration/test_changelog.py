"""The changelog topic against the real broker: chunked, checksummed checkpoints keyed by
stream, the newest found by reading backwards, torn writes left behind without harm, one
current checkpoint per stream once compaction has run (``live_view``), and the state dir
as a cache of it (``ChangelogStates``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from spacenet.stream.changelog import (
    TOPIC_CONFIGS,
    Changelog,
    Manifest,
    chunk_bytes_for,
    chunk_key,
    ensure_changelog,
    live_view,
    stream_of,
)
from spacenet.stream.checkpoint import decode, encode
from spacenet.stream.kafka_config import KafkaSettings, ensure_topics
from spacenet.stream.state_store import ChangelogStates, LocalStates
from tests.support.service import make_producer, read_topic, unique_name

MAX_MESSAGE_BYTES = 64 << 10


@pytest.fixture
def clients(kafka_bootstrap: str) -> Iterator[tuple[Any, Any]]:
    from kafka import KafkaConsumer

    producer = make_producer(kafka_bootstrap)
    client = KafkaSettings(bootstrap=kafka_bootstrap).client_kwargs()
    reader = KafkaConsumer(**client, enable_auto_commit=False)
    yield producer, reader
    reader.close()
    producer.close(timeout=10)


def changelog(bootstrap: str, clients: tuple[Any, Any], partitions: int = 2) -> Changelog:
    """A changelog topic of its own, compacted, with messages of at most 64 KiB."""
    topic = unique_name("state")
    configs = {**TOPIC_CONFIGS, "max.message.bytes": str(MAX_MESSAGE_BYTES)}
    ensure_topics(KafkaSettings(bootstrap=bootstrap), [topic], partitions=partitions, configs=configs)
    found, max_bytes = ensure_changelog(KafkaSettings(bootstrap=bootstrap), topic, partitions)
    assert (found, max_bytes) == (partitions, MAX_MESSAGE_BYTES)
    return Changelog(topic, *clients, partitions, chunk_bytes_for(max_bytes, 4 << 20))


def payload(seed: int, floats: int = 50_000) -> dict[str, Any]:
    """About ``4 * floats`` bytes of checkpoint: several chunks of 60 KiB."""
    return {"w": torch.randn(floats, generator=torch.Generator().manual_seed(seed)), "positions": {"0": seed}}


def live_keys(bootstrap: str, log: Changelog, stream: int) -> dict[bytes, bytes]:
    messages = read_topic(bootstrap, log.topic, log.partition_of(stream))
    return {k: v for k, v in live_view(messages).items() if stream_of(k) == stream}


def test_ensure_changelog_creates_a_compacted_topic_once(kafka_bootstrap: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    settings, topic = KafkaSettings(bootstrap=kafka_bootstrap), unique_name("made")
    assert ensure_changelog(settings, topic, 3)[0] == 3
    assert ensure_changelog(settings, topic, 6)[0] == 3  # an existing topic is left as it is
    admin = KafkaAdminClient(**settings.client_kwargs())
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=["cleanup.policy"])
        configs = admin.describe_configs([resource], config_filter="all")["topic"][topic]
    finally:
        admin.close()
    assert configs["cleanup.policy"]["value"] == "compact"


def test_a_checkpoint_is_chunked_found_from_the_end_and_read_back_verified(
    kafka_bootstrap: str, clients: tuple[Any, Any]
) -> None:
    log = changelog(kafka_bootstrap, clients)
    assert log.head(1).manifest is None
    head = log.head(1)
    for seed in range(1, 4):
        data = encode(payload(seed))
        head = log.write(1, data, head, model_version=seed, positions={1: 100 * seed})
    manifest = head.manifest
    assert manifest is not None and manifest.seq == 3 and manifest.model_version == 3
    assert manifest.chunks == -(-len(data) // log.chunk_bytes) > 1
    assert manifest.positions == {1: 300}

    found = log.head(1)
    assert found.manifest == manifest and not found.orphans
    restored = decode(log.read(manifest))
    assert torch.equal(restored["w"], payload(3)["w"])
    # Compaction keeps the newest manifest and only its chunks: one current checkpoint.
    live = live_keys(kafka_bootstrap, log, 1)
    assert Manifest.decode(live[b"1"]) == manifest
    assert sorted(live) == sorted([b"1", *manifest.chunk_keys()])


def test_streams_sharing_a_partition_and_a_long_history_are_found(
    kafka_bootstrap: str, clients: tuple[Any, Any]
) -> None:
    log = changelog(kafka_bootstrap, clients, partitions=1)
    heads = {0: log.head(0), 5: log.head(5)}
    for seed in range(12):  # enough messages that the backward search must widen its window
        for stream in (0, 5):
            data = encode(payload(seed, floats=20_000 + 1000 * stream))
            heads[stream] = log.write(stream, data, heads[stream], seed, {stream: seed})
    for stream in (0, 5):
        found = log.head(stream)
        assert found.manifest == heads[stream].manifest
        assert torch.equal(decode(log.read(found.manifest))["w"], payload(11, 20_000 + 1000 * stream)["w"])


def test_a_torn_write_leaves_the_previous_checkpoint_current_and_is_cleaned_by_the_next(
    kafka_bootstrap: str, clients: tuple[Any, Any]
) -> None:
    producer = clients[0]
    log = changelog(kafka_bootstrap, clients)
    head = log.write(0, encode(payload(1)), log.head(0), 1, {0: 10})
    # A writer dies after sending five chunks of checkpoint 2 (more than checkpoint 2 will have).
    for i in range(5):
        producer.send(log.topic, key=chunk_key(0, 2, i), value=b"x" * 1000, partition=0)
    producer.flush()

    found = log.head(0)
    assert found.manifest == head.manifest
    assert found.orphans == {chunk_key(0, 2, i) for i in range(5)}
    assert torch.equal(decode(log.read(head.manifest))["w"], payload(1)["w"])  # type: ignore[arg-type]

    small = encode(payload(2, floats=20_000))  # two chunks: the torn write's keys 2..4 are orphans
    after = log.write(0, small, found, 2, {0: 20})
    assert after.manifest is not None and after.manifest.seq == 2 and after.manifest.chunks == 2
    live = live_keys(kafka_bootstrap, log, 0)
    assert sorted(live) == sorted([b"0", *after.manifest.chunk_keys()])
    assert decode(log.read(log.head(0).manifest))["positions"] == {"0": 2}  # type: ignore[arg-type]


def test_chunks_that_do_not_match_their_manifest_are_refused(
    kafka_bootstrap: str, clients: tuple[Any, Any]
) -> None:
    producer = clients[0]
    log = changelog(kafka_bootstrap, clients)
    head = log.write(1, encode(payload(7)), log.head(1), 1, {1: 1})
    assert head.manifest is not None
    producer.send(log.topic, key=chunk_key(1, 1, 0), value=b"altered", partition=1)
    producer.flush()
    with pytest.raises(ValueError, match="do not match"):
        log.read(head.manifest)


def test_the_state_dir_is_a_cache_of_the_changelog(
    kafka_bootstrap: str, clients: tuple[Any, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = changelog(kafka_bootstrap, clients)
    first = ChangelogStates(log, LocalStates(tmp_path / "a"))
    assert first.load(0) is None
    first.save(0, 4, payload(4))
    assert first.size(0) == len(encode(payload(4)))

    caplog.set_level(logging.INFO, logger="spacenet.stream.state_store")
    same_dir = ChangelogStates(log, LocalStates(tmp_path / "a"))  # a restart on the same machine
    assert torch.equal(same_dir.load(0)["w"], payload(4)["w"])  # type: ignore[index]
    assert "from the local cache" in caplog.text

    caplog.clear()
    elsewhere = ChangelogStates(log, LocalStates(tmp_path / "b"))  # another machine
    assert torch.equal(elsewhere.load(0)["w"], payload(4)["w"])  # type: ignore[index]
    assert f"from {log.topic}" in caplog.text
    assert LocalStates(tmp_path / "b").store(0).versions() == [4]  # now cached there too
    elsewhere.save(0, 5, payload(5))

    caplog.clear()
    back = ChangelogStates(log, LocalStates(tmp_path / "a"))  # its cache is behind the changelog
    assert torch.equal(back.load(0)["w"], payload(5)["w"])  # type: ignore[index]
    assert f"from {log.topic}" in caplog.text
