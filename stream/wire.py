"""Wire format version 1: a Kafka message value is one Arrow IPC stream of one record batch.

Spec: ``docs/wire-format.md``. ``decode`` raises only ``WireError``, whose bounded ``reason``
is safe as a metric label.

>>> import numpy as np
>>> value = encode(np.zeros((2, 1, 28, 28), np.uint8), np.array([3, 4]), tasks=0)
>>> msg = decode(value, make_headers(Marker.TASK_START, 0), WireLimits(expected_shape=(1, 28, 28)))
>>> msg.num_records, tuple(msg.features.shape), msg.labels.tolist(), msg.marker.value, msg.marker_task
(2, (2, 1, 28, 28), [3, 4], 'task-start', 0)
>>> decode(b"", make_headers(Marker.TASK_END, 0), WireLimits()).is_control  # a control message
True
"""

from __future__ import annotations

import math
import re
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.dlpack import from_dlpack

from spacenet.stream.boundary import Marker as Marker  # the detector's markers are the wire's

SCHEMA_VERSION = "1"
_VERSION = SCHEMA_VERSION.encode()
VERSION_HEADER, MARKER_HEADER, TASK_HEADER = "spacenet-schema-version", "spacenet-marker", "spacenet-task"
VERSION_KEY, SHAPE_KEY = b"spacenet.schema_version", b"spacenet.shape"
EVENT_TIME_TYPE = pa.timestamp("ms", tz="UTC")
Headers = Sequence[tuple[str, bytes | None]]  # as Kafka clients hand them over; a None value reads as b""
_INT64 = pa.int64()
_NO_CLASS_LIMIT = 1 << 63  # above every non-negative int64 label
_LITTLE_ENDIAN = sys.byteorder == "little"
_OPTIONAL_TYPES = {"label": _INT64, "task": _INT64, "event_time": EVENT_TIME_TYPE}
_DIM = re.compile(rb"[1-9][0-9]{0,8}")  # at most 8 dims of at most 9 digits: no huge-int parsing
_TASK_ID = re.compile(rb"[0-9]{1,18}")
# What hostile bytes raise inside pyarrow and our flatbuffer peek; all of it means undecodable.
_DECODE_ERRORS = (pa.ArrowException, OSError, ValueError, struct.error, IndexError, OverflowError)
# Two caches make a producer's messages cheap after its first: every message from one producer
# carries the same schema bytes, and every message with as many records the same bytes up to
# its batch body. Both hold only what passed every check, keyed by those exact bytes and by
# everything else the checks read; both are bounded in entries and in key size, so hostile
# input cannot grow them. Parsing and checking the schema (``_schema``) and the batch layout
# (``_Layout``) cost far more than reading the values.
_SchemaKey = tuple[bytes, str | None, tuple[int, ...] | None, int]
_SCHEMA_CACHE: dict[_SchemaKey, tuple[pa.Schema, tuple[int, ...]]] = {}
_LayoutKey = tuple[bytes, int, str | None, tuple[int, ...] | None, int, int]
_LAYOUT_CACHE: dict[_LayoutKey, _Layout] = {}
_CACHE_ENTRIES = 64  # per cache; the oldest entry goes first
_CACHE_KEY_BYTES = 16 << 10  # a v1 schema plus batch header is about 1 KiB
_CACHE_LOCK = threading.Lock()
_CONTINUATION = b"\xff\xff\xff\xff"  # starts each message of an Arrow IPC stream
_EMPTY = np.empty((0,), np.uint8)
_EMPTY.flags.writeable = False
_TAIL_BYTES = 16  # what may follow the batch body in a cached layout: the end-of-stream marker


