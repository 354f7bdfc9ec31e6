"""The benchmark runner's aggregation: per-seed runs into ``results.json`` and ``results.md``.

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
        train_cpu_seconds_mean, per_seed_train_cpu_seconds (the child's CPU time while
        training: a fairer comparison than wall time on a shared machine),
        per_seed_wall_seconds, peak_rss_bytes (max over seeds), per_seed_peak_rss_bytes,
        per_seed_rss_after_imports_bytes, accuracy_after_each_task_mean,
        mean_accuracy_matrix, accuracy_matrices (AccuracyMatrix.as_dict() per seed),
        errors ([{seed, error}]), and for SpaceNet variants capacity (per seed,
        CapacityReport.as_dict()) and spacenet_kwargs}}

Means are None when every seed failed. Peak RSS is the child's ``VmHWM`` (see
``bench.run_one``), so it includes Python, torch and Avalanche themselves.

    >>> summarise("naive", [{"seed": 0, "error": "RuntimeError: boom"}])["final_accuracy_mean"] is None
    True
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from spacenet.strategy.baselines import REGISTRY, SPACENET_VARIANTS
from spacenet.strategy.bench_plots import plot_curves, plot_matrix
from spacenet.strategy.cl_metrics import AccuracyMatrix, mean_matrix

SCHEMA_VERSION = 1


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
        "train_cpu_seconds_mean": _mean(col("train_cpu_seconds")),
        "per_seed_train_cpu_seconds": col("train_cpu_seconds"),
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
        "| strategy | final acc mean ± std | sample acc | avg forgetting | BWT | train s | train CPU s "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["strategies"].items():
        rss = None if e["peak_rss_bytes"] is None else e["peak_rss_bytes"] / 2**20
        lines.append(
            f"| {name} | {_fmt(e['final_accuracy_mean'])} ± {_fmt(e['final_accuracy_std'])} | "
            f"{_fmt(e['sample_accuracy_mean'])} | {_fmt(e['average_forgetting_mean'])} | "
            f"{_fmt(e['bwt_mean'])} | "
            f"{_fmt(e['train_seconds_mean'], '.1f')} | {_fmt(e['train_cpu_seconds_mean'], '.1f')} | "
            f"{_fmt(rss, '.0f')} |"
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
