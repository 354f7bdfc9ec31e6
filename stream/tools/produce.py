"""``spacenet produce``: publish a labeled dataset to Kafka as a class-incremental stream.

The classes, in ``--class-order``, are cut into tasks of ``--classes-per-task``; every record
of task 0 is sent (its classes interleaved at random by ``--seed``, each class in dataset
order), then every record of task 1, and so on. Each Kafka message is one wire-v1 value
(``docs/wire-format.md``) of at most ``--records-per-message`` records of a single task:
features as they are stored (uint8 1x28x28 for MNIST, never normalised), labels int64.

* **Markers** (``--markers``): the first message of a task carries ``task-start`` and its last
  message ``task-end`` (headers on the data messages). A task that fits in one message gets
  ``task-start`` on it and ``task-end`` on an empty control message right after it, since a
  message holds one marker.
* **Keys**: ``b"<task>:<index>"`` in ASCII, where ``index`` is the stream position of the
  message's first record (for a control message: the number of records sent before it).
* **Order**: every message goes to one partition (``--partition``, default 0), since a
  class-incremental stream is only meaningful in order; the topic is created with one
  partition when missing.
* **Inputs**: ``split_mnist`` / ``split_fmnist`` (torchvision, from the seeded data root; class
  order 0..9 by default) or an Arrow IPC / Feather / Parquet file with a ``features`` column
  (fixed-size or variable lists of numbers) and a ``label`` column; the record shape comes
  from ``--shape``, else the schema metadata ``spacenet.shape`` or ``shape``, else is flat.
  A file's default class order is the order in which its classes first appear.
  Integer features within 0..255 travel as uint8, any other numbers as float32.
* Connection security comes from ``SPACENET_KAFKA_*`` variables (see ``kafka_config``).

    $ spacenet produce --dataset split_mnist --topic mnist --bootstrap 127.0.0.1:9092 --markers

From Python: ``produce_stream(producer, "mnist", images, labels, markers=True)`` with any
producer (``send``/``flush`` as in kafka-python) sends the messages ``iter_messages`` lists:

    >>> labels = np.array([0, 1, 2, 3] * 3)
    >>> plans = plan_tasks(labels, classes_per_task=2)
    >>> images = np.zeros((12, 1, 2, 2), np.uint8)
    >>> [(m.key, m.records, dict(m.headers).get(wire.MARKER_HEADER))  # doctest: +NORMALIZE_WHITESPACE
    ...  for m in iter_messages(images, labels, plans, records_per_message=4, markers=True)]
    [(b'0:0', 4, b'task-start'), (b'0:4', 2, b'task-end'),
     (b'1:6', 4, b'task-start'), (b'1:10', 2, b'task-end')]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from spacenet.stream import wire
from spacenet.stream.kafka_config import KafkaSettings, ensure_topics

DATASETS = {"split_mnist": "MNIST", "split_fmnist": "FashionMNIST"}
# The largest value the service accepts by default; topics we create allow it plus headroom.
MAX_VALUE_BYTES = wire.WireLimits().max_message_bytes
MAX_RECORDS_PER_MESSAGE = wire.WireLimits().max_records
_MAX_REQUEST_BYTES = MAX_VALUE_BYTES + (1 << 20)
TOPIC_CONFIGS = {"max.message.bytes": str(_MAX_REQUEST_BYTES)}  # for topics we create


class DatasetError(ValueError):
    """The dataset is missing or not in a form this command can stream."""


class Producer(Protocol):
    """What ``produce_stream`` needs of a producer (kafka-python's ``KafkaProducer`` fits)."""

    def send(
        self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]], partition: Any
    ) -> Any:
        """Queue one message; returns a future with ``is_done``, ``failed()``, ``exception``, ``get()``."""

    def flush(self, timeout: float | None = None) -> None:
        """Block until every queued message is sent."""


@dataclass(frozen=True)
class TaskPlan:
    """One task: its classes and the dataset rows to send, in sending order."""

    task: int
    classes: tuple[int, ...]
    rows: npt.NDArray[np.intp]


@dataclass(frozen=True)
class OutgoingMessage:
    key: bytes
    value: bytes  # b"" for a control message
    headers: list[tuple[str, bytes]]
    task: int
    records: int


@dataclass(frozen=True)
class ProduceSummary:
    topic: str
    records: int
    messages: int  # data messages
    control_messages: int
    tasks: int
    bytes: int  # message values, as sent
    seconds: float
    task_classes: tuple[tuple[int, ...], ...]

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else math.inf

    def describe(self) -> str:
        tasks = " ".join(f"{i}:{','.join(map(str, c))}" for i, c in enumerate(self.task_classes))
        control = f" + {self.control_messages} control" if self.control_messages else ""
        return (
            f"topic {self.topic}: {self.records} records in {self.messages} messages{control}, "
            f"{self.tasks} tasks [{tasks}], {self.bytes / 1e6:.2f} MB in {self.seconds:.2f} s "
            f"({self.records_per_s:,.0f} records/s)"
        )


