"""PrometheusLogger: Avalanche metric names parsed by marker, values read back from a registry."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    class_accuracy_metrics,
    confusion_matrix_metrics,
    forgetting_metrics,
    loss_metrics,
)
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from prometheus_client import CollectorRegistry
from torch import nn
from torch.utils.data import TensorDataset

from spacenet.strategy.prometheus_logger import LABELS, MetricName, PrometheusLogger, scalar

REPO = Path(__file__).resolve().parents[2]


class LabeledTensors(TensorDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def blobs(per_class: int, seed: int) -> LabeledTensors:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)) * 3
    x = torch.cat([centers[c] + torch.randn(per_class, 16, generator=g) for c in range(4)])
    y = torch.arange(4).repeat_interleave(per_class)
    return LabeledTensors(x, y)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001", ("Top1_Acc_Exp", "eval", "test", 0, 1, "")),
        ("Top1_Acc_Stream/eval_phase/test_stream/Task000", ("Top1_Acc_Stream", "eval", "test", 0, None, "")),
        ("StreamForgetting/eval_phase/test_stream", ("StreamForgetting", "eval", "test", None, None, "")),
        ("Loss_MB/train_phase/train_stream/Task003", ("Loss_MB", "train", "train", 3, None, "")),
        (
            "Top1_ClassAcc_Epoch/train_phase/train_stream/Task000/7",
            ("Top1_ClassAcc_Epoch", "train", "train", 0, None, "7"),
        ),
        ("Repartition/train_phase/train_stream/Task_002", ("Repartition", "train", "train", 2, None, "")),
        # Markers are found wherever they are, not by position.
        ("Custom/Exp012/valid_stream", ("Custom", None, "valid", None, 12, "")),
        ("MaxRAMUsage", ("MaxRAMUsage", None, None, None, None, "")),
    ],
)
def test_names_are_parsed_by_their_markers(name: str, expected: tuple[object, ...]) -> None:
    parsed = MetricName.parse(name)
    assert (parsed.name, parsed.phase, parsed.stream, parsed.task, parsed.experience, parsed.key) == expected


def test_scalars() -> None:
    assert scalar(0.5) == 0.5 and scalar(3) == 3.0 and scalar(np.float32(0.25)) == 0.25
    assert scalar(torch.tensor(0.75)) == 0.75
    assert scalar(torch.zeros(3, 3)) is None and scalar("text") is None and scalar(np.zeros(2)) is None


def test_log_single_metric_keeps_labels_bounded() -> None:
    registry = CollectorRegistry()
    logger = PrometheusLogger(registry, max_index=4, max_series=3)

    def get(metric: str, **labels: str) -> float | None:
        return registry.get_sample_value(metric, labels)

    base = {"name": "Top1_Acc_Exp", "phase": "eval", "stream": "test", "task": "0", "key": ""}
    logger.log_single_metric("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001", 0.5, 10)
    logger.log_single_metric("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001", 0.75, 20)
    assert get("spacenet_bench_metric", **base, experience="1") == 0.75
    assert get("spacenet_bench_metric_step", **base, experience="1") == 20.0
    for reason in ("not_scalar", "index_cap", "series_cap"):
        assert get("spacenet_bench_metrics_dropped_total", reason=reason) == 0.0

    logger.log_single_metric("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp004", 0.9, 30)  # index >= 4
    logger.log_single_metric("ConfusionMatrix_Stream/eval_phase/test_stream", torch.eye(3), 30)
    assert get("spacenet_bench_metrics_dropped_total", reason="index_cap") == 1.0
    assert get("spacenet_bench_metrics_dropped_total", reason="not_scalar") == 1.0
    assert get("spacenet_bench_metric", **base, experience="4") is None

    for exp in (0, 2, 3):  # two more series fit under max_series=3, the third does not
        logger.log_single_metric(f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp00{exp}", 0.1, 40)
    assert get("spacenet_bench_metrics_dropped_total", reason="series_cap") == 1.0
    assert get("spacenet_bench_metric", **base, experience="2") == 0.1
    assert get("spacenet_bench_metric", **base, experience="3") is None
    logger.log_single_metric("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001", 0.2, 50)  # known: updates
    assert get("spacenet_bench_metric", **base, experience="1") == 0.2


def test_real_evaluation_plugin_values_arrive_in_the_registry() -> None:
    torch.manual_seed(0)
    bm = nc_benchmark(blobs(40, 0), blobs(10, 1), n_experiences=2, task_labels=False, shuffle=False, seed=0)
    registry = CollectorRegistry()
    logger = PrometheusLogger(registry)
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(stream=True),
        forgetting_metrics(experience=True, stream=True),
        class_accuracy_metrics(stream=True),
        confusion_matrix_metrics(stream=True, save_image=False),
        loggers=[logger],
    )
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    strategy = Naive(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=64,
        evaluator=evaluator,
    )
    for exp in bm.train_stream:
        strategy.train(exp, num_workers=0)
        strategy.eval(bm.test_stream, num_workers=0)

    exported = 0
    for name, value in evaluator.get_last_metrics().items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for key, v in items:
            number = scalar(v)
            full = f"{name}/{key}" if key != "" else name
            labels = logger.labels_of(full)
            if number is None or labels is None:
                continue
            got = registry.get_sample_value("spacenet_bench_metric", dict(zip(LABELS, labels, strict=True)))
            assert got == pytest.approx(number), full
            exported += 1
    assert exported >= 8
    stream_acc = {
        "name": "Top1_Acc_Stream",
        "phase": "eval",
        "stream": "test",
        "task": "0",
        "experience": "",
        "key": "",
    }
    assert 0.0 <= (registry.get_sample_value("spacenet_bench_metric", stream_acc) or -1.0) <= 1.0
    assert (
        registry.get_sample_value("spacenet_bench_metrics_dropped_total", {"reason": "not_scalar"}) or 0
    ) >= 1


def test_strategy_does_not_depend_on_stream() -> None:
    tree = ast.parse((REPO / "strategy" / "prometheus_logger.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "prometheus_client" in modules
    assert not any(m and m.startswith(("spacenet.stream", "stream")) for m in modules)
