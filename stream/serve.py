"""``spacenet serve``: run the streaming service until SIGTERM or SIGINT.

    $ spacenet serve --bootstrap 127.0.0.1:9092 --topic mnist --group g1 --state-dir ./state \\
          --metrics-port 9109

Settings: defaults < ``--config FILE`` (TOML) < ``SPACENET_*`` environment < flags; see
``config.py``. Kafka security settings come from ``SPACENET_KAFKA_*`` (``kafka_config.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from spacenet.stream.config import ServiceConfig
from spacenet.stream.kafka_config import BrokerUnavailable

log = logging.getLogger("spacenet.serve")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spacenet serve", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="TOML file with [spacenet] settings")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers host:port[,host:port]")
    p.add_argument("--topic", help="training topic (its partition order is the learning order)")
    p.add_argument("--group", help="consumer group")
    p.add_argument("--state-dir", dest="state_dir", help="checkpoints and spill files")
    p.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=int,
        help="/metrics, /healthz, /readyz (default 9109; 0: any free port; -1: off)",
    )
    p.add_argument("--metrics-host", dest="metrics_host", help="bind address (default 127.0.0.1)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any other setting")
    p.add_argument(
        "--log-level",
        default=os.environ.get("SPACENET_LOG_LEVEL", "INFO"),
        help="the service's own log (default $SPACENET_LOG_LEVEL, else INFO)",
    )
    p.add_argument(
        "--kafka-log-level",
        default=os.environ.get("SPACENET_KAFKA_LOG_LEVEL", "WARNING"),
        help="kafka-python's log (default $SPACENET_KAFKA_LOG_LEVEL, else WARNING; INFO shows every "
        "connection and rebalance)",
    )
    return p.parse_args(list(argv))


def load_config(args: argparse.Namespace) -> ServiceConfig:
    overrides: dict[str, Any] = {
        k: getattr(args, k)
        for k in ("bootstrap", "topic", "group", "state_dir", "metrics_port", "metrics_host", "device")
    }
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value
    return ServiceConfig.load(args.config, overrides=overrides)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(args.kafka_log_level.upper())
    try:
        cfg = load_config(args)
    except (OSError, ValueError) as e:
        print(f"spacenet serve: {e}", file=sys.stderr)
        return 2
    from spacenet.stream.runtime import Runtime

    registry = CollectorRegistry()
    # The process's own series (memory, CPU, open files; Python and GC), on the same registry.
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    runtime = Runtime(cfg, registry)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping (the current step finishes or is abandoned cleanly)", signum)
        stop.set()
        runtime.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return int(runtime.run())
    except BrokerUnavailable as e:  # a deadline the operator set: one line, no traceback
        log.error("%s", e)
        return 3
    except Exception as e:  # a clear line, a non-zero exit; the supervisor restarts us
        log.exception("service failed: %s", e)
        return 1
