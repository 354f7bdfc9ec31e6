"""Poison input at volume, at the decoder (issue 7, level a): hypothesis draws streams of
malformed messages of every kind (``tests/support/poison.py``) interleaved with good
ones, and feeds them to one ``wire.decode`` in order, so the schema and layout caches
that good messages fill are in play for the bad ones after them. Every bad message must
raise ``WireError`` with the reason its kind names and nothing else; every good one must
decode to its records. ``test_poison_streams_only_raise_the_expected_reason`` tries
300 streams of 5 to 30 messages (about 2,500 messages, some 1,550 of them malformed; the
count is printed with -s); the seeded batch the broker test sends adds 300 more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacenet.stream import wire
from tests.support import poison
from tests.support.service import Message, synthetic_images

LIMITS = wire.WireLimits(
    max_message_bytes=60_000, max_records=50, expected_shape=(1, 28, 28), num_classes_max=10
)
STREAMS = 300


@st.composite
def labels(draw: st.DrawFn) -> np.ndarray:
    return np.asarray(draw(st.lists(st.integers(0, 9), min_size=2, max_size=6)), np.int64)


@st.composite
def good_messages(draw: st.DrawFn) -> Message:
    y = draw(labels())
    if draw(st.booleans()):
        return poison.good(y, draw(st.integers(0, 3)))
    x = synthetic_images(y, 1).astype(np.float32) / 255  # finite float32 is valid wire v1
    return Message(wire.encode(x, y), records=len(y))


@st.composite
def bad_messages(draw: st.DrawFn) -> Message:
    y = draw(labels())
    valid = wire.encode(synthetic_images(y), y)
    at = st.integers(0, 1 << 20)
    builders: list[Callable[[], Message]] = [
        lambda: poison.random_bytes(draw(st.binary(min_size=1, max_size=600))),
        lambda: poison.truncated(valid, draw(st.integers(1, len(valid) - 9))),
        lambda: poison.huge_length_prefix(valid, draw(st.integers(0, 1))),
        lambda: poison.header_version(valid, draw(st.binary(max_size=4).filter(lambda v: v != b"1"))),
        lambda: poison.metadata_version(y, draw(st.sampled_from([b"0", b"2", b"1.0", b" 1"]))),
        lambda: poison.wrong_shape(y, draw(st.integers(1, 40).filter(lambda s: s != 28))),
        lambda: poison.shape_metadata(y, draw(st.sampled_from([b"999999999,999999999", b"", b"28,28,x"]))),
        lambda: poison.feature_dtype(y, draw(st.sampled_from(poison.FEATURE_DTYPES))),
        lambda: poison.label_dtype(y, draw(st.sampled_from(["int8", "int32", "uint64", "float32"]))),
        lambda: poison.non_finite(y, draw(at), draw(st.sampled_from([np.nan, np.inf, -np.inf]))),
        lambda: poison.negative_label(y, draw(at), draw(st.integers(-(1 << 63), -1))),
        lambda: poison.label_out_of_range(y, draw(at), draw(st.integers(10, (1 << 63) - 1))),
        lambda: poison.missing_label(y, draw(st.booleans())),
        lambda: poison.missing_features(y),
        lambda: poison.unknown_column(y, draw(st.sampled_from(["extra", "labels", "Features"]))),
        lambda: poison.negative_task(y, draw(st.integers(-(1 << 40), -1))),
        lambda: poison.too_many_records(LIMITS.max_records),
        lambda: poison.oversized(LIMITS.max_message_bytes),
        lambda: poison.empty(draw(st.booleans())),
        lambda: poison.bad_marker(y, draw(st.sampled_from([b"task-middle", b"", b"Task-Start"])), b"1"),
        lambda: poison.bad_marker(y, b"task-start", draw(st.sampled_from([b"-1", b"x", b"", b"1" * 19]))),
    ]
    return builders[draw(st.integers(0, len(builders) - 1))]()


def check(message: Message) -> str:
    """Decode one message; returns the outcome (``good`` or the reason) after checking it."""
    try:
        decoded = wire.decode(message.value, message.headers, LIMITS)
    except wire.WireError as e:
        assert e.reason.value == message.kind, f"expected {message.kind}, got {e}"
        return e.reason.value
    assert message.kind == "good", f"expected {message.kind}, but it decoded"
    assert decoded.num_records == message.records and decoded.labels is not None
    assert decoded.features.shape == (message.records, 1, 28, 28)
    return "good"


@pytest.fixture(scope="module")
def tried() -> Any:
    counts: Counter[str] = Counter()
    yield counts
    print(f"\npoison unit test: {sum(counts.values())} messages decoded: {dict(sorted(counts.items()))}")


@settings(
    max_examples=STREAMS,
    derandomize=True,  # the same streams every run
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.one_of(good_messages(), bad_messages(), bad_messages()), min_size=5, max_size=30))
def test_poison_streams_only_raise_the_expected_reason(tried: Counter[str], stream: list[Message]) -> None:
    for message in stream:
        tried[check(message)] += 1


def test_the_seeded_batch_names_the_reasons_decode_gives() -> None:
    """The numpy-drawn batch the broker test sends: each message's kind is what the service's
    limits make of it (uint8 only is checked by the service after decoding)."""
    limits = wire.WireLimits(max_message_bytes=60_000, max_records=100, expected_shape=(1, 28, 28))
    batch = poison.poison_batch(np.random.default_rng(9), 300, 60_000, 100)
    outcomes: Counter[str] = Counter()
    for message in batch:
        with pytest.raises(wire.WireError) as info:
            wire.decode(message.value, message.headers, limits)
        assert info.value.reason.value == message.kind
        outcomes[message.kind] += 1
    # Every reason is drawn but label_out_of_range: the service sets no class limit.
    assert set(outcomes) == {r.value for r in wire.RejectReason} - {"label_out_of_range"}, outcomes
