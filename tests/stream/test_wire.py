"""Tests for wire format v1: round trips, zero-copy, every reject reason, hostile input."""

from __future__ import annotations

import contextlib
import gc
import struct
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacenet.stream import wire
from spacenet.stream.wire import (
    EVENT_TIME_TYPE,
    SCHEMA_VERSION,
    Decoded,
    Decoder,
    Marker,
    RejectReason,
    WireError,
    WireLimits,
    decode,
    encode,
    make_headers,
)

HEADERS = make_headers()
LIMITS = WireLimits()
META = {b"spacenet.schema_version": b"1", b"spacenet.shape": b"2,2"}
FEATURES_TYPE = pa.list_(pa.uint8(), 4)


def _ipc(*batches: pa.RecordBatch, schema: pa.Schema | None = None, compression: str | None = None) -> bytes:
    """Serialize batches as one IPC stream, bypassing ``encode`` so tests can break the rules."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, schema or batches[0].schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def _crafted(meta: dict[bytes, bytes] | None = META, **columns: Any) -> bytes:
    """A one-batch message with 2x2 uint8 features unless ``columns`` override them."""
    arrays: dict[str, Any] = {"features": pa.array([[1, 2, 3, 4], [5, 6, 7, 8]], FEATURES_TYPE)}
    arrays["label"] = pa.array([0, 1], pa.int64())
    arrays.update(columns)
    arrays = {name: array for name, array in arrays.items() if array is not None}
    return _ipc(pa.record_batch(arrays, metadata=meta))


def _reason(value: bytes | None, headers: Any = HEADERS, limits: WireLimits = LIMITS) -> RejectReason:
    with pytest.raises(WireError) as info:
        decode(value, headers, limits)
    return info.value.reason


def _schema_message_length(value: bytes) -> int:
    source = pa.BufferReader(value)
    pa.ipc.MessageReader.open_stream(source).read_next_message()
    return int(source.tell())


def _valid(dtype: type = np.uint8, shape: tuple[int, ...] = (1, 4, 4), n: int = 3, **kwargs: Any) -> bytes:
    features = np.arange(n * int(np.prod(shape))).reshape(n, *shape).astype(dtype)
    return encode(features, np.arange(n) % 10, **kwargs)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (10,), (2, 3, 4, 5)])
@pytest.mark.parametrize("with_task", [False, True])
@pytest.mark.parametrize("with_time", [False, True])
def test_round_trip(dtype: type, shape: tuple[int, ...], with_task: bool, with_time: bool) -> None:
    rng = np.random.default_rng(0)
    features = (rng.random((5, *shape)) * 255).astype(dtype)
    labels = rng.integers(0, 10, 5)
    tasks = rng.integers(0, 3, 5) if with_task else None
    times = np.array(["2024-01-01T00:00:00.123"] * 5, "datetime64[ms]") if with_time else None
    value = encode(features, labels, tasks=tasks, event_time=times)
    msg = decode(value, HEADERS, WireLimits(expected_shape=shape, num_classes_max=10))
    assert msg.features.dtype == torch.from_numpy(features).dtype
    assert torch.equal(msg.features, torch.from_numpy(features))
    assert msg.labels is not None and msg.labels.dtype == np.int64
    np.testing.assert_array_equal(msg.labels, labels)
    if tasks is None:
        assert msg.tasks is None
    else:
        np.testing.assert_array_equal(msg.tasks, tasks)
    if times is None:
        assert msg.event_time is None
    else:
        assert msg.event_time is not None and msg.event_time.dtype == np.dtype("datetime64[ms]")
        np.testing.assert_array_equal(msg.event_time, times)
    assert (msg.shape, msg.num_records, msg.nbytes) == (shape, 5, len(value))
    assert (msg.marker, msg.marker_task, msg.is_control) == (None, None, False)


def test_single_record_and_the_default_record_limit() -> None:
    one = decode(_valid(n=1), HEADERS, LIMITS)
    assert one.num_records == 1 and tuple(one.features.shape) == (1, 1, 4, 4)
    features = np.random.default_rng(1).integers(0, 256, (10_000, 1, 28, 28), dtype=np.uint8)
    value = encode(features, np.zeros(10_000, np.int64))
    assert len(value) <= LIMITS.max_message_bytes
    msg = decode(value, HEADERS, LIMITS)
    assert msg.num_records == 10_000 and torch.equal(msg.features, torch.from_numpy(features))


def test_scalar_task_and_event_time_conversions() -> None:
    nanos = np.array(["2024-05-06T07:08:09.123456789"] * 3, "datetime64[ns]")
    msg = decode(_valid(tasks=4, event_time=nanos), HEADERS, LIMITS)
    assert msg.tasks is not None and msg.tasks.tolist() == [4, 4, 4]
    assert msg.event_time is not None
    assert msg.event_time[0] == np.datetime64("2024-05-06T07:08:09.123", "ms")
    millis = decode(_valid(event_time=np.array([0, 1, 2])), HEADERS, LIMITS).event_time
    assert millis is not None and millis[2] == np.datetime64(2, "ms")


def test_decoded_arrays_share_memory_with_the_message_and_warn_nothing() -> None:
    value = _valid(np.float32, tasks=1, event_time=np.array([0, 1, 2]))
    whole = np.frombuffer(value, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msg = decode(value, HEADERS, LIMITS)
    assert np.shares_memory(msg.features.numpy(), whole)
    for array in (msg.labels, msg.tasks, msg.event_time):
        assert array is not None and np.shares_memory(array, whole) and not array.flags.writeable


def test_decoded_tensor_keeps_the_message_alive() -> None:
    features = np.arange(3 * 16, dtype=np.uint8).reshape(3, 1, 4, 4)
    msg = decode(encode(features, np.zeros(3)), HEADERS, LIMITS)  # nothing else holds the bytes
    gc.collect()
    _ = [bytes(1000) for _ in range(1000)]  # reuse any freed memory
    assert torch.equal(msg.features, torch.from_numpy(features))


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode(np.zeros((2, 4), np.int16), None)
    with pytest.raises(ValueError):
        encode(np.zeros(4, np.uint8), None)
    with pytest.raises(ValueError):
        encode(np.zeros((0, 4), np.uint8), None)
    with pytest.raises(ValueError):
        encode(np.zeros((2, 0), np.uint8), None)
    with pytest.raises(ValueError):
        encode(np.zeros((1,) * 10, np.uint8), None)
    with pytest.raises(ValueError):
        encode(np.zeros((2, 4), np.uint8), np.array([1, 2, 3]))


def test_limits_must_be_positive() -> None:
    for bad in ({"max_message_bytes": 0}, {"max_records": -1}, {"max_features": 0}, {"num_classes_max": 0}):
        with pytest.raises(ValueError):
            WireLimits(**bad)


# ---------------------------------------------------------------- headers and markers


def test_make_headers() -> None:
    assert make_headers() == [("spacenet-schema-version", b"1")]
    assert make_headers(Marker.TASK_START, 12) == [
        ("spacenet-schema-version", b"1"),
        ("spacenet-marker", b"task-start"),
        ("spacenet-task", b"12"),
    ]
    for marker, task in ((Marker.TASK_END, None), (None, 3), (Marker.TASK_END, -1)):
        with pytest.raises(ValueError):
            make_headers(marker, task)


@pytest.mark.parametrize("marker", list(Marker))
def test_markers_round_trip_on_data_and_control_messages(marker: Marker) -> None:
    data = decode(_valid(), make_headers(marker, 5), LIMITS)
    assert (data.marker, data.marker_task, data.num_records) == (marker, 5, 3)
    control = decode(b"", make_headers(marker, 6), LIMITS)
    assert (control.marker, control.marker_task, control.num_records, control.nbytes) == (marker, 6, 0, 0)
    assert control.is_control and control.labels is None and control.features.numel() == 0
    assert decode(None, make_headers(marker, 6), LIMITS).is_control


def test_header_tolerances() -> None:
    other = [("trace-id", b"abc"), *make_headers(Marker.TASK_END, 1), ("spacenet-task", b"1")]
    assert decode(_valid(), other, LIMITS).marker_task == 1  # identical duplicates are harmless
    assert decode(_valid(), None, LIMITS).num_records == 3  # the schema metadata carries the version
    assert str(RejectReason.TOO_LARGE) == "too_large" and Marker.TASK_END == "task-end"


# ---------------------------------------------------------------- rejects, one crafted message per path


def _two_schema_messages() -> bytes:
    value = _crafted()
    return value[: _schema_message_length(value)] + value


def _batch_first() -> bytes:
    value = _crafted()
    return value[_schema_message_length(value) :]


def _no_batch() -> bytes:
    return _ipc(schema=pa.record_batch({"features": pa.array([], FEATURES_TYPE)}, metadata=META).schema)


def _float_features(values: list[float]) -> Any:
    return pa.array([values], pa.list_(pa.float32(), 4))


def _meta(**changes: bytes) -> dict[bytes, bytes]:
    meta = dict(META)
    for key, raw in changes.items():
        meta[f"spacenet.{key}".encode()] = raw
    return meta


def _one_row(**columns: Any) -> bytes:
    one = {"features": pa.array([[1, 2, 3, 4]], FEATURES_TYPE), "label": pa.array([0], pa.int64())}
    return _crafted(**{**one, **columns})


def _case(name: str, value: bytes | None, reason: RejectReason, headers: Any = HEADERS, **limits: Any) -> Any:
    return pytest.param(value, headers, WireLimits(**limits), reason, id=name)


R = RejectReason
MARKED = [*HEADERS, ("spacenet-marker", b"task-end")]
HUGE_METADATA = b"\xff\xff\xff\xff" + struct.pack("<i", 2**31 - 1) + bytes(64)
ONE_ROW = pa.record_batch({"features": pa.array([[1, 2, 3, 4]], FEATURES_TYPE)}, metadata=META)
CASES = [
    _case("garbage", b"not arrow at all", R.UNDECODABLE),
    _case("truncated", _crafted()[:-20], R.UNDECODABLE),
    _case("huge metadata length", HUGE_METADATA, R.UNDECODABLE),
    _case("eos only", b"\xff\xff\xff\xff\x00\x00\x00\x00", R.UNDECODABLE),
    _case("batch before schema", _batch_first(), R.UNDECODABLE),
    _case("trailing bytes", _crafted() + b"tail", R.UNDECODABLE),
    _case("empty value", b"", R.EMPTY),
    _case("none value", None, R.EMPTY, None),
    _case("no batch", _no_batch(), R.EMPTY),
    _case("zero rows", _ipc(ONE_ROW.slice(0, 0)), R.EMPTY),
    _case("message size", _crafted(), R.TOO_LARGE, max_message_bytes=100),
    _case("record count", _crafted(), R.TOO_LARGE, max_records=1),
    _case("feature count", _crafted(), R.TOO_LARGE, max_features=3),
    _case("header version", _crafted(), R.SCHEMA_VERSION, [("spacenet-schema-version", b"2")]),
    _case("metadata version", _crafted(meta=_meta(schema_version=b"2")), R.SCHEMA_VERSION),
    _case("no version", _crafted(meta={b"spacenet.shape": b"2,2"}), R.SCHEMA_VERSION, []),
    _case(
        "conflicting versions", _crafted(), R.SCHEMA_VERSION, [*HEADERS, ("spacenet-schema-version", b"0")]
    ),
    _case("control without version", b"", R.SCHEMA_VERSION, make_headers(Marker.TASK_START, 1)[1:]),
    _case("unknown column", _crafted(extra=pa.array([1, 2])), R.SCHEMA),
    _case("no features", _crafted(features=None), R.SCHEMA),
    _case("variable list", _crafted(features=pa.array([[1], [2]], pa.list_(pa.uint8()))), R.SCHEMA),
    _case("two schemas", _two_schema_messages(), R.SCHEMA),
    _case("two batches", _ipc(ONE_ROW, ONE_ROW), R.SCHEMA),
    _case("compressed", _ipc(ONE_ROW, compression="zstd"), R.SCHEMA),
    _case("null record", _one_row(features=pa.array([None], FEATURES_TYPE)), R.SCHEMA),
    _case("null feature", _one_row(features=pa.array([[1, None, 3, 4]], FEATURES_TYPE)), R.SCHEMA),
    _case("null event time", _one_row(event_time=pa.array([None], EVENT_TIME_TYPE)), R.SCHEMA),
    _case("int16 features", _one_row(features=pa.array([[1, 2, 3, 4]], pa.list_(pa.int16(), 4))), R.DTYPE),
    _case("int32 label", _one_row(label=pa.array([1], pa.int32())), R.DTYPE),
    _case("float task", _one_row(task=pa.array([1.0])), R.DTYPE),
    _case("local event time", _one_row(event_time=pa.array([1], pa.timestamp("ms"))), R.DTYPE),
    _case("no shape", _crafted(meta={b"spacenet.schema_version": b"1"}), R.SHAPE),
    _case("empty shape", _crafted(meta=_meta(shape=b"")), R.SHAPE),
    _case("unparsable shape", _crafted(meta=_meta(shape=b"2x2")), R.SHAPE),
    _case("zero dim", _crafted(meta=_meta(shape=b"4,0")), R.SHAPE),
    _case("huge dim", _crafted(meta=_meta(shape=b"9" * 5000)), R.SHAPE),
    _case("wrong product", _crafted(meta=_meta(shape=b"2,3")), R.SHAPE),
    _case("unexpected shape", _crafted(), R.SHAPE, expected_shape=(4,)),
    _case("absent label", _crafted(label=None), R.LABEL_MISSING),
    _case("null label", _crafted(label=pa.array([1, None], pa.int64())), R.LABEL_MISSING),
    _case("negative label", _crafted(label=pa.array([1, -1], pa.int64())), R.LABEL_NEGATIVE),
    _case(
        "negative request label",
        _crafted(label=pa.array([None, -1], pa.int64())),
        R.LABEL_NEGATIVE,
        require_label=False,
    ),
    _case(
        "label too big",
        _crafted(label=pa.array([1, 10], pa.int64())),
        R.LABEL_OUT_OF_RANGE,
        num_classes_max=10,
    ),
    _case("negative task", _crafted(task=pa.array([0, -2], pa.int64())), R.TASK),
    _case("null task", _crafted(task=pa.array([0, None], pa.int64())), R.TASK),
    _case(
        "unknown marker", b"", R.MARKER, [*HEADERS, ("spacenet-marker", b"pause"), ("spacenet-task", b"1")]
    ),
    _case("marker without task", b"", R.MARKER, MARKED),
    _case("task without marker", _crafted(), R.MARKER, [*HEADERS, ("spacenet-task", b"1")]),
    _case("signed task", b"", R.MARKER, [*MARKED, ("spacenet-task", b"-1")]),
    _case("null task header", b"", R.MARKER, [*MARKED, ("spacenet-task", None)]),
    _case("huge task", b"", R.MARKER, [*MARKED, ("spacenet-task", b"9" * 19)]),
    _case("conflicting tasks", b"", R.MARKER, [*make_headers(Marker.TASK_END, 1), ("spacenet-task", b"2")]),
    _case("nan", _one_row(features=_float_features([0.0, float("nan"), 1.0, 2.0])), R.NON_FINITE),
    _case("inf", _one_row(features=_float_features([0.0, 1.0, float("-inf"), 2.0])), R.NON_FINITE),
]


@pytest.mark.parametrize(("value", "headers", "limits", "reason"), CASES)
def test_rejects(value: bytes | None, headers: Any, limits: WireLimits, reason: RejectReason) -> None:
    with pytest.raises(WireError) as info:
        decode(value, headers, limits)
    assert info.value.reason is reason
    assert str(info.value).startswith(f"{reason.value}: ") and info.value.detail


def test_every_reason_has_a_crafted_message() -> None:
    assert {case.values[3] for case in CASES} == set(RejectReason)
    assert [r.value for r in RejectReason] == [
        "undecodable",
        "empty",
        "too_large",
        "schema_version",
        "schema",
        "dtype",
        "shape",
        "label_missing",
        "label_negative",
        "label_out_of_range",
        "task",
        "marker",
        "non_finite",
    ]


def test_size_limit_is_checked_before_decoding() -> None:
    garbage = b"\x00" * 101
    assert _reason(garbage, limits=WireLimits(max_message_bytes=100)) is R.TOO_LARGE
    assert _reason(garbage) is R.UNDECODABLE


def test_prediction_requests_may_omit_labels() -> None:
    requests = WireLimits(require_label=False)
    assert decode(_crafted(label=None), HEADERS, requests).labels is None
    assert decode(_crafted(label=pa.array([None, None], pa.int64())), HEADERS, requests).labels is None
    assert decode(_crafted(label=pa.array([None, 3], pa.int64())), HEADERS, requests).labels is None
    labelled = decode(_crafted(), HEADERS, requests).labels
    assert labelled is not None and labelled.tolist() == [0, 1]


# ---------------------------------------------------------------- hostile input

VALID = [_valid(), _valid(np.float32, (3, 2), n=2, tasks=1, event_time=np.array([5, 6])), _crafted()]


def _decode_or_reject(value: bytes) -> Decoded | None:
    try:
        return decode(value, HEADERS, LIMITS)
    except WireError:
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1024))
def test_random_bytes_only_raise_wire_error(value: bytes) -> None:
    _decode_or_reject(value)
    _decode_or_reject(b"\xff\xff\xff\xff" + value)  # past the continuation marker too


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_truncations_only_raise_wire_error(value: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(value) - 1))
    decoded = _decode_or_reject(value[:cut])
    assert decoded is None or cut >= len(value) - 8  # only the end-of-stream marker is optional


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_corrupted_bytes_only_raise_wire_error(value: bytes, data: st.DataObject) -> None:
    corrupted = bytearray(value)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.integers(0, 255))
    _decode_or_reject(bytes(corrupted))


_PEAK_SCRIPT = """
import sys, pyarrow as pa
from spacenet.stream.wire import WireError, WireLimits, decode
value = sys.stdin.buffer.read()
try:
    decode(value, None, WireLimits(max_records=10**6))
