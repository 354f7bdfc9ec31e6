"""The one dead-letter sink: rejected messages as they came, unlearnable records one by one."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from spacenet.stream import wire
from spacenet.stream.dead_letters import DETAIL_HEADER, REASON_HEADER, SOURCE_HEADER, DeadLetters
from spacenet.stream.observability.metrics import ServiceMetrics
from spacenet.stream.records import Records, record_ids

Message = namedtuple("Message", "topic partition offset key value headers")


def sink() -> tuple[DeadLetters, list[dict[str, Any]], CollectorRegistry]:
    sent: list[dict[str, Any]] = []
    registry = CollectorRegistry()
    letters = DeadLetters(
        lambda topic, **kw: sent.append({"topic": topic, **kw}), "t.dlq", ServiceMetrics(registry)
    )
    return letters, sent, registry


def test_a_rejected_message_goes_on_as_it_came_with_its_reason_and_source() -> None:
    letters, sent, registry = sink()
    letters.message(Message("t", 2, 41, b"k", None, []), "empty", "x" * 600)
    (letter,) = sent
    headers = dict(letter["headers"])
    assert (letter["topic"], letter["key"], letter["value"]) == ("t.dlq", b"k", b"")
    assert headers[REASON_HEADER] == b"empty" and headers[SOURCE_HEADER] == b"t:2:41"
    assert headers[DETAIL_HEADER] == b"x" * 500
    assert registry.get_sample_value("spacenet_dead_letter_messages_total", {"reason": "empty"}) == 1


def test_unlearnable_records_go_one_per_message_naming_their_source() -> None:
    letters, sent, registry = sink()
    features = np.arange(3 * 4, dtype=np.uint8).reshape(3, 1, 2, 2)
    records = Records(
        features, np.array([7, 8, 9]), np.array([1, 1, 1], np.int32), record_ids([50, 51], [2, 1])
    )
    letters.records(records, "capacity_exhausted", "t")
    details = [dict(letter["headers"])[DETAIL_HEADER] for letter in sent]
    assert details == [b"record t:1:50", b"record t:1:50", b"record t:1:51"]
    assert all(SOURCE_HEADER not in dict(letter["headers"]) for letter in sent)
    decoded = [wire.decode(letter["value"], wire.make_headers(), wire.WireLimits()) for letter in sent]
    assert [d.labels.tolist() for d in decoded] == [[7], [8], [9]]
    assert np.array_equal(np.concatenate([d.values for d in decoded]), features)
    reason = {"reason": "capacity_exhausted"}
    assert registry.get_sample_value("spacenet_dead_letter_messages_total", reason) == 3