def plan_tasks(
    labels: npt.ArrayLike,
    classes_per_task: int = 2,
    class_order: Sequence[int] | None = None,
    seed: int = 0,
    limit_per_class: int | None = None,
) -> list[TaskPlan]:
    """Cut ``class_order`` (default: the sorted labels) into tasks and list each task's rows:
    its classes interleaved at random by ``seed`` (each task with its own generator), each
    class's rows in dataset order. Classes left out of an explicit order are not sent;
    ``limit_per_class`` keeps each class's first rows.

    Keeping each class in dataset order makes a task's records, taken class by class, the
    same sequence as the offline benchmark's experience (Avalanche lists an experience's
    records class by class, each in dataset order), so the service can train a task exactly
    as the benchmark runner trains that experience.

    >>> plan_tasks(np.array([0, 1, 0, 1, 0, 1]), classes_per_task=2, seed=1)[0].rows.tolist()
    [1, 0, 2, 4, 3, 5]
    """
    y = np.asarray(labels)
    present = np.unique(y).tolist()
    order = list(present if class_order is None else class_order)
    if classes_per_task < 1:
        raise ValueError("classes_per_task must be at least 1")
    if len(set(order)) != len(order) or not set(order) <= set(present):
        raise ValueError(f"class order {order} must list distinct classes among {present}")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError("limit_per_class must be at least 1")
    plans = []
    for task, start in enumerate(range(0, len(order), classes_per_task)):
        classes = tuple(int(c) for c in order[start : start + classes_per_task])
        per_class = [np.flatnonzero(y == c)[:limit_per_class] for c in classes]
        slots = np.repeat(np.arange(len(classes)), [len(r) for r in per_class])
        np.random.default_rng([seed, task]).shuffle(slots)  # which class each position takes
        rows = np.empty(len(slots), np.intp)
        for k, class_rows in enumerate(per_class):
            rows[slots == k] = class_rows
        plans.append(TaskPlan(task, classes, rows))
    return plans


def iter_messages(
    features: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    plans: Sequence[TaskPlan],
    records_per_message: int = 64,
    markers: bool = False,
) -> Iterator[OutgoingMessage]:
    """The messages of the stream, in order; see the module docstring for keys and markers."""
    if not 1 <= records_per_message <= MAX_RECORDS_PER_MESSAGE:
        raise ValueError(f"records_per_message must be in 1..{MAX_RECORDS_PER_MESSAGE}")
    index = 0
    for plan in plans:
        chunks = [
            plan.rows[i : i + records_per_message] for i in range(0, len(plan.rows), records_per_message)
        ]
        for i, rows in enumerate(chunks):
            marker = wire.Marker.TASK_START if i == 0 else None
            if i == len(chunks) - 1 and i > 0:
                marker = wire.Marker.TASK_END
            headers = wire.make_headers(marker, plan.task) if markers and marker else wire.make_headers()
            value = wire.encode(features[rows], labels[rows])
            if len(value) > MAX_VALUE_BYTES:
                raise ValueError(
                    f"a message of {len(value)} bytes exceeds {MAX_VALUE_BYTES}: send fewer records"
                )
            yield OutgoingMessage(f"{plan.task}:{index}".encode(), value, headers, plan.task, len(rows))
            index += len(rows)
        if markers and len(chunks) == 1:
            headers = wire.make_headers(wire.Marker.TASK_END, plan.task)
            yield OutgoingMessage(f"{plan.task}:{index}".encode(), b"", headers, plan.task, 0)


