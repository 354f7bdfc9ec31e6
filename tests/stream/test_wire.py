"""Tests for wire format v1: round trips, zero-copy, every reject reason, hostile input."""

from __future__ import annotations

import gc
import struct
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacenet.stream.wire import (
    EVENT_TIME_TYPE,
    Decoded,
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
