"""Malformed wire messages, each named by the reject reason ``decode`` must give it.

Every builder returns a ``Message`` whose ``kind`` is the expected ``RejectReason`` value
(``"good"`` for a valid one). The builders take their parameters explicitly, so that a
hypothesis strategy (``tests/stream/test_poison.py``) and a seeded numpy generator
(``poison_batch``, for the run against the broker) drive the same code.

    >>> rng = np.random.default_rng(0)
    >>> [m.kind for m in poison_batch(rng, 3, max_message_bytes=60_000, max_records=100)]
    ['too_large', 'empty', 'schema']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from spacenet.stream import wire
from tests.support.service import SHAPE, Message, synthetic_images

V1 = tuple(wire.make_headers())
WIDTH = int(np.prod(SHAPE))


def arrow_stream(columns: Mapping[str, pa.Array], metadata: Mapping[bytes, bytes] | None) -> bytes:
    """One Arrow IPC stream of one batch, built without ``wire.encode``'s checks."""
    batch = pa.record_batch(dict(columns), metadata=dict(metadata) if metadata is not None else None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def _features(values: npt.NDArray[Any], width: int = WIDTH) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def _meta(version: bytes = b"1", shape: bytes = b"1,28,28") -> dict[bytes, bytes]:
    return {wire.VERSION_KEY: version, wire.SHAPE_KEY: shape}


def good(labels: npt.NDArray[np.int64], seed: int) -> Message:
    return Message(wire.encode(synthetic_images(labels, seed), labels), records=len(labels))


def random_bytes(raw: bytes) -> Message:
    """Bytes that are no Arrow stream (a leading 0xff could start a valid one: avoided)."""
    raw = raw if raw and raw[0] != 0xFF else b"\x00" + raw
    return Message(raw, kind="undecodable")


def truncated(value: bytes, cut: int) -> Message:
    """``value`` cut to ``cut`` bytes, ``0 < cut < len(value) - 8`` (the last 8 bytes are
    the optional end-of-stream marker); cut right after the schema, no batch is left."""
    if not 0 < cut < len(value) - 8:
        raise ValueError("cut must leave part of the record batch out")
    source = pa.BufferReader(pa.py_buffer(value))
    pa.ipc.MessageReader.open_stream(source).read_next_message()
    return Message(value[:cut], kind="empty" if cut == source.tell() else "undecodable")


def huge_length_prefix(value: bytes, which: int) -> Message:
    """The schema (``which=0``) or batch (1) message declares a 2 GiB metadata length."""
    at = 4 if which == 0 else 8 + int.from_bytes(value[4:8], "little") + 4
    patched = value[:at] + (0x7FFFFFF0).to_bytes(4, "little") + value[at + 4 :]
    return Message(patched, kind="undecodable")


def header_version(value: bytes, version: bytes) -> Message:
    return Message(value, headers=(("spacenet-schema-version", version),), kind="schema_version")


def metadata_version(labels: npt.NDArray[np.int64], version: bytes) -> Message:
    x = synthetic_images(labels)
    columns = {"features": _features(x), "label": pa.array(labels)}
    return Message(arrow_stream(columns, _meta(version=version)), headers=(), kind="schema_version")


def wrong_shape(labels: npt.NDArray[np.int64], side: int) -> Message:
    """Square images of ``side`` x ``side`` (never 28)."""
    x = np.zeros((len(labels), 1, side, side), np.uint8)
    return Message(wire.encode(x, labels), kind="shape")


def shape_metadata(labels: npt.NDArray[np.int64], raw: bytes) -> Message:
    """Shape metadata that is unparsable, or declares sizes the column does not have
    (``b"999999999,999999999"``: a huge declared size)."""
    x = synthetic_images(labels)
    columns = {"features": _features(x), "label": pa.array(labels)}
    return Message(arrow_stream(columns, _meta(shape=raw)), kind="shape")


FEATURE_DTYPES = ("int8", "int16", "int32", "int64", "uint16", "float16", "float64")


def feature_dtype(labels: npt.NDArray[np.int64], dtype: str) -> Message:
    x = synthetic_images(labels).astype(dtype)
    columns = {"features": _features(x), "label": pa.array(labels)}
    return Message(arrow_stream(columns, _meta()), kind="dtype")


def label_dtype(labels: npt.NDArray[np.int64], dtype: str) -> Message:
    """Labels as another integer or a float type."""
    x = synthetic_images(labels)
    columns = {"features": _features(x), "label": pa.array(labels.astype(dtype))}
    return Message(arrow_stream(columns, _meta()), kind="dtype")


def non_finite(labels: npt.NDArray[np.int64], where: int, value: float) -> Message:
    x = synthetic_images(labels).astype(np.float32)
    x.reshape(-1)[where % x.size] = value
    return Message(wire.encode(x, labels), kind="non_finite")


def negative_label(labels: npt.NDArray[np.int64], where: int, value: int) -> Message:
    """One label (at ``where``) set to ``value`` < 0."""
    bad = labels.copy()
    bad[where % len(bad)] = value
    return Message(wire.encode(synthetic_images(labels), bad), kind="label_negative")


def label_out_of_range(labels: npt.NDArray[np.int64], where: int, value: int) -> Message:
    """A label >= the limit's ``num_classes_max`` (only a limit that sets it rejects this)."""
    bad = labels.copy()
    bad[where % len(bad)] = value
    return Message(wire.encode(synthetic_images(labels), bad), kind="label_out_of_range")


def missing_label(labels: npt.NDArray[np.int64], nulls: bool) -> Message:
    """No label column, or one with a null."""
    x = synthetic_images(labels)
    if not nulls:
        return Message(wire.encode(x), kind="label_missing")
    label = pa.array([None, *labels[1:].tolist()], pa.int64())
    return Message(arrow_stream({"features": _features(x), "label": label}, _meta()), kind="label_missing")


def missing_features(labels: npt.NDArray[np.int64]) -> Message:
    return Message(arrow_stream({"label": pa.array(labels)}, _meta()), kind="schema")


def unknown_column(labels: npt.NDArray[np.int64], name: str) -> Message:
    x = synthetic_images(labels)
    columns = {"features": _features(x), "label": pa.array(labels), name: pa.array(labels)}
    return Message(arrow_stream(columns, _meta()), kind="schema")


def negative_task(labels: npt.NDArray[np.int64], task: int) -> Message:
    return Message(wire.encode(synthetic_images(labels), labels, tasks=task), kind="task")


def too_many_records(max_records: int) -> Message:
    labels = np.zeros(max_records + 1, np.int64)
    return Message(wire.encode(np.zeros((len(labels), *SHAPE), np.uint8), labels), kind="too_large")


def oversized(max_message_bytes: int) -> Message:
    """A valid-looking message over the byte limit (random pixels do not compress)."""
    n = max_message_bytes // WIDTH + 2
    x = np.random.default_rng(n).integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)
    return Message(wire.encode(x, np.zeros(n, np.int64)), kind="too_large")


