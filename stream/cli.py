"""The ``spacenet`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module with a ``main(argv) -> int`` that owns its
arguments, so this file only dispatches and imports nothing heavy up front.

    $ spacenet --help
    $ spacenet bench --benchmark split_mnist --strategies spacenet,naive --seeds 0
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# name -> (module with main(argv), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("spacenet.stream.tools.demo", "run the whole pipeline locally: broker, producer, service"),
    "serve": ("spacenet.stream.serve", "the streaming service: learn from Kafka, serve predictions"),
    "produce": ("spacenet.stream.tools.produce", "publish a dataset to Kafka as a class-incremental stream"),
    "predict": ("spacenet.stream.tools.ask", "ask a running service for predictions (table or JSON lines)"),
    "bench": ("spacenet.strategy.bench_cli", "reproduce the paper's benchmarks beside Avalanche baselines"),
    "ingest-bench": (
        "spacenet.stream.tools.ingest_bench",
        "measure ingest throughput against plain kafka-python",
    ),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items())
    return (
        f"usage: spacenet <command> [options]\n\ncommands:\n{rows}\n\n"
        "'spacenet <command> --help' for a command's options."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"spacenet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"spacenet {name}: not available in this build ({module_name} is missing)", file=sys.stderr)
        return 2
    run: Callable[[list[str]], int] = module.main
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
