"""The open task's records, bounded in memory, plus every task's held-out sample.

Training records stay in memory up to ``max_memory_bytes``, then go to Arrow IPC files
in a private folder under ``spill_dir``; ``iter_batches()`` and ``dataset()`` return
them all, in the order they became training records. A record is held out when a
seeded hash of its (partition, id) falls below ``holdout_fraction``; each task keeps at
most ``holdout_max_per_task`` of them, and all tasks together at most ``holdout_max_records``
(n tasks: ``holdout_max_records // n`` each), by reservoir sampling with a counter-based
seeded generator; a record the open task's reservoir passes over or evicts joins training
instead. When a task is added, a closed task's sample over its new share keeps a seeded
uniform subset (its other records were never trained: they only measured).
So held-out and training never overlap and, for stable ids such as Kafka offsets, a
replay splits the same way. Held-out samples outlive ``clear()``: they measure
forgetting later. ``state_dict`` / ``load_state_dict`` carry the open task's records and
every held-out sample (with its reservoir's count) in a checkpoint, as they are (zstd
Arrow IPC, ``records.pack``): restoring splits nothing again.

    >>> buf = TaskBuffer((2,), "uint8", holdout_fraction=0.5, seed=0)
    >>> buf.start_task(0)
    >>> x, ids = np.arange(20, dtype=np.uint8).reshape(10, 2), np.arange(10)
    >>> buf.add(Records(x, np.zeros(10, np.int64), np.zeros(10, np.int32), ids))
    >>> len(buf) + len(buf.holdout(0).labels)
    10
    >>> x, y = buf.dataset()[0]
    >>> x.dtype, x.shape, y
    (torch.float32, torch.Size([2]), 0)
    >>> buf.clear(); len(buf), buf.holdout_tasks
    (0, [0])
"""

from __future__ import annotations

import bisect
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from spacenet.stream.records import FIELDS, Records, from_arrow, pack, to_arrow, unpack

_GOLDEN = 0x9E3779B97F4A7C15


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finalizer: a fast, well-spread 64-bit hash (wraps by design)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(*keys: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    h = np.zeros(1, np.uint64)
    for key in keys:
        h = _mix(h ^ np.asarray(key).astype(np.int64).view(np.uint64))
    return h


def _gather(
    blocks: Sequence[npt.NDArray[Any]], starts: npt.NDArray[np.intp], rows: npt.NDArray[np.intp]
) -> npt.NDArray[Any]:
    """Rows ``rows`` (ascending positions in the blocks laid end to end, block b starting at
    ``starts[b]``) copied into one new array: one fancy index per block that has any."""
    first = blocks[0]
    out = np.empty((len(rows), *first.shape[1:]), first.dtype)
    which = np.searchsorted(starts, rows, side="right") - 1  # each row's block
    local = rows - starts[which]
    edges = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(rows)]
    for a, b in itertools.pairwise(edges):
        if b > a:
            out[a:b] = blocks[which[a]][local[a:b]]
    return out


