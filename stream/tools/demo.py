"""``spacenet demo``: the whole pipeline on this machine, start to finish.

Starts the project's local Kafka broker (``local_kafka.py``), runs ``spacenet serve`` as a
child process, publishes split MNIST with ``spacenet produce``'s code (no markers:
the service finds the task boundaries itself), waits until every task is learned,
then sends the MNIST test set as prediction requests and scores the replies: the
class-incremental accuracy of the live service. Prints the accuracy matrix on the
held-out samples, the test accuracy per task and free capacity, writes a JSON
summary and the service's final ``/metrics`` scrape (``metrics.prom``), and stops
everything.

    $ spacenet demo                       # full split MNIST (a few minutes on 2 CPU cores)
    $ spacenet demo --limit-per-class 500 --epochs 2     # a quick look
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spacenet.strategy.cl_metrics import AccuracyMatrix
from spacenet.strategy.rss import peak_rss_bytes
from spacenet.stream.config import ServiceConfig
from spacenet.stream.kafka_config import KafkaSettings, ensure_topics
from spacenet.stream.observability.http import free_port
from spacenet.stream.tools import local_kafka
from spacenet.stream.tools.ask import ask
from spacenet.stream.tools.produce import load_dataset, produce_stream


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spacenet demo", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="split_mnist", choices=["split_mnist", "split_fmnist"])
    p.add_argument("--bootstrap", help="use this broker instead of starting the local one")
    p.add_argument("--limit-per-class", type=int, default=None, help="train records per class (default: all)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--markers", action="store_true", help="send explicit task markers")
    p.add_argument("--metrics-port", type=int, default=0, help="the service's /metrics (0: a free port)")
    p.add_argument("--out", default="runs/demo", help="folder for summary.json and logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        help="seconds without records after which the service closes the open (last) task",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the tasks")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="passed to serve")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="spacenet-demo-"))
    broker = None
    if args.bootstrap:
        bootstrap = args.bootstrap
    else:
        broker = local_kafka.LocalKafka(work / "kafka")
        t0 = time.perf_counter()
        bootstrap = broker.start()
        print(
            f"[demo] Kafka {local_kafka.KAFKA_VERSION} up at {bootstrap} in {time.perf_counter() - t0:.1f}s"
        )
    try:
        return run(args, bootstrap, work, out)
    finally:
        if broker is not None:
            broker.stop()
            print("[demo] Kafka stopped")


def run(args: argparse.Namespace, bootstrap: str, work: Path, out: Path) -> int:
    from kafka import KafkaConsumer, KafkaProducer

    settings = KafkaSettings(bootstrap=bootstrap)
    topic = f"demo-{int(time.time())}"
    names = ServiceConfig(topic=topic)  # the topics the service derives from it
    ensure_topics(settings, names.topics)
    models = KafkaConsumer(names.models_topic, auto_offset_reset="earliest", **settings.client_kwargs())
    metrics_port = args.metrics_port or free_port()
    serve_log = open(out / "serve.log", "w")  # noqa: SIM115 - lives as long as the child
    cmd = [
        sys.executable,
        "-m",
        "spacenet.stream.cli",
        "serve",
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--group",
        f"{topic}-g",
        "--state-dir",
        str(work / "state"),
        "--metrics-port",
        str(metrics_port),
        "--set",
        f"epochs={args.epochs}",
        "--set",
        f"seed={args.seed}",
        "--set",
        f"idle_timeout_s={args.idle_timeout}",
        *[part for s in args.set for part in ("--set", s)],
    ]
    service = subprocess.Popen(cmd, stdout=serve_log, stderr=subprocess.STDOUT)
    print(f"[demo] service started (pid {service.pid}); log: {out / 'serve.log'}")
    try:
        name = {"split_mnist": "split_mnist", "split_fmnist": "split_fmnist"}[args.dataset]
        x, y, order = load_dataset(name, train=True)
        producer = KafkaProducer(**settings.client_kwargs(), max_request_size=16 << 20)
        summary = produce_stream(
            producer,
            topic,
            x,
            y,
            class_order=order,
            markers=args.markers,
            seed=args.seed,
            limit_per_class=args.limit_per_class,
        )
        print(f"[demo] produced {summary.describe()}")
        expected = [list(c) for c in summary.task_classes]
        events = wait_for_models(models, len(expected), service, args.timeout)
        final = events[-1]
        learned = final["tasks_learned"]
        print(f"[demo] {learned} tasks learned, model version {final['model_version']}")
        xt, yt, _ = load_dataset(name, train=False)
        test = score_predictions(settings, names, xt, yt, expected, args.seed)
        rss = peak_rss_bytes(service.pid)
        exposition = scrape(metrics_port)
        (out / "metrics.prom").write_text(exposition)
        series = sum(1 for line in exposition.splitlines() if line.startswith("spacenet_"))
        print(
            f"[demo] {series} spacenet_* series on :{metrics_port}/metrics, saved to {out / 'metrics.prom'}"
        )
        report = {
            "seed": args.seed,
            "dataset": args.dataset,
            "serve_settings": args.set,  # the --set NAME=VALUE overrides, in order
            "topic": topic,
            "expected_tasks": expected,
            "events": events,
            "test": test,
            "service_peak_rss_bytes": rss,
            "produce": summary.describe(),
        }
        (out / "summary.json").write_text(json.dumps(report, indent=2))
        print_report(final, test, rss)
        detected = [sorted(e["new_classes"]) for e in events]
        ok = detected == [sorted(c) for c in expected]
        print(
            f"[demo] detected tasks {detected}: {'as streamed' if ok else 'DIFFERENT from ' + str(expected)}"
        )
        return 0 if ok else 1
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            code = service.wait(timeout=120)
        except subprocess.TimeoutExpired:
            service.kill()
            code = service.wait()
        serve_log.close()
        models.close()
        print(f"[demo] service stopped (exit {code})")


def wait_for_models(
    consumer: Any, tasks: int, service: subprocess.Popen[Any], timeout: float
) -> list[dict[str, Any]]:
    """Model-version events until ``tasks`` tasks are learned; each gets its new classes."""
    events: list[dict[str, Any]] = []
    known: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"[demo] the service exited with code {service.returncode}; see serve.log")
        for messages in consumer.poll(timeout_ms=1000).values():
            for msg in messages:
                event = json.loads(msg.value)
                event["new_classes"] = sorted(set(event["classes"]) - known)
                known |= set(event["classes"])
                events.append(event)
                held_out = event["final_accuracy"]  # None when the service holds nothing out
                print(
                    f"[demo] model v{event['model_version']}: classes {event['new_classes']} learned"
                    + (f" (held-out accuracy so far {held_out:.3f})" if held_out is not None else "")
                )
        if events and events[-1]["tasks_learned"] >= tasks:
            return events
    raise SystemExit(f"[demo] timed out after {timeout:.0f}s waiting for {tasks} tasks")


def score_predictions(
    settings: KafkaSettings,
    names: ServiceConfig,
    x: np.ndarray,
    y: np.ndarray,
    tasks: list[list[int]],
    seed: int,
) -> dict[str, Any]:
    """Send the test set as prediction requests (labels included, in an order drawn from
    ``seed``) with ``spacenet predict``'s client and score the replies."""
    order = np.random.default_rng(seed).permutation(len(y))
    t0 = time.perf_counter()
    replies = ask(settings, names, x[order], y[order], timeout=600.0)
    seconds = time.perf_counter() - t0
    p, t = replies["prediction"], y[order]
    per_task = [float((p[np.isin(t, c)] == t[np.isin(t, c)]).mean()) for c in tasks]
    return {
        "records": len(t),
        "accuracy_all": float((p == t).mean()),
        "per_task": per_task,
        "final_accuracy": float(np.mean(per_task)),
        "model_versions": sorted({str(v) for v in replies["model_version"].tolist()}),
        "seconds": seconds,
        "requests_per_s": len(t) / seconds,
    }


