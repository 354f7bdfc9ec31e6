"""StreamUnit restore: what its metrics say after a restart equals what they said before."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from spacenet.stream import wire
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.unit import StreamUnit

Message = collections.namedtuple("Message", "topic partition offset key value headers")


def _unit(tmp_path: Path) -> tuple[StreamUnit, CollectorRegistry]:
    cfg = ServiceConfig(
        input_shape=(1, 2, 2), hidden=(8, 8), n_select=4, n_reserve=2, connections=(0.5, 0.5, 0.5),
        min_count=2, group_window=8, holdout_fraction=0.0, device="cpu", state_dir=str(tmp_path),
        prequential_every=4, prequential_sample=8,
    )  # fmt: skip
    registry = CollectorRegistry()
    tm = Telemetry(registry)
    return StreamUnit(cfg, tm, DeadLetters(lambda *a, **k: None, "t.dlq", tm.metrics), partition=0), registry


def _messages(labels: list[int]) -> collections.deque[Message]:
    return collections.deque(
        Message(
            "t",
            0,
            i,
            None,
            wire.encode(np.full((4, 1, 2, 2), 60 * y, np.uint8), [y] * 4),
            wire.make_headers(),
        )
        for i, y in enumerate(labels)
    )


def test_current_task_is_restored_with_the_unit(tmp_path: Path) -> None:
    unit, registry = _unit(tmp_path / "a")
    backlog = _messages([0, 1, 0, 1, 2, 3, 2, 3])
    while backlog:
        for closed in unit.handle(backlog):  # class 2 opens task 1: task 0 closes
            unit.finish(unit.train(closed))
    before = registry.get_sample_value("spacenet_current_task", {"stream": "0"})
    assert before == 1.0
    restored, fresh = _unit(tmp_path / "b")
    assert fresh.get_sample_value("spacenet_current_task", {"stream": "0"}) != before
    restored.load_state_dict(unit.state_dict())
    assert fresh.get_sample_value("spacenet_current_task", {"stream": "0"}) == before


def test_arriving_records_of_known_classes_are_scored_before_they_are_learned(tmp_path: Path) -> None:
    unit, registry = _unit(tmp_path)
    backlog = _messages([0, 1, 0, 1, 2, 3])  # class 2 opens task 1: task 0 closes
    for closed in unit.handle(backlog):
        unit.finish(unit.train(closed))
        unit.publish()  # the served model knows classes 0 and 1 from here on

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"stream": "0"})

    while backlog:  # records of the new task: classes the served model does not know
        list(unit.handle(backlog))
    assert sample("spacenet_prequential_records_total") in (None, 0.0)
    late = _messages([0, 1, 0, 1, 0, 1, 0, 1])  # known classes again: offsets 0, 4 are scored
    while late:
        list(unit.handle(late))
    assert sample("spacenet_prequential_records_total") == 8.0  # two messages of 4 records
    accuracy = sample("spacenet_prequential_accuracy_ratio")
    assert accuracy is not None and accuracy == unit.prequential.accuracy
    assert sample("spacenet_accuracy_drift_total") == 0.0
