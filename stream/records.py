"""The one record type of the service: ``Records``, and the records held back for a class.

A record is one row of a wire message: its features, its label, the Kafka partition it came
from and its id. Every part of the service passes records as ``Records``, whose columns
always come in this order and these dtypes: ``features`` (n, *shape), ``labels`` int64,
``partitions`` int32, ``ids`` int64. The id names the record stably within its partition:
``offset << ROW_BITS | row`` (``record_ids``; ``offsets_of`` gives the offsets back), so a
replay of the same messages gives the same ids.

The boundary detector holds some records back (``PENDING``) until their class is
confirmed; a checkpoint must carry them, because their offsets are committed with it.
``PendingStore`` keeps them by detector sequence number. ``to_arrow``/``from_arrow`` give
records as an Arrow record batch (spill files); ``pack``/``unpack`` as one zstd-compressed
Arrow IPC stream in a uint8 tensor, for a ``weights_only`` checkpoint.

    >>> ids = record_ids([7, 9], [2, 1])          # message 7 holds 2 records, message 9 one
    >>> ids.tolist(), offsets_of(ids).tolist()
    ([458752, 458753, 589824], [7, 7, 9])
    >>> recs = Records(np.zeros((3, 1, 2, 2), np.uint8), np.array([5, 5, 6]), np.zeros(3, np.int32), ids)
    >>> store = PendingStore()
    >>> store.put(np.array([10, 11, 12]), recs)
    >>> store.take([11]).ids.tolist(), len(store)
    ([458753], 2)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch

ROW_BITS = 16  # a message holds at most 2**16 records (the ingest's limits cap it there)
FIELDS = ("features", "labels", "partitions", "ids")  # the columns of Records, in order


def record_ids(offsets: npt.ArrayLike, counts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """The ids of the records of messages at ``offsets`` holding ``counts`` records each,
    in order: ``offset << ROW_BITS | row``, row being the record's position in its message."""
    n = np.asarray(counts, np.int64).reshape(-1)
    rows = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return (np.repeat(np.asarray(offsets, np.int64).reshape(-1), n) << ROW_BITS) + rows


def offsets_of(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The Kafka offsets of the messages the records ``ids`` came in."""
    return ids >> ROW_BITS


@dataclass(frozen=True)
class Records:
    """Rows of records: features (n, *shape), labels, Kafka partitions and ids."""

    features: npt.NDArray[Any]
    labels: npt.NDArray[np.int64]
    partitions: npt.NDArray[np.int32]
    ids: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.features, self.labels, self.partitions, self.ids))

    def records(self) -> Records:
        """These records (as ``buffer._Blocks.records`` copies its rows into)."""
        return self

    def take(self, rows: npt.ArrayLike) -> Records:
        r = np.asarray(rows, dtype=np.intp)  # np.take gathers rows about twice as fast as x[r]
        return Records(*(np.take(getattr(self, f), r, axis=0) for f in FIELDS))

    @staticmethod
    def concat(parts: Sequence[Records]) -> Records:
        return Records(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))

    @staticmethod
    def empty(shape: Sequence[int], dtype: npt.DTypeLike, n: int = 0) -> Records:
        """``n`` zeroed records of features ``shape`` and ``dtype``."""
        return Records(
            np.zeros((n, *shape), dtype), np.zeros(n, np.int64), np.zeros(n, np.int32), np.zeros(n, np.int64)
        )


ARROW_FORMAT = 1  # the schema below; kept in its metadata as "format"
PACK_CODEC = "zstd"  # level 1: MNIST records shrink to about 0.21x, in about 2.5 ms a MB here


def to_arrow(records: Records, meta: dict[str, Any] | None = None) -> pa.RecordBatch:
    """Records as one Arrow record batch: a fixed-size list of the flattened features per
    record, then label, partition and id; the features' shape and dtype, with ``meta``, go
    in the schema's ``spacenet`` metadata (JSON)."""
    shape = records.features.shape[1:]
    info = {
        **(meta or {}),
        "shape": list(shape),
        "dtype": str(records.features.dtype),
        "format": ARROW_FORMAT,
    }
    features = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(records.features).reshape(-1)), max(1, math.prod(shape))
    )
    schema = pa.schema(
        [("features", features.type), ("label", pa.int64()), ("partition", pa.int32()), ("id", pa.int64())],
        metadata={"spacenet": json.dumps(info)},
    )
    columns = [features, pa.array(records.labels), pa.array(records.partitions), pa.array(records.ids)]
    return pa.record_batch(columns, schema=schema)


