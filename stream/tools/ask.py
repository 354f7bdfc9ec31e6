"""``spacenet predict``: ask a running service for predictions from the command line.

Sends records as prediction requests to ``<topic>.requests`` (partition ``--stream``: the
stream whose model answers), reads the replies to its own requests from
``<topic>.predictions`` (matched by key) and prints each record's prediction, score and
model version, as a table or JSON lines; with labels it reports the accuracy too.
``--wait-version N`` first waits until that stream announces model version N on
``<topic>.models`` (e.g. until the tour's five tasks are learned).

    $ spacenet predict --topic mnist --dataset split_mnist --limit 1000 --wait-version 5
    $ spacenet predict --topic mnist --file requests.parquet --json > replies.jsonl
    $ cat requests.arrow | spacenet predict --topic mnist --stdin

The records come from the test split of a named dataset (``--train`` for the training
split), an Arrow IPC or Parquet file, or such a file on standard input, laid out as for
``spacenet produce`` (``features`` lists and ``label``, which may be left out here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from spacenet.stream import wire
from spacenet.stream.config import ServiceConfig
from spacenet.stream.kafka_config import KafkaSettings
from spacenet.stream.predict import MODEL_VERSION_HEADER, decode_reply
from spacenet.stream.tools.produce import DatasetError, load_dataset, parse_shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spacenet predict", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="split_mnist or split_fmnist (its test split)")
    source.add_argument("--file", help="an Arrow IPC or Parquet file of records")
    source.add_argument("--stdin", action="store_true", help="an Arrow IPC or Parquet file on standard input")
    p.add_argument("--topic", required=True, help="the service's training topic")
    p.add_argument("--bootstrap", help="host:port[,...] (default: $SPACENET_BOOTSTRAP, else 127.0.0.1:9092)")
    p.add_argument("--stream", type=int, default=0, help="the stream (partition) whose model answers")
    p.add_argument("--train", action="store_true", help="a named dataset's training split")
    p.add_argument("--limit", type=int, help="send only the first N records")
    p.add_argument("--shape", type=parse_shape, help="record shape for a file input, e.g. 1,28,28")
    p.add_argument("--data-root", help="dataset root (default: $SPACENET_DATA or the user cache)")
    p.add_argument("--wait-version", type=int, help="first wait until the stream's model has this version")
    p.add_argument("--json", action="store_true", help="one JSON object per record instead of a table")
    p.add_argument("--show", type=int, default=10, help="table rows to print (default 10)")
    p.add_argument("--records-per-message", type=int, default=500)
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait (for a version, for replies)"
    )
    return p


def _records(args: argparse.Namespace) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64] | None]:
    if args.stdin:
        with tempfile.NamedTemporaryFile(suffix=".arrow") as tmp:
            tmp.write(sys.stdin.buffer.read())
            tmp.flush()
            x, y, _ = load_dataset(tmp.name, shape=args.shape, require_label=False)
    else:
        name = args.dataset or args.file
        x, y, _ = load_dataset(
            name, train=args.train, data_root=args.data_root, shape=args.shape, require_label=False
        )
    if args.limit is not None:
        x, y = x[: args.limit], y[: args.limit]
    return x, (None if (y < 0).all() else y)


def wait_for_version(
    settings: KafkaSettings, names: ServiceConfig, stream: int, version: int, timeout: float
) -> int:
    """Read ``<topic>.models`` from its start until ``stream`` announces ``version`` or later;
    returns the version seen (raises TimeoutError)."""
    from kafka import KafkaConsumer

    models = KafkaConsumer(names.models_topic, auto_offset_reset="earliest", **settings.client_kwargs())
    deadline = time.monotonic() + timeout
    seen = 0
    try:
        while time.monotonic() < deadline:
            for messages in models.poll(timeout_ms=500).values():
                for msg in messages:
                    event = json.loads(msg.value)
                    if int(event.get("stream", 0)) == stream and int(event["model_version"]) > seen:
                        seen = int(event["model_version"])
                        print(f"spacenet predict: stream {stream} has model version {seen}", file=sys.stderr)
            if seen >= version:
                return seen
    finally:
        models.close()
    raise TimeoutError(f"stream {stream} reached model version {seen}, not {version}, within {timeout:g} s")


def ask(
    settings: KafkaSettings,
    names: ServiceConfig,
    x: npt.NDArray[Any],
    y: npt.NDArray[np.int64] | None,
    stream: int = 0,
    per_message: int = 500,
    timeout: float = 120.0,
) -> dict[str, npt.NDArray[Any]]:
    """Send ``x`` (with labels ``y`` if given) as requests to ``stream`` and collect the replies
    to them: ``prediction``, ``score``, ``model_version`` per record, in the order sent."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    run = uuid.uuid4().hex[:12]
    replies = KafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    parts = [
        TopicPartition(names.predictions_topic, p)
        for p in replies.partitions_for_topic(names.predictions_topic) or ()
    ]
    if not parts:
        raise RuntimeError(f"no topic {names.predictions_topic}: is a service running on {names.topic}?")
    replies.assign(parts)
    replies.seek_to_end(*parts)
    for tp in parts:
        replies.position(tp)  # resolve the end now, before any request is sent
    producer = KafkaProducer(**settings.client_kwargs(), max_request_size=16 << 20)
    starts = list(range(0, len(x), per_message))
    for i in starts:
        rows = slice(i, i + per_message)
        producer.send(
            names.requests_topic,
            partition=stream,
            key=f"{run}:{i}".encode(),
            value=wire.encode(x[rows], None if y is None else y[rows]),
            headers=wire.make_headers(),
        )
    producer.flush()
    producer.close()
    got: dict[int, tuple[dict[str, Any], int]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(starts) and time.monotonic() < deadline:
            for messages in replies.poll(timeout_ms=500).values():
                for msg in messages:
                    key = (msg.key or b"").decode(errors="replace")
                    if not key.startswith(run + ":"):
                        continue  # another client's reply
                    headers = {k: v.decode() for k, v in msg.headers or ()}
                    got[int(key.split(":", 1)[1])] = (
                        decode_reply(msg.value),
                        int(headers[MODEL_VERSION_HEADER]),
                    )
    finally:
        replies.close()
    if len(got) < len(starts):
        raise TimeoutError(
            f"{len(got)} of {len(starts)} replies within {timeout:g} s (is stream {stream} served?)"
        )
    prediction = np.concatenate([got[i][0]["prediction"] for i in starts])
    score = np.concatenate([got[i][0]["score"] for i in starts])
    version = np.concatenate([np.full(len(got[i][0]["prediction"]), got[i][1]) for i in starts])
    return {"prediction": prediction, "score": score, "model_version": version}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    from kafka.errors import KafkaError

    try:
        settings = KafkaSettings.from_env(bootstrap=args.bootstrap)
        names = ServiceConfig(topic=args.topic)
        x, y = _records(args)
        if args.wait_version:
            wait_for_version(settings, names, args.stream, args.wait_version, args.timeout)
        out = ask(settings, names, x, y, args.stream, args.records_per_message, args.timeout)
    except (DatasetError, ValueError, OSError, KafkaError, RuntimeError, TimeoutError) as e:
        print(f"spacenet predict: error: {e}", file=sys.stderr)
        return 1
    report(out, y, args)
    return 0


def report(
    out: dict[str, npt.NDArray[Any]], y: npt.NDArray[np.int64] | None, args: argparse.Namespace
) -> None:
    n = len(out["prediction"])
    if args.json:
        for i in range(n):
            row = {
                "index": i,
                "prediction": int(out["prediction"][i]),
                "score": round(float(out["score"][i]), 6),
            }
            if y is not None:
                row["label"] = int(y[i])
            row |= {"model_version": int(out["model_version"][i]), "stream": args.stream}
            print(json.dumps(row))
    else:
        print(
            f"{'index':>7} {'prediction':>10} {'score':>7}"
            + (f" {'label':>6}" if y is not None else "")
            + "  model"
        )
        for i in range(min(n, args.show)):
            label = f" {int(y[i]):>6}" if y is not None else ""
            pred, score, version = (
                int(out["prediction"][i]),
                float(out["score"][i]),
                int(out["model_version"][i]),
            )
            print(f"{i:>7} {pred:>10} {score:>7.4f}{label}  v{version}")
        if n > args.show:
            print(f"... {n - args.show} more (--show N, or --json for all)")
    versions = ",".join(str(v) for v in sorted(set(out["model_version"].tolist())))
    line = f"{n} records, stream {args.stream}, model version {versions}"
    if y is not None:
        line += f", accuracy {float((out['prediction'] == y).mean()):.4f}"
    print(line, file=sys.stderr if args.json else sys.stdout)