def scrape(port: int) -> str:
    """The service's ``/metrics`` exposition text (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def print_report(final: dict[str, Any], test: dict[str, Any], rss: int | None) -> None:
    matrix = AccuracyMatrix.from_dict(final["accuracy"]) if "accuracy" in final else None
    if matrix is not None:
        print("[demo] held-out accuracy matrix (row: after task, column: task)")
        print(matrix.table())
    print(
        "[demo] test-set accuracy per task (class-incremental, no task id): "
        + ", ".join(f"{a:.3f}" for a in test["per_task"])
    )
    print(
        f"[demo] final accuracy {test['final_accuracy']:.4f} (mean over tasks), "
        f"{test['accuracy_all']:.4f} on all "
        f"{test['records']} test records; served at {test['requests_per_s']:,.0f} predictions/s"
    )
    cap = final["capacity"]
    print(
        "[demo] capacity: "
        + "; ".join(
            f"{layer['name']} free {layer['free_neurons']}/{layer['neurons']} neurons, "
            f"{layer['used_connection_ratio']:.1%} connections used"
            for layer in cap["layers"]
        )
        + f"; estimated tasks remaining {cap['tasks_remaining']}"
        + f"; learner state {cap['state_bytes'] / 1000:.1f} KB, {cap['state_ratio']:.2f}x the dense model"
    )
    if rss is not None:
        print(f"[demo] service peak RSS {rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
