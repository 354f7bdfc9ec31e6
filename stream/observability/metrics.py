"""Hot-path Prometheus instruments of the streaming service, on a registry it is given.

The service creates one ``CollectorRegistry`` and calls these small methods from its
loop; values computed from the model's state come from ``ModelStateCollector``
(``metrics_collector.py``) at scrape time instead. Every name starts with
``spacenet_``; labels take values from bounded sets only: a reason that is not in the
set given to the constructor is counted as ``other``, a task at or above
``max_task_label`` gets no per-task series, and a ``stream`` is a partition of the
training topic. Every labelled series of a known set is created at 0 (a stream's when
the process takes the stream on, and removed when it hands it over), so a missing series
never reads as zero. Reference: ``docs/metrics.md``.

    >>> from prometheus_client import CollectorRegistry
    >>> registry = CollectorRegistry()
    >>> metrics = ServiceMetrics(registry, reject_reasons=("empty", "schema"))
    >>> metrics.consumed("records", 0, records=32, decode_seconds=0.002)
    >>> metrics.rejected("schema"); metrics.rejected("never heard of it")
    >>> registry.get_sample_value("spacenet_records_consumed_total", {"topic": "records", "partition": "0"})
    32.0
    >>> [registry.get_sample_value("spacenet_messages_rejected_total", {"reason": r})
    ...  for r in ("empty", "schema", "other")]
    [0.0, 1.0, 1.0]
    >>> with metrics.training(task=0, stream="0"):
    ...     registry.get_sample_value("spacenet_training_in_progress")
    1.0
    >>> metrics.stream_added("4"); metrics.model_published("4", 2)
    >>> registry.get_sample_value("spacenet_model_version", {"stream": "4"})
    2.0
"""

from __future__ import annotations

import collections
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from spacenet.stream.boundary import Reason
from spacenet.stream.wire import RejectReason

OTHER = "other"
RECENT_BOUNDARIES = 20  # task openings the status page lists


@dataclass(frozen=True)
class Boundary:
    """A task that opened: when (epoch seconds), on which stream, its id and why."""

    at: float
    stream: str
    task: int
    reason: str


DEFAULT_REJECT_REASONS: tuple[str, ...] = tuple(r.value for r in RejectReason)
DEFAULT_BOUNDARY_REASONS: tuple[str, ...] = tuple(
    r.value for r in (Reason.MARKER, Reason.NEW_CLASS, Reason.NEXT_TASK, Reason.TIMEOUT, Reason.RECORD_LIMIT)
)
# What became of records that decoded: trained on, held back as a candidate new class,
# evaluation-only because their task is closed, or dropped as label noise.
DEFAULT_OUTCOMES: tuple[str, ...] = ("train", "pending", "late", "noise")
DEFAULT_DEAD_LETTER_REASONS: tuple[str, ...] = (*DEFAULT_REJECT_REASONS, "capacity_exhausted")

# Seconds for a small task on a CPU up to hours for a large one.
TRAINING_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DECODE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
PREDICTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_labels(device: str) -> dict[str, str]:
    """The labels of ``spacenet_build_info`` (versions from package metadata: no imports)."""
    return {
        "version": _version("spacenet-stream"),
        "torch": _version("torch"),
        "avalanche": _version("avalanche-lib"),
        "python": platform.python_version(),
        "device": device,
    }


