"""Checkpoint store: atomic writes, torn-file detection, weights-only loading, pruning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spacenet.stream.checkpoint import CheckpointError, CheckpointStore
from spacenet.stream.config import ServiceConfig
from spacenet.stream.records import PendingStore, Records, pack, unpack


def payload(v: int) -> dict[str, object]:
    return {"version": v, "w": torch.full((3, 3), float(v)), "offsets": {"0": 10 * v}, "note": "x"}


def test_round_trip_latest_and_pruning(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for v in (1, 2, 3):
        store.save(v, payload(v))
    assert store.versions() == [2, 3]
    version, data = store.latest() or (None, {})
    assert version == 3 and torch.equal(data["w"], torch.full((3, 3), 3.0)) and data["offsets"] == {"0": 30}


@pytest.mark.parametrize("damage", ["truncate", "flip", "footerless"])
def test_torn_or_altered_file_is_skipped(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    store.save(1, payload(1))
    path = store.save(2, payload(2))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[100] ^= 0xFF
    else:
        data = data[:-40]
    path.write_bytes(bytes(data))
    version, _ = store.latest() or (None, None)
    assert version == 1
    assert store.skipped_ == [path]


def test_crash_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, payload(1))
    code = (
        "import torch; from spacenet.stream.checkpoint import CheckpointStore;"
        f"CheckpointStore({str(tmp_path)!r}).save(2, {{'w': torch.zeros(1000, 1000)}})"
    )
    env = {**os.environ, "SPACENET_CRASH_AT": "checkpoint_mid_write"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120)
    assert proc.returncode == 137
    assert list(tmp_path.glob("*.tmp")), "the half-written file is left under its temporary name"
    assert store.latest() is not None and store.latest()[0] == 1  # type: ignore[index]


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    store = CheckpointStore(tmp_path)
    store.save(1, {"evil": Evil()})  # torch.save pickles anything...
    with pytest.raises(ValueError, match="refused to load"):
        store.load(1)  # ...but loading never executes it
    assert store.latest() is None


def test_unwritable_directory_raises_checkpoint_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="writing checkpoint"):
        CheckpointStore(blocker / "sub").save(1, payload(1))


def test_pending_store_and_packing_round_trip() -> None:
    import numpy as np

    store = PendingStore()
    feats = np.arange(3 * 4, dtype=np.uint8).reshape(3, 1, 2, 2)
    recs = Records(feats, np.array([1, 2, 3]), np.array([0, 0, 1], np.int32), np.array([90, 40, 70]))
    store.put(np.array([9, 4, 7]), recs)
    state = store.state_dict()
    seqs, recs = state["pending_seqs"].tolist(), unpack(state["pending"])
    assert seqs == [4, 7, 9] and recs.labels.tolist() == [2, 3, 1]
    again = unpack(torch.load(_save(pack(recs)), weights_only=True))
    assert again.ids.tolist() == [40, 70, 90] and np.array_equal(again.features, recs.features)
    assert store.take([7]).partitions.tolist() == [1] and len(store) == 2


def _save(obj: object) -> object:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_config_layers_and_errors(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        '[spacenet]\ntopic = "t1"\nepochs = 2\nhidden = [100, 50]\nconnections = [0.1, 0.2, 0.5]\n'
    )
    cfg = ServiceConfig.load(
        toml, env={"SPACENET_EPOCHS": "3", "SPACENET_CALIBRATE": "yes"}, overrides={"lr": 0.1}
    )
    assert (cfg.topic, cfg.epochs, cfg.calibrate, cfg.lr, cfg.hidden) == ("t1", 3, True, 0.1, (100, 50))
    assert cfg.predictions_topic == "t1.predictions" and cfg.spacenet_connections == (0.1, 0.2, 0.5)
    with pytest.raises(ValueError, match="unknown settings"):
        ServiceConfig.load(env={}, overrides={"epoch": 1})
    with pytest.raises(ValueError, match="cannot read"):
        ServiceConfig.load(env={"SPACENET_CALIBRATE": "maybe"})
    with pytest.raises(ValueError, match="connections needs 3"):
        ServiceConfig.load(env={"SPACENET_CONNECTIONS": "1,2"})
