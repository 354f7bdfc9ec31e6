"""The benchmark runner (``bench``, ``bench_report``, ``bench_cli``): metric parsing, every
baseline, and whole runs through ``main``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from spacenet.strategy import bench, bench_cli, bench_report
from spacenet.strategy.baselines import (
    REGISTRY,
    SPACENET_VARIANTS,
    STATISTICS_ONLY,
    TrainSettings,
    build_strategy,
    spacenet_kwargs,
)
from spacenet.strategy.cl_metrics import AccuracyMatrix
from spacenet.strategy.models import SmallCNN, SpaceNetMLP
from spacenet.stream.observability.http import free_port
from tests.strategy.test_benchmarks import write_synthetic_cifar10

REQUIRED_STRATEGY_KEYS = {
    "final_accuracy_mean",
    "final_accuracy_std",
    "per_seed_final_accuracy",
    "sample_accuracy_mean",
    "average_forgetting_mean",
    "bwt_mean",
    "train_seconds_mean",
    "per_seed_train_seconds",
    "train_cpu_seconds_mean",
    "per_seed_train_cpu_seconds",
    "peak_rss_bytes",
    "accuracy_matrices",
    "errors",
}
REQUIRED_SETTINGS_KEYS = {
    "benchmark",
    "epochs",
    "lr",
    "batch_size",
    "seeds",
    "threads",
    "torch_version",
    "avalanche_version",
    "device",
    "cpu_count",
}


# ------------------------------------------------------------------ fast unit tests
def test_experience_accuracies_parse_names_by_marker() -> None:
    metrics = {
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp003": 0.25,
        "Top1_Acc_Exp/eval_phase/test_stream/Exp001": 0.5,  # newer API: no task segment
        "Top1_Acc_Stream/eval_phase/test_stream/Task000": 0.9,
        "Top1_Acc_Exp/eval_phase/train_stream/Task000/Exp000": 0.1,
        "Loss_Exp/eval_phase/test_stream/Task000/Exp000": 2.0,
    }
    assert bench.experience_accuracies(metrics) == {3: 0.25, 1: 0.5}


def test_parse_args_defaults_and_errors(tmp_path: Path) -> None:
    args = bench_cli.parse_args(["--out", str(tmp_path), "--strategies", "spacenet, naive", "--seeds", "3,4"])
    assert args.strategies == ["spacenet", "naive"]
    assert args.seeds == [3, 4]
    assert (args.benchmark, args.epochs, args.lr, args.batch_size, args.threads) == (
        "split_mnist",
        4,
        0.01,
        128,
        1,
    )
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--out", str(tmp_path), "--strategies", "spacenet,packnet"])
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--out", str(tmp_path), "--benchmark", "split_imagenet"])


def _run(seed: int, rows: list[list[float]], train_s: float) -> dict[str, Any]:
    matrix = AccuracyMatrix()
    for i, row in enumerate(rows):
        for j, acc in enumerate(row):
            matrix.record(i, j, acc, 100)
    return {
        "seed": seed,
        "accuracy_matrix": matrix.as_dict(),
        **matrix.summary(),
        "train_seconds": train_s,
        "train_cpu_seconds": train_s / 2,
        "wall_seconds": train_s + 1,
        "peak_rss_bytes": 2**30 + seed,
        "rss_after_imports_bytes": 2**29,
        "capacity": {"tasks_learned": len(rows)},
    }


def test_summarise_aggregates_seeds_and_keeps_errors() -> None:
    runs = [
        _run(0, [[1.0, 0.0], [0.5, 0.9]], 2.0),
        _run(1, [[0.8, 0.0], [0.3, 0.7]], 4.0),
        {"seed": 2, "error": "RuntimeError: boom"},
    ]
    entry = bench_report.summarise("spacenet", runs, {"n_select": 80})
    assert entry["seeds"] == [0, 1]
    assert entry["per_seed_final_accuracy"] == pytest.approx([0.7, 0.5])
    assert entry["final_accuracy_mean"] == pytest.approx(0.6)
    assert entry["final_accuracy_std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std
    assert entry["average_forgetting_mean"] == pytest.approx(0.5)
    assert entry["bwt_mean"] == pytest.approx(-0.5)
    assert entry["train_seconds_mean"] == pytest.approx(3.0)
    assert entry["train_cpu_seconds_mean"] == pytest.approx(1.5)
    assert entry["peak_rss_bytes"] == 2**30 + 1
    assert entry["accuracy_after_each_task_mean"] == pytest.approx([0.9, 0.6])
    for row, expected in zip(entry["mean_accuracy_matrix"], [[0.9, 0.0], [0.4, 0.8]], strict=True):
        assert row == pytest.approx(expected)
    assert entry["errors"] == [{"seed": 2, "error": "RuntimeError: boom"}]
    assert entry["capacity"] == [{"tasks_learned": 2}, {"tasks_learned": 2}]
    assert entry["spacenet_kwargs"] == {"n_select": 80}
    failed = bench_report.summarise("naive", [{"seed": 0, "error": "x"}])
    assert failed["final_accuracy_mean"] is None and failed["peak_rss_bytes"] is None
    assert "capacity" not in failed


def test_markdown_table_caveats_and_failures(tmp_path: Path) -> None:
    args = bench_cli.parse_args(["--out", str(tmp_path), "--strategies", "spacenet,si", "--seeds", "0"])
    results = {
        "settings": {**bench_cli.settings_block(args, TrainSettings()), "n_experiences": 2},
        "strategies": {
            "spacenet": bench_report.summarise("spacenet", [_run(0, [[1.0, 0.0], [0.5, 0.9]], 2.0)]),
            "si": bench_report.summarise("si", [{"seed": 0, "error": "RuntimeError: boom"}]),
        },
    }
    text = bench_report.markdown(results)
    assert "| spacenet | 0.700 ± 0.000 | 0.700 | 0.500 | -0.500 | 2.0 | 1.0 | 1024 |" in text
    assert "| si | n/a ± n/a |" in text
    assert "SynapticIntelligence is a no-op on the CPU" in text
    assert "- si seed 0: RuntimeError: boom" in text
    bench_report.write_outputs(results, tmp_path, final=True)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "accuracy_matrix_spacenet.png").stat().st_size > 0
    assert not (tmp_path / "accuracy_matrix_si.png").exists()  # nothing to draw


def test_registry_has_the_issue_strategies() -> None:
    expected = {"spacenet", "spacenet_fb", "spacenet_cal", "spacenet_plus", "spacenet_2x", "spacenet_ti",
                "naive", "ewc", "si", "lwf", "replay", "replay1000", "gem", "agem", "gdumb", "cumulative",
                "slda", "ncm", "mixtures"}  # fmt: skip
    assert set(REGISTRY) == expected
    assert {"spacenet", "spacenet_fb", "spacenet_cal", "spacenet_plus", "spacenet_2x",
                                 "spacenet_ti"} == SPACENET_VARIANTS  # fmt: skip
    assert all(REGISTRY[name].caveat for name in ("si", "ewc", "lwf"))


def test_spacenet_kwargs_per_model() -> None:
    assert spacenet_kwargs(SpaceNetMLP()) == {}
    cnn = SmallCNN()
    assert spacenet_kwargs(cnn, 10) == cnn.spacenet_defaults(10)
    # Sized so the tasks fit: before the last task, each hidden layer still has n_select free neurons.
    for tasks in (5, 10):
        kw = cnn.spacenet_defaults(tasks)
        widths = (32, 64, 128, 256)
        for w, sel, res in zip(widths, kw["n_select"], kw["n_reserve"], strict=True):  # type: ignore[call-overload]
            assert w - (tasks - 1) * res >= sel


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_build_strategy_copies_the_plugin_list(name: str) -> None:
    plugins: list[Any] = []
    model = SpaceNetMLP()
    strategy = build_strategy(
        name, model, TrainSettings(epochs=2, lr=0.05, batch_size=32), seed=0, plugins=plugins
    )
    assert plugins == []  # the wrappers append to the list they get, never to ours
    if name in STATISTICS_ONLY:  # one pass of exact statistics, no gradient steps
        assert strategy.train_epochs == 1 and strategy.optimizer is None
        return
    assert strategy.train_epochs == 2 and strategy.train_mb_size == 32
    assert type(strategy.optimizer) is torch.optim.SGD
    assert strategy.optimizer.param_groups[0]["lr"] == 0.05
    assert strategy.optimizer.param_groups[0]["momentum"] == 0
    has_spacenet = any(type(p).__name__ == "SpaceNetPlugin" for p in strategy.plugins)
    assert has_spacenet == (name in SPACENET_VARIANTS)


def test_build_strategy_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown strategy"):
        build_strategy("packnet", SpaceNetMLP(), TrainSettings(), seed=0)


# ----------------------------------------------------- every baseline, in process
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_strategy_runs_a_tiny_stream(name: str) -> None:
    config = bench.RunConfig(
        "split_mnist", name, 0, TrainSettings(epochs=1, batch_size=32), subset_per_class=20,
        test_subset_per_class=10, progress=False,
    )  # fmt: skip
    result = bench.run_one(config)
    matrix = AccuracyMatrix.from_dict(result["accuracy_matrix"])
    assert (matrix.n_trained, matrix.n_tasks) == (5, 5)
    assert 0.0 <= result["final_accuracy"] <= 1.0
    assert result["train_seconds"] > 0 and result["train_cpu_seconds"] > 0 and result["peak_rss_bytes"] > 0
    assert ("capacity" in result) == (name in SPACENET_VARIANTS)
    if name in SPACENET_VARIANTS:
        assert result["capacity"]["tasks_learned"] == 5


# ------------------------------------------------------------ whole runs via main()
@pytest.mark.slow
def test_bench_split_mnist_spacenet_beats_naive(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 1000 training samples per class with lr 0.05 give SpaceNet enough steps to learn
    # (~0.65 here, like full MNIST at lr 0.01); Naive forgets everything (~0.19).
    argv = ["--benchmark", "split_mnist", "--strategies", "spacenet,naive", "--seeds", "0", "--out", str(out),
            "--epochs", "4", "--lr", "0.05", "--subset-per-class", "1000", "--test-subset-per-class", "300",
            "--threads", "1", "--no-progress"]  # fmt: skip
    assert bench_cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"].keys() >= REQUIRED_SETTINGS_KEYS
    assert results["settings"]["seeds"] == [0] and results["settings"]["lr"] == 0.05
    strategies = results["strategies"]
    assert list(strategies) == ["spacenet", "naive"]
    for entry in strategies.values():
        assert entry.keys() >= REQUIRED_STRATEGY_KEYS
        assert entry["errors"] == []
        assert len(entry["accuracy_matrices"]) == 1
        assert len(entry["accuracy_matrices"][0]["accuracy"]) == 5
        assert entry["peak_rss_bytes"] > 100 * 2**20
    capacity = strategies["spacenet"]["capacity"][0]
    assert capacity["tasks_learned"] == 5 and capacity["classes_known"] == 10
    assert "capacity" not in strategies["naive"]
    spacenet, naive = (
        strategies["spacenet"]["final_accuracy_mean"],
        strategies["naive"]["final_accuracy_mean"],
    )
    assert naive < 0.3
    assert spacenet > naive + 0.2
    table = (out / "results.md").read_text()
    assert "| spacenet |" in table and "| naive |" in table
    for png in ("accuracy_after_each_task.png", "accuracy_matrix_spacenet.png", "accuracy_matrix_naive.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_bench_small_cnn_on_synthetic_cifar10(tmp_path: Path) -> None:
    root = write_synthetic_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--benchmark", "split_cifar10", "--strategies", "spacenet", "--seeds", "0", "--out", str(out),
            "--epochs", "1", "--data-root", str(root), "--no-verify", "--no-progress"]  # fmt: skip
    assert bench_cli.main(argv) == 0
    entry = json.loads((out / "results.json").read_text())["strategies"]["spacenet"]
    assert entry["errors"] == []
    capacity = entry["capacity"][0]
    assert capacity["tasks_learned"] == 5
    assert [layer["name"] for layer in capacity["layers"]] == ["convs.0", "convs.1", "convs.2", "fc", "out"]
    assert "on_exhausted" not in entry["spacenet_kwargs"]  # the defaults fit: no shrinking needed
    assert (out / "accuracy_matrix_spacenet.png").exists()


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_exit_code_says_so(tmp_path: Path) -> None:
    """The data loads (so the bench starts) but has no test images: the run itself fails."""
    root = write_synthetic_cifar10(tmp_path / "data", train_per_class=4, test_per_class=0)
    out = tmp_path / "out"
    argv = ["--benchmark", "split_cifar10", "--strategies", "naive", "--seeds", "0", "--out", str(out),
            "--data-root", str(root), "--no-verify", "--no-progress"]  # fmt: skip
    assert bench_cli.main(argv) == 1
    entry = json.loads((out / "results.json").read_text())["strategies"]["naive"]
    assert entry["seeds"] == [] and entry["final_accuracy_mean"] is None
    assert entry["errors"][0]["error"]
    assert "Failed runs:" in (out / "results.md").read_text()


def test_metrics_port_serves_the_runs_avalanche_metrics() -> None:
    import socket
    import urllib.request

    from spacenet.strategy.bench import RunConfig, _prometheus_loggers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = RunConfig("split_mnist", "spacenet", 0, TrainSettings(), metrics_port=port)
    loggers, server = _prometheus_loggers(config)
    try:
        loggers[0].log_single_metric("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001", 0.75, 3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "spacenet_bench_metric{" in body and "0.75" in body


def test_spacenet_2x_doubles_the_hidden_budgets_only() -> None:
    strategy = build_strategy("spacenet_2x", SpaceNetMLP(), TrainSettings(), seed=0)
    plugin = next(p for p in strategy.plugins if type(p).__name__ == "SpaceNetPlugin")
    assert tuple(plugin.spacenet.connections) == (20000, 3280, 80)


def test_bench_without_its_dataset_fails_fast_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline (every download goes to a proxy nobody listens on), CIFAR-10 is not there."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SPACENET_DATA_SEED", str(tmp_path / "no-mirror"))
    out = tmp_path / "out"
    argv = ["--benchmark", "split_cifar10", "--strategies", "naive", "--seeds", "0", "--out", str(out)]
    code = bench_cli.main([*argv, "--data-root", str(tmp_path / "data"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("spacenet bench: cannot load split_cifar10 (train split) under ")
    assert "Traceback" not in err