def from_arrow(batch: pa.RecordBatch) -> Records:
    """``to_arrow``'s inverse (zero-copy where Arrow's buffers allow: uncompressed ones)."""
    info = json.loads(batch.schema.metadata[b"spacenet"])
    flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
    return Records(
        flat.astype(info["dtype"], copy=False).reshape(-1, *info["shape"]),
        batch.column(1).to_numpy(),
        batch.column(2).to_numpy(),
        batch.column(3).to_numpy(),
    )


def pack(records: Records) -> torch.Tensor:
    """Records as one uint8 tensor for a ``weights_only`` checkpoint: an Arrow IPC stream of
    ``to_arrow``'s batch, its buffers compressed with zstd."""
    batch = to_arrow(records)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec(PACK_CODEC, 1))
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    return torch.from_numpy(np.frombuffer(sink.getvalue(), np.uint8).copy())  # one copy, writeable


def unpack(packed: torch.Tensor | dict[str, torch.Tensor]) -> Records:
    """``pack``'s inverse, in writeable arrays; also reads the first checkpoint format's dict of
    plain tensors (whose partitions may be int64)."""
    if isinstance(packed, torch.Tensor):
        recs = from_arrow(pa.ipc.open_stream(pa.py_buffer(packed.numpy())).read_next_batch())
        return Records(*(np.array(getattr(recs, f)) for f in FIELDS))  # writeable, as the tensors were
    return Records(
        features=packed["features"].numpy(),
        labels=packed["labels"].numpy().astype(np.int64, copy=False),
        partitions=packed["partitions"].numpy().astype(np.int32, copy=False),
        ids=packed["ids"].numpy().astype(np.int64, copy=False),
    )


class PendingStore:
    """Pending records by sequence number (at most the detector's window of them)."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[npt.NDArray[np.generic], int, int, int]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, seqs: npt.NDArray[np.int64], records: Records) -> None:
        """Keep ``records[i]`` under ``seqs[i]`` (copies: the caller may reuse its arrays)."""
        columns = zip(records.labels.tolist(), records.partitions.tolist(), records.ids.tolist(), strict=True)
        for i, (seq, (label, partition, record_id)) in enumerate(zip(seqs.tolist(), columns, strict=True)):
            self._rows[seq] = (records.features[i].copy(), label, partition, record_id)

    def take(self, seqs: Iterable[int]) -> Records:
        """Remove and return these records (in the given order)."""
        return self._records([self._rows.pop(s) for s in seqs])

    def clear(self) -> None:
        self._rows.clear()

    def state_dict(self) -> dict[str, Any]:
        """The pending records and their sequence numbers, as tensors."""
        seqs = sorted(self._rows)
        return {
            "pending_seqs": torch.tensor(seqs, dtype=torch.long),
            "pending": pack(self._records([self._rows[s] for s in seqs])),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the pending records with those of ``state_dict()``."""
        self._rows.clear()
        self.put(state["pending_seqs"].numpy(), unpack(state["pending"]))

    @staticmethod
    def _records(rows: list[tuple[npt.NDArray[np.generic], int, int, int]]) -> Records:
        if not rows:
            return Records.empty((), np.uint8)
        return Records(
            features=np.stack([r[0] for r in rows]),
            labels=np.array([r[1] for r in rows], np.int64),
            partitions=np.array([r[2] for r in rows], np.int32),
            ids=np.array([r[3] for r in rows], np.int64),
        )