def produce_stream(
    producer: Producer,
    topic: str,
    features: npt.NDArray[Any],
    labels: npt.ArrayLike,
    *,
    classes_per_task: int = 2,
    class_order: Sequence[int] | None = None,
    records_per_message: int = 64,
    markers: bool = False,
    rate: float = 0.0,
    seed: int = 0,
    limit_per_class: int | None = None,
    partition: int | None = 0,
    flush_timeout_s: float = 120.0,
) -> ProduceSummary:
    """Send ``features`` (N, *shape) uint8/float32 with ``labels`` as a class-incremental stream;
    ``rate`` caps records per second (0: as fast as the broker takes them). Raises the first
    delivery error; returns once every message is acknowledged."""
    y = np.asarray(labels).astype(np.int64, copy=False)
    if len(features) != len(y):
        raise ValueError(f"{len(features)} feature rows but {len(y)} labels")
    plans = plan_tasks(y, classes_per_task, class_order, seed, limit_per_class)
    pending: list[Any] = []
    records = messages = control = nbytes = 0
    start = time.perf_counter()
    for msg in iter_messages(features, y, plans, records_per_message, markers):
        pending.append(
            producer.send(topic, value=msg.value, key=msg.key, headers=msg.headers, partition=partition)
        )
        records, nbytes = records + msg.records, nbytes + len(msg.value)
        messages, control = (messages + 1, control) if msg.records else (messages, control + 1)
        if len(pending) >= 256:
            pending = _raise_failed(pending)
        if rate > 0:
            time.sleep(max(0.0, start + records / rate - time.perf_counter()))
    producer.flush(timeout=flush_timeout_s)
    for future in pending:
        future.get(timeout=flush_timeout_s)  # raises the delivery error, if any
    seconds = time.perf_counter() - start
    classes = tuple(p.classes for p in plans)
    return ProduceSummary(topic, records, messages, control, len(plans), nbytes, seconds, classes)


def _raise_failed(pending: list[Any]) -> list[Any]:
    """Raise the first failed delivery; keep only the futures still in flight."""
    for future in pending:
        if future.is_done and future.failed():
            raise future.exception
    return [f for f in pending if not f.is_done]


def make_producer(settings: KafkaSettings, max_block_ms: int = 10_000) -> Any:
    """A kafka-python producer for streams of wire messages: batches up to 1 MiB, lingering
    5 ms, values up to the wire format's limit; ``max_block_ms`` bounds waits for metadata."""
    from kafka import KafkaProducer

    return KafkaProducer(
        **settings.client_kwargs(),
        max_block_ms=max_block_ms,
        linger_ms=5,
        batch_size=1 << 20,
        max_request_size=_MAX_REQUEST_BYTES,
    )


# ---- inputs ------------------------------------------------------------------------------
def load_dataset(
    dataset: str,
    *,
    train: bool = True,
    data_root: str | None = None,
    shape: Sequence[int] | None = None,
    require_label: bool = True,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], list[int]]:
    """``(features (N, *shape), labels, default class order)`` of a named dataset or a file;
    a file without a ``label`` column gives labels of -1 when ``require_label`` is False."""
    if dataset in DATASETS:
        return _load_torchvision(DATASETS[dataset], train, data_root)
    path = Path(dataset)
    if not path.is_file():
        names = ", ".join(DATASETS)
        raise DatasetError(f"no dataset {dataset!r}: not one of {names} and no such file")
    return _load_table(path, shape, require_label)


