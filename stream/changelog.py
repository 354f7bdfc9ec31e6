"""Each stream's checkpoint in a compacted Kafka topic, the way Kafka Streams keeps its state stores.

The changelog topic (``<topic>.state``; ``cleanup.policy=compact``) holds stream ``p`` (partition
``p`` of the training topic) in its partition ``p % partitions``; the service creates it with as
many partitions as the training topic. A checkpoint is ``checkpoint.encode()`` output (the payload
and its SHA-256 footer), cut into chunks that fit the topic's ``max.message.bytes``. Keys:

======================  ==============================================================
``<p>/<seq>/<i>``       chunk ``i`` of checkpoint number ``seq`` of stream ``p``
``<p>``                 the manifest (JSON): ``seq``, the chunk count, bytes, SHA-256,
                        model version, positions, time, the offset of chunk 0
``<p>/<seq>/<i>`` null  tombstones for the chunks of the two checkpoints before
======================  ==============================================================

Chunks go first and are acknowledged before their manifest is sent, so the newest manifest of a
stream always names a complete checkpoint: a writer that dies half-way leaves the previous one
current. After the manifest, the chunks of earlier checkpoints are deleted (tombstones), so once
the broker compacts, the topic holds exactly one checkpoint per stream: its newest manifest and
that manifest's chunks (``live_view``).

A reader finds the newest manifest by reading backwards from the end of the partition (a
checkpoint's manifest is followed only by tombstones), then reads its chunks from the offset the
manifest names: a restore costs one checkpoint's bytes, however long the topic's history.
Chunks written after the newest manifest (a torn write) are noted, to be deleted by the next
write.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from spacenet.stream.checkpoint import CheckpointError, digest_of
from spacenet.stream.faults import maybe_crash

log = logging.getLogger(__name__)
TOPIC_CONFIGS = {"cleanup.policy": "compact"}
HEADROOM_BYTES = 4096  # a record's key, headers and batch framing, beside the chunk itself
BACKWARD_WINDOW = 64  # messages read from the end first when looking for the newest manifest


@dataclass(frozen=True)
class Manifest:
    """What names one complete checkpoint of one stream in the changelog."""

    stream: int
    seq: int  # checkpoints of this stream written to the changelog, this one included
    chunks: int
    size: int  # bytes
    sha256: str  # the checkpoint footer's digest (hex): what ``CheckpointStore.digest`` reads
    model_version: int
    positions: dict[int, int]
    time: float
    first_offset: int  # changelog offset of chunk 0
    previous: tuple[int, int] = (0, 0)  # (seq, chunks) of the checkpoint this one replaced

    def chunk_keys(self) -> list[bytes]:
        return [chunk_key(self.stream, self.seq, i) for i in range(self.chunks)]

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes) -> Manifest:
        raw = json.loads(value)
        raw["positions"] = {int(p): int(o) for p, o in raw["positions"].items()}
        raw["previous"] = tuple(raw["previous"])
        return cls(**raw)


@dataclass
class Head:
    """The newest checkpoint of a stream in the changelog (None: none yet), and the keys of
    chunks that no manifest will ever name (left by a torn write), to delete."""

    manifest: Manifest | None = None
    orphans: set[bytes] = field(default_factory=set)

    @property
    def seq(self) -> int:
        return 0 if self.manifest is None else self.manifest.seq

    def stale_keys(self) -> list[bytes]:
        """Chunk keys that the next checkpoint replaces: the current one's, its predecessor's
        (in case its writer died before deleting them) and the orphans."""
        m = self.manifest
        if m is None:
            return sorted(self.orphans)
        previous = [chunk_key(m.stream, m.previous[0], i) for i in range(m.previous[1])]
        return sorted({*m.chunk_keys(), *previous, *self.orphans})


def chunk_key(stream: int, seq: int, index: int) -> bytes:
    return f"{stream}/{seq}/{index}".encode()


def stream_of(key: bytes | None) -> int | None:
    """The stream a changelog key belongs to (None: not a changelog key)."""
    head = (key or b"").split(b"/", 1)[0]
    return int(head) if head.isdigit() else None


class Changelog:
    """Writes and reads checkpoints of streams in ``topic`` (see the module doc).

    ``producer`` and ``reader`` are kafka-python clients: a producer whose ``max_request_size``
    admits ``chunk_bytes``, and a consumer without a group, used only here.
    """

    def __init__(
        self,
        topic: str,
        producer: Any,
        reader: Any,
        partitions: int,
        chunk_bytes: int,
        timeout_s: float = 60.0,
    ) -> None:
        if partitions < 1 or chunk_bytes < 1:
            raise ValueError("a changelog needs at least one partition and a positive chunk size")
        self.topic = topic
        self.producer = producer
        self.reader = reader
        self.partitions = partitions
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s

    def partition_of(self, stream: int) -> int:
        return stream % self.partitions

    # ------------------------------------------------------------------ writing
    def write(
        self, stream: int, data: bytes, head: Head, model_version: int, positions: dict[int, int]
    ) -> Head:
        """Write ``data`` (``checkpoint.encode()`` output) as the checkpoint after ``head``;
        returns the new head. Raises ``CheckpointError`` unless every message is acknowledged."""
        from kafka.errors import KafkaError

        partition, seq = self.partition_of(stream), head.seq + 1
        pieces = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        try:
            sent = [self._send(chunk_key(stream, seq, i), piece, partition) for i, piece in enumerate(pieces)]
            first_offset = int(sent[0].get(timeout=self.timeout_s).offset)
            for future in sent[1:]:
                future.get(timeout=self.timeout_s)
            maybe_crash("changelog_mid_write")
            previous = (0, 0) if head.manifest is None else (head.manifest.seq, head.manifest.chunks)
            manifest = Manifest(
                stream,
                seq,
                len(pieces),
                len(data),
                digest_of(data).hex(),
                model_version,
                dict(positions),
                time.time(),
                first_offset,
                previous,
            )
            self._send(str(stream).encode(), manifest.encode(), partition).get(timeout=self.timeout_s)
            # The new checkpoint is current: delete what it replaces (lost deletes are redone next
            # time). A torn write's chunks may carry this checkpoint's keys: those stay.
            current = set(manifest.chunk_keys())
            for key in head.stale_keys():
                if key not in current:
                    self._send(key, None, partition)
            self.producer.flush(timeout=self.timeout_s)
        except KafkaError as e:
            raise CheckpointError(f"writing stream {stream}'s checkpoint to {self.topic} failed: {e}") from e
        return Head(manifest)

    def _send(self, key: bytes, value: bytes | None, partition: int) -> Any:
        return self.producer.send(self.topic, key=key, value=value, partition=partition)

    # ------------------------------------------------------------------ reading
    def head(self, stream: int) -> Head:
        """The newest manifest of ``stream`` and the chunks written after it, found by reading
        backwards from the end of its partition."""
        from kafka.structs import TopicPartition

        tp = TopicPartition(self.topic, self.partition_of(stream))
        self.reader.assign([tp])
        begin = self.reader.beginning_offsets([tp])[tp]
        end = self.reader.end_offsets([tp])[tp]
        window = BACKWARD_WINDOW
        while True:
            start = max(begin, end - window)
            found = Head()
            for msg in self._read(tp, start, end):
                if stream_of(msg.key) != stream:
                    continue
                if msg.key == str(stream).encode() and msg.value is not None:
                    found = Head(Manifest.decode(msg.value))
                elif msg.value is None:
                    found.orphans.discard(msg.key)
                elif _seq_of(msg.key) > found.seq:
                    found.orphans.add(msg.key)
            if found.manifest is not None or start == begin:
                return found
            window *= 4

    def read(self, manifest: Manifest) -> bytes:
        """The checkpoint ``manifest`` names, verified against its length and digest;
        ``ValueError`` if its chunks are missing or do not add up."""
        from kafka.structs import TopicPartition

        tp = TopicPartition(self.topic, self.partition_of(manifest.stream))
        wanted = {key: i for i, key in enumerate(manifest.chunk_keys())}
        pieces: dict[int, bytes] = {}
        end = self.reader.end_offsets([tp])[tp]
        for msg in self._read(tp, manifest.first_offset, end):  # the newest value of a key wins,
            if msg.key in wanted:  # as after compaction
                if msg.value is None:
                    pieces.pop(wanted[msg.key], None)
                else:
                    pieces[wanted[msg.key]] = msg.value
        if len(pieces) != len(wanted):
            raise ValueError(f"{len(wanted) - len(pieces)} of {len(wanted)} chunks missing")
        data = b"".join(pieces[i] for i in range(len(wanted)))
        if len(data) != manifest.size or digest_of(data).hex() != manifest.sha256:
            raise ValueError("the chunks do not match their manifest")
        return data

    def _read(self, tp: Any, start: int, end: int) -> Iterator[Any]:
        """Messages of ``tp`` from ``start`` up to ``end`` (exclusive), in order."""
        self.reader.assign([tp])
        self.reader.seek(tp, start)
        deadline = time.monotonic() + self.timeout_s
        while self.reader.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {tp.topic}/{tp.partition} up to offset {end}")
            for messages in self.reader.poll(timeout_ms=500).values():
                yield from (m for m in messages if m.offset < end)


def _seq_of(key: bytes) -> int:
    parts = key.split(b"/")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def live_view(messages: Iterable[Any]) -> dict[bytes, bytes]:
    """What compaction leaves of a changelog partition read from its beginning: the newest
    value of each key, deleted keys left out."""
    live: dict[bytes, bytes] = {}
    for msg in messages:
        if msg.value is None:
            live.pop(msg.key, None)
        else:
            live[msg.key] = msg.value
    return live


def chunk_bytes_for(max_message_bytes: int, max_request_bytes: int) -> int:
    """The chunk size that fits both the topic's ``max.message.bytes`` and the producer's
    ``max_request_size``, leaving room for the record's framing."""
    limit = min(max_message_bytes, max_request_bytes) - HEADROOM_BYTES
    if limit < HEADROOM_BYTES:
        raise ValueError(f"messages of {max_message_bytes} bytes are too small for checkpoint chunks")
    return limit


def ensure_changelog(settings: Any, topic: str, partitions: int) -> tuple[int, int]:
    """Create ``topic`` (compacted, ``partitions`` partitions) unless it exists; returns its
    partition count and ``max.message.bytes``. ``settings`` is a ``KafkaSettings``."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    from spacenet.stream.kafka_config import ensure_topics, partition_count

    if ensure_topics(settings, [topic], partitions=partitions, configs=TOPIC_CONFIGS):
        log.info("created the changelog topic %s (%d partitions, compacted)", topic, partitions)
    names = ["max.message.bytes", "cleanup.policy"]
    admin = KafkaAdminClient(**settings.client_kwargs())
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=names)
        configs = admin.describe_configs([resource], config_filter="all")["topic"][topic]
    finally:
        admin.close()
    if "compact" not in configs["cleanup.policy"]["value"]:
        log.warning("changelog topic %s is not compacted: old checkpoints are kept until retention", topic)
    return partition_count(settings, topic), int(configs["max.message.bytes"]["value"])
