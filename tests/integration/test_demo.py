"""``spacenet demo`` (the README's main job) end to end on a small slice of split MNIST,
against the session's real broker: it must detect the five tasks, score the live
service's prediction replies, leave its summary and final metrics scrape behind, and,
holding nothing out, learn exactly what the offline benchmark runner learns from the same
records with the same seed and settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spacenet.strategy.baselines import TrainSettings
from spacenet.strategy.bench import RunConfig, run_one


@pytest.mark.timeout(600)
def test_demo_on_a_small_slice(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "spacenet.stream.cli",
        "demo",
        "--bootstrap",
        kafka_bootstrap,
        "--limit-per-class",
        "500",
        "--epochs",
        "5",
        "--idle-timeout",
        "3",
        "--out",
        str(out),
        "--timeout",
        "400",
        # 1000 records a task: the detector's windows scaled down from the full stream's,
        # and a larger step so that a few dozen steps learn each task
        "--set",
        "lr=0.05",
        "--set",
        "min_count=10",
        "--set",
        "window=300",
        "--set",
        "group_window=100",
        # every record trains, as in the offline runner
        "--set",
        "holdout_fraction=0",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expected_tasks"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [sorted(e["new_classes"]) for e in summary["events"]] == summary["expected_tasks"]
    test = summary["test"]
    assert test["records"] == 10_000  # the whole MNIST test set came back as replies
    assert test["model_versions"] == ["5"]
    assert 0.0 <= test["final_accuracy"] <= 1.0
    assert test["final_accuracy"] > 0.3  # well above chance (0.1) on 500 records a class
    metrics = (out / "metrics.prom").read_text()
    assert 'spacenet_model_version{stream="0"} 5.0' in metrics
    assert 'spacenet_task_boundaries_total{reason="new_class"} 5.0' in metrics
    assert "detected tasks [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]: as streamed" in done.stdout

    # The offline runner on the same records (the first 500 of each class), same settings
    runner = run_one(
        RunConfig(
            "split_mnist",
            "spacenet",
            seed=0,
            settings=TrainSettings(epochs=5, lr=0.05),
            subset_per_class=500,
            threads=torch.get_num_threads(),  # run_one sets it for this process
            progress=False,
        )
    )
    assert test["final_accuracy"] == pytest.approx(runner["final_accuracy"], abs=1e-6)
    assert test["accuracy_all"] == pytest.approx(runner["sample_accuracy"], abs=1e-6)
