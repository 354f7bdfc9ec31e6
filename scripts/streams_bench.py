#!/usr/bin/env python3
"""What one stream's learner costs in ``spacenet serve``, and how long a hand-over takes.

    .venv/bin/python scripts/streams_bench.py --out results/streams/streams.json

On a local broker (started and stopped here), with split MNIST (all 60,000 training records,
or the first ``--limit-per-class`` of each class; stream ``p`` takes the classes in its own
order, 0..9 shuffled by ``p``, five tasks of two) and the service's default settings (the
paper's 784-400-400-10 MLP, 4 epochs, 10% held out), an idle timeout of 3 s:

1. one stream, one process;
2. six streams, one process: with (1), the memory and CPU one more learner costs, the
   checkpoint (state) bytes of each stream and the bytes each wrote to the changelog;
3. six streams, all their records waiting: one process learns two tasks of each, then a
   second process joins and takes three streams over. Per moved stream: the time from the
   old owner's revocation (which checkpoints the stream's open task) to the new owner's
   first message, the restore time, and that the two processes consumed each record once.

Memory is the process's resident set (psutil, sampled every 0.25 s, and its final value);
CPU is the process's user + system seconds (all threads) when the last task is learned.
Imports the test-support helpers (run from the checkout). HOME points at a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS, STREAMS = 5, 6


def _isolate_home() -> None:
    """As tests/conftest.py: caches and datasets where they are, HOME somewhere temporary."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ.setdefault("SPACENET_CACHE", str(cache / "spacenet-stream"))
    os.environ.setdefault("SPACENET_DATA", str(cache / "spacenet-stream" / "data"))
    home = Path(tempfile.mkdtemp(prefix="streams-bench-home-"))
    os.environ["HOME"] = os.environ["MPLCONFIGDIR"] = str(home)


