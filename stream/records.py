"""Records observed but not yet learned: pending candidates and the open task's stash.

The boundary detector holds some records back (``PENDING``) until their class is
confirmed; a checkpoint must carry them, and the open task's training records,
because their offsets are committed with it. ``PendingStore`` keeps pending
records by detector sequence number; ``pack``/``unpack`` turn record sets into
plain tensors for a ``weights_only`` checkpoint.

    >>> import numpy as np
    >>> store = PendingStore()
    >>> store.put(np.array([5, 6]), np.zeros((2, 1, 2, 2), np.uint8), np.array([7, 7]), np.array([0, 0]),
    ...           np.array([10, 11]))
    >>> store.take([6]).labels.tolist(), len(store)
    ([7], 1)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import torch

from spacenet.stream.buffer import Records


class PendingStore:
    """Pending records by sequence number (at most the detector's window of them)."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[npt.NDArray[np.generic], int, int, int]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def put(
        self,
        seqs: npt.NDArray[np.int64],
        features: npt.NDArray[np.generic],
        labels: npt.NDArray[np.int64],
        partitions: npt.NDArray[np.int64],
        offsets: npt.NDArray[np.int64],
    ) -> None:
        for i, seq in enumerate(seqs.tolist()):
            self._rows[seq] = (features[i].copy(), int(labels[i]), int(partitions[i]), int(offsets[i]))

    def take(self, seqs: Iterable[int]) -> Records:
        """Remove and return these records (in the given order)."""
        rows = [self._rows.pop(s) for s in seqs]
        return _records(rows)

    def all(self) -> tuple[list[int], Records]:
        seqs = sorted(self._rows)
        return seqs, _records([self._rows[s] for s in seqs])

    def clear(self) -> None:
        self._rows.clear()


def _records(rows: list[tuple[npt.NDArray[np.generic], int, int, int]]) -> Records:
    if not rows:
        return Records(
            np.zeros((0,), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        )
    return Records(
        features=np.stack([r[0] for r in rows]),
        labels=np.array([r[1] for r in rows], np.int64),
        partitions=np.array([r[2] for r in rows], np.int32),
        ids=np.array([r[3] for r in rows], np.int64),
    )


def pack(records: Records) -> dict[str, torch.Tensor]:
    """Records as tensors, for a checkpoint."""
    return {
        "features": torch.from_numpy(np.ascontiguousarray(records.features)),
        "labels": torch.from_numpy(records.labels.astype(np.int64)),
        "partitions": torch.from_numpy(records.partitions.astype(np.int64)),
        "ids": torch.from_numpy(records.ids.astype(np.int64)),
    }


def unpack(packed: dict[str, torch.Tensor]) -> Records:
    return Records(
        features=packed["features"].numpy(),
        labels=packed["labels"].numpy(),
        partitions=packed["partitions"].numpy().astype(np.int32),
        ids=packed["ids"].numpy(),
    )
