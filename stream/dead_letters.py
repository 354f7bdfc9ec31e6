"""The dead-letter sink: whatever the service cannot use goes to one topic, with its reason.

Two kinds of dead letters, from three places:

* ``message``: a Kafka message that does not decode or validate, training data or a
  prediction request, sent on as it came (value and key) with its source
  (``topic:partition:offset``).
* ``records``: well-formed records the service cannot learn (a label that never became a
  class, a task that does not fit the network), re-encoded one record per message, the
  detail naming each record's source.

Every dead letter carries ``spacenet-reject-reason`` (a bounded reason, also the label of
``spacenet_dead_letter_messages_total``) and ``spacenet-reject-detail`` (for humans, at most
500 characters):

    >>> headers("schema", "columns ['x']", source="mnist:0:7")  # doctest: +NORMALIZE_WHITESPACE
    [('spacenet-reject-reason', b'schema'), ('spacenet-reject-detail', b"columns ['x']"),
     ('spacenet-source', b'mnist:0:7')]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spacenet.stream import wire
from spacenet.stream.observability.metrics import ServiceMetrics
from spacenet.stream.records import Records, offsets_of

REASON_HEADER, DETAIL_HEADER, SOURCE_HEADER = (
    "spacenet-reject-reason",
    "spacenet-reject-detail",
    "spacenet-source",
)
MAX_DETAIL_CHARS = 500
Send = Callable[..., Any]  # as kafka-python's KafkaProducer.send(topic, value=, key=, headers=)


def headers(reason: str, detail: str, source: str | None = None) -> list[tuple[str, bytes]]:
    """The headers of a dead letter."""
    out = [
        (REASON_HEADER, reason.encode()),
        (DETAIL_HEADER, detail[:MAX_DETAIL_CHARS].encode(errors="replace")),
    ]
    if source is not None:
        out.append((SOURCE_HEADER, source.encode()))
    return out


class DeadLetters:
    """Sends dead letters to ``topic`` through ``send`` and counts them by reason."""

    def __init__(self, send: Send, topic: str, metrics: ServiceMetrics) -> None:
        self.send = send
        self.topic = topic
        self.metrics = metrics

    def message(self, msg: Any, reason: str, detail: str) -> None:
        """A consumed Kafka message the service rejects, sent on as it came."""
        source = f"{msg.topic}:{msg.partition}:{msg.offset}"
        self._send(msg.value or b"", msg.key, headers(reason, detail, source))
        self.metrics.dead_lettered(reason)

    def records(self, records: Records, reason: str, topic: str) -> None:
        """Well-formed records of ``topic`` the service cannot learn: one message per record."""
        offsets = offsets_of(records.ids)
        for i in range(len(records)):
            value = wire.encode(records.features[i : i + 1], records.labels[i : i + 1])
            source = f"{topic}:{int(records.partitions[i])}:{int(offsets[i])}"
            self._send(value, None, headers(reason, f"record {source}"))
            self.metrics.dead_lettered(reason)

    def _send(self, value: bytes, key: bytes | None, dead_letter_headers: list[tuple[str, bytes]]) -> None:
        self.send(self.topic, key=key, value=value, headers=dead_letter_headers)