class Sampler:
    """Peak resident set size of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except Exception:  # the process ended
                return

    def now(self) -> dict[str, float]:
        cpu = self.process.cpu_times()
        return {"rss_bytes": self.process.memory_info().rss, "cpu_seconds": cpu.user + cpu.system}

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def serve(bootstrap: str, topic: str, work: Path, name: str) -> Any:
    from tests.support.service import ServiceProcess

    settings = {
        "bootstrap": bootstrap,
        "topic": topic,
        "group": f"{topic}-g",
        "state_dir": str(work / name),
        "idle_timeout_s": "3",
        "device": "cpu",
    }
    return ServiceProcess(settings, work / f"{name}.log").start()


def produce(
    bootstrap: str, topic: str, n: int, data: tuple[Any, Any], tasks: slice, limit: int | None
) -> None:
    """Tasks ``tasks`` of each of ``n`` streams, stream ``p`` to partition ``p``."""
    import numpy as np

    from spacenet.stream.kafka_config import KafkaSettings
    from spacenet.stream.tools.produce import make_producer, produce_stream

    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    try:
        for stream in range(n):
            order = np.random.default_rng(100 + stream).permutation(10).tolist()
            classes = order[2 * (tasks.start or 0) : 2 * tasks.stop]
            x, y = data
            produce_stream(
                producer, topic, x, y, class_order=classes, limit_per_class=limit, partition=stream
            )
    finally:
        producer.close()


def make_topic(bootstrap: str, topic: str, n: int) -> None:
    from spacenet.stream.config import ServiceConfig
    from spacenet.stream.kafka_config import KafkaSettings, ensure_topics
    from spacenet.stream.tools.produce import TOPIC_CONFIGS

    cfg = ServiceConfig(topic=topic)
    settings = KafkaSettings(bootstrap=bootstrap)
    ensure_topics(settings, [cfg.topic, cfg.requests_topic, cfg.predictions_topic], n, configs=TOPIC_CONFIGS)


def wait_learned(
    bootstrap: str, topic: str, n: int, tasks: int, runs: list[Any], timeout_s: float = 1800
) -> None:
    from tests.support.service import TopicFollower
    from tests.support.streams import StreamEvents

    def done(messages: list[Any]) -> bool:
        events = StreamEvents.of(messages)
        return all(events.learned(p) >= tasks for p in range(n))

    with TopicFollower(bootstrap, f"{topic}.models") as models:
        models.wait_until(done, timeout_s, lambda: all(r.alive for r in runs), f"{tasks} tasks")


def changelog_bytes(bootstrap: str, topic: str, n: int) -> dict[str, dict[int, int]]:
    """Per stream: bytes of every value it wrote to the changelog, and what compaction keeps."""
    from spacenet.stream.changelog import live_view, stream_of
    from tests.support.service import read_topic

    written: dict[int, int] = {}
    kept: dict[int, int] = {}
    for p in range(n):
        messages = read_topic(bootstrap, f"{topic}.state", p)
        for msg in messages:
            stream = stream_of(msg.key)
            if stream is not None:
                written[stream] = written.get(stream, 0) + len(msg.value or b"")
        for key, value in live_view(messages).items():
            stream = stream_of(key)
            if stream is not None:
                kept[stream] = kept.get(stream, 0) + len(value)
    return {"written": written, "kept": kept}


def sample(samples: Any, name: str, **labels: str) -> float:
    return float(samples.get((name, frozenset(labels.items())), 0.0))


def one_process(
    bootstrap: str, topic: str, n: int, data: Any, work: Path, limit: int | None
) -> dict[str, Any]:
    """``n`` streams, one process, every task: its memory, CPU and bytes."""
    make_topic(bootstrap, topic, n)
    run = serve(bootstrap, topic, work, f"{n}-streams")
    sampler = Sampler(run.proc.pid)
    try:
        run.wait_for_sample("spacenet_streams", lambda v: v == n, timeout_s=120)
        time.sleep(1.0)
        idle = sampler.now()  # up, streams taken on, no record yet
        started = time.monotonic()
        produce(bootstrap, topic, n, data, slice(0, TASKS), limit)
        wait_learned(bootstrap, topic, n, TASKS, [run])
        seconds = time.monotonic() - started
        final = sampler.now()
        metrics = run.metrics()
    finally:
        peak = sampler.stop()
        run.stop(signal.SIGTERM)
    tasks = n * TASKS

    def per_stream(name: str) -> dict[str, float]:
        return {str(p): sample(metrics, name, stream=str(p)) for p in range(n)}

    checkpoints = sample(metrics, "spacenet_checkpoint_duration_seconds_count")
    return {
        "streams": n,
        "tasks": tasks,
        "seconds": seconds,
        "idle_rss_bytes": idle["rss_bytes"],
        "peak_rss_bytes": peak,
        "final_rss_bytes": final["rss_bytes"],
        "cpu_seconds": final["cpu_seconds"],
        "cpu_seconds_per_task": final["cpu_seconds"] / tasks,
        "training_seconds_per_task": sample(metrics, "spacenet_training_duration_seconds_sum") / tasks,
        "checkpoint_bytes": per_stream("spacenet_checkpoint_bytes"),
        "checkpoints": checkpoints,
        "checkpoint_seconds_mean": sample(metrics, "spacenet_checkpoint_duration_seconds_sum")
        / max(1, checkpoints),
        "learner_state_bytes": per_stream("spacenet_learner_state_bytes"),
        "dense_model_bytes": per_stream("spacenet_dense_model_bytes"),
        "holdout_bytes": per_stream("spacenet_holdout_bytes"),
        "holdout_records": per_stream("spacenet_holdout_records"),
        "changelog_bytes": changelog_bytes(bootstrap, topic, n),
        "checkpoint_write": checkpoint_write(work / f"{n}-streams"),
    }


def checkpoint_write(state_dir: Path, repeats: int = 20) -> dict[str, Any]:
    """Stream 0's newest checkpoint, as the service left it: its parts' sizes, and the time to
    encode it and write it atomically (fsynced) again, here, ``repeats`` times."""
    import statistics

    from spacenet.stream.checkpoint import encode
    from spacenet.stream.state_store import LocalStates

    cache = LocalStates(state_dir / "checkpoints")
    payload = cache.load(0)
    assert payload is not None, "no checkpoint of stream 0"
    target = LocalStates(Path(tempfile.mkdtemp(prefix="ckpt-write-")))
    seconds = []
    for version in range(1, repeats + 1):
        started = time.perf_counter()
        target.save(0, version, payload)
        seconds.append(time.perf_counter() - started)
    parts = {  # records are zstd Arrow IPC, one uint8 tensor each (records.pack)
        "learner": len(encode({"learner": payload["learner"]})),
        "held_out_records": sum(t.numel() for t in payload["holdout"].values()),
        "open_and_pending_records": payload["open_records"].numel() + payload["pending"].numel(),
    }
    return {
        "bytes": target.size(0),
        "parts_bytes": parts,
        "write_seconds_median": statistics.median(seconds),
        "write_seconds_max": max(seconds),
    }


def scale_up(bootstrap: str, topic: str, data: Any, work: Path, limit: int | None) -> dict[str, Any]:
    """Six streams, all their records waiting: one process learns two tasks of each, then a
    second joins and takes three streams over, with records waiting for them."""
    from tests.support.streams import handovers, owned

    make_topic(bootstrap, topic, STREAMS)
    produce(bootstrap, topic, STREAMS, data, slice(0, TASKS), limit)
    first = serve(bootstrap, topic, work, "first")
    second = None
    try:
        wait_learned(bootstrap, topic, STREAMS, 2, [first])
        second = serve(bootstrap, topic, work, "second")
        wait_learned(bootstrap, topic, STREAMS, TASKS, [first, second])
        moved = sorted(owned(second.log_text()))
        metrics = [first.metrics(), second.metrics()]
    finally:
        for run in (second, first):
            if run is not None:
                run.stop(signal.SIGTERM)
    old = [h for h in handovers(first.log_text()) if h.what == "handed over"]
    out = {h.stream: h for h in reversed(old)}  # each stream's first hand-over
    new = handovers(second.log_text())
    streams = {}
    for p in moved:
        taken = next(h for h in new if h.stream == p and h.what == "taken on")
        first_message = next(h for h in new if h.stream == p and h.what == "first message")
        revoked = out[p].at - out[p].seconds
        consumed = [
            sample(m, "spacenet_records_consumed_total", topic=topic, partition=str(p)) for m in metrics
        ]
        streams[str(p)] = {
            "checkpoint_at_revocation_seconds": out[p].seconds,
            "restore_seconds": taken.seconds,
            "revocation_to_take_on_seconds": taken.at - revoked,
            "revocation_to_first_message_seconds": first_message.at - revoked,
            "offsets": [out[p].offset, taken.offset, first_message.offset],
            "records_consumed_by_each_process": consumed,
        }
    return {"moved": moved, "streams": streams}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit-per-class", type=int, help="default: every record")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--only", choices=["one"], help="run only the one-stream case (about a minute): memory and state"
    )
    args = p.parse_args(argv)
    _isolate_home()
    from spacenet.stream.tools import local_kafka
    from spacenet.stream.tools.produce import load_dataset

    x, y, _ = load_dataset("split_mnist", train=True)
    work = Path(tempfile.mkdtemp(prefix="streams-bench-"))
    broker = local_kafka.LocalKafka(work / "kafka")
    bootstrap = broker.start()
    try:
        one = one_process(bootstrap, "bench-one", 1, (x, y), work, args.limit_per_class)
        if args.only is None:
            six = one_process(bootstrap, "bench-six", STREAMS, (x, y), work, args.limit_per_class)
            handover = scale_up(bootstrap, "bench-up", (x, y), work, args.limit_per_class)
    finally:
        broker.stop()
    if args.only is not None:
        return _write(
            {"limit_per_class": args.limit_per_class, "tasks_per_stream": TASKS, "one_stream": one}, args.out
        )
    more = STREAMS - 1
    report = {
        "limit_per_class": args.limit_per_class,
        "tasks_per_stream": TASKS,
        "one_stream": one,
        "six_streams": six,
        "per_learner": {
            "final_rss_bytes": (six["final_rss_bytes"] - one["final_rss_bytes"]) / more,
            "peak_rss_bytes": (six["peak_rss_bytes"] - one["peak_rss_bytes"]) / more,
            "cpu_seconds_per_task": (six["cpu_seconds"] - one["cpu_seconds"]) / (more * TASKS),
        },
        "scale_up": handover,
    }
    return _write(report, args.out)


def _write(report: dict[str, Any], out: Path | None) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
