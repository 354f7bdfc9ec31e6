"""``spacenet bench``: SpaceNet beside Avalanche baselines on class-incremental streams.

    $ spacenet bench --benchmark split_mnist --strategies spacenet,naive,replay \\
          --seeds 0,1,2,3,4 --out results/split_mnist

Each (strategy, seed) run happens in a fresh child process (spawn), so its peak RSS
and timings are its own. Train time counts only the ``strategy.train(exp)`` calls.
After each experience the strategy is evaluated on every test experience through
``strategy.eval`` (so plugins that act at evaluation, e.g. SpaceNet's calibration, take
part) with an ``EvaluationPlugin(accuracy_metrics(experience=True))`` and no loggers;
per-experience accuracies are read from the metric names' ``Top1_Acc_Exp/eval_phase/
test_stream/.../ExpNNN`` markers and fill an ``AccuracyMatrix``.

Writes to ``--out``: ``results.json`` (rewritten after every run), ``results.md``,
``accuracy_after_each_task.png`` and ``accuracy_matrix_<strategy>.png``.

``results.json`` (schema_version 1, a stable interface)::

    settings: benchmark, n_experiences, epochs, lr, batch_size, eval_batch_size, device,
        strategies, seeds, threads, subset_per_class, test_subset_per_class, optimizer,
        evaluation, std, torch_version, avalanche_version, python_version, machine,
        cpu_count, cuda_device, schema_version
    strategies: {name: {description, caveat, seeds (successful runs; every per_seed_*
        list and accuracy_matrices follow this order), final_accuracy_mean,
        final_accuracy_std, per_seed_final_accuracy, sample_accuracy_mean,
        per_seed_sample_accuracy, average_forgetting_mean, per_seed_average_forgetting,
        bwt_mean, per_seed_bwt, train_seconds_mean, per_seed_train_seconds,
        per_seed_wall_seconds, peak_rss_bytes (max over seeds), per_seed_peak_rss_bytes,
        per_seed_rss_after_imports_bytes, accuracy_after_each_task_mean,
        mean_accuracy_matrix, accuracy_matrices (AccuracyMatrix.as_dict() per seed),
        errors ([{seed, error}]), and for SpaceNet variants capacity (per seed,
        CapacityReport.as_dict()) and spacenet_kwargs}}

Means are None when every seed failed. Peak RSS is the child's ``VmHWM`` (see
``peak_rss_bytes``), so it includes Python, torch and Avalanche themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from spacenet.strategy.baselines import (
    REGISTRY,
    SPACENET_VARIANTS,
    TrainSettings,
    build_strategy,
    make_model,
    seed_everything,
    seed_experience,
    spacenet_kwargs,
)
from spacenet.strategy.benchmarks import BENCHMARKS, build_benchmark
from spacenet.strategy.cl_metrics import AccuracyMatrix, mean_matrix

SCHEMA_VERSION = 1
DEFAULT_STRATEGIES = "spacenet,naive,ewc,si,lwf,replay"
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


# ---------------------------------------------------------------- one run (child)
def experience_accuracies(metrics: dict[str, Any]) -> dict[int, float]:
    """Experience index -> accuracy, from Avalanche metric names (by marker, not position)."""
    out: dict[int, float] = {}
    for name, value in metrics.items():
        match = _EXP_ACC.match(name)
        if match:
            out[int(match.group(1))] = float(value)
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes.

    Linux: ``VmHWM`` from ``/proc/self/status``. ``getrusage(RUSAGE_SELF).ru_maxrss`` is
    not used there because a spawned child inherits its parent's peak through exec: a
    child of a 1.5 GB parent reports 1.5 GB before it allocates anything. Elsewhere:
    ``ru_maxrss`` (KiB on Linux and BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


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
        t0 = time.perf_counter()
        strategy.train(exp)
        train_seconds += time.perf_counter() - t0
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


# ------------------------------------------------------------------ aggregation
def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1); 0.0 for one value."""
    if not values:
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(
    name: str, runs: list[dict[str, Any]], plugin_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One strategy's entry in ``results.json`` from its per-seed runs; SpaceNet variants
    also get their final capacity reports and ``plugin_kwargs`` (the model-specific ones)."""
    ok = [r for r in runs if "error" not in r]
    matrices = [AccuracyMatrix.from_dict(r["accuracy_matrix"]) for r in ok]
    curves = [m.accuracy_curve() for m in matrices]
    n_rows = max((len(c) for c in curves), default=0)
    baseline = REGISTRY[name]

    def col(key: str) -> list[Any]:
        return [r[key] for r in ok]

    entry: dict[str, Any] = {
        "description": baseline.description,
        "caveat": baseline.caveat,
        "seeds": col("seed"),
        "final_accuracy_mean": _mean(col("final_accuracy")),
        "final_accuracy_std": _std(col("final_accuracy")),
        "per_seed_final_accuracy": col("final_accuracy"),
        "sample_accuracy_mean": _mean(col("sample_accuracy")),
        "per_seed_sample_accuracy": col("sample_accuracy"),
        "average_forgetting_mean": _mean(col("average_forgetting")),
        "per_seed_average_forgetting": col("average_forgetting"),
        "bwt_mean": _mean(col("bwt")),
        "per_seed_bwt": col("bwt"),
        "train_seconds_mean": _mean(col("train_seconds")),
        "per_seed_train_seconds": col("train_seconds"),
        "per_seed_wall_seconds": col("wall_seconds"),
        "peak_rss_bytes": max(col("peak_rss_bytes"), default=None),
        "per_seed_peak_rss_bytes": col("peak_rss_bytes"),
        "per_seed_rss_after_imports_bytes": col("rss_after_imports_bytes"),
        "accuracy_after_each_task_mean": [
            _mean([v for c in curves if i < len(c) and (v := c[i]) is not None]) for i in range(n_rows)
        ],
        "mean_accuracy_matrix": mean_matrix(matrices),
        "accuracy_matrices": col("accuracy_matrix"),
        "errors": [{"seed": r["seed"], "error": r["error"]} for r in runs if "error" in r],
    }
    if name in SPACENET_VARIANTS:
        entry["capacity"] = col("capacity")
        entry["spacenet_kwargs"] = plugin_kwargs or {}
    return entry


# ---------------------------------------------------------------------- outputs
def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """The summary table, the settings line, caveats and errors."""
    s = results["settings"]
    lines = [
        f"# {s['benchmark']}: class-incremental, {s['n_experiences']} experiences, no task labels",
        "",
        f"SGD lr {s['lr']}, batch {s['batch_size']}, {s['epochs']} epochs per experience, seeds "
        f"{','.join(map(str, s['seeds']))}, device {s['device']}, {s['threads']} torch thread(s); "
        f"train subset {s['subset_per_class'] or 'all'} per class, test subset "
        f"{s['test_subset_per_class'] or 'all'} per class. Final accuracy: mean over tasks of each task's "
        "test accuracy after the last one (± sample std over seeds).",
        "",
        "| strategy | final acc mean ± std | sample acc | avg forgetting | BWT | train s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in results["strategies"].items():
        rss = None if e["peak_rss_bytes"] is None else e["peak_rss_bytes"] / 2**20
        lines.append(
            f"| {name} | {_fmt(e['final_accuracy_mean'])} ± {_fmt(e['final_accuracy_std'])} | "
            f"{_fmt(e['sample_accuracy_mean'])} | {_fmt(e['average_forgetting_mean'])} | "
            f"{_fmt(e['bwt_mean'])} | "
            f"{_fmt(e['train_seconds_mean'], '.1f')} | {_fmt(rss, '.0f')} |"
        )
    base_rss = [b for e in results["strategies"].values() for b in e["per_seed_rss_after_imports_bytes"]]
    if base_rss:
        lines += [
            "",
            f"Peak RSS is the whole run's process: {min(base_rss) / 2**20:.0f} MB of it is Python, "
            "torch and Avalanche after import.",
        ]
    caveats = [f"{n}: {e['caveat']}" for n, e in results["strategies"].items() if e["caveat"]]
    if caveats:
        lines += ["", "Caveats: " + " ".join(caveats)]
    errors = [
        f"- {n} seed {err['seed']}: {err['error']}"
        for n, e in results["strategies"].items()
        for err in e["errors"]
    ]
    if errors:
        lines += ["", "Failed runs:", *errors]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Mean accuracy on seen tasks after each task, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in results["strategies"].items():
        curve = e["accuracy_after_each_task_mean"]
        xs = [i + 1 for i, v in enumerate(curve) if v is not None]
        ax.plot(xs, [v for v in curve if v is not None], marker="o", label=name)
    ax.set(
        xlabel="tasks trained",
        ylabel="mean accuracy on seen tasks",
        ylim=(0, 1.02),
        title=results["settings"]["benchmark"],
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_matrix(name: str, matrix: list[list[float | None]], path: Path) -> None:
    """Heatmap of the seed-mean accuracy matrix R[after task][task]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float).reshape(
        len(matrix), -1
    )
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * max(1, data.shape[1]), 1.0 + 0.5 * max(1, data.shape[0])))
    ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    if data.size <= 400:
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set(xlabel="evaluated task", ylabel="after training task", title=f"{name}: accuracy (seed mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path, final: bool) -> None:
    tmp = out / "results.json.partial"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")
    if not final:
        return
    (out / "results.md").write_text(markdown(results))
    plot_curves(results, out / "accuracy_after_each_task.png")
    for name, e in results["strategies"].items():
        if e["mean_accuracy_matrix"]:
            plot_matrix(name, e["mean_accuracy_matrix"], out / f"accuracy_matrix_{name}.png")


# ------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spacenet bench",
        description="SpaceNet beside Avalanche baselines on class-incremental benchmarks without task "
        "labels; one child process per (strategy, seed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="split_mnist")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=f"comma list of: {', '.join(REGISTRY)}")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2, 3, 4], help="comma list")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--n-experiences", type=int, default=None, help="None: 5 (10 for CIFAR-100)")
    p.add_argument("--subset-per-class", type=int, default=None, help="first N training samples per class")
    p.add_argument("--test-subset-per-class", type=int, default=None, help="first N test samples per class")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--data-root", default=None, help="None: $SPACENET_DATA or the user cache")
    p.add_argument("--device", default=None, help="None: cuda if available, else cpu")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip CIFAR md5 checks: only for small local files in CIFAR's format (tests)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--metrics-port", type=int, default=None, help="serve the runs' metrics for Prometheus")
    p.add_argument("--metrics-host", default="127.0.0.1", help="bind address of --metrics-port")
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in REGISTRY]
    if unknown or not args.strategies:
        p.error(f"unknown strategies {unknown}; known: {', '.join(REGISTRY)}")
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    return args


