"""The small stream whose checkpoint ``tests/fixtures/checkpoint-format<N>.ckpt`` keeps.

``build_unit`` and ``learn`` are what wrote the fixtures (``python -m
tests.support.checkpoint_fixture <dir>`` from the checkout's root, run at the commit named in
``tests/fixtures/README.md``); the tests build the same unit to load them into. The stream
is two closed tasks ({0, 1}, {2, 3}) with held-out samples, then an open task ({4, 5})
whose 21 training records are buffered.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from spacenet.stream import wire
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.unit import StreamUnit

Message = collections.namedtuple("Message", "topic partition offset key value headers")
LABELS = [0, 1] * 4 + [2, 3] * 4 + [4, 5] * 2  # 8 records a message
PROBE_SEED = 7


def build_unit(state_dir: Path) -> StreamUnit:
    cfg = ServiceConfig(
        input_shape=(1, 4, 4), hidden=(32, 32), n_select=6, n_reserve=3, connections=(0.5, 0.5, 0.5),
        min_count=2, group_window=32, holdout_fraction=0.25, device="cpu", state_dir=str(state_dir),
        epochs=2, prequential_every=0,
    )  # fmt: skip
    tm = Telemetry(CollectorRegistry())
    return StreamUnit(cfg, tm, DeadLetters(lambda *a, **k: None, "t.dlq", tm.metrics), partition=0)


def messages() -> collections.deque[Any]:
    rng = np.random.default_rng(0)
    out = collections.deque()
    for offset, label in enumerate(LABELS):
        base = np.full((8, 1, 4, 4), 40 * label, np.int16) + rng.integers(0, 30, (8, 1, 4, 4))
        value = wire.encode(base.clip(0, 255).astype(np.uint8), [label] * 8)
        out.append(Message("t", 0, offset, None, value, wire.make_headers()))
    return out


def learn(unit: StreamUnit) -> StreamUnit:
    backlog = messages()
    while backlog:
        for closed in unit.handle(backlog):
            unit.finish(unit.train(closed))
            unit.publish()
    return unit


def probe() -> torch.Tensor:
    """Inputs whose predictions a restored unit must reproduce bit for bit."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, 256, (64, 1, 4, 4), generator=gen, dtype=torch.uint8)


def main(out: Path) -> None:
    from spacenet.stream.checkpoint import encode

    unit = learn(build_unit(out / "state"))
    pred = unit.predictor_.predict(probe())
    state = unit.state_dict()
    data, fmt = encode(state), state["format"]
    (out / f"checkpoint-format{fmt}.ckpt").write_bytes(data)
    torch.save({"labels": pred.labels, "scores": pred.scores}, out / f"checkpoint-format{fmt}.predictions.pt")
    print(f"format {fmt}: {len(data)} bytes, classes {unit.predictor_.known_labels.tolist()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