@dataclass(frozen=True)
class _Blocks:
    """Training records whose features stay in the caller's read-only blocks (e.g. views of
    immutable Kafka message values), kept by reference: ``rows`` are their positions in
    the blocks laid end to end (block b starts at ``starts[b]``)."""

    blocks: list[npt.NDArray[Any]]
    starts: npt.NDArray[np.intp]
    rows: npt.NDArray[np.intp]
    labels: npt.NDArray[np.int64]
    partitions: npt.NDArray[np.int32]
    ids: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes kept alive: whole blocks (rows held out included), labels, ids."""
        columns = self.labels.nbytes + self.partitions.nbytes + self.ids.nbytes
        return sum(b.nbytes for b in self.blocks) + columns

    def records(self) -> Records:
        """The records, copied into one array (at read time, off the ingest path)."""
        return Records(_gather(self.blocks, self.starts, self.rows), self.labels, self.partitions, self.ids)


class RecordDataset(Dataset[tuple[torch.Tensor, int]]):
    """Random access to record segments as ``(float32 features * scale, label)``;
    ``targets`` holds all labels (what Avalanche's classification datasets look for)."""

    def __init__(
        self,
        segments: Sequence[Records],
        shape: tuple[int, ...],
        scale: float,
        order: npt.NDArray[np.intp] | None = None,
    ) -> None:
        self._segments = [s for s in segments if len(s)]
        self._ends = np.cumsum([len(s) for s in self._segments]).tolist()
        self._shape, self._scale = shape, scale
        labels = [s.labels for s in self._segments]
        targets = np.concatenate(labels) if labels else np.empty(0, np.int64)
        self._order = order  # record i is row order[i] of the segments laid end to end
        self.targets = torch.from_numpy(targets if order is None else targets[order])

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        if self._order is not None:
            i = int(self._order[i])
        k = bisect.bisect_right(self._ends, i)
        seg, row = self._segments[k], i - (self._ends[k - 1] if k else 0)
        x = torch.from_numpy(seg.features[row].astype(np.float32)).reshape(self._shape)
        return x * self._scale if self._scale != 1.0 else x, int(seg.labels[row])


class _Reservoir:
    """One task's held-out sample: ``n`` of at most ``cap`` rows; ``seen`` records offered."""

    def __init__(self, cap: int, seen: int = 0, rows: Records | None = None) -> None:
        self.cap, self.seen, self.rows = cap, seen, rows
        self.n = 0 if rows is None else len(rows)

    def offer(
        self, recs: Records, seed: int, task: int, index: npt.NDArray[np.intp] | None = None
    ) -> tuple[npt.NDArray[np.intp], list[Records]]:
        """Sample the rows ``index`` of ``recs`` (default: all) in, in that order, copying only
        those kept; returns the positions in ``index`` passed over and the evicted rows."""
        if index is None:
            index = np.arange(len(recs), dtype=np.intp)
        counts = np.arange(self.seen + 1, self.seen + len(index) + 1, dtype=np.int64)
        slots = (_hash(seed, task, counts) % counts.astype(np.uint64)).astype(np.int64)
        filling = counts <= self.cap
        slots[filling] = counts[filling] - 1  # not full yet: keep every record
        self.seen += len(index)
        rows = self._reserve(min(self.seen, self.cap), recs)
        fill = index[filling]
        for f in FIELDS:
            getattr(rows, f)[self.n : self.n + len(fill)] = np.take(getattr(recs, f), fill, axis=0)
        self.n += len(fill)
        replacing = np.flatnonzero(~filling & (slots < self.cap))
        if not len(replacing):
            return np.flatnonzero(slots >= self.cap), []
        evicted = self._replace(rows, recs, index[replacing], slots[replacing])
        return np.flatnonzero(slots >= self.cap), [evicted]

    @staticmethod
    def _replace(rows: Records, recs: Records, replacing: npt.NDArray[np.intp], slots: Any) -> Records:
        """Put ``recs[replacing[i]]`` into ``rows[slots[i]]`` for each i in order and return the
        rows evicted, in that order, in one gather: a record placed earlier in this call may be
        evicted again by a later one for the same slot."""
        order = np.argsort(slots, kind="stable")  # each slot's replacements, in call order
        sorted_slots = slots[order]
        first = np.ones(len(order), bool)  # the first replacement of its slot in this call
        first[1:] = sorted_slots[1:] != sorted_slots[:-1]
        last = np.ones(len(order), bool)  # the one that stays
        last[:-1] = first[1:]
        evicts_old = order[first]  # these evict a row sampled before this call
        evicts_new = order[~first]  # these evict the record its slot's previous replacement put there
        previous = replacing[order[np.flatnonzero(~first) - 1]]
        evicted = {}
        for f in FIELDS:
            sample, offered = getattr(rows, f), getattr(recs, f)
            out = evicted[f] = np.empty((len(order), *offered.shape[1:]), offered.dtype)
            out[evicts_old] = sample[slots[evicts_old]]  # copied before the writes below
            out[evicts_new] = offered[previous]
            sample[sorted_slots[last]] = offered[replacing[order[last]]]
        return Records(**evicted)

    def _reserve(self, size: int, like: Records) -> Records:
        have = 0 if self.rows is None else len(self.rows)
        if self.rows is None or size > have:
            size = min(self.cap, max(size, 2 * have))
            pad = Records.empty(like.features.shape[1:], like.features.dtype, size - have)
            self.rows = pad if self.rows is None else Records.concat([self.rows, pad])
        return self.rows

    def sample(self) -> Records:
        assert self.rows is not None
        return self.rows.take(np.arange(self.n))

    def shrink(self, cap: int, seed: int, task: int) -> Records | None:
        """Lower the cap to ``cap``; past it, keep a seeded uniform subset of the rows (in
        their order) and return the others (None when none go)."""
        self.cap = cap
        if self.rows is None or self.n <= cap:
            return None
        sample = self.sample()
        rank = np.argsort(_hash(seed, task, sample.partitions, sample.ids), kind="stable")
        keep = np.zeros(self.n, bool)
        keep[rank[:cap]] = True
        self.rows, self.n = sample.take(np.flatnonzero(keep)), cap
        return sample.take(np.flatnonzero(~keep))


class TaskBuffer:
    """Training records of the open task, spilled past a memory limit, and held-out samples.

    Defaults: 256 MiB in memory (a few hundred thousand MNIST-sized records before any
    spill), 10 % held out but at most 1000 per task, enough for a per-task accuracy
    within about +-3 points without starving training of records, and 5000 over all tasks
    (with 10 tasks, 500 each: about +-4.5 points), so a long stream's samples stay bounded.
    """

    task_: int | None  # the open task; None until start_task, and after clear
    spilled_files_: list[Path]

    def __init__(
        self,
        feature_shape: Sequence[int],
        dtype: str = "float32",
        max_memory_bytes: int = 256 * 2**20,
        spill_dir: str | os.PathLike[str] | None = None,
        holdout_fraction: float = 0.1,
        holdout_max_per_task: int = 1000,
        holdout_max_records: int = 5000,
        seed: int = 0,
    ) -> None:
        if np.dtype(dtype) not in (np.dtype(np.uint8), np.dtype(np.float32)):
            raise ValueError(f"features must be uint8 or float32, not {dtype}")
        if (
            not 0.0 <= holdout_fraction <= 1.0
            or min(holdout_max_per_task, holdout_max_records, max_memory_bytes) < 0
        ):
            raise ValueError(
                "need 0 <= holdout_fraction <= 1 and holdout_max_per_task, holdout_max_records, "
                "max_memory_bytes >= 0"
            )
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.dtype = dtype
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = spill_dir
        self.holdout_fraction = holdout_fraction
        self.holdout_max_per_task = holdout_max_per_task
        self.holdout_max_records = holdout_max_records
        self.seed = seed
        self.task_ = None
        self.spilled_files_ = []
        self._chunks: list[Records | _Blocks] = []
        self._chunk_bytes = 0
        self._spill_path: Path | None = None
        self._spilled_rows = 0
        self._holdout: dict[int, _Reservoir] = {}

    # ---- writing ----------------------------------------------------------------------
    def start_task(self, task: int) -> None:
        """Collect training records for ``task``; the previous task must be cleared."""
        if self.task_ is not None and self.task_ != task and len(self):
            raise RuntimeError(f"task {self.task_} still holds {len(self)} records: clear() it first")
        self.task_ = task

    def add(self, records: Records) -> None:
        """Add records of the open task: held-out or training, never both. Their
        ``(partitions, ids)`` name them stably (Kafka partition and ``record_ids``). The
        buffer copies what it keeps, so the caller may reuse or overwrite its arrays."""
        recs = self._checked(records)
        self._add(recs.labels, recs.partitions, recs.ids, lambda rows: np.take(recs.features, rows, axis=0))

    def add_blocks(
        self,
        blocks: Sequence[npt.NDArray[Any]],
        labels: npt.ArrayLike,
        partitions: npt.ArrayLike,
        ids: npt.ArrayLike,
    ) -> None:
        """``add`` for records whose features come in blocks of rows (e.g. one per message),
        in order. Read-only blocks are kept by reference, not copied (their records are
        copied when read: ``iter_batches``, ``dataset``, a spill); writeable ones are copied.

        >>> buf = TaskBuffer((2,), "uint8", holdout_fraction=0.0)
        >>> buf.start_task(0)
        >>> blocks = [np.zeros((2, 2), np.uint8), np.ones((1, 2), np.uint8)]
        >>> buf.add_blocks(blocks, labels=[0, 0, 1], partitions=[0, 0, 0], ids=[0, 1, 2])
        >>> next(buf.iter_batches()).features.tolist()
        [[0, 0], [0, 0], [1, 1]]
        """
        shaped, dtype, shape = [], np.dtype(self.dtype), self.feature_shape
        for block in blocks:
            if block.dtype != dtype:
                raise TypeError(f"features are {block.dtype}, this buffer holds {self.dtype}")
            if block.shape[1:] != shape:
                block = block.reshape(len(block), *shape)
            if block.flags.writeable:
                block = block.copy()
                block.flags.writeable = False
            shaped.append(block)
        starts = np.cumsum([0, *map(len, shaped)])
        y, p, i = self._columns(int(starts[-1]), labels, partitions, ids)

        def gather(rows: npt.NDArray[np.intp]) -> npt.NDArray[Any]:
            if not len(rows):
                return np.empty((0, *self.feature_shape), self.dtype)
            return _gather(shaped, starts, rows)

        def keep(rows: npt.NDArray[np.intp]) -> _Blocks:
            return _Blocks(shaped, starts, rows, y[rows], p[rows], i[rows])

        self._add(y, p, i, gather, keep)

    def _add(
        self,
        labels: npt.NDArray[np.int64],
        partitions: npt.NDArray[np.int32],
        ids: npt.NDArray[np.int64],
        gather: Callable[[npt.NDArray[np.intp]], npt.NDArray[Any]],
        keep: Callable[[npt.NDArray[np.intp]], Records | _Blocks] | None = None,
    ) -> None:
        """Split records into held-out and training; ``gather(rows)`` copies the features of
        ``rows`` (ascending positions) into a new array, ``keep(rows)`` makes the training
        chunk of those rows (default: their records, gathered)."""
        if self.task_ is None:
            raise RuntimeError("start_task() first")
        u = (_hash(self.seed, partitions, ids) >> np.uint64(11)).astype(np.float64) / 2.0**53
        chosen = u < self.holdout_fraction
        reservoir = self._reservoir(self.task_)
        held = np.flatnonzero(chosen)
        offered = Records(gather(held), labels[held], partitions[held], ids[held])
        passed, evicted = reservoir.offer(offered, self.seed, self.task_)
        chosen[held[passed]] = False
        rows = np.flatnonzero(~chosen)
        train = (
            keep(rows)
            if keep is not None
            else Records(gather(rows), labels[rows], partitions[rows], ids[rows])
        )
        self._keep([train, *evicted])

    def _keep(self, chunks: Sequence[Records | _Blocks]) -> None:
        """Append training chunks, spilling past the memory limit."""
        for chunk in [c for c in chunks if len(c)]:
            self._chunks.append(chunk)
            self._chunk_bytes += chunk.nbytes
        if self._chunk_bytes > self.max_memory_bytes:
            self._spill()

    def add_late(self, task: int, records: Records) -> None:
        """Offer records of a closed task's classes to that task's held-out sample (they
        are never trained; beyond the cap the reservoir keeps a uniform sample)."""
        recs = self._checked(records)
        self._reservoir(task).offer(recs, self.seed, task)

    def _reservoir(self, task: int) -> _Reservoir:
        """``task``'s held-out reservoir, made (and every cap lowered to its share) if new."""
        if task not in self._holdout:
            self._holdout[task] = _Reservoir(self.holdout_max_per_task)
            self._share()
        return self._holdout[task]

    def _share(self) -> None:
        """Cap each task's sample at its share of ``holdout_max_records``; the open task's
        records over it join training, a closed task's are let go (they only measured)."""
        cap = min(self.holdout_max_per_task, self.holdout_max_records // max(1, len(self._holdout)))
        for task, reservoir in self._holdout.items():
            over = reservoir.shrink(cap, self.seed, task)
            if over is not None and task == self.task_:
                self._keep([over])

    def clear(self) -> None:
        """Forget the open task's training records and delete its spill files."""
        if self._spill_path is not None:
            shutil.rmtree(self._spill_path, ignore_errors=True)
        self.task_, self.spilled_files_, self._chunks, self._chunk_bytes = None, [], [], 0
        self._spill_path, self._spilled_rows = None, 0

    # ---- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        """Training records of the open task."""
        return self._spilled_rows + sum(len(c) for c in self._chunks)

    def iter_batches(self) -> Iterator[Records]:
        """Training records in order: one batch per spill file, then one per added chunk."""
        for path in self.spilled_files_:
            yield from self._read(path)
        for chunk in self._chunks:
            yield chunk.records()

    def dataset(self, scale: float | None = None, stream_order: bool = False) -> RecordDataset:
        """The training records as a torch Dataset over memory-mapped spill files; ``scale``
        defaults to 1/255 for uint8 features (as torchvision's ToTensor) and 1 for float32.
        ``stream_order``: ordered by (partition, id), e.g. the order of the records in the
        stream, rather than the order they became training records (records held back by
        boundary detection arrive late)."""
        batches = list(self.iter_batches())
        order = None
        if stream_order and batches:
            parts = np.concatenate([b.partitions for b in batches])
            ids = np.concatenate([b.ids for b in batches])
            order = np.lexsort((ids, parts))
        return RecordDataset(batches, self.feature_shape, self._scale(scale), order)

    @property
    def holdout_tasks(self) -> list[int]:
        return sorted(self._holdout)

    def holdout(self, task: int) -> Records:
        """A copy of ``task``'s held-out sample (KeyError for a task without one)."""
        return self._holdout[task].sample()

    def holdout_dataset(self, task: int, scale: float | None = None) -> RecordDataset:
        return RecordDataset([self.holdout(task)], self.feature_shape, self._scale(scale))

    @property
    def holdout_records(self) -> int:
        """Held-out records over all tasks."""
        return sum(r.n for r in self._holdout.values())

    @property
    def holdout_bytes(self) -> int:
        """Bytes the held-out samples take in memory."""
        return sum(r.rows.nbytes for r in self._holdout.values() if r.rows is not None)

    @property
    def memory_bytes(self) -> int:
        """Bytes of records held in memory: open task's training records and held-out samples."""
        return self.holdout_bytes + self._chunk_bytes

    @property
    def spilled_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.spilled_files_)

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The open task and its training records, and every task's held-out sample with its
        reservoir's count of records offered, as tensors for a checkpoint."""
        samples = {t: r for t, r in sorted(self._holdout.items()) if r.rows is not None}
        return {
            "open_task": -1 if self.task_ is None else int(self.task_),
            "open_records": pack(Records.concat([self._empty(), *self.iter_batches()])),
            "holdout": {str(t): pack(r.sample()) for t, r in samples.items()},
            "holdout_seen": {str(t): r.seen for t, r in samples.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output exactly as it was saved: the open task's records
        stay training records and each reservoir keeps its count, so nothing is split again."""
        self.clear()
        seen = state.get("holdout_seen", {})  # absent in checkpoints written before it was kept
        self._holdout = {}
        for task, packed in state["holdout"].items():
            rows = self._restored(packed)
            count = int(seen.get(task, len(rows)))
            self._holdout[int(task)] = _Reservoir(self.holdout_max_per_task, count, rows)
        if state["open_task"] >= 0:
            self.start_task(int(state["open_task"]))
            packed = state["open_records"]  # the first format wrote {} for none
            if isinstance(packed, torch.Tensor) or packed:
                self._keep([self._restored(packed)])
        self._share()  # the caps of this buffer's settings

    # ---- helpers ----------------------------------------------------------------------
    def _checked(self, records: Records) -> Records:
        """``records`` with this buffer's feature dtype and shape and Records' column dtypes."""
        x = np.asarray(records.features)
        if x.dtype != self.dtype and not (self.dtype == "float32" and x.dtype.kind == "f"):
            raise TypeError(f"features are {x.dtype}, this buffer holds {self.dtype}")
        n = len(x)
        x = x.astype(self.dtype, copy=False).reshape(n, *self.feature_shape)
        return Records(x, *self._columns(n, records.labels, records.partitions, records.ids))

    def _empty(self) -> Records:
        return Records.empty(self.feature_shape, self.dtype)

    def _restored(self, packed: torch.Tensor | dict[str, Any]) -> Records:
        """Records of a checkpoint, which must hold features of this buffer's shape and dtype."""
        recs = unpack(packed)
        if recs.features.shape[1:] != self.feature_shape or recs.features.dtype != self.dtype:
            raise ValueError(
                f"checkpoint features {recs.features.shape[1:]} {recs.features.dtype} do not match "
                f"this buffer's {self.feature_shape} {self.dtype}"
            )
        return recs

    @staticmethod
    def _columns(
        n: int, labels: npt.ArrayLike, partitions: npt.ArrayLike, ids: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.int64]]:
        """Labels, partitions and ids of ``n`` records, in Records' order and dtypes."""
        y = np.asarray(labels).astype(np.int64, copy=False).reshape(n)
        p = np.asarray(partitions).astype(np.int32, copy=False).reshape(n)
        i = np.asarray(ids).astype(np.int64, copy=False).reshape(n)
        return y, p, i

    def _scale(self, scale: float | None) -> float:
        return scale if scale is not None else (1 / 255 if self.dtype == "uint8" else 1.0)

    def _spill(self) -> None:
        if self._spill_path is None:
            root = self.spill_dir if self.spill_dir is not None else tempfile.gettempdir()
            Path(root).mkdir(parents=True, exist_ok=True)
            self._spill_path = Path(tempfile.mkdtemp(prefix=f"spill-task{self.task_}-", dir=root))
        path = self._spill_path / f"{len(self.spilled_files_):06d}.arrow"
        chunk = Records.concat([c.records() for c in self._chunks])
        self._write(path, chunk, {"task": self.task_})
        self.spilled_files_.append(path)
        self._spilled_rows += len(chunk)
        self._chunks, self._chunk_bytes = [], 0

    def _write(self, path: Path, recs: Records, meta: dict[str, Any]) -> None:
        batch = to_arrow(recs, meta)  # uncompressed: read back memory-mapped, zero-copy
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)

    def _read(self, path: Path) -> Iterator[Records]:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))  # zero-copy: pages load on access
        for i in range(reader.num_record_batches):
            yield from_arrow(reader.get_batch(i))