except WireError as error:
    print(error.reason.value)
print(pa.default_memory_pool().max_memory())
pa.ipc.open_stream(value).read_all()  # what a plain reader would allocate
print(pa.default_memory_pool().max_memory())
"""


def test_compressed_bomb_is_rejected_without_inflating() -> None:
    zeros = np.zeros((20_000, 1, 28, 28), np.uint8)  # 15.7 MB that zstd packs into a few KB
    bomb = _ipc(
        pa.record_batch(
            {"features": pa.FixedSizeListArray.from_arrays(pa.array(zeros.reshape(-1)), 784)},
            metadata=_meta(shape=b"1,28,28"),
        ),
        compression="zstd",
    )
    assert len(bomb) < 64 * 1024
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], input=bomb, capture_output=True, check=True, timeout=120
    )
    reason, peak_decode, peak_plain = run.stdout.decode().split()
    assert reason == "schema"
    assert int(peak_decode) < 1 << 20 <= zeros.nbytes <= int(peak_plain)


# ---------------------------------------------------------------- caches of checked schemas and layouts


@pytest.fixture
def caches(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Empty schema and layout caches for this test (the module's own come back afterwards)."""
    fresh = SimpleNamespace(schema={}, layout={})
    monkeypatch.setattr(wire, "_SCHEMA_CACHE", fresh.schema)
    monkeypatch.setattr(wire, "_LAYOUT_CACHE", fresh.layout)
    return fresh