class RejectReason(StrEnum):
    """Why a message was rejected: a small fixed set, safe as a Prometheus label value."""

    UNDECODABLE = "undecodable"
    EMPTY = "empty"
    TOO_LARGE = "too_large"
    SCHEMA_VERSION = "schema_version"
    SCHEMA = "schema"
    DTYPE = "dtype"
    SHAPE = "shape"
    LABEL_MISSING = "label_missing"
    LABEL_NEGATIVE = "label_negative"
    LABEL_OUT_OF_RANGE = "label_out_of_range"
    TASK = "task"
    MARKER = "marker"
    NON_FINITE = "non_finite"


class WireError(Exception):
    """A message that does not decode or validate; ``reason`` is bounded, ``detail`` is for humans."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason, self.detail = reason, detail


def _ensure(ok: bool, reason: RejectReason, detail: str) -> None:
    if not ok:
        raise WireError(reason, detail)


@dataclass(frozen=True, slots=True)
class WireLimits:
    """What ``decode`` accepts; ``require_label=False`` is for prediction requests."""

    max_message_bytes: int = 8 << 20
    max_records: int = 10_000
    max_features: int = 1 << 20
    expected_shape: tuple[int, ...] | None = None
    num_classes_max: int | None = None
    require_label: bool = True

    def __post_init__(self) -> None:
        maxima = (self.max_message_bytes, self.max_records, self.max_features, self.num_classes_max)
        if any(limit is not None and limit < 1 for limit in maxima):
            raise ValueError("WireLimits maxima must be positive")


@dataclass(slots=True, eq=False)  # not frozen: that triples the cost of making one, per message
class Decoded:
    """One decoded message, to be treated as read-only. ``values`` (the features as a
    read-only numpy array of shape (records, *shape)), ``labels``, ``tasks`` and
    ``event_time`` share memory with the immutable message value, and so does the
    ``features`` tensor: never write it in place; ``.clone()`` first."""

    values: npt.NDArray[np.uint8] | npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64] | None
    tasks: npt.NDArray[np.int64] | None
    event_time: npt.NDArray[np.datetime64] | None
    shape: tuple[int, ...]
    marker: Marker | None
    marker_task: int | None
    num_records: int
    nbytes: int

    @property
    def features(self) -> torch.Tensor:
        """``values`` as a tensor, without a copy."""
        flat = pa.Array.from_buffers(
            pa.from_numpy_dtype(self.values.dtype), self.values.size, [None, pa.py_buffer(self.values)]
        )
        return from_dlpack(flat).reshape(self.values.shape)

    @property
    def is_control(self) -> bool:
        """True for an empty-valued message that only carries a marker."""
        return self.num_records == 0


def make_headers(marker: Marker | None = None, task: int | None = None) -> list[tuple[str, bytes]]:
    """Kafka headers for a v1 message; a marker needs its task id and vice versa.

    >>> make_headers(Marker.TASK_END, 7)
    [('spacenet-schema-version', b'1'), ('spacenet-marker', b'task-end'), ('spacenet-task', b'7')]
    """
    if (marker is None) != (task is None) or not 0 <= (task or 0) < 10**18:
        raise ValueError(f"marker and a task id in [0, 1e18) go together, got {marker!r}, {task!r}")
    headers = [(VERSION_HEADER, _VERSION)]
    if marker is not None:
        headers += [(MARKER_HEADER, Marker(marker).value.encode()), (TASK_HEADER, str(task).encode())]
    return headers


def encode(
    features: npt.NDArray[Any],
    labels: npt.ArrayLike | None = None,
    *,
    tasks: npt.ArrayLike | None = None,
    event_time: npt.ArrayLike | None = None,
) -> bytes:
    """Serialize ``features`` of shape (N, *shape), uint8 or float32, into one message value.

    ``tasks`` is one id for all records or one per record; ``event_time`` is datetime64 (any
    unit, truncated to ms) or int64 ms since the epoch. Columns left as None are not written.
    """
    if features.dtype not in (np.uint8, np.float32) or not 2 <= features.ndim <= 9 or 0 in features.shape:
        raise ValueError("features must be uint8 or float32 of shape (N, *shape), 1 to 8 dims, none 0")
    shape = features.shape[1:]
    flat = pa.array(np.ascontiguousarray(features).reshape(-1))
    columns = {"features": pa.FixedSizeListArray.from_arrays(flat, math.prod(shape))}
    if labels is not None:  # pa.record_batch rejects columns of another length
        columns["label"] = pa.array(np.asarray(labels, np.int64))
    if tasks is not None:
        columns["task"] = pa.array(np.broadcast_to(np.asarray(tasks, np.int64), len(features)))
    if event_time is not None:
        times = np.asarray(event_time)
        millis = times.astype("datetime64[ms]").view(np.int64) if times.dtype.kind == "M" else times
        columns["event_time"] = pa.array(np.asarray(millis, np.int64), EVENT_TIME_TYPE)
    metadata = {VERSION_KEY: SCHEMA_VERSION, SHAPE_KEY: ",".join(map(str, shape))}
    batch = pa.record_batch(columns, metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def decode(value: bytes | None, headers: Headers | None, limits: WireLimits) -> Decoded:
    """Validate and decode one message, raising only ``WireError``; the first failing check (in
    the order of ``docs/wire-format.md``) names the reason. A None value counts as empty."""
    return _decode(value, headers, limits)[0]


class Decoder:
    """``decode`` for one consumer's stream, with ``limits`` fixed. It remembers the layout of
    the last message that passed with one. A message with the same headers and length as
    that one, and the same bytes up to its batch body (as each full message of a producer
    has), is read with that layout at once: no cache key is built, hashed or looked up.

    >>> import numpy as np
    >>> decoder = Decoder(WireLimits(expected_shape=(1, 2, 2)))
    >>> values = [encode(np.full((3, 1, 2, 2), i, np.uint8), [i, i, i]) for i in range(3)]
    >>> [decoder(value, make_headers()).labels.tolist() for value in values]
    [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    """

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        # (headers, length, bytes up to the body, layout) of the last message with a layout
        self._last: tuple[list[tuple[str, bytes | None]], int, bytes, _Layout] | None = None

    def __call__(self, value: bytes | None, headers: Headers | None) -> Decoded:
        """Decode one message, exactly as ``decode(value, headers, self.limits)`` would."""
        last = self._last
        if (
            last is not None
            and type(value) is bytes
            and len(value) == last[1]
            and headers == last[0]
            and value.startswith(last[2])
            and value.endswith(last[3].tail)
        ):
            # The same key ``decode`` would look the layout up under: equal headers give the
            # same header version (and no marker), the limits are ours.
            last_layout = last[3]
            features, labels, tasks, event_time = last_layout.columns(value, self.limits)
            finite = features.dtype != np.float32 or bool(np.isfinite(features).all())
            _ensure(finite, RejectReason.NON_FINITE, "features contain NaN or infinity")
            shape, rows = last_layout.shape, last_layout.rows
            return Decoded(features, labels, tasks, event_time, shape, None, None, rows, len(value))
        decoded, key, layout = _decode(value, headers, self.limits)
        if key is not None and layout is not None and decoded.marker is None:
            self._last = list(headers or ()), key[1], key[0], layout
        return decoded


def _decode(
    value: bytes | None, headers: Headers | None, limits: WireLimits
) -> tuple[Decoded, _LayoutKey | None, _Layout | None]:
    """``decode``, and the layout key and layout it read the message by (None when it read
    the message in full and did not cache its layout)."""
    nbytes = len(value) if value is not None else 0
    if nbytes > limits.max_message_bytes:
        raise WireError(RejectReason.TOO_LARGE, f"{nbytes} bytes > limit")
    header_version, marker, marker_task = _read_headers(headers or ())
    if not value:
        _ensure(marker is not None, RejectReason.EMPTY, "empty value without a marker header")
        _ensure(header_version is not None, RejectReason.SCHEMA_VERSION, "control message needs a version")
        return Decoded(_EMPTY, None, None, None, (), marker, marker_task, 0, nbytes), None, None
    learned: _Layout | None = None
    try:
        key = _layout_key(value, header_version, limits)
        layout = None if key is None else _LAYOUT_CACHE.get(key)
        if layout is not None and value.endswith(layout.tail):
            features, labels, tasks, event_time = layout.columns(value, limits)
            shape, rows = layout.shape, layout.rows
        else:
            layout = None
            batch, column, shape, body = _read_stream(value, header_version, limits)
            rows = batch.num_rows
            width = column.type.list_size
            # The child values in this batch's rows, as a view (validate(full=True) bounded them):
            # what flatten() returns for a column without nulls, without a pyarrow.compute call.
            flat = column.values.slice(column.offset * width, len(column) * width)
            features = flat.to_numpy(zero_copy_only=True).reshape(rows, *shape)
            names = batch.schema.names
            labels = _labels(batch, names, limits)
            tasks = _column(batch, names, "task", RejectReason.TASK)
            event_time = _column(batch, names, "event_time", RejectReason.SCHEMA)
            if key is not None and (labels is not None or "label" not in names):  # no null anywhere
                learned = _Layout.learn(value, body, shape, features, labels, tasks, event_time)
    except _DECODE_ERRORS as exc:
        raise WireError(RejectReason.UNDECODABLE, f"{type(exc).__name__}: {exc}"[:300]) from exc
    finite = features.dtype != np.float32 or bool(np.isfinite(features).all())
    _ensure(finite, RejectReason.NON_FINITE, "features contain NaN or infinity")
    if learned is not None and key is not None:  # only a message that passed everything
        _remember(_LAYOUT_CACHE, key, learned)
        layout = learned
    decoded = Decoded(features, labels, tasks, event_time, shape, marker, marker_task, rows, nbytes)
    return decoded, key, layout


def _read_headers(headers: Headers) -> tuple[str | None, Marker | None, int | None]:
    found: dict[str, bytes] = {}
    for key, raw in headers:
        if key in (VERSION_HEADER, MARKER_HEADER, TASK_HEADER) and found.setdefault(key, raw or b"") != (
            raw or b""
        ):
            reason = RejectReason.SCHEMA_VERSION if key == VERSION_HEADER else RejectReason.MARKER
            raise WireError(reason, f"conflicting {key} headers")
    version = found.get(VERSION_HEADER)
    if version not in (None, _VERSION):
        raise WireError(RejectReason.SCHEMA_VERSION, f"header version {version!r:.24}")
    header_version = None if version is None else SCHEMA_VERSION
    raw_marker, raw_task = found.get(MARKER_HEADER), found.get(TASK_HEADER)
    if raw_marker is None and raw_task is None:
        return header_version, None, None
    markers = {m.value.encode(): m for m in Marker}
    if raw_marker not in markers or raw_task is None or not _TASK_ID.fullmatch(raw_task):
        raise WireError(RejectReason.MARKER, f"bad marker/task headers {raw_marker!r:.40}, {raw_task!r:.40}")
    return header_version, markers[raw_marker], int(raw_task)


def _read_stream(
    value: bytes, header_version: str | None, limits: WireLimits
) -> tuple[pa.RecordBatch, pa.FixedSizeListArray, tuple[int, ...], tuple[int, int]]:
    """Read the stream message by message: the batch, its features column, their shape and where
    the batch body lies in ``value``; the batch's buffers stay views of ``value``."""
    source = pa.BufferReader(pa.py_buffer(value))
    messages: Iterator[Any] = iter(pa.ipc.MessageReader.open_stream(source))
    first = next(messages, None)
    _ensure(first is not None and first.type == "schema", RejectReason.UNDECODABLE, "no schema message")
    schema, shape = _schema(first, header_version, limits)
    message: Any = next(messages, None)
    _ensure(message is not None, RejectReason.EMPTY, "stream holds no record batch")
    _ensure(message.type == "record batch", RejectReason.SCHEMA, f"unexpected {message.type} message")
    # Decompression would allocate whatever the sender declares, far beyond the message size.
    _ensure(not _body_compressed(message.metadata), RejectReason.SCHEMA, "compressed body")
    body_end = source.tell()
    body = body_end - (message.body.size if message.body is not None else 0), body_end
    batch = pa.ipc.read_record_batch(message, schema)
    _ensure(batch.num_rows > 0, RejectReason.EMPTY, "record batch has zero rows")
    _ensure(batch.num_rows <= limits.max_records, RejectReason.TOO_LARGE, f"{batch.num_rows} records")
    batch.validate(full=True)  # buffers must cover the declared lengths before anything reads them
    _ensure(next(messages, None) is None, RejectReason.SCHEMA, "more than one record batch")
    _ensure(source.tell() == len(value), RejectReason.UNDECODABLE, "trailing bytes after end of stream")
    column = batch.column("features")
    _ensure(not column.null_count and not column.values.null_count, RejectReason.SCHEMA, "null features")
    return batch, column, shape, body


def _schema(first: Any, header_version: str | None, limits: WireLimits) -> tuple[pa.Schema, tuple[int, ...]]:
    """The checked schema of a schema message, from the cache when these exact bytes passed the
    same check under the same limits before. ``read_schema`` reads only the message's flatbuffer
    (which also fixes its body length), so equal bytes give an equal schema and equal outcome."""
    meta = first.metadata.to_pybytes()
    expected = None if limits.expected_shape is None else tuple(limits.expected_shape)
    key = (meta, header_version, expected, limits.max_features)
    cached = _SCHEMA_CACHE.get(key)
    if cached is not None:
        return cached
    schema = pa.ipc.read_schema(first)
    checked = schema, _check_schema(schema, header_version, limits)
    if len(meta) <= _CACHE_KEY_BYTES:  # only schemas that passed: failures raised above
        _remember(_SCHEMA_CACHE, key, checked)
    return checked


def _remember(cache: dict[Any, Any], key: Any, entry: Any) -> None:
    with _CACHE_LOCK:
        while len(cache) >= _CACHE_ENTRIES:
            del cache[next(iter(cache))]  # the oldest entry
        cache[key] = entry


def _layout_key(value: bytes, header_version: str | None, limits: WireLimits) -> _LayoutKey | None:
    """What a message's layout is cached under: its bytes up to the batch body (read as two
    length-prefixed messages), its length and what the checks read besides; None when the
    value does not start that way or that part is too long to be a key."""
    if type(value) is not bytes or len(value) < 16 or not value.startswith(_CONTINUATION):
        return None  # (another buffer type takes the full reader: keys must be immutable)
    batch = 8 + int.from_bytes(value[4:8], "little", signed=True)
    if not 8 <= batch <= len(value) - 8 or value[batch : batch + 4] != _CONTINUATION:
        return None
    body = batch + 8 + int.from_bytes(value[batch + 4 : batch + 8], "little", signed=True)
    if not batch + 8 <= body <= min(len(value), _CACHE_KEY_BYTES):
        return None
    expected = None if limits.expected_shape is None else tuple(limits.expected_shape)
    return value[:body], len(value), header_version, expected, limits.max_features, limits.max_records


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the columns of a message that passed every check lie in its bytes.

    A message whose bytes before the batch body are identical to that message's (schema
    message and batch header: columns, types, shape, row count, null counts, buffer offsets
    and sizes, body length, compression), of the same length and with the same bytes after the
    body, differs from it only inside the body. There Arrow reads nothing but column values:
    the columns have fixed widths (no offsets), and a zero null count, which a layout requires
    of every column, makes Arrow ignore any validity bitmap. So such a message passes every
    check on its structure that the first one passed, and ``columns`` reads it as Arrow would
    (``learn`` took the offsets from Arrow's own buffers), checking only its values.
    """

    tail: bytes  # what follows the body: the end-of-stream marker, or nothing
    rows: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]  # of the features
    features: int  # byte offsets of each column's values in the message; None: column absent
    label: int | None
    task: int | None
    event_time: int | None

    @staticmethod
    def learn(
        value: bytes,
        body: tuple[int, int],
        shape: tuple[int, ...],
        features: npt.NDArray[Any],
        labels: npt.NDArray[Any] | None,
        tasks: npt.NDArray[Any] | None,
        event_time: npt.NDArray[Any] | None,
    ) -> _Layout | None:
        """The layout of a message just read in full, or None unless every column lies inside
        the body of ``value`` (Arrow copies buffers it has to byte-swap or realign)."""
        start, end = body
        if len(value) - end > _TAIL_BYTES:
            return None
        base = pa.py_buffer(value).address
        where = [
            features.ctypes.data - base,
            *(None if a is None else a.ctypes.data - base for a in (labels, tasks, event_time)),
        ]
        sizes = [
            features.nbytes,
            *(0 if a is None else a.nbytes for a in (labels, tasks, event_time)),
        ]
        if any(
            at is not None and not start <= at <= at + size <= end
            for at, size in zip(where, sizes, strict=True)
        ):
            return None
        feature_at, label_at, task_at, time_at = where
        assert feature_at is not None
        return _Layout(
            value[end:], len(features), shape, features.dtype, feature_at, label_at, task_at, time_at
        )

    def columns(self, value: bytes, limits: WireLimits) -> tuple[npt.NDArray[Any], Any, Any, Any]:
        """Features, labels, task ids and event times of ``value``, a message of this layout, as
        views of it; labels and task ids are checked as ``_labels`` and ``_column`` do."""
        n = self.rows
        count = n * math.prod(self.shape)
        features = np.frombuffer(value, self.dtype, count, self.features).reshape(n, *self.shape)
        if self.label is None:
            _ensure(not limits.require_label, RejectReason.LABEL_MISSING, "record without a label")
            labels = None
        else:
            labels = np.frombuffer(value, np.int64, n, self.label)
            # The common case in one C call: each label's most significant byte is 0, so
            # 0 <= label < 2**56 (little-endian int64, as Arrow wrote them: see ``learn``).
            top = value[self.label + 7 : self.label + 8 * n : 8] if _LITTLE_ENDIAN else b""
            if top.count(0) != n or (limits.num_classes_max or _NO_CLASS_LIMIT) < 1 << 56:
                _label_range(labels, limits)
        tasks = None
        if self.task is not None:
            tasks = np.frombuffer(value, np.int64, n, self.task)
            _ensure(int(tasks.min()) >= 0, RejectReason.TASK, "task has negative ids")
        event_time = (
            None if self.event_time is None else np.frombuffer(value, "datetime64[ms]", n, self.event_time)
        )
        return features, labels, tasks, event_time


def _body_compressed(meta: Any) -> bool:
    """Whether the RecordBatch flatbuffer (already verified by Arrow) has a compression field."""

    def field(table: int, slot: int) -> int:  # where a table's field lies, 0 when absent
        vtable = table - struct.unpack_from("<i", meta, table)[0]
        if vtable < 0 or 6 + 2 * slot > struct.unpack_from("<H", meta, vtable)[0]:
            return 0
        offset: int = struct.unpack_from("<H", meta, vtable + 4 + 2 * slot)[0]
        return table + offset if offset else 0

    header = field(struct.unpack_from("<I", meta, 0)[0], 2)  # Message.header: the RecordBatch table
    return header > 0 and field(header + struct.unpack_from("<I", meta, header)[0], 3) > 0


def _check_schema(schema: pa.Schema, header_version: str | None, limits: WireLimits) -> tuple[int, ...]:
    meta = schema.metadata or {}
    version = meta.get(VERSION_KEY)
    _ensure(version is not None or header_version is not None, RejectReason.SCHEMA_VERSION, "no version")
    _ensure(version in (None, _VERSION), RejectReason.SCHEMA_VERSION, f"metadata version {version!r:.24}")
    names = schema.names
    known = len(set(names)) == len(names) and set(names) <= {"features", *_OPTIONAL_TYPES}
    _ensure(known and "features" in names, RejectReason.SCHEMA, f"columns {names!r:.120}")
    ftype = schema.field("features").type
    _ensure(pa.types.is_fixed_size_list(ftype), RejectReason.SCHEMA, f"features is {ftype}")
    _ensure(ftype.value_type in (pa.uint8(), pa.float32()), RejectReason.DTYPE, f"features of {ftype}")
    for name, expected in _OPTIONAL_TYPES.items():
        actual = schema.field(name).type if name in names else expected
        _ensure(actual == expected, RejectReason.DTYPE, f"{name} is {actual}, not {expected}")
    raw_shape = meta.get(SHAPE_KEY, b"")
    parts = raw_shape.split(b",")
    valid = len(parts) <= 8 and all(_DIM.fullmatch(part) for part in parts)
    _ensure(valid, RejectReason.SHAPE, f"bad or missing shape metadata {raw_shape!r:.60}")
    shape = tuple(int(part) for part in parts)
    _ensure(math.prod(shape) == ftype.list_size, RejectReason.SHAPE, f"{shape} != {ftype.list_size}")
    expected_shape = shape if limits.expected_shape is None else tuple(limits.expected_shape)
    _ensure(shape == expected_shape, RejectReason.SHAPE, f"shape {shape} != {expected_shape}")
    _ensure(ftype.list_size <= limits.max_features, RejectReason.TOO_LARGE, f"{ftype.list_size} features")
    return shape


def _labels(batch: pa.RecordBatch, names: list[str], limits: WireLimits) -> npt.NDArray[np.int64] | None:
    """All labels, or None for a request with any label absent; present ones are range-checked."""
    column = batch.column("label") if "label" in names else None
    complete = column is not None and not column.null_count
    _ensure(complete or not limits.require_label, RejectReason.LABEL_MISSING, "record without a label")
    if column is None or column.null_count == len(column):
        return None
    if complete:  # numpy on the zero-copy view is several times cheaper than pyarrow.compute
        return _label_range(column.to_numpy(zero_copy_only=True), limits)
    low, high = (bound.as_py() for bound in pc.min_max(column).values())  # the labels present
    _check_label_range(low, high, limits)
    return None


def _label_range(labels: npt.NDArray[np.int64], limits: WireLimits) -> npt.NDArray[np.int64]:
    """``labels`` once every one is a class id under ``limits``."""
    # One pass for the common case: read as uint64, a negative label is >= 2**63.
    limit = min(limits.num_classes_max or _NO_CLASS_LIMIT, _NO_CLASS_LIMIT)
    if int(labels.view(np.uint64).max()) >= limit:
        _check_label_range(int(labels.min()), int(labels.max()), limits)
    return labels


def _check_label_range(low: int, high: int, limits: WireLimits) -> None:
    _ensure(low >= 0, RejectReason.LABEL_NEGATIVE, f"label {low} < 0")
    in_range = limits.num_classes_max is None or high < limits.num_classes_max
    _ensure(in_range, RejectReason.LABEL_OUT_OF_RANGE, f"label {high} >= {limits.num_classes_max}")


def _column(batch: pa.RecordBatch, names: list[str], name: str, reason: RejectReason) -> Any:
    """An optional column as a zero-copy numpy view; no nulls, and ids are never negative."""
    if name not in names:
        return None
    column = batch.column(name)
    _ensure(not column.null_count, reason, f"{name} has nulls")
    values = column.to_numpy(zero_copy_only=True)
    _ensure(column.type != _INT64 or int(values.min()) >= 0, reason, f"{name} has negative ids")
    return values