def _load_torchvision(name: str, train: bool, data_root: str | None) -> tuple[Any, Any, list[int]]:
    from torchvision import datasets

    from spacenet.strategy.data import prepare_dataset

    try:
        root = prepare_dataset(name, root=data_root)
        ds = getattr(datasets, name)(str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:
        raise DatasetError(f"cannot load {name} under {data_root or 'the data root'}: {e}") from e
    images = ds.data.numpy()[:, None]  # (N, 1, 28, 28) uint8, as stored
    labels = ds.targets.numpy().astype(np.int64)
    return images, labels, sorted(np.unique(labels).tolist())


def _load_table(
    path: Path, shape: Sequence[int] | None, require_label: bool = True
) -> tuple[Any, Any, list[int]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            try:
                table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Arrow IPC or Parquet file ({e})") from e
    if not require_label and "label" not in table.column_names:
        table = table.append_column("label", pa.array(np.full(len(table), -1, np.int64)))
    if "features" not in table.column_names or "label" not in table.column_names:
        raise DatasetError(f"{path}: needs columns 'features' and 'label', has {table.column_names}")
    column = table.column("features").combine_chunks()
    label = table.column("label").combine_chunks()
    is_list = pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list
    if not any(check(column.type) for check in is_list):
        raise DatasetError(f"{path}: 'features' must hold lists of numbers, not {column.type}")
    if column.null_count or column.flatten().null_count or label.null_count:
        raise DatasetError(f"{path}: 'features' and 'label' must have no nulls")
    if not pa.types.is_integer(label.type):
        raise DatasetError(f"{path}: 'label' must be integers, not {label.type}")
    lengths = pc.list_value_length(column).to_numpy()
    width = int(lengths[0]) if len(lengths) else 0
    if not len(lengths) or (lengths != width).any() or width == 0:
        raise DatasetError(f"{path}: every record needs the same, non-zero number of features")
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    record_shape = tuple(shape) if shape else _shape_from_metadata(table.schema.metadata) or (width,)
    if math.prod(record_shape) != width:
        raise DatasetError(f"{path}: shape {record_shape} does not hold {width} features")
    labels = label.to_numpy().astype(np.int64)
    order = list(dict.fromkeys(labels.tolist()))  # classes in order of first appearance
    return _wire_dtype(values).reshape(len(values), *record_shape), labels, order


def _shape_from_metadata(metadata: dict[bytes, bytes] | None) -> tuple[int, ...] | None:
    for key in (wire.SHAPE_KEY, b"shape"):
        raw = (metadata or {}).get(key)
        if raw:
            try:
                return parse_shape(raw.decode().strip("[]() "))
            except ValueError as e:
                raise DatasetError(f"bad shape metadata {raw!r}: {e}") from e
    return None


def _wire_dtype(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind in "iu" and (not values.size or (values.min() >= 0 and values.max() <= 255)):
        return values.astype(np.uint8)
    if values.dtype.kind in "iuf":
        return values.astype(np.float32)
    raise DatasetError(f"features of {values.dtype} cannot be sent; use integers or floats")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``."""
    dims = tuple(int(part) for part in text.split(",") if part.strip())
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"a shape is positive integers separated by commas, got {text!r}")
    return dims


# ---- command line ------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spacenet produce",
        description="Publish a dataset to Kafka as a class-incremental stream (wire format v1).",
        epilog="TLS/SASL settings come from SPACENET_KAFKA_* variables (see spacenet.stream.kafka_config).",
    )
    p.add_argument(
        "--dataset", required=True, help="split_mnist, split_fmnist, or a .arrow/.feather/.parquet file"
    )
    p.add_argument("--topic", required=True)
    p.add_argument("--bootstrap", help="host:port[,...] (default: $SPACENET_BOOTSTRAP, else 127.0.0.1:9092)")
    p.add_argument("--records-per-message", type=int, default=64)
    p.add_argument(
        "--markers", action="store_true", help="task-start/task-end headers on each task's messages"
    )
    p.add_argument("--rate", type=float, default=0.0, help="records per second, 0 = unlimited")
    p.add_argument("--classes-per-task", type=int, default=2)
    p.add_argument("--class-order", type=_int_list, help="e.g. 0,1,2,... (default: sorted / file order)")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--train", dest="train", action="store_true", default=True, help="training split (default)"
    )
    split.add_argument("--test", dest="train", action="store_false", help="test split")
    p.add_argument("--limit-per-class", type=int, help="send only the first N records of each class")
    p.add_argument("--data-root", help="dataset root (default: $SPACENET_DATA or the user cache)")
    p.add_argument("--seed", type=int, default=0, help="shuffle within each task")
    p.add_argument("--shape", type=parse_shape, help="record shape for a file input, e.g. 1,28,28")
    p.add_argument("--partition", type=int, default=0, help="the partition every message goes to")
    create = "create the topic (1 partition) when missing"
    p.add_argument("--create-topic", action=argparse.BooleanOptionalAction, default=True, help=create)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to reach the broker")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _fail(code: int, message: str) -> int:
    print(f"spacenet produce: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed why
        return e.code if isinstance(e.code, int) else 2
    from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

    timeout_ms = max(1, int(args.timeout * 1000))
    try:
        settings = KafkaSettings.from_env(bootstrap=args.bootstrap, bootstrap_timeout_ms=timeout_ms)
        features, labels, order = load_dataset(
            args.dataset, train=args.train, data_root=args.data_root, shape=args.shape
        )
        plan_tasks(labels, args.classes_per_task, args.class_order or order, args.seed, args.limit_per_class)
        if not 1 <= args.records_per_message <= MAX_RECORDS_PER_MESSAGE or args.rate < 0:
            raise ValueError(f"--records-per-message must be in 1..{MAX_RECORDS_PER_MESSAGE}, --rate >= 0")
    except ValueError as e:  # DatasetError included
        return _fail(2, str(e))
    try:
        if args.create_topic:
            ensure_topics(settings, [args.topic], configs=TOPIC_CONFIGS)
        producer = make_producer(settings, timeout_ms)
    except (KafkaTimeoutError, KafkaConnectionError) as e:
        return _fail(2, f"no Kafka broker reachable at {settings.bootstrap} within {args.timeout:g} s ({e})")
    except KafkaError as e:
        return _fail(2, f"cannot prepare topic {args.topic!r} at {settings.bootstrap}: {e}")
    try:
        summary = produce_stream(
            producer,
            args.topic,
            features,
            labels,
            classes_per_task=args.classes_per_task,
            class_order=args.class_order or order,
            records_per_message=args.records_per_message,
            markers=args.markers,
            rate=args.rate,
            seed=args.seed,
            limit_per_class=args.limit_per_class,
            partition=args.partition,
        )
    except KafkaError as e:
        return _fail(1, f"sending to {args.topic!r} failed: {e}")
    finally:
        producer.close(timeout=10)
    print(summary.describe())
    return 0