class _NoCache(dict[Any, Any]):
    """A cache that never keeps anything: decode then reads every message in full."""

    def __setitem__(self, key: Any, value: Any) -> None:
        return None


@contextlib.contextmanager
def _uncached() -> Iterator[None]:
    saved = wire._SCHEMA_CACHE, wire._LAYOUT_CACHE
    wire._SCHEMA_CACHE, wire._LAYOUT_CACHE = _NoCache(), _NoCache()
    try:
        yield
    finally:
        wire._SCHEMA_CACHE, wire._LAYOUT_CACHE = saved


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(owner, name, counting)
    return calls


def _outcome(
    value: bytes, headers: Any = HEADERS, limits: WireLimits = LIMITS, decoder: Decoder | None = None
) -> Any:
    """What decode (or ``decoder``) makes of a message, comparable across calls: the reason,
    or the content."""
    try:
        msg = decode(value, headers, limits) if decoder is None else decoder(value, headers)
    except WireError as error:
        return error.reason
    arrays = (msg.labels, msg.tasks, msg.event_time)
    return (
        msg.features.dtype,
        msg.features.numpy().tobytes(),
        *(None if a is None else (a.dtype, a.tobytes(), a.flags.writeable) for a in arrays),
        msg.shape,
        msg.marker,
        msg.marker_task,
        msg.num_records,
        msg.nbytes,
    )


