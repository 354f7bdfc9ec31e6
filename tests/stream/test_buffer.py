"""TaskBuffer: spilling, held-out sampling, checkpoints of held-out samples and open records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spacenet.stream import buffer
from spacenet.stream.buffer import TaskBuffer
from spacenet.stream.records import FIELDS, Records

SHAPE = (1, 4, 4)


def records(start: int, n: int, dtype: str = "uint8", partition: int = 0) -> Records:
    """Features encode the id, so a read-back row can be checked against its id."""
    ids = np.arange(start, start + n, dtype=np.int64)
    x = (ids[:, None] + np.arange(16)[None, :]) % 251
    return Records(x.astype(dtype).reshape(n, *SHAPE), ids % 10, np.full(n, partition, np.int32), ids)


def read_back(buf: TaskBuffer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = list(buf.iter_batches())
    if not batches:
        return np.zeros((0, *SHAPE)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate([getattr(b, f) for b in batches]) for f in ("features", "labels", "ids"))


def fill(buf: TaskBuffer, task: int, n_batches: int = 50, size: int = 10, dtype: str = "uint8") -> None:
    buf.start_task(task)
    for b in range(n_batches):
        buf.add(records(task * 10_000 + b * size, size, dtype))


def test_tiny_memory_limit_spills_and_returns_every_record_once_in_order(tmp_path: Path) -> None:
    buf = TaskBuffer(SHAPE, "uint8", max_memory_bytes=1000, spill_dir=tmp_path, holdout_fraction=0.0)
    fill(buf, 0)
    assert buf.spilled_files_ and all(p.exists() for p in buf.spilled_files_)
    assert buf.spilled_bytes > 0 and buf.memory_bytes <= 1000
    x, y, ids = read_back(buf)
    assert ids.tolist() == list(range(500)) and len(buf) == 500
    np.testing.assert_array_equal(x, records(0, 500).features)
    np.testing.assert_array_equal(y, ids % 10)
    ds = buf.dataset()
    assert len(ds) == 500 and ds.targets.tolist() == y.tolist()
    for i in (0, 137, 499, -1):
        xi, yi = ds[i]
        assert xi.dtype == torch.float32 and xi.shape == SHAPE and yi == y[i]
        torch.testing.assert_close(xi, torch.from_numpy(x[i].astype(np.float32)) / 255)
    with pytest.raises(IndexError):
        ds[500]


def test_float32_features_round_trip_through_spill_files(tmp_path: Path) -> None:
    buf = TaskBuffer(SHAPE, "float32", max_memory_bytes=0, spill_dir=tmp_path, holdout_fraction=0.0)
    fill(buf, 0, n_batches=5, dtype="float32")
    assert len(buf.spilled_files_) == 5 and buf.memory_bytes == 0
    x, _, _ = read_back(buf)
    np.testing.assert_array_equal(x, records(0, 50, "float32").features)
    xi, _ = buf.dataset()[7]
    torch.testing.assert_close(xi, torch.from_numpy(x[7]))  # float32 is not rescaled


def test_clear_deletes_spill_files_and_keeps_held_out(tmp_path: Path) -> None:
    buf = TaskBuffer(SHAPE, "uint8", max_memory_bytes=500, spill_dir=tmp_path)
    fill(buf, 0)
    files = list(buf.spilled_files_)
    assert files and len(buf.holdout(0))
    buf.clear()
    assert not any(p.exists() for p in files) and list(tmp_path.iterdir()) == []
    assert len(buf) == 0 and buf.spilled_bytes == 0 and buf.task_ is None
    assert buf.holdout_tasks == [0] and len(buf.holdout(0)) > 0
    fill(buf, 1)  # the next task starts clean
    assert read_back(buf)[2].min() >= 10_000


def test_start_task_refuses_to_mix_tasks() -> None:
    buf = TaskBuffer(SHAPE, "uint8")
    with pytest.raises(RuntimeError):
        buf.add(records(0, 3))
    fill(buf, 0, n_batches=1)
    with pytest.raises(RuntimeError):
        buf.start_task(1)


def test_held_out_never_overlaps_training_and_loses_nothing(tmp_path: Path) -> None:
    buf = TaskBuffer(SHAPE, "uint8", max_memory_bytes=2000, spill_dir=tmp_path, holdout_max_per_task=20)
    fill(buf, 0, n_batches=100)
    train_ids = read_back(buf)[2]
    held = buf.holdout(0)
    assert len(held) == 20  # 10 % of 1000 is 100: the reservoir caps it
    assert not set(train_ids.tolist()) & set(held.ids.tolist())
    assert sorted([*train_ids.tolist(), *held.ids.tolist()]) == list(range(1000))
    np.testing.assert_array_equal(held.features, records(0, 1000).features[held.ids])


def test_held_out_fraction_is_about_right_below_the_cap() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_fraction=0.1, holdout_max_per_task=10_000)
    fill(buf, 0, n_batches=500)
    assert 400 <= len(buf.holdout(0)) <= 600 and len(buf) + len(buf.holdout(0)) == 5000
    # the rule is a hash of the id: independent of how the records were batched
    other = TaskBuffer(SHAPE, "uint8", holdout_fraction=0.1, holdout_max_per_task=10_000)
    other.start_task(0)
    other.add(records(0, 5000))
    assert other.holdout(0).ids.tolist() == buf.holdout(0).ids.tolist()


def test_deterministic_with_a_seed() -> None:
    def held(seed: int) -> list[int]:
        buf = TaskBuffer(SHAPE, "uint8", holdout_max_per_task=30, seed=seed)
        fill(buf, 0, n_batches=100)
        return sorted(buf.holdout(0).ids.tolist())

    assert held(1) == held(1)
    assert held(1) != held(2)


def test_late_records_join_the_closed_tasks_held_out_only() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_max_per_task=50)
    fill(buf, 0, n_batches=10)
    before = len(buf.holdout(0))
    buf.clear()
    fill(buf, 1, n_batches=5)
    n_train = len(buf)
    buf.add_late(0, records(90_000, 30))
    assert len(buf) == n_train  # not in the open task's training records
    assert len(buf.holdout(0)) == min(50, before + 30)
    buf.add_late(0, records(91_000, 500))
    assert len(buf.holdout(0)) == 50 and buf.holdout(0).ids.max() >= 90_000
    buf.add_late(7, records(92_000, 3))  # a task without held-out records yet
    assert buf.holdout(7).ids.tolist() == [92_000, 92_001, 92_002]


def test_save_and_load_held_out() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_max_per_task=40)
    for task in range(3):
        fill(buf, task)
        buf.clear()
    state = _saved(buf.state_dict())
    assert sorted(state["holdout"]) == ["0", "1", "2"]
    loaded = TaskBuffer(SHAPE, "uint8", holdout_max_per_task=40)
    loaded.load_state_dict(state)
    assert loaded.holdout_tasks == [0, 1, 2]
    for task in range(3):
        a, b = buf.holdout(task), loaded.holdout(task)
        for field in ("features", "labels", "partitions", "ids"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # sampling goes on identically after a reload (the generator is counter-based)
    buf.add_late(1, records(50_000, 200))
    loaded.add_late(1, records(50_000, 200))
    assert buf.holdout(1).ids.tolist() == loaded.holdout(1).ids.tolist()
    ds = loaded.holdout_dataset(2)
    assert len(ds) == 40 and ds[0][0].shape == SHAPE
    with pytest.raises(ValueError):
        TaskBuffer((16,), "uint8").load_state_dict(state)


def _saved(state: dict) -> dict:
    """``state`` after a round trip through ``torch.save`` / ``torch.load(weights_only=True)``."""
    import io

    out = io.BytesIO()
    torch.save(state, out)
    out.seek(0)
    return torch.load(out, weights_only=True)


def test_a_restored_buffer_goes_on_exactly_as_the_one_saved(tmp_path: Path) -> None:
    """Open records stay training records and each reservoir keeps its count of records
    offered: a full reservoir samples the next records as the uninterrupted buffer does."""
    kwargs = {"holdout_fraction": 0.3, "holdout_max_per_task": 25, "seed": 4, "spill_dir": tmp_path}
    buf = TaskBuffer(SHAPE, "uint8", max_memory_bytes=3000, **kwargs)
    fill(buf, 0, n_batches=40)  # the reservoir is full: it has seen more than it keeps
    buf.clear()
    fill(buf, 1, n_batches=30)
    restored = TaskBuffer(SHAPE, "uint8", **kwargs)
    restored.load_state_dict(_saved(buf.state_dict()))
    assert restored.task_ == 1 and len(restored) == len(buf)
    for more in (records(20_000, 300), records(30_000, 300)):
        buf.add(more)
        restored.add(more)
    buf.add_late(0, records(40_000, 300))
    restored.add_late(0, records(40_000, 300))
    np.testing.assert_array_equal(read_back(restored)[2], read_back(buf)[2])
    for task in (0, 1):
        ours, theirs = restored.holdout(task), buf.holdout(task)
        for field in FIELDS:
            np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))


def test_partitions_are_part_of_the_record_id() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_fraction=0.5, holdout_max_per_task=10_000)
    buf.start_task(0)
    buf.add(records(0, 400, partition=0))
    buf.add(records(0, 400, partition=1))
    held = buf.holdout(0)
    by_part = [set(held.ids[held.partitions == p].tolist()) for p in (0, 1)]
    assert by_part[0] != by_part[1]


def test_wrong_feature_dtype_is_rejected() -> None:
    buf = TaskBuffer(SHAPE, "uint8")
    buf.start_task(0)
    with pytest.raises(TypeError):
        buf.add(records(0, 4, "float32"))
    with pytest.raises(ValueError):
        TaskBuffer(SHAPE, "int16")


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=15),
    limit=st.integers(0, 3000),
    fraction=st.floats(0.0, 1.0),
    cap=st.integers(0, 25),
)
def test_every_record_is_training_or_held_out_once(tmp_path_factory, sizes, limit, fraction, cap) -> None:
    spill = tmp_path_factory.mktemp("spill")
    buf = TaskBuffer(SHAPE, "uint8", limit, spill, fraction, holdout_max_per_task=cap, seed=3)
    buf.start_task(0)
    start = 0
    for n in sizes:
        buf.add(records(start, n))
        start += n
    x, _, train = read_back(buf)
    held = buf.holdout(0).ids.tolist()
    assert len(held) <= cap and len(buf) == len(train)
    assert sorted([*train.tolist(), *held]) == list(range(start))
    np.testing.assert_array_equal(x, records(0, start).features[train] if start else x)
    if fraction == 0.0 or cap == 0:
        assert train.tolist() == list(range(start))  # nothing evicted: stream order
    buf.clear()
    assert list(spill.iterdir()) == []


def _offer_one_by_one(
    reservoir: buffer._Reservoir, recs: buffer.Records, seed: int, task: int
) -> tuple[np.ndarray, list[buffer.Records]]:
    """The reservoir's replacement step as first written, one evicted row at a time: the reference
    the gathered version must match row for row and in order."""
    counts = np.arange(reservoir.seen + 1, reservoir.seen + len(recs) + 1, dtype=np.int64)
    slots = (buffer._hash(seed, task, counts) % counts.astype(np.uint64)).astype(np.int64)
    filling = counts <= reservoir.cap
    slots[filling] = counts[filling] - 1
    reservoir.seen += len(recs)
    rows = reservoir._reserve(min(reservoir.seen, reservoir.cap), recs)
    fill = np.flatnonzero(filling)
    for f in FIELDS:
        getattr(rows, f)[reservoir.n : reservoir.n + len(fill)] = getattr(recs, f)[fill]
    reservoir.n += len(fill)
    evicted = []
    for row in np.flatnonzero(~filling & (slots < reservoir.cap)).tolist():
        slot = int(slots[row])
        evicted.append(rows.take([slot]))
        for f in FIELDS:
            getattr(rows, f)[slot] = getattr(recs, f)[row]
    return np.flatnonzero(slots >= reservoir.cap), evicted


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=8),
    cap=st.integers(0, 30),
    seed=st.integers(0, 2**32),
    subset=st.booleans(),
)
def test_reservoir_evicts_in_one_gather_exactly_as_one_row_at_a_time(sizes, cap, seed, subset) -> None:
    ours, reference = buffer._Reservoir(cap), buffer._Reservoir(cap)
    start = 0
    for n in sizes:
        recs = records(start, n, partition=2)
        start += n
        if subset:  # some rows on offer, as TaskBuffer.add offers the ones it holds out
            index = np.flatnonzero(np.random.default_rng([seed, n]).random(n) < 0.3)
            passed, evicted = ours.offer(recs, seed, 5, index)
            want_passed, want_evicted = _offer_one_by_one(reference, recs.take(index), seed, 5)
        else:
            passed, evicted = ours.offer(recs, seed, 5)
            want_passed, want_evicted = _offer_one_by_one(reference, recs, seed, 5)
        np.testing.assert_array_equal(passed, want_passed)
        assert len(evicted) == (1 if want_evicted else 0)  # one chunk per call, not one per row
        if want_evicted:
            want = buffer.Records.concat(want_evicted)
            for f in FIELDS:
                np.testing.assert_array_equal(getattr(evicted[0], f), getattr(want, f))
                assert getattr(evicted[0], f).dtype == getattr(want, f).dtype
        assert (ours.seen, ours.n) == (reference.seen, reference.n)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(ours.sample(), f), getattr(reference.sample(), f))


def test_reservoir_returns_a_slot_evicted_twice_in_one_call_in_order() -> None:
    reservoir = buffer._Reservoir(2)
    _, evicted = reservoir.offer(records(0, 2000), 0, 0)
    (chunk,) = evicted
    kept = reservoir.sample().ids.tolist()
    # every record is kept, evicted or passed over; each evicted one was in the sample before
    assert len(set(chunk.ids.tolist())) == len(chunk) and not set(kept) & set(chunk.ids.tolist())
    assert len(chunk) > 2  # with 2 slots and 2000 offers, slots were replaced more than once
    np.testing.assert_array_equal(chunk.features, records(0, 2000).features[chunk.ids])


def test_add_keeps_copies_so_callers_may_reuse_their_arrays() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_fraction=0.5, holdout_max_per_task=5, seed=1)
    buf.start_task(0)
    scratch = np.empty((40, *SHAPE), np.uint8)
    for start in (0, 40, 80):  # one reused array, as the ingest bench's sink does
        recs = records(start, 40)
        scratch[:] = recs.features
        buf.add(Records(scratch, recs.labels, recs.partitions, recs.ids))
        scratch[:] = 0
    x, _, ids = read_back(buf)
    held = buf.holdout(0)
    assert sorted([*ids.tolist(), *held.ids.tolist()]) == list(range(120))
    np.testing.assert_array_equal(x, records(0, 120).features[ids])
    np.testing.assert_array_equal(held.features, records(0, 120).features[held.ids])


def test_add_blocks_splits_and_stores_exactly_as_add(tmp_path: Path) -> None:
    recs = records(0, 3000)
    x, y, p, ids = recs.features, recs.labels, recs.partitions, recs.ids * 7
    blocks = [x[lo:hi] for lo, hi in [(0, 64), (64, 65), (65, 1000), (1000, 1000), (1000, 3000)]]
    one = TaskBuffer((1, 4, 4), "uint8", holdout_fraction=0.2, holdout_max_per_task=300, seed=5)
    many = TaskBuffer((1, 4, 4), "uint8", holdout_fraction=0.2, holdout_max_per_task=300, seed=5)
    for buf in (one, many):
        buf.start_task(2)
    one.add(Records(x, y, p, ids))
    many.add_blocks(blocks, y, p, ids)
    for a, b in zip(one.iter_batches(), many.iter_batches(), strict=True):
        for field in ("features", "labels", "partitions", "ids"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for field in ("features", "labels", "ids"):
        np.testing.assert_array_equal(getattr(one.holdout(2), field), getattr(many.holdout(2), field))
    with pytest.raises(TypeError):
        many.add_blocks([x[:2].astype(np.float32)], y[:2], p[:2], ids[:2])


def test_dataset_in_stream_order_sorts_by_partition_then_id() -> None:
    buf = TaskBuffer((1, 4, 4), "uint8", holdout_fraction=0.0)
    buf.start_task(0)
    recs = records(0, 30)
    x, y, ids = recs.features, recs.labels, recs.ids
    late = [3, 1, 4]  # e.g. pending records released after later ones
    first = [i for i in range(30) if i not in late]
    parts = np.where(np.array(first) < 20, 0, 1).astype(np.int32)
    buf.add(Records(x[first], y[first], parts, ids[first]))
    buf.add(recs.take(late))  # partition 0
    plain, ordered = buf.dataset(scale=1.0), buf.dataset(scale=1.0, stream_order=True)
    assert plain.targets.tolist() == y[first + late].tolist()
    key = sorted(range(30), key=lambda i: (int(i >= 20 and i not in late), i))
    assert ordered.targets.tolist() == y[key].tolist()
    for i, row in enumerate(key):
        features, label = ordered[i]
        assert label == y[row] and torch.equal(features, torch.from_numpy(x[row].astype(np.float32)))


def test_held_out_samples_share_a_total_bound_across_tasks() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_fraction=0.5, holdout_max_per_task=40, holdout_max_records=90)
    sizes, before = [], {}
    for task in range(4):
        fill(buf, task)  # 500 records, about 250 offered to the held-out sample
        sizes.append([len(buf.holdout(t).ids) for t in buf.holdout_tasks])
        before = {t: set(buf.holdout(t).ids.tolist()) for t in buf.holdout_tasks} if task == 2 else before
        buf.clear()
    # 40 a task while 40 x n fits in 90; then 90 // n each
    assert sizes == [[40], [40, 40], [30, 30, 30], [22, 22, 22, 22]]
    assert buf.holdout_records == 88 and buf.holdout_bytes >= 88 * 16
    for t in range(3):  # a closed task's sample shrank to a subset of itself
        assert set(buf.holdout(t).ids.tolist()) < before[t]
    ids = np.concatenate([buf.holdout(t).ids for t in buf.holdout_tasks])
    assert len(np.unique(ids)) == len(ids)


def test_the_open_tasks_records_over_its_new_share_join_training() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_fraction=0.5, holdout_max_per_task=40, holdout_max_records=60)
    fill(buf, 0)
    n_train = len(buf)
    buf.add_late(7, records(90_000, 20))  # a closed task's late records: a second sample
    assert len(buf.holdout(0).ids) == 30 and len(buf) == n_train + 10  # 10 go back to training
    held, train = set(buf.holdout(0).ids.tolist()), set(read_back(buf)[2].tolist())
    assert not held & train and len(held | train) == 500


def test_packed_held_out_is_compressed_and_restores_with_the_settings_bound() -> None:
    buf = TaskBuffer(SHAPE, "uint8", holdout_fraction=0.5, holdout_max_per_task=200, holdout_max_records=600)
    for task in range(3):
        fill(buf, task)
        buf.clear()
    state = buf.state_dict()
    packed = sum(t.numel() for t in state["holdout"].values())
    assert packed < 0.5 * buf.holdout_bytes  # zstd Arrow IPC: ids and features follow a pattern
    tighter = TaskBuffer(SHAPE, "uint8", holdout_max_per_task=200, holdout_max_records=300)
    tighter.load_state_dict(state)
    assert [len(tighter.holdout(t).ids) for t in range(3)] == [100, 100, 100]
