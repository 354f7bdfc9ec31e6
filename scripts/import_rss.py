#!/usr/bin/env python3
"""Where a service process's resident memory goes before any data: one import at a time.

    .venv/bin/python scripts/import_rss.py --out results/streams/import_rss.json

In a fresh interpreter, imports what ``spacenet serve`` loads in the order it loads it, then
what the first training adds (Avalanche and what Avalanche imports, heaviest parts named
first so each shows its own cost), then builds a learner; prints the resident set size
(psutil) after each step and its growth. Each step's figure includes whatever that import
pulls in that earlier steps did not.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

SERVING = [  # what spacenet serve imports to consume, serve and checkpoint
    "numpy",
    "torch",
    "pyarrow",
    "kafka",
    "prometheus_client",
    "spacenet.stream.serve",
]
TRAINING = [  # what the first task's training adds: Avalanche's import chain
    "torch._dynamo",  # torchvision.ops imports it
    "torchvision",
    "scipy.signal",  # torchmetrics imports it
    "torchmetrics",
    "wandb",  # avalanche.evaluation.metrics imports it
    "qpsolvers",  # avalanche's GEM plugin imports it; it imports every QP solver it finds (JAX too)
    "avalanche.training",
]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import psutil  # not strategy.rss.rss_bytes: importing spacenet.strategy loads torch first

    process = psutil.Process()
    steps: list[dict[str, Any]] = [{"step": "interpreter", "rss_bytes": process.memory_info().rss}]

    def record(step: str, phase: str) -> None:
        rss = process.memory_info().rss
        steps.append(
            {"step": step, "phase": phase, "rss_bytes": rss, "growth_bytes": rss - steps[-1]["rss_bytes"]}
        )
        print(f"{phase:9s} {step:28s} {rss / 2**20:7.0f} MiB  +{(rss - steps[-2]['rss_bytes']) / 2**20:4.0f}")

    for name in SERVING:
        importlib.import_module(name)
        record(name, "serving")
    from spacenet.stream.config import ServiceConfig
    from spacenet.stream.learner import Learner

    learner = Learner(ServiceConfig(device="cpu"))
    record("Learner (784-400-400-10)", "serving")
    for name in TRAINING:
        importlib.import_module(name)
        record(name, "training")
    learner._training_strategy()
    record("Naive strategy built", "training")
    report = {"steps": steps, "python": sys.version.split()[0]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
