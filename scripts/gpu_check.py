#!/usr/bin/env python3
"""The GPU check: one short run that proves the CUDA path and measures it (docs/gpu-check.md).

Run it through ``scripts/gpu-check.sh`` (which sets up the environment), on the machine
to check:

1. the device: Python, torch, CUDA, the accelerator's name and memory;
2. the tests marked ``cuda`` (they skip without a CUDA device);
3. split MNIST, one seed, ``spacenet`` and ``naive``, on ``cuda`` and on ``cpu`` in the same
   run: training seconds, final accuracy, peak GPU memory;
4. the service's learner (``StreamUnit``, the code ``spacenet serve`` runs per stream, fed
   the wire messages ``spacenet produce`` would send) on a 3-task slice on the GPU:
   ``spacenet_device_info`` names the GPU, the model trained there, and a CPU unit loaded
   from the same checkpoint bytes predicts the same labels within float tolerance.

Everything goes into one JSON file, ``OUT/gpu-check.json``. Without CUDA it says so first,
runs the CPU half and exits 0 (a rehearsal); it exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SERVICE_CLASSES = (0, 1, 2, 3, 4, 5)  # three tasks of two classes
ATOL = 1e-4  # largest difference allowed between GPU and CPU prediction scores


def device_report() -> dict[str, Any]:
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report |= {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "devices": torch.cuda.device_count(),
        }
    return report


def run_cuda_tests() -> dict[str, Any]:
    """The tests marked ``cuda``, in a child pytest (they skip where CUDA is missing)."""
    files = ["tests/strategy/test_plugin.py", "tests/test_gpu_check.py"]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    return {
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else proc.stderr.strip()[-500:],
        "seconds": time.perf_counter() - started,
        "ok": proc.returncode in (0, 5) and "failed" not in (lines[-1] if lines else ""),
    }


def train_split_mnist(strategy: str, device: str, threads: int, subset: int | None) -> dict[str, Any]:
    from spacenet.strategy import bench
    from spacenet.strategy.baselines import TrainSettings

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    config = bench.RunConfig(
        "split_mnist", strategy, 0, TrainSettings(device=device), subset_per_class=subset,
        threads=threads, progress=False,
    )  # fmt: skip
    result = bench.run_one(config)
    out = {
        "strategy": strategy,
        "device": device,
        "train_seconds": result["train_seconds"],
        "final_accuracy": result["final_accuracy"],
        "wall_seconds": result["wall_seconds"],
    }
    if device.startswith("cuda"):
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def service_check(device: str, limit_per_class: int, epochs: int = 4) -> dict[str, Any]:
    """Three tasks through a ``StreamUnit`` on ``device``; its checkpoint loaded on the CPU."""
    from prometheus_client import CollectorRegistry

    from spacenet.stream import checkpoint
    from spacenet.stream.config import ServiceConfig
    from spacenet.stream.dead_letters import DeadLetters
    from spacenet.stream.learner import Learner
    from spacenet.stream.observability.telemetry import Telemetry
    from spacenet.stream.tools.produce import iter_messages, load_dataset, plan_tasks
    from spacenet.stream.unit import StreamUnit

    rejected: list[Any] = []

    def unit_on(cfg: ServiceConfig) -> tuple[StreamUnit, CollectorRegistry]:
        registry = CollectorRegistry()
        learner = Learner(cfg)
        tm = Telemetry(
            registry, str(learner.device), learner.device_name, layers=learner.spacenet.layer_names_
        )
        dead = DeadLetters(lambda *a, **k: rejected.append(a), "gpu-check.dlq", tm.metrics)
        return StreamUnit(cfg, tm, dead, partition=0, learner=learner), registry

    state_dir = tempfile.mkdtemp(prefix="gpu-check-")
    cfg = ServiceConfig(device=device, state_dir=state_dir, epochs=epochs, holdout_fraction=0.1)
    unit, registry = unit_on(cfg)
    features, labels, _ = load_dataset("split_mnist")
    plans = plan_tasks(labels, class_order=list(SERVICE_CLASSES), limit_per_class=limit_per_class)
    Message = collections.namedtuple("Message", "topic partition offset key value headers")
    backlog = collections.deque(
        Message("gpu-check", 0, i, m.key, m.value, m.headers)
        for i, m in enumerate(iter_messages(features, labels, plans, markers=True))
    )
    tasks = []
    started = time.perf_counter()
    while backlog:  # as the service's loop: handle() returns after each closed task
        for closed in unit.handle(backlog):
            result = unit.train(closed)
            if result.error is not None:
                raise RuntimeError(f"task {closed} failed: {result.error!r}")
            unit.finish(result)
            unit.publish()
            tasks.append({"task": result.task, "train_seconds": result.train_seconds, "steps": result.steps})
    seconds = time.perf_counter() - started
    learner = unit.learner
    params_on = sorted({p.device.type for p in learner.model.parameters()})
    masks_on = sorted({layer.conn_owner_.device.type for layer in learner.spacenet.layers_})
    info = {
        s.labels["device"]: s.labels["name"]
        for metric in registry.collect()
        if metric.name == "spacenet_device_info"
        for s in metric.samples
        if s.value == 1
    }
    data = checkpoint.encode(unit.state_dict())
    cpu_unit, _ = unit_on(replace(cfg, device="cpu", state_dir=tempfile.mkdtemp(prefix="gpu-check-cpu-")))
    cpu_unit.load_state_dict(checkpoint.decode(data))
    test_x, test_y, _ = load_dataset("split_mnist", train=False)
    keep = np.isin(test_y, SERVICE_CLASSES)
    x = torch.from_numpy(test_x[keep])
    assert unit.predictor_ is not None and cpu_unit.predictor_ is not None
    here, there = unit.predictor_.predict(x), cpu_unit.predictor_.predict(x)
    agreement = float((here.labels == there.labels).float().mean())
    max_diff = float((here.scores - there.scores).abs().max())
    return {
        "device": str(learner.device),
        "device_info": info,
        "parameters_on": params_on,
        "masks_on": masks_on,
        "tasks": tasks,
        "seconds": seconds,
        "model_version": unit.model_version_,
        "dead_letters": len(rejected),
        "test_records": int(keep.sum()),
        "accuracy": float((here.labels.numpy() == test_y[keep]).mean()),
        "cpu_agreement": agreement,
        "cpu_max_score_diff": max_diff,
        "checkpoint_bytes": len(data),
        "ok": unit.model_version_ == 3
        and agreement == 1.0
        and max_diff <= ATOL
        and params_on == [learner.device.type]
        and masks_on == [learner.device.type]
        and info.get(str(learner.device)) is not None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu-check.json")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the CPU runs")
    p.add_argument("--subset-per-class", type=int, default=None, help="split MNIST training records a class")
    p.add_argument("--service-limit-per-class", type=int, default=2000, help="service slice: records a class")
    p.add_argument("--setup-seconds", type=float, default=None, help="what the set-up took (for the JSON)")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": device_report(), "setup_seconds": args.setup_seconds}
    cuda = report["device"]["cuda_available"]
    print(
        "gpu-check: "
        + (f"CUDA device {report['device']['name']}" if cuda else "NO CUDA DEVICE: CPU half only")
    )
    print(json.dumps(report["device"]), flush=True)

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")

    if not args.skip_tests:
        report["cuda_tests"] = run_cuda_tests()
        print("cuda tests:", report["cuda_tests"]["summary"], flush=True)
        save()
    if cuda:  # CUDA's start-up is not training time
        torch.ones(8, 8, device="cuda").matmul(torch.ones(8, 8, device="cuda")).sum().item()
    devices = (["cuda"] if cuda else []) + ["cpu"]
    report["training"] = []
    for strategy in ("spacenet", "naive"):
        for device in devices:
            run = train_split_mnist(strategy, device, args.threads, args.subset_per_class)
            report["training"].append(run)
            print(
                f"{strategy} on {device}: {run['train_seconds']:.1f} s, accuracy {run['final_accuracy']:.4f}"
            )
            save()
    if cuda:
        by = {(r["strategy"], r["device"]): r for r in report["training"]}
        report["cpu_over_gpu_train_seconds"] = {
            s: by[(s, "cpu")]["train_seconds"] / by[(s, "cuda")]["train_seconds"]
            for s in ("spacenet", "naive")
        }
    report["service"] = service_check("cuda" if cuda else "cpu", args.service_limit_per_class)
    svc = report["service"]
    print(
        f"service on {svc['device']}: {svc['model_version']} tasks in {svc['seconds']:.1f} s, accuracy "
        f"{svc['accuracy']:.4f}, CPU agreement {svc['cpu_agreement']:.4f}, "
        f"max diff {svc['cpu_max_score_diff']:.2e}"
    )
    checks = [svc["ok"], report.get("cuda_tests", {"ok": True})["ok"]]
    report["ok"] = all(checks)
    save()
    print(f"gpu-check: {'ok' if report['ok'] else 'FAILED'}; {out / 'gpu-check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
