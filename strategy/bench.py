"""The benchmark runner's training loop: one (strategy, seed) run, in a child process.

``run_one`` trains a strategy on a class-incremental benchmark and, after each experience,
evaluates it on every test experience through ``strategy.eval`` (so plugins that act at
evaluation, e.g. SpaceNet's calibration, take part) with an
``EvaluationPlugin(accuracy_metrics(experience=True))`` and no loggers; per-experience
accuracies are read from the metric names' ``Top1_Acc_Exp/eval_phase/test_stream/.../ExpNNN``
markers and fill an ``AccuracyMatrix``. Train time counts only the ``strategy.train(exp)``
calls. ``run_in_child`` runs it in a fresh spawned process, so that its peak RSS and timings
are its own.

The rest of ``spacenet bench`` is apart from this loop: the command line in
``bench_cli.py``, aggregation over seeds and ``results.json`` / ``results.md`` in
``bench_report.py``, the plots in ``bench_plots.py``.

    >>> experience_accuracies({"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp002": 0.5, "Loss": 1.0})
    {2: 0.5}
"""

from __future__ import annotations

import re
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch
from tqdm import tqdm

from spacenet.strategy.baselines import TrainSettings, build_strategy, make_model
from spacenet.strategy.benchmarks import BENCHMARKS, build_benchmark
from spacenet.strategy.cl_metrics import AccuracyMatrix
from spacenet.strategy.rss import peak_rss_bytes
from spacenet.strategy.seeding import seed_everything, seed_experience

_EXP_ACC = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/(?:.*/)?Exp(\d+)$")


@dataclass(frozen=True)
class RunConfig:
    """Everything one child process needs (picklable)."""

    benchmark: str
    strategy: str
    seed: int
    settings: TrainSettings
    subset_per_class: int | None = None
    test_subset_per_class: int | None = None
    data_root: str | None = None
    verify: bool = True
    threads: int = 1
    progress: bool = True
    metrics_port: int | None = None  # serve Avalanche's metrics as Prometheus gauges on it
    metrics_host: str = "127.0.0.1"


def experience_accuracies(metrics: dict[str, Any]) -> dict[int, float]:
    """Experience index -> accuracy, from Avalanche metric names (by marker, not position)."""
    out: dict[int, float] = {}
    for name, value in metrics.items():
        match = _EXP_ACC.match(name)
        if match:
            out[int(match.group(1))] = float(value)
    return out


def run_one(config: RunConfig) -> dict[str, Any]:
    """Train ``config.strategy`` on the benchmark, evaluating after each experience."""
    import avalanche.training  # noqa: F401  # imported before measuring the baseline RSS
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    warnings.filterwarnings("ignore", module=r"avalanche\..*")
    warnings.filterwarnings("ignore", message="No loggers specified")
    torch.set_num_threads(config.threads)
    rss_after_imports = peak_rss_bytes()
    started = time.perf_counter()
    bm = build_benchmark(
        config.benchmark,
        n_experiences=config.settings.n_experiences,
        subset_per_class=config.subset_per_class,
        test_subset_per_class=config.test_subset_per_class,
        root=config.data_root,
        verify=config.verify,
    )
    seed_everything(config.seed)
    model = make_model(BENCHMARKS[config.benchmark])
    loggers, server = _prometheus_loggers(config)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=loggers)
    strategy = build_strategy(config.strategy, model, config.settings, config.seed, evaluator=evaluator)
    test_sizes = [len(exp.dataset) for exp in bm.test_stream]
    matrix = AccuracyMatrix()
    train_seconds = 0.0
    train_cpu_seconds = 0.0
    bar = tqdm(
        bm.train_stream,
        desc=f"{config.strategy} seed {config.seed}",
        unit="exp",
        leave=False,
        position=1,
        disable=not config.progress,
    )
    for i, exp in enumerate(bar):
        seed_experience(config.seed, i)
        t0, c0 = time.perf_counter(), time.process_time()
        strategy.train(exp)
        train_seconds += time.perf_counter() - t0
        train_cpu_seconds += time.process_time() - c0
        accuracies = experience_accuracies(strategy.eval(bm.test_stream))
        missing = set(range(len(test_sizes))) - set(accuracies)
        if missing:
            raise RuntimeError(f"no accuracy reported for test experiences {sorted(missing)}")
        for j, n in enumerate(test_sizes):
            matrix.record(i, j, accuracies[j], n)
    result: dict[str, Any] = {
        "seed": config.seed,
        "accuracy_matrix": matrix.as_dict(),
        **matrix.summary(),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_imports_bytes": rss_after_imports,
    }
    from spacenet.strategy.plugin import SpaceNetPlugin

    for plugin in strategy.plugins:
        if isinstance(plugin, SpaceNetPlugin):
            result["capacity"] = plugin.capacity().as_dict()
    if server is not None:
        server.shutdown()
        server.server_close()
    return result


def _prometheus_loggers(config: RunConfig) -> tuple[list[Any], Any]:
    """With ``--metrics-port``: a ``PrometheusLogger`` on a registry of this run, served
    over HTTP for the run's duration (runs are sequential, so they share the port)."""
    if config.metrics_port is None:
        return [], None
    from prometheus_client import CollectorRegistry, start_http_server

    from spacenet.strategy.prometheus_logger import PrometheusLogger

    registry = CollectorRegistry()
    server, _ = start_http_server(config.metrics_port, addr=config.metrics_host, registry=registry)
    return [PrometheusLogger(registry)], server


def run_in_child(config: RunConfig) -> dict[str, Any]:
    """``run_one`` in a fresh spawned process; a failure becomes ``{"seed", "error"}``."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(run_one, config).result()
    except Exception as e:  # a failed run must not lose the others' results
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        return {"seed": config.seed, "error": detail}
