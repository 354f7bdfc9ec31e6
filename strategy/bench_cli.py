"""``spacenet bench``: SpaceNet beside Avalanche baselines on class-incremental streams.

    $ spacenet bench --benchmark split_mnist --strategies spacenet,naive,replay \\
          --seeds 0,1,2,3,4 --out results/split_mnist

Each (strategy, seed) run happens in a fresh child process (``bench.run_in_child``).
Writes to ``--out``: ``results.json`` (rewritten after every run; its schema is in
``bench_report.py``), ``results.md``, ``accuracy_after_each_task.png`` and
``accuracy_matrix_<strategy>.png``.

    >>> parse_args(["--out", "results/x", "--strategies", "spacenet, naive", "--seeds", "0,1"]).strategies
    ['spacenet', 'naive']
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from spacenet.strategy.baselines import REGISTRY, TrainSettings, make_model, spacenet_kwargs
from spacenet.strategy.bench import RunConfig, run_in_child
from spacenet.strategy.bench_report import SCHEMA_VERSION, markdown, summarise, write_outputs
from spacenet.strategy.benchmarks import BENCHMARKS, DatasetUnavailable, check_available

DEFAULT_STRATEGIES = "spacenet,naive,ewc,si,lwf,replay"


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
    try:  # before anything is written: a run without its data would write only nulls
        check_available(args.benchmark, args.data_root, verify=not args.no_verify)
    except DatasetUnavailable as e:
        print(f"spacenet bench: {e}", file=sys.stderr)
        return 2
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
    # Seed-major: the strategies of one seed run one after another, so their timings are
    # compared under the same load on a shared machine.
    jobs = [(name, seed) for seed in args.seeds for name in args.strategies]
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
