"""ServiceMetrics: every instrument read back from its own registry."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spacenet.strategy.prometheus_logger import PrometheusLogger
from spacenet.stream.observability.metrics import (
    DEFAULT_BOUNDARY_REASONS,
    DEFAULT_DEAD_LETTER_REASONS,
    DEFAULT_OUTCOMES,
    DEFAULT_REJECT_REASONS,
    OTHER,
    TRAINING_BUCKETS,
    ServiceMetrics,
)
from spacenet.stream.wire import RejectReason
from tests.support.service_metrics import populated_registry


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> ServiceMetrics:
    return ServiceMetrics(registry, max_task_label=4, layers=("hidden.0", "out"), device="cpu")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_labelled_counters_are_pre_initialised_at_zero(
    registry: CollectorRegistry, metrics: ServiceMetrics
) -> None:
    assert set(DEFAULT_REJECT_REASONS) == {r.value for r in RejectReason}
    for name, label, values in (
        ("spacenet_messages_rejected_total", "reason", DEFAULT_REJECT_REASONS),
        ("spacenet_task_boundaries_total", "reason", ("marker", "new_class", "timeout", "record_limit")),
        ("spacenet_records_routed_total", "outcome", DEFAULT_OUTCOMES),
        ("spacenet_dead_letter_messages_total", "reason", DEFAULT_DEAD_LETTER_REASONS),
        ("spacenet_capacity_exhausted_total", "layer", ("hidden.0", "out", "unknown")),
    ):
        for v in (*values, OTHER):
            assert value(registry, name, **{label: v}) == 0.0, (name, v)
    assert set(DEFAULT_BOUNDARY_REASONS) >= {"marker", "new_class", "timeout", "record_limit"}
    for name in (
        "spacenet_batches_total",
        "spacenet_training_steps_total",
        "spacenet_training_failures_total",
        "spacenet_checkpoint_failures_total",
        "spacenet_prediction_requests_total",
        "spacenet_boundary_disagreements_total",
        "spacenet_training_in_progress",
        "spacenet_last_record_timestamp_seconds",
        "spacenet_training_duration_seconds_count",
        "spacenet_checkpoint_duration_seconds_count",
        "spacenet_streams",
    ):
        assert value(registry, name) == 0.0, name
    assert value(registry, "spacenet_checkpoint_max_age_seconds") == 7200.0


def test_a_streams_series_start_when_it_is_taken_on_and_go_when_it_is_handed_over(
    registry: CollectorRegistry, metrics: ServiceMetrics
) -> None:
    per_stream = (
        "spacenet_model_version",
        "spacenet_model_published_timestamp_seconds",
        "spacenet_known_classes",
        "spacenet_checkpoint_bytes",
        "spacenet_holdout_records",
        "spacenet_holdout_bytes",
        "spacenet_uncheckpointed_messages",
    )
    assert all(value(registry, name, stream="2") is None for name in per_stream)
    metrics.stream_added("2")
    metrics.stream_added("5")
    assert all(value(registry, name, stream="2") == 0.0 for name in per_stream)
    assert value(registry, "spacenet_current_task", stream="2") == -1.0
    assert time.time() - 5 < (value(registry, "spacenet_last_checkpoint_timestamp_seconds", stream="2") or 0)
    assert value(registry, "spacenet_streams") == 2.0
    metrics.training_finished(2.0, task=1, stream="2")
    metrics.uncheckpointed_messages("2", 40)
    metrics.checkpoint_size("2", 1234)
    metrics.holdout_size("2", 50, 39_200)
    metrics.stream_restored(0.3)
    assert value(registry, "spacenet_uncheckpointed_messages", stream="2") == 40.0
    assert value(registry, "spacenet_checkpoint_bytes", stream="2") == 1234.0
    assert value(registry, "spacenet_holdout_records", stream="2") == 50.0
    assert value(registry, "spacenet_holdout_bytes", stream="2") == 39_200.0
    assert value(registry, "spacenet_stream_restore_duration_seconds_count") == 1.0

    metrics.stream_removed("2")
    assert all(value(registry, name, stream="2") is None for name in (*per_stream, "spacenet_current_task"))
    assert value(registry, "spacenet_task_training_duration_seconds", stream="2", task="1") is None
    assert value(registry, "spacenet_model_version", stream="5") == 0.0
    assert value(registry, "spacenet_streams") == 1.0


def test_ingest(registry: CollectorRegistry, metrics: ServiceMetrics) -> None:
    before = time.time()
    metrics.consumed("train", 0, records=32, decode_seconds=0.002)
    metrics.consumed("train", 0, records=8)
    metrics.consumed("train", 3, records=1, decode_seconds=0.5)
    assert value(registry, "spacenet_records_consumed_total", topic="train", partition="0") == 40.0
    assert value(registry, "spacenet_messages_consumed_total", topic="train", partition="0") == 2.0
    assert value(registry, "spacenet_records_consumed_total", topic="train", partition="3") == 1.0
    assert value(registry, "spacenet_decode_duration_seconds_count") == 2.0
    assert value(registry, "spacenet_decode_duration_seconds_bucket", le="0.0025") == 1.0
    assert before <= (value(registry, "spacenet_last_record_timestamp_seconds") or 0) <= time.time()

    metrics.rejected("schema", decode_seconds=0.001)
    metrics.rejected("made-up reason")
    assert value(registry, "spacenet_messages_rejected_total", reason="schema") == 1.0
    assert value(registry, "spacenet_messages_rejected_total", reason=OTHER) == 1.0
    assert value(registry, "spacenet_messages_rejected_total", reason="made-up reason") is None
    assert value(registry, "spacenet_decode_duration_seconds_count") == 3.0

    metrics.routed("train", 30)
    metrics.routed("late", 2)
    metrics.routed("unheard-of", 5)
    assert value(registry, "spacenet_records_routed_total", outcome="train") == 30.0
    assert value(registry, "spacenet_records_routed_total", outcome="late") == 2.0
    assert value(registry, "spacenet_records_routed_total", outcome=OTHER) == 5.0

    metrics.batch()
    assert value(registry, "spacenet_batches_total") == 1.0

    # An assigned partition reads 0 before its first record (so rate() sees that increase).
    assert value(registry, "spacenet_records_consumed_total", topic="train", partition="5") is None
    metrics.partition_assigned("train", 5)
    assert value(registry, "spacenet_records_consumed_total", topic="train", partition="5") == 0.0
    assert value(registry, "spacenet_messages_consumed_total", topic="train", partition="5") == 0.0

    metrics.lag("train", 0, 120)
    metrics.lag("train", 1, 3)
    metrics.lag("train", 0, 100)
    assert value(registry, "spacenet_consumer_lag_messages", topic="train", partition="0") == 100.0
    metrics.partition_revoked("train", 0)
    metrics.partition_revoked("train", 7)  # never reported: no error
    assert value(registry, "spacenet_consumer_lag_messages", topic="train", partition="0") is None
    assert value(registry, "spacenet_consumer_lag_messages", topic="train", partition="1") == 3.0


def test_tasks_and_boundaries(registry: CollectorRegistry, metrics: ServiceMetrics) -> None:
    metrics.boundary("new_class")
    metrics.boundary("timeout")
    metrics.boundary("timeout")
    metrics.boundary("noise?")
    metrics.disagreement()
    metrics.set_current_task("0", 2)
    metrics.set_known_classes("0", 6)
    assert value(registry, "spacenet_task_boundaries_total", reason="new_class") == 1.0
    assert value(registry, "spacenet_task_boundaries_total", reason="timeout") == 2.0
    assert value(registry, "spacenet_task_boundaries_total", reason=OTHER) == 1.0
    assert value(registry, "spacenet_boundary_disagreements_total") == 1.0
    assert value(registry, "spacenet_current_task", stream="0") == 2.0
    assert value(registry, "spacenet_known_classes", stream="0") == 6.0


def test_training_context_times_flags_and_counts_failures(
    registry: CollectorRegistry, metrics: ServiceMetrics
) -> None:
    with metrics.training(task=1, stream="0"):
        assert value(registry, "spacenet_training_in_progress") == 1.0
        metrics.steps(10)
    assert value(registry, "spacenet_training_in_progress") == 0.0
    assert value(registry, "spacenet_training_duration_seconds_count") == 1.0
    assert value(registry, "spacenet_training_steps_total") == 10.0
    assert (value(registry, "spacenet_task_training_duration_seconds", stream="0", task="1") or -1) >= 0.0

    with pytest.raises(RuntimeError, match="boom"), metrics.training(task=2, stream="0"):
        raise RuntimeError("boom")
    assert value(registry, "spacenet_training_in_progress") == 0.0
    assert value(registry, "spacenet_training_failures_total") == 1.0
    assert value(registry, "spacenet_training_duration_seconds_count") == 2.0
    assert value(registry, "spacenet_task_training_duration_seconds", stream="0", task="2") is None


def test_training_from_another_thread_and_task_cap(
    registry: CollectorRegistry, metrics: ServiceMetrics
) -> None:
    metrics.training_started()
    assert value(registry, "spacenet_training_in_progress") == 1.0
    metrics.training_finished(45.0, task=3, stream="1")
    metrics.training_started()
    metrics.training_finished(4000.0, task=4, stream="1")  # task 4 >= max_task_label: no per-task series
    metrics.training_started()
    metrics.training_finished(1.5, failed=True)
    assert value(registry, "spacenet_training_in_progress") == 0.0
    assert value(registry, "spacenet_task_training_duration_seconds", stream="1", task="3") == 45.0
    assert value(registry, "spacenet_task_training_duration_seconds", stream="1", task="4") is None
    assert value(registry, "spacenet_training_failures_total") == 1.0
    assert value(registry, "spacenet_training_duration_seconds_sum") == 4046.5
    # Buckets reach hours: 45 s and 1.5 s fall under 60, 4000 s only under 7200 and +Inf.
    assert value(registry, "spacenet_training_duration_seconds_bucket", le="60.0") == 2.0
    assert value(registry, "spacenet_training_duration_seconds_bucket", le="3600.0") == 2.0
    assert value(registry, "spacenet_training_duration_seconds_bucket", le="7200.0") == 3.0
    assert TRAINING_BUCKETS[-1] == 7200.0

    metrics.capacity_exhausted("out")
    metrics.capacity_exhausted()
    metrics.capacity_exhausted("not-a-layer")
    assert value(registry, "spacenet_capacity_exhausted_total", layer="out") == 1.0
    assert value(registry, "spacenet_capacity_exhausted_total", layer="unknown") == 1.0
    assert value(registry, "spacenet_capacity_exhausted_total", layer=OTHER) == 1.0


def test_checkpoints_models_predictions_dead_letters(
    registry: CollectorRegistry, metrics: ServiceMetrics
) -> None:
    metrics.stream_added("0")
    metrics.uncheckpointed_messages("0", 7)
    with metrics.checkpoint("0"):
        pass
    stamp = value(registry, "spacenet_last_checkpoint_timestamp_seconds", stream="0") or 0.0
    assert time.time() - 5 < stamp <= time.time()
    assert value(registry, "spacenet_uncheckpointed_messages", stream="0") == 0.0
    metrics.uncheckpointed_messages("0", 3)
    with pytest.raises(OSError), metrics.checkpoint("0"):
        raise OSError("disk full")
    assert value(registry, "spacenet_checkpoint_failures_total") == 1.0
    assert value(registry, "spacenet_checkpoint_duration_seconds_count") == 2.0
    assert value(registry, "spacenet_last_checkpoint_timestamp_seconds", stream="0") == stamp
    assert value(registry, "spacenet_uncheckpointed_messages", stream="0") == 3.0

    metrics.model_published("0", 3)
    assert value(registry, "spacenet_model_version", stream="0") == 3.0
    assert (value(registry, "spacenet_model_published_timestamp_seconds", stream="0") or 0.0) >= stamp

    metrics.prediction(0.004, records=16)
    metrics.prediction(0.2)
    assert value(registry, "spacenet_prediction_requests_total") == 2.0
    assert value(registry, "spacenet_predicted_records_total") == 17.0
    assert value(registry, "spacenet_prediction_duration_seconds_bucket", le="0.005") == 1.0

    metrics.dead_lettered("capacity_exhausted")
    metrics.dead_lettered("undecodable")
    metrics.dead_lettered("?")
    assert value(registry, "spacenet_dead_letter_messages_total", reason="capacity_exhausted") == 1.0
    assert value(registry, "spacenet_dead_letter_messages_total", reason="undecodable") == 1.0
    assert value(registry, "spacenet_dead_letter_messages_total", reason=OTHER) == 1.0


def test_build_and_device_info(registry: CollectorRegistry) -> None:
    ServiceMetrics(registry, device="cuda:0", device_name="NVIDIA H100")
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    (build,) = families["spacenet_build_info"].samples
    assert build.name == "spacenet_build_info" and build.value == 1.0
    assert build.labels["device"] == "cuda:0"
    assert build.labels["python"] == platform.python_version()
    assert set(build.labels) == {"version", "torch", "avalanche", "python", "device"}
    assert build.labels["torch"] != "unknown" and build.labels["avalanche"] != "unknown"
    device = {"device": "cuda:0", "name": "NVIDIA H100"}
    assert registry.get_sample_value("spacenet_device_info", device) == 1.0
    assert time.time() - 60 < (value(registry, "spacenet_start_time_seconds") or 0.0) <= time.time()


def test_naming_conventions_and_own_registry(registry: CollectorRegistry, metrics: ServiceMetrics) -> None:
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert len(families) >= 30
    for family in families:
        assert family.name.startswith("spacenet_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
    # Library code never touches the global registry; a second instance on the same
    # registry is a clear error rather than silently shared state.
    assert REGISTRY.get_sample_value("spacenet_batches_total") is None
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ServiceMetrics(registry)
    ServiceMetrics(CollectorRegistry())  # a fresh registry is fine
    with pytest.raises(ValueError):
        ServiceMetrics(CollectorRegistry(), max_task_label=-1)


def test_every_series_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[3] / "docs" / "metrics.md").read_text()
    registry, _ = populated_registry()
    bench = CollectorRegistry()
    PrometheusLogger(bench).log_single_metric("Top1_Acc_Stream/eval_phase/test_stream/Task000", 0.5, 1)
    for reg in (registry, bench):
        for family in text_string_to_metric_families(generate_latest(reg).decode()):
            if family.name.endswith("_created"):
                continue
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in docs, f"{name} is missing from docs/metrics.md"