def test_a_producers_schema_and_layout_are_read_once(
    caches: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    schemas = _count_calls(monkeypatch, pa.ipc, "read_schema")
    streams = _count_calls(monkeypatch, wire, "_read_stream")  # the full reader
    limits = WireLimits(expected_shape=(1, 4, 4), num_classes_max=11)
    rng = np.random.default_rng(0)
    for i in range(5):  # new values each time, same layout
        features = rng.integers(0, 256, (7, 1, 4, 4), dtype=np.uint8)
        msg = decode(encode(features, np.arange(7) + i), HEADERS, limits)
        assert torch.equal(msg.features, torch.from_numpy(features))
        assert msg.labels is not None and msg.labels.tolist() == list(range(i, i + 7))
    assert (schemas[0], streams[0]) == (1, 1) and len(caches.schema) == len(caches.layout) == 1
    for n in (1, 3):  # another record count: another layout, the same schema
        assert decode(_valid(n=n), HEADERS, limits).num_records == n
    assert (schemas[0], streams[0]) == (1, 3) and len(caches.schema) == 1 and len(caches.layout) == 3


def test_a_cached_schema_lets_no_other_schema_shape_version_or_limits_through(
    caches: SimpleNamespace,
) -> None:
    strict = WireLimits(expected_shape=(2, 2), num_classes_max=10)
    assert decode(_crafted(), HEADERS, strict).num_records == 2  # now cached
    assert len(caches.schema) == len(caches.layout) == 1
    # Other schema bytes are checked afresh, whatever is cached.
    assert _reason(_crafted(meta=_meta(shape=b"4")), limits=strict) is R.SHAPE
    assert _reason(_crafted(meta=_meta(shape=b"1,4")), limits=strict) is R.SHAPE
    assert _reason(_crafted(meta=_meta(schema_version=b"2")), limits=strict) is R.SCHEMA_VERSION
    int16 = pa.array([[1, 2, 3, 4], [5, 6, 7, 8]], pa.list_(pa.int16(), 4))
    assert _reason(_crafted(features=int16), limits=strict) is R.DTYPE
    assert _reason(_crafted(label=pa.array([0, 1], pa.int32())), limits=strict) is R.DTYPE
    assert _reason(_crafted(extra=pa.array([1, 2])), limits=strict) is R.SCHEMA
    # The same bytes under other limits are checked against those limits.
    assert _reason(_crafted(), limits=WireLimits(expected_shape=(4,))) is R.SHAPE
    assert _reason(_crafted(), limits=WireLimits(expected_shape=(2, 2), max_features=3)) is R.TOO_LARGE
    assert _reason(_crafted(), limits=WireLimits(expected_shape=(2, 2), max_records=1)) is R.TOO_LARGE
    assert _reason(_crafted(), limits=WireLimits(max_message_bytes=100)) is R.TOO_LARGE
    assert _reason(_crafted(), limits=WireLimits(num_classes_max=1)) is R.LABEL_OUT_OF_RANGE
    assert _reason(_crafted(), [("spacenet-schema-version", b"2")], strict) is R.SCHEMA_VERSION
    # A schema that passed only thanks to the version header does not pass without it.
    unversioned = _crafted(meta={b"spacenet.shape": b"2,2"})
    assert decode(unversioned, HEADERS, strict).num_records == 2
    assert _reason(unversioned, [], strict) is R.SCHEMA_VERSION
    assert _reason(unversioned, None, strict) is R.SCHEMA_VERSION
    # Nothing that failed was cached: of the schemas, those that passed the schema checks (one
    # under other limits), of the layouts, those of the two messages that passed everything.
    assert len(caches.schema) == 3 and len(caches.layout) == 2
    # A cached layout does not vouch for the values: they are still checked.
    assert _reason(_crafted(label=pa.array([1, 10], pa.int64())), limits=strict) is R.LABEL_OUT_OF_RANGE
    assert _reason(_crafted(label=pa.array([-1, 1], pa.int64())), limits=strict) is R.LABEL_NEGATIVE
    assert _reason(_crafted(label=pa.array([1, None], pa.int64())), limits=strict) is R.LABEL_MISSING
    value = _crafted()
    assert _reason(value + b"tail", limits=strict) is R.UNDECODABLE
    assert _reason(value[:-20], limits=strict) is R.UNDECODABLE
    assert _reason(value[:-8] + b"\xff\xff\xff\xff\x01\x00\x00\x00", limits=strict) is R.UNDECODABLE
    # Same bytes up to the body and the same end, but a body of another length.
    assert _reason(value[:-8] + bytes(8) + value[-8:], limits=strict) is R.UNDECODABLE
    shorter = value[:-16] + value[-8:]  # the end-of-stream marker becomes the end of the body
    with _uncached():
        expected = _outcome(shorter, limits=strict)
    assert _outcome(shorter, limits=strict) == expected == R.LABEL_OUT_OF_RANGE


def test_a_cached_layout_still_checks_every_value(caches: SimpleNamespace) -> None:
    def message(label: int = 1, task: int = 0, feature: float = 2.0) -> bytes:
        return _crafted(
            features=pa.array([[0.0, 1.0, feature, 3.0]] * 2, pa.list_(pa.float32(), 4)),
            label=pa.array([0, label], pa.int64()),
            task=pa.array([task, 1], pa.int64()),
            event_time=pa.array([5, 6], EVENT_TIME_TYPE),
        )

    limits = WireLimits(num_classes_max=10)
    first = decode(message(), HEADERS, limits)
    assert first.tasks is not None and first.event_time is not None and len(caches.layout) == 1
    again = decode(message(label=9, task=7, feature=-1.5), HEADERS, limits)  # the cached layout
    assert again.labels is not None and again.labels.tolist() == [0, 9]
    assert again.tasks is not None and again.tasks.tolist() == [7, 1]
    assert again.event_time is not None and again.event_time.tolist() == first.event_time.tolist()
    assert again.features[0].tolist() == [[0.0, 1.0], [-1.5, 3.0]]
    assert _reason(message(label=10), limits=limits) is R.LABEL_OUT_OF_RANGE
    assert _reason(message(label=-1), limits=limits) is R.LABEL_NEGATIVE
    assert _reason(message(task=-1), limits=limits) is R.TASK
    assert _reason(message(feature=float("nan")), limits=limits) is R.NON_FINITE
    assert _reason(message(feature=float("inf")), limits=limits) is R.NON_FINITE
    assert len(caches.layout) == 1


def test_a_layout_without_labels_serves_requests_only(caches: SimpleNamespace) -> None:
    requests = WireLimits(require_label=False)
    assert decode(_crafted(label=None), HEADERS, requests).labels is None
    assert len(caches.layout) == 1
    assert decode(_crafted(label=None), HEADERS, requests).labels is None
    assert _reason(_crafted(label=None)) is R.LABEL_MISSING  # training limits, the same layout


def test_messages_with_nulls_or_in_other_buffers_are_never_layouts(caches: SimpleNamespace) -> None:
    requests = WireLimits(require_label=False)
    partial = _crafted(label=pa.array([None, 3], pa.int64()))
    assert decode(partial, HEADERS, requests).labels is None
    assert decode(_crafted(label=pa.array([None, None], pa.int64())), HEADERS, requests).labels is None
    assert caches.layout == {}  # a null count above zero: Arrow reads the validity bitmap
    assert _reason(_crafted(label=pa.array([None, -1], pa.int64())), limits=requests) is R.LABEL_NEGATIVE
    value = _crafted()
    for other in (bytearray(value), memoryview(value)):  # decoded in full, never cached
        assert decode(other, HEADERS, LIMITS).num_records == 2  # type: ignore[arg-type]
    assert caches.layout == {}
    schemas = len(caches.schema)
    padded = _crafted(meta={**META, b"padding": b"x" * wire._CACHE_KEY_BYTES})
    assert decode(padded, HEADERS, LIMITS).num_records == 2
    assert caches.layout == {} and len(caches.schema) == schemas  # too long to be a key


def test_decoded_views_of_a_cached_layout_share_memory_warn_nothing_and_keep_the_message_alive(
    caches: SimpleNamespace,
) -> None:
    decode(_valid(np.float32, tasks=1, event_time=np.array([0, 1, 2])), HEADERS, LIMITS)
    value = _valid(np.float32, tasks=2, event_time=np.array([3, 4, 5]))
    whole = np.frombuffer(value, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msg = decode(value, HEADERS, LIMITS)
    assert len(caches.layout) == 1 and np.shares_memory(msg.features.numpy(), whole)
    for array in (msg.labels, msg.tasks, msg.event_time):
        assert array is not None and np.shares_memory(array, whole) and not array.flags.writeable
    features = np.arange(3 * 16, dtype=np.uint8).reshape(3, 1, 4, 4)
    decode(encode(features[::-1].copy(), np.zeros(3)), HEADERS, LIMITS)
    kept = decode(encode(features, np.zeros(3)), HEADERS, LIMITS)  # the layout; nothing else holds the bytes
    gc.collect()
    _ = [bytes(1000) for _ in range(1000)]  # reuse any freed memory
    assert torch.equal(kept.features, torch.from_numpy(features))


@pytest.mark.parametrize("value", [*VALID, _valid(tasks=3), _crafted(label=None)])
def test_a_cached_layout_decodes_exactly_as_the_full_reader(value: bytes) -> None:
    for limits in (LIMITS, WireLimits(require_label=False), WireLimits(num_classes_max=2)):
        with _uncached():
            expected = _outcome(value, limits=limits)
        decode(value, HEADERS, WireLimits(require_label=False))  # learn the layout, if any
        assert _outcome(value, limits=limits) == expected


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_corrupting_a_cached_layouts_message_gives_what_the_full_reader_gives(
    value: bytes, data: st.DataObject
) -> None:
    decode(value, HEADERS, LIMITS)  # its layout is cached now
    key = wire._layout_key(value, SCHEMA_VERSION, LIMITS)
    assert key is not None
    body = st.integers(len(key[0]), len(value) - 9)  # where a message keeps its layout
    corrupted = bytearray(value)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.one_of(body, body, body, st.integers(0, len(value) - 1)))
        corrupted[at] = data.draw(st.integers(0, 255))
    limits = data.draw(
        st.sampled_from([LIMITS, WireLimits(num_classes_max=5), WireLimits(require_label=False)])
    )
    with _uncached():
        expected = _outcome(bytes(corrupted), limits=limits)
    assert _outcome(bytes(corrupted), limits=limits) == expected


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_a_decoder_gives_what_the_full_reader_gives_message_after_message(
    value: bytes, data: st.DataObject
) -> None:
    """A Decoder that has taken a shortcut for a layout is fed messages like it: corrupted,
    with other labels, other headers; each comes out as the full reader makes it."""
    limits = data.draw(
        st.sampled_from([LIMITS, WireLimits(num_classes_max=5), WireLimits(require_label=False)])
    )
    decoder = Decoder(limits)
    decoder(value, HEADERS)  # its layout is the decoder's shortcut now, where it has one
    key = wire._layout_key(value, SCHEMA_VERSION, limits)
    assert key is not None
    body = st.integers(len(key[0]), len(value) - 9)  # where a message keeps its layout
    marker, version_2 = make_headers(Marker.TASK_START, 1), [("spacenet-schema-version", b"2")]
    other_headers = st.sampled_from([HEADERS, [*HEADERS], [], None, marker, version_2])
    for _ in range(data.draw(st.integers(1, 4))):
        changed = bytearray(value)
        for _ in range(data.draw(st.integers(0, 3))):
            at = data.draw(st.one_of(body, body, body, st.integers(0, len(value) - 1)))
            changed[at] = data.draw(st.integers(0, 255))
        headers = data.draw(st.one_of(st.just(HEADERS), other_headers))
        with _uncached():
            expected = _outcome(bytes(changed), headers, limits)
        assert _outcome(bytes(changed), headers, limits, decoder) == expected


@pytest.mark.parametrize(
    ("labels", "num_classes_max", "reason"),
    [
        ([0, 2**56 - 1], None, None),
        ([2**56, 3], None, None),  # a most significant byte that is not 0: checked in full
        ([2**62, 3], None, None),
        ([-1, 3], None, R.LABEL_NEGATIVE),
        ([3, -(2**63)], None, R.LABEL_NEGATIVE),
        ([0, 300], 300, R.LABEL_OUT_OF_RANGE),  # below 2**56 yet out of a small class range
        ([0, 2**56 - 1], 2**56 - 1, R.LABEL_OUT_OF_RANGE),
        ([0, 2**56 - 2], 2**56 - 1, None),
    ],
)
def test_a_decoders_shortcut_checks_labels_at_the_edges(
    labels: list[int], num_classes_max: int | None, reason: Any
) -> None:
    limits = WireLimits(num_classes_max=num_classes_max)
    decoder = Decoder(limits)
    assert decoder(_crafted(label=pa.array([0, 1], pa.int64())), HEADERS).num_records == 2
    value = _crafted(label=pa.array(labels, pa.int64()))  # the same layout
    assert wire._layout_key(value, SCHEMA_VERSION, limits) == wire._layout_key(
        _crafted(), SCHEMA_VERSION, limits
    )
    outcome = _outcome(value, HEADERS, limits, decoder)
    if reason is None:
        assert outcome[2] == (np.dtype(np.int64), np.array(labels, np.int64).tobytes(), False)
    else:
        assert outcome is reason


def test_the_caches_stay_bounded(caches: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = _count_calls(monkeypatch, pa.ipc, "read_schema")
    entries = wire._CACHE_ENTRIES
    values = [_valid(shape=(k,), n=2) for k in range(1, 3 * entries + 1)]  # as many distinct schemas
    for k, value in enumerate(values, 1):
        assert decode(value, HEADERS, LIMITS).shape == (k,)
        assert len(caches.schema) <= entries and len(caches.layout) <= entries
    assert len(caches.schema) == len(caches.layout) == entries and parsed[0] == len(values)
    assert decode(values[-1], HEADERS, LIMITS).shape == (len(values),)  # the newest stay: a hit
    assert parsed[0] == len(values)
    assert decode(values[0], HEADERS, LIMITS).shape == (1,)  # the oldest went: parsed again
    assert parsed[0] == len(values) + 1 and len(caches.schema) == len(caches.layout) == entries


def test_a_schema_with_huge_metadata_is_checked_but_never_cached(caches: SimpleNamespace) -> None:
    padded = _crafted(meta={**META, b"padding": b"x" * (wire._CACHE_KEY_BYTES + 1)})
    assert decode(padded, HEADERS, LIMITS).num_records == 2
    assert caches.schema == {} and caches.layout == {}
    assert decode(_crafted(), HEADERS, LIMITS).num_records == 2 and len(caches.schema) == 1


def test_expected_shape_given_as_a_list_keys_the_caches_like_a_tuple(caches: SimpleNamespace) -> None:
    listed = WireLimits(expected_shape=[2, 2])  # type: ignore[arg-type]
    assert decode(_crafted(), HEADERS, listed).shape == (2, 2)
    assert decode(_crafted(), HEADERS, WireLimits(expected_shape=(2, 2))).shape == (2, 2)
    assert len(caches.schema) == len(caches.layout) == 1


def test_the_caches_under_threads(caches: SimpleNamespace) -> None:
    entries = wire._CACHE_ENTRIES
    values = [_valid(shape=(k,), n=1) for k in range(1, 2 * entries + 1)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(400):
                k = (i * 7 + offset) % len(values)
                assert decode(values[k], HEADERS, LIMITS).shape == (k + 1,)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(caches.schema) <= entries and len(caches.layout) <= entries


def test_features_need_not_be_the_first_column() -> None:
    batch = pa.record_batch(
        {
            "label": pa.array([3, 4], pa.int64()),
            "features": pa.array([[1, 2, 3, 4], [5, 6, 7, 8]], FEATURES_TYPE),
        },
        metadata=META,
    )
    msg = decode(_ipc(batch), HEADERS, LIMITS)
    assert msg.features.tolist() == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]] and msg.labels is not None
    assert msg.labels.tolist() == [3, 4]


@pytest.mark.parametrize(
    ("labels", "num_classes_max", "reason"),
    [
        ([0, 9], 10, None),
        ([0, 10], 10, R.LABEL_OUT_OF_RANGE),
        ([-1, 3], 10, R.LABEL_NEGATIVE),
        ([-1, 30], 10, R.LABEL_NEGATIVE),  # the first failing check names the reason
        ([-(2**63), 3], None, R.LABEL_NEGATIVE),
        ([-1, 3], 2**70, R.LABEL_NEGATIVE),  # a class limit beyond int64 lets no negative through
        ([2**63 - 1, 0], None, None),
        ([2**63 - 1, 0], 2**63, None),
        ([2**63 - 1, 0], 2**63 - 1, R.LABEL_OUT_OF_RANGE),
    ],
)
def test_label_range_at_the_edges(labels: list[int], num_classes_max: int | None, reason: Any) -> None:
    value = _crafted(label=pa.array(labels, pa.int64()))
    limits = WireLimits(num_classes_max=num_classes_max)
    if reason is None:
        msg = decode(value, HEADERS, limits)
        assert msg.labels is not None and msg.labels.tolist() == labels
    else:
        assert _reason(value, limits=limits) is reason
