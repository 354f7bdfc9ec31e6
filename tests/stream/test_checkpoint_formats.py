"""Checkpoints of every payload format the service has written restore, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spacenet.strategy import SpaceNetPlugin
from spacenet.stream.checkpoint import decode, encode
from spacenet.stream.unit import STATE_FORMAT, StreamUnit
from tests.support.checkpoint_fixture import build_unit, probe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _restored(tmp_path: Path, fmt: int) -> tuple[StreamUnit, dict[str, torch.Tensor]]:
    state = decode((FIXTURES / f"checkpoint-format{fmt}.ckpt").read_bytes())
    assert state["format"] == fmt
    unit = build_unit(tmp_path)
    unit.load_state_dict(state)
    expected = torch.load(FIXTURES / f"checkpoint-format{fmt}.predictions.pt", weights_only=True)
    return unit, expected


@pytest.mark.parametrize("fmt", [1, STATE_FORMAT])
def test_a_checkpoint_restores_bit_identical_predictions(tmp_path: Path, fmt: int) -> None:
    unit, expected = _restored(tmp_path, fmt)
    pred = unit.predictor_.predict(probe())
    assert torch.equal(pred.labels, expected["labels"])
    assert torch.equal(pred.scores, expected["scores"])
    assert unit.predictor_.known_labels.tolist() == [0, 1, 2, 3]
    assert unit.buffer.holdout_tasks == [0, 1, 2] and unit.buffer.task_ == 2 and len(unit.buffer) == 21


@pytest.mark.parametrize("fmt", [1, STATE_FORMAT])
def test_a_checkpoint_saved_again_restores_the_same(tmp_path: Path, fmt: int) -> None:
    unit, expected = _restored(tmp_path / "a", fmt)
    again = build_unit(tmp_path / "b")
    again.load_state_dict(decode(encode(unit.state_dict())))
    pred = again.predictor_.predict(probe())
    assert torch.equal(pred.labels, expected["labels"]) and torch.equal(pred.scores, expected["scores"])
    for task in unit.buffer.holdout_tasks:
        assert (again.buffer.holdout(task).features == unit.buffer.holdout(task).features).all()
    assert [len(b) for b in again.buffer.iter_batches()] and len(again.buffer) == len(unit.buffer)


def test_the_current_format_is_what_a_unit_writes_and_smaller(tmp_path: Path) -> None:
    unit, _ = _restored(tmp_path, 1)
    data = encode(unit.state_dict())
    assert decode(data)["format"] == STATE_FORMAT
    assert len(data) < 0.5 * (FIXTURES / "checkpoint-format1.ckpt").stat().st_size


def test_a_version1_spacenet_state_loads_into_a_plugin_beside_its_dense_model(tmp_path: Path) -> None:
    from spacenet.stream.learner import build_model

    unit, _ = _restored(tmp_path, 1)
    learner = decode((FIXTURES / "checkpoint-format1.ckpt").read_bytes())["learner"]
    assert learner["plugin"]["spacenet"]["version"] == 1
    model = build_model(unit.cfg)
    model.load_state_dict(learner["model"])  # the first version kept the weights here
    plugin = SpaceNetPlugin(n_select=6, n_reserve=3, connections=(0.5, 0.5, 0.5))
    plugin.load_state_dict(learner["plugin"])
    plugin.attach(model)  # keeps the loaded weights, applies the pending state
    x = probe()
    assert torch.equal(model(x), unit.learner.model(x))
    assert plugin.capacity() == unit.learner.spacenet.capacity()