def _factories(
    registry: CollectorRegistry,
) -> tuple[Callable[..., Counter], Callable[..., Gauge], Callable[[str, str, Sequence[float]], Histogram]]:
    """Counter, gauge and histogram constructors bound to ``registry``."""

    def counter(name: str, documentation: str, *labels: str) -> Counter:
        return Counter(name, documentation, labels, registry=registry)

    def gauge(name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(name, documentation, labels, registry=registry)

    def histogram(name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, documentation, buckets=buckets, registry=registry)

    return counter, gauge, histogram


class _Bounded:
    """A fixed set of label values; anything else maps to ``other``."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = tuple(dict.fromkeys([*values, OTHER]))
        self._known = frozenset(self.values)

    def __call__(self, value: str) -> str:
        return value if value in self._known else OTHER


class ServiceMetrics:
    """The service's counters, gauges and histograms, registered on ``registry``.

    Parameters:
        registry: where every instrument is registered (never the global registry).
        max_task_label: tasks ``0 .. max_task_label - 1`` get per-task series; later
            tasks are left out of them (their totals still count).
        layers: names of the model's layers, the bounded values of the ``layer`` label
            of ``spacenet_capacity_exhausted_total`` (plus ``unknown``).
        reject_reasons, boundary_reasons, outcomes, dead_letter_reasons: the bounded
            label values, each pre-initialised at 0 together with ``other``.
        device, device_name: where the model trains (``cpu``, ``cuda:0``) and the
            accelerator's name, for ``spacenet_build_info`` and ``spacenet_device_info``.
        checkpoint_max_age_s: exported as ``spacenet_checkpoint_max_age_seconds``, the age
            past which a stream's checkpoint, with messages handled since, alerts.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        max_task_label: int = 32,
        layers: Sequence[str] = (),
        *,
        reject_reasons: Sequence[str] = DEFAULT_REJECT_REASONS,
        boundary_reasons: Sequence[str] = DEFAULT_BOUNDARY_REASONS,
        outcomes: Sequence[str] = DEFAULT_OUTCOMES,
        dead_letter_reasons: Sequence[str] = DEFAULT_DEAD_LETTER_REASONS,
        device: str = "cpu",
        device_name: str = "",
        checkpoint_max_age_s: float = 7200.0,
    ) -> None:
        if max_task_label < 0:
            raise ValueError("max_task_label must be >= 0")
        self.max_task_label = max_task_label
        self._reject, self._boundary = _Bounded(reject_reasons), _Bounded(boundary_reasons)
        self._consumed: dict[tuple[str, int], tuple[Counter, Counter]] = {}  # per (topic, partition)
        self._outcome, self._dead_letter = _Bounded(outcomes), _Bounded(dead_letter_reasons)
        self._layer = _Bounded([*layers, "unknown"])
        self._task_series: set[tuple[str, str]] = set()  # (stream, task) of task_training_seconds
        c, g, h = _factories(registry)

        # ingest
        self.messages_consumed = c(
            "spacenet_messages_consumed_total", "Kafka messages accepted.", "topic", "partition"
        )
        self.records_consumed = c(
            "spacenet_records_consumed_total",
            "Records in accepted messages (1..N per message).",
            "topic",
            "partition",
        )
        self.messages_rejected = c(
            "spacenet_messages_rejected_total", "Messages that failed to decode/validate.", "reason"
        )
        self.records_routed = c("spacenet_records_routed_total", "Accepted records by outcome.", "outcome")
        self.batches = c("spacenet_batches_total", "Poll batches processed.")
        self.decode_seconds = h(
            "spacenet_decode_duration_seconds", "Time to decode and validate one message.", DECODE_BUCKETS
        )
        self.consumer_lag = g(
            "spacenet_consumer_lag_messages",
            "Messages from the consumer position to the end.",
            "topic",
            "partition",
        )
        self.last_record = g(
            "spacenet_last_record_timestamp_seconds", "Unix time of the last accepted message (0: none yet)."
        )
        # streams
        self.streams = g("spacenet_streams", "Streams (training-topic partitions) this process learns.")
        self.restore_seconds = h(
            "spacenet_stream_restore_duration_seconds",
            "Time to restore a stream this process was assigned.",
            CHECKPOINT_BUCKETS,
        )
        self.uncheckpointed = g(
            "spacenet_uncheckpointed_messages",
            "Messages handled since the stream's newest checkpoint.",
            "stream",
        )
        self.checkpoint_bytes = g(
            "spacenet_checkpoint_bytes", "Size of the stream's newest checkpoint.", "stream"
        )
        self.holdout_records = g(
            "spacenet_holdout_records", "Held-out records the stream keeps, over all its tasks.", "stream"
        )
        self.holdout_bytes = g(
            "spacenet_holdout_bytes", "Bytes the stream's held-out records take in memory.", "stream"
        )
        self.checkpoint_max_age = g(
            "spacenet_checkpoint_max_age_seconds",
            "A stream's checkpoint older than this, with messages handled since, is stale.",
        )
        self.checkpoint_max_age.set(checkpoint_max_age_s)
        # tasks
        self.current_task = g(
            "spacenet_current_task", "Open (or last) task id; -1 before the first.", "stream"
        )
        self.known_classes = g("spacenet_known_classes", "Classes the stream's model has learned.", "stream")
        self.boundaries = c("spacenet_task_boundaries_total", "Task boundary events by reason.", "reason")
        self.recent_boundaries: collections.deque[Boundary] = collections.deque(maxlen=RECENT_BOUNDARIES)
        self.prequential_records = c(
            "spacenet_prequential_records_total",
            "Arriving records of known classes scored by the served model before being learned.",
            "stream",
        )
        self.prequential_accuracy = g(
            "spacenet_prequential_accuracy_ratio",
            "Accuracy of the served model on the last prequential_window scored arriving records.",
            "stream",
        )
        self.accuracy_drifts = c(
            "spacenet_accuracy_drift_total",
            "Lasting rises of the prequential error rate (Page-Hinkley); monitoring only.",
            "stream",
        )
        self.disagreements = c("spacenet_boundary_disagreements_total", "Markers and detection disagreed.")
        # training
        self.training_seconds = h(
            "spacenet_training_duration_seconds", "Time to train one task.", TRAINING_BUCKETS
        )
        self.task_training_seconds = g(
            "spacenet_task_training_duration_seconds",
            "Time the task's last successful training took.",
            "stream",
            "task",
        )
        self.training_in_progress = g("spacenet_training_in_progress", "1 while a task trains, else 0.")
        self.training_steps = c("spacenet_training_steps_total", "Optimizer steps taken.")
        self.training_failures = c("spacenet_training_failures_total", "Task trainings that failed.")
        self.capacity_exhausted_events = c(
            "spacenet_capacity_exhausted_total",
            "Tasks refused for lack of capacity, by limiting layer.",
            "layer",
        )
        # checkpoints and models
        self.checkpoint_seconds = h(
            "spacenet_checkpoint_duration_seconds", "Time to write a checkpoint.", CHECKPOINT_BUCKETS
        )
        self.last_checkpoint = g(
            "spacenet_last_checkpoint_timestamp_seconds",
            "Unix time of the stream's newest checkpoint, or of its take-on when later.",
            "stream",
        )
        self.checkpoint_failures = c("spacenet_checkpoint_failures_total", "Checkpoints that failed.")
        self.model_version = g(
            "spacenet_model_version", "Version of the stream's published model (0: none).", "stream"
        )
        self.model_published_at = g(
            "spacenet_model_published_timestamp_seconds",
            "Unix time the stream's current model version was published.",
            "stream",
        )
        # predictions and dead letters
        self.prediction_requests = c(
            "spacenet_prediction_requests_total", "Prediction request messages answered."
        )
        self.predicted_records = c("spacenet_predicted_records_total", "Records predicted.")
        self.prediction_seconds = h(
            "spacenet_prediction_duration_seconds", "Time to answer one request message.", PREDICTION_BUCKETS
        )
        self.dead_letters = c(
            "spacenet_dead_letter_messages_total", "Messages sent to the dead-letter topic.", "reason"
        )
        # process identity
        self.build_info = Info("spacenet_build", "Versions this process runs with.", registry=registry)
        self.build_info.info(build_labels(device))
        self.device_info = g("spacenet_device_info", "1 for the device training runs on.", "device", "name")
        self.device_info.labels(device, device_name).set(1)
        self.start_time = g("spacenet_start_time_seconds", "Unix time these metrics were created.")
        self.start_time.set(time.time())

        for values, counter in (
            (self._reject.values, self.messages_rejected),
            (self._boundary.values, self.boundaries),
            (self._outcome.values, self.records_routed),
            (self._dead_letter.values, self.dead_letters),
            (self._layer.values, self.capacity_exhausted_events),
        ):
            for value in values:
                counter.labels(value)

    # ---------------------------------------------------------------- ingest
    def consumed(
        self,
        topic: str,
        partition: int,
        records: int,
        decode_seconds: float | None = None,
        messages: int = 1,
    ) -> None:
        """``messages`` accepted messages (one by default) holding ``records`` records in all
        (and how long one took to decode; observe the others with ``decoded``)."""
        children = self._consumed.get((topic, partition))
        if children is None:  # labels() costs more than the increments: once per partition
            children = self._consumed[topic, partition] = (
                self.messages_consumed.labels(topic, str(partition)),
                self.records_consumed.labels(topic, str(partition)),
            )
        children[0].inc(messages)
        children[1].inc(records)
        self.last_record.set(time.time())
        if decode_seconds is not None:
            self.decode_seconds.observe(decode_seconds)

    def decoded(self, seconds: float) -> None:
        """How long one message took to decode and validate."""
        self.decode_seconds.observe(seconds)

    def rejected(self, reason: str, decode_seconds: float | None = None) -> None:
        """One message that failed to decode or validate; ``reason`` from the bounded set."""
        self.messages_rejected.labels(self._reject(reason)).inc()
        if decode_seconds is not None:
            self.decode_seconds.observe(decode_seconds)

    def routed(self, outcome: str, records: int = 1) -> None:
        """``records`` accepted records went to ``outcome`` (train, pending, late, noise)."""
        self.records_routed.labels(self._outcome(outcome)).inc(records)

    def batch(self) -> None:
        """One poll batch processed."""
        self.batches.inc()

    def lag(self, topic: str, partition: int, messages: int) -> None:
        """The consumer is ``messages`` behind the end of ``topic``/``partition``."""
        self.consumer_lag.labels(topic, str(partition)).set(messages)

    def partition_assigned(self, topic: str, partition: int) -> None:
        """Create this partition's counters at 0 when it is assigned, before its first
        record: a series that appears with its first value hides that increase from
        ``rate()`` and ``increase()``."""
        self.messages_consumed.labels(topic, str(partition))
        self.records_consumed.labels(topic, str(partition))

    def partition_revoked(self, topic: str, partition: int) -> None:
        """Stop reporting lag for a partition this consumer no longer owns."""
        with suppress(KeyError):
            self.consumer_lag.remove(topic, str(partition))

    # --------------------------------------------------------------- streams
    def stream_added(self, stream: str) -> None:
        """This process takes ``stream`` on: its series start."""
        self.streams.inc()
        self.current_task.labels(stream).set(-1)
        self.known_classes.labels(stream).set(0)
        self.model_version.labels(stream).set(0)
        self.model_published_at.labels(stream).set(0)
        self.last_checkpoint.labels(stream).set(time.time())
        self.checkpoint_bytes.labels(stream).set(0)
        self.holdout_records.labels(stream).set(0)
        self.holdout_bytes.labels(stream).set(0)
        self.uncheckpointed.labels(stream).set(0)

    def stream_restored(self, seconds: float) -> None:
        """A stream taken on was restored (or found new) in ``seconds``."""
        self.restore_seconds.observe(seconds)

    def stream_removed(self, stream: str) -> None:
        """This process handed ``stream`` over: its series go (the new owner exports them)."""
        self.streams.dec()
        for gauge in (
            self.current_task,
            self.known_classes,
            self.model_version,
            self.model_published_at,
            self.last_checkpoint,
            self.checkpoint_bytes,
            self.holdout_records,
            self.holdout_bytes,
            self.uncheckpointed,
            self.prequential_records,
            self.prequential_accuracy,
            self.accuracy_drifts,
        ):
            with suppress(KeyError):
                gauge.remove(stream)
        for key in [k for k in self._task_series if k[0] == stream]:
            self.task_training_seconds.remove(*key)
            self._task_series.discard(key)

    def uncheckpointed_messages(self, stream: str, messages: int) -> None:
        self.uncheckpointed.labels(stream).set(messages)

    # ----------------------------------------------------------------- tasks
    def boundary(self, reason: str) -> None:
        """One task boundary event (marker, new_class, next_task, timeout, record_limit)."""
        self.boundaries.labels(self._boundary(reason)).inc()

    def disagreement(self) -> None:
        self.disagreements.inc()

    def set_current_task(self, stream: str, task: int) -> None:
        self.current_task.labels(stream).set(task)

    def prequential(self, stream: str, scored: int, accuracy: float | None, drifts: int) -> None:
        """Records of known classes scored before they were learned, the windowed accuracy,
        and drifts the test found (``stream/prequential.py``)."""
        self.prequential_records.labels(stream).inc(scored)
        if accuracy is not None:
            self.prequential_accuracy.labels(stream).set(accuracy)
        self.accuracy_drifts.labels(stream).inc(drifts)

    def task_opened(self, stream: str, task: int, reason: str) -> None:
        """A task opened: its boundary counted, the stream's current task, and the event
        kept among the last few for the status page (``recent_boundaries``)."""
        self.boundary(reason)
        self.set_current_task(stream, task)
        self.recent_boundaries.appendleft(Boundary(time.time(), stream, task, reason))

    def set_known_classes(self, stream: str, classes: int) -> None:
        self.known_classes.labels(stream).set(classes)

    # -------------------------------------------------------------- training
    def training_started(self) -> None:
        """A task's training began (for trainers on another thread; see ``training()``)."""
        self.training_in_progress.set(1)

    def training_finished(
        self, seconds: float, failed: bool = False, task: int | None = None, stream: str = ""
    ) -> None:
        """A task (of ``stream``) ended training after ``seconds``; ``failed`` counts a failure."""
        self.training_in_progress.set(0)
        self.training_seconds.observe(seconds)
        if failed:
            self.training_failures.inc()
        elif task is not None and 0 <= task < self.max_task_label and stream:
            self.task_training_seconds.labels(stream, str(task)).set(seconds)
            self._task_series.add((stream, str(task)))

    @contextmanager
    def training(self, task: int | None = None, stream: str = "") -> Iterator[None]:
        """Time a training run in this thread; an exception counts as a failure and propagates."""
        self.training_started()
        start = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            self.training_finished(time.perf_counter() - start, failed=failed, task=task, stream=stream)

    def steps(self, n: int = 1) -> None:
        """``n`` optimizer steps were taken."""
        self.training_steps.inc(n)

    def capacity_exhausted(self, layer: str | None = None) -> None:
        """A task could not be allocated; ``layer`` is the limiting layer when known."""
        self.capacity_exhausted_events.labels(self._layer(layer or "unknown")).inc()

    # ---------------------------------------------------- checkpoints, models
    def checkpoint_finished(self, stream: str, seconds: float, failed: bool = False) -> None:
        self.checkpoint_seconds.observe(seconds)
        if failed:
            self.checkpoint_failures.inc()
        else:
            self.last_checkpoint.labels(stream).set(time.time())
            self.uncheckpointed.labels(stream).set(0)

    def checkpoint_size(self, stream: str, size: int) -> None:
        """The stream's newest checkpoint is ``size`` bytes."""
        self.checkpoint_bytes.labels(stream).set(size)

    def holdout_size(self, stream: str, records: int, nbytes: int) -> None:
        """The stream keeps ``records`` held-out records in ``nbytes`` of memory."""
        self.holdout_records.labels(stream).set(records)
        self.holdout_bytes.labels(stream).set(nbytes)

    @contextmanager
    def checkpoint(self, stream: str) -> Iterator[None]:
        """Time a checkpoint of ``stream``; an exception counts as a failure and propagates."""
        start = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            self.checkpoint_finished(stream, time.perf_counter() - start, failed=failed)

    def model_published(self, stream: str, version: int) -> None:
        self.model_version.labels(stream).set(version)
        self.model_published_at.labels(stream).set(time.time())

    # ------------------------------------------------ predictions, dead letters
    def prediction(self, latency_s: float, records: int = 1) -> None:
        """One prediction request message of ``records`` records, answered in ``latency_s``."""
        self.prediction_requests.inc()
        self.predicted_records.inc(records)
        self.prediction_seconds.observe(latency_s)

    def dead_lettered(self, reason: str) -> None:
        """One message written to the dead-letter topic."""
        self.dead_letters.labels(self._dead_letter(reason)).inc()