def empty(with_version: bool) -> Message:
    return Message(b"", headers=V1 if with_version else (), kind="empty")


def bad_marker(labels: npt.NDArray[np.int64], marker: bytes, task: bytes) -> Message:
    headers = (*V1, (wire.MARKER_HEADER, marker), (wire.TASK_HEADER, task))
    return Message(wire.encode(synthetic_images(labels), labels), headers=headers, kind="marker")


# ------------------------------------------------------------ a seeded batch, numpy-driven
_T = TypeVar("_T")


def _pick(rng: np.random.Generator, options: Sequence[_T]) -> _T:
    """One of ``options`` as itself (``rng.choice`` would hand back numpy scalars)."""
    return options[int(rng.integers(0, len(options)))]


def _labels(rng: np.random.Generator) -> npt.NDArray[np.int64]:
    return rng.integers(0, 10, size=int(rng.integers(2, 6))).astype(np.int64)


def _sample(rng: np.random.Generator, max_message_bytes: int, max_records: int) -> Message:
    """One random malformed message, any kind the service rejects (uint8 1x28x28 expected,
    no class limit: an out-of-range label is just an unknown class to the service)."""
    y = _labels(rng)
    valid = wire.encode(synthetic_images(y), y)
    builders: list[Callable[[], Message]] = [
        lambda: random_bytes(rng.bytes(int(rng.integers(1, 400)))),
        lambda: truncated(valid, int(rng.integers(1, len(valid) - 8))),
        lambda: huge_length_prefix(valid, int(rng.integers(0, 2))),
        lambda: header_version(valid, _pick(rng, [b"0", b"2", b"v1", b"", b"11"])),
        lambda: metadata_version(y, _pick(rng, [b"0", b"2", b"1.0"])),
        lambda: wrong_shape(y, int(_pick(rng, [7, 14, 27, 29]))),
        lambda: shape_metadata(y, _pick(rng, [b"999999999,999999999", b"", b"28,28,1,x", b"0,784"])),
        lambda: feature_dtype(y, str(_pick(rng, FEATURE_DTYPES))),
        lambda: label_dtype(y, str(_pick(rng, ["int32", "uint8", "float64"]))),
        lambda: non_finite(y, int(rng.integers(0, 1 << 20)), float(_pick(rng, [np.nan, np.inf, -np.inf]))),
        lambda: negative_label(y, int(rng.integers(0, 8)), -int(rng.integers(1, 1 << 62))),
        lambda: missing_label(y, bool(rng.integers(0, 2))),
        lambda: missing_features(y),
        lambda: unknown_column(y, str(_pick(rng, ["extra", "labels", "Features"]))),
        lambda: negative_task(y, -int(rng.integers(1, 100))),
        lambda: too_many_records(max_records),
        lambda: empty(bool(rng.integers(0, 2))),
        lambda: bad_marker(y, _pick(rng, [b"task-middle", b"task-start"]), _pick(rng, [b"-1", b"x", b""])),
    ]
    # Oversized ones are ~100 kB each: one draw in 40, not one in 19.
    if rng.random() < 1 / 40:
        return oversized(max_message_bytes)
    return builders[int(rng.integers(0, len(builders)))]()


def poison_batch(rng: np.random.Generator, n: int, max_message_bytes: int, max_records: int) -> list[Message]:
    """``n`` malformed messages drawn by ``rng``, keyed ``bad-<i>``."""
    out = []
    for i in range(n):
        m = _sample(rng, max_message_bytes, max_records)
        out.append(Message(m.value, f"bad-{i}".encode(), m.headers, 0, m.kind))
    return out