def settings_block(args: argparse.Namespace, settings: TrainSettings) -> dict[str, Any]:
    import avalanche

    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": args.benchmark,
        **asdict(settings),
        "input_range": list(settings.input_range),  # JSON has no tuples
        "strategies": args.strategies,
        "seeds": args.seeds,
        "threads": args.threads,
        "subset_per_class": args.subset_per_class,
        "test_subset_per_class": args.test_subset_per_class,
        "optimizer": "SGD (no momentum, no weight decay)",
        "evaluation": "strategy.eval on every test experience after each training experience",
        "std": "sample standard deviation over seeds (ddof=1); 0 with one seed",
        "torch_version": torch.__version__,
        "avalanche_version": getattr(avalanche, "__version__", "unknown"),
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(0) if settings.device.startswith("cuda") else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    info = BENCHMARKS[args.benchmark]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = TrainSettings(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        device=device,
        n_experiences=args.n_experiences or info.n_experiences,
        input_range=info.input_range,
        input_size=info.input_size,
        num_classes=info.num_classes,
    )
    plugin_kwargs = spacenet_kwargs(make_model(info), settings.n_experiences)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": settings_block(args, settings), "strategies": {}}
    base = RunConfig(
        args.benchmark,
        "",
        0,
        settings,
        args.subset_per_class,
        args.test_subset_per_class,
        args.data_root,
        not args.no_verify,
        args.threads,
        not args.no_progress,
        args.metrics_port,
        args.metrics_host,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.strategies}
    jobs = [(name, seed) for name in args.strategies for seed in args.seeds]
    for name, seed in tqdm(jobs, desc=args.benchmark, unit="run", position=0, disable=args.no_progress):
        runs[name].append(run_in_child(replace(base, strategy=name, seed=seed)))
        results["strategies"][name] = summarise(name, runs[name], plugin_kwargs)
        write_outputs(results, args.out, final=False)
    write_outputs(results, args.out, final=True)
    print(markdown(results))
    failed = sum(len(e["errors"]) for e in results["strategies"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
