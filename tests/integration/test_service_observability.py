"""Issue 5, end to end: ``spacenet serve`` learns a small stream of 3 tasks while a real
Prometheus scrapes it (every second, with ``deploy/prometheus/rules/spacenet.yml``
loaded); then every PromQL expression of the Grafana dashboard and every rule
expression is asked of Prometheus' HTTP API, and must answer with data and sane values.

One scenario (``observed``, module-scoped: the service starts in about 15 s and the
stream takes a few more) feeds every test below. The service runs as a child process,
as in production, so the registry, the HTTP endpoint and the process are the real ones.

Boundary counting, as ``stream/ingest.py`` does it: every task *opening* counts once
with its reason (``new_class`` here); closings count only when no opening caused them
(``timeout``, ``record_limit``). The 3 tasks are streamed back to back, so tasks 0 and 1
close when the next opens (not counted) and task 2 closes by the idle timeout: 3 + 1.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from spacenet.stream import wire
from tests.support import load_grafana_generator
from tests.support.prometheus import PrometheusServer
from tests.support.service import (
    Message,
    ServiceProcess,
    TopicFollower,
    chunk,
    create_topics,
    http_get,
    make_producer,
    models_topic,
    send_all,
    service_settings,
    shuffled_task,
    start_assigned,
    synthetic_images,
    unique_name,
    wait_for_models,
)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules" / "spacenet.yml"
TASKS = [[0, 1], [2, 3], [4, 5]]
PER_CLASS = 120
LATE = 100  # records of task 0's classes after the last task opened: known to the served model
# The dashboard selects job="spacenet" (as deploy/prometheus/prometheus.yml names it).
JOB = "spacenet"

# From prometheus_client's ProcessCollector, which ``spacenet serve`` registers.
PROCESS_EXPRESSIONS = ("process_resident_memory_bytes", "process_cpu_seconds_total")

# This module needs a real Prometheus; its fixture is module-scoped (one scenario for
# all tests), so it builds the server itself instead of using ``prometheus_factory``.
pytestmark = pytest.mark.prometheus


generate = load_grafana_generator()


def dashboard_expressions() -> list[str]:
    return [generate.queryable(expr) for expr in generate.expressions()]


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


@dataclass
class Observed:
    prom: PrometheusServer
    service: ServiceProcess
    topic: str
    events: list[dict[str, Any]]
    free_before: dict[str, float]
    started_at: float

    def values(self, promql: str) -> list[float]:
        return [_value(s) for s in self.prom.query(promql)]

    def one(self, promql: str) -> float:
        values = self.values(promql)
        assert len(values) == 1, f"{promql}: {values}"
        return values[0]


def _stream() -> list[Message]:
    rng = np.random.default_rng(11)
    labels = np.concatenate([shuffled_task(c, PER_CLASS, rng) for c in TASKS])
    # Late records of learned classes, so the prequential score (test-then-train) has some.
    labels = np.concatenate([labels, shuffled_task(TASKS[0], LATE // 2, rng)])
    messages = chunk(synthetic_images(labels, seed=11), labels)
    # One undecodable message, so the reject ratio and dead-letter series move off 0.
    return [*messages[:3], Message(b"not arrow", b"bad", kind="undecodable"), *messages[3:]]


@pytest.fixture(scope="module")
def observed(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    work = tmp_path_factory.mktemp("observability")
    topic = unique_name("observed")
    create_topics(kafka_bootstrap, topic)
    # With the task inference on, so that its series (and its dashboard panel) have data too.
    # Every message's sample prequentially scored, so the few late records are.
    settings = service_settings(
        topic, kafka_bootstrap, work / "state", task_inference="true", prequential_every=1
    )
    producer = make_producer(kafka_bootstrap)
    prom: PrometheusServer | None = None
    started_at = time.time()
    with (
        start_assigned(lambda: ServiceProcess(settings, work / "serve.log")) as service,
        TopicFollower(kafka_bootstrap, models_topic(topic)) as models,
    ):
        try:
            prom = PrometheusServer(work / "prometheus", [service.target], [RULES], "1s", job_name=JOB)
            prom.start()
            # Before any record: the model-state collector exposes the untouched capacity.
            free = prom.wait_for("spacenet_layer_free_neurons", lambda r: len(r) == 3, timeout=60)
            free_before = {s["metric"]["layer"]: _value(s) for s in free}

            send_all(producer, topic, _stream())
            events = wait_for_models(models, len(TASKS), service, timeout_s=180)
            _predict(kafka_bootstrap, producer, topic, service)
            # Prometheus has seen the end state, and rates have a few samples to work with.
            prom.wait_for("spacenet_model_version", lambda r: bool(r) and _value(r[0]) == 3, timeout=60)
            prom.wait_for("spacenet_prediction_requests_total", lambda r: bool(r) and _value(r[0]) >= 2)
            prom.wait_for("instance:spacenet_records_consumed:rate5m", lambda r: bool(r) and _value(r[0]) > 0)
            for rule in rules():  # every recording rule has been evaluated with data
                if "record" in rule:
                    prom.wait_for(rule["record"], bool, timeout=30)
            yield Observed(prom, service, topic, events, free_before, started_at)
        finally:
            producer.close(timeout=10)
            if prom is not None:
                prom.stop()
            code = service.stop(signal.SIGTERM)
            assert code == 0, f"serve exited with {code}:\n{service.log_tail()}"


def _predict(bootstrap: str, producer: Any, topic: str, service: ServiceProcess) -> None:
    """Two prediction requests, so the prediction series have samples."""
    labels = np.repeat(np.arange(6), 5)
    x = synthetic_images(labels, seed=12)
    requests = [
        Message(wire.encode(x, labels), b"p1", records=30),
        Message(wire.encode(x), b"p2", records=30),
    ]
    with TopicFollower(bootstrap, f"{topic}.predictions") as replies:
        send_all(producer, f"{topic}.requests", requests)
        replies.wait_until(lambda m: len(m) >= 2, 60, lambda: service.alive, "two prediction replies")


# ------------------------------------------------------------------------------- tests
def test_every_dashboard_expression_returns_data(observed: Observed) -> None:
    empty = []
    for expr in dashboard_expressions():
        if not observed.prom.query(expr):  # a PromQL error raises PrometheusError
            empty.append(expr)
    assert not empty, f"dashboard expressions without data: {empty}"


def test_process_panels_have_data(observed: Observed) -> None:
    exprs = [e for e in dashboard_expressions() if any(n in e for n in PROCESS_EXPRESSIONS)]
    assert len(exprs) == 2
    for expr in exprs:
        assert observed.prom.query(expr), expr


def test_every_recording_rule_returns_data(observed: Observed) -> None:
    recording = [rule for rule in rules() if "record" in rule]
    assert len(recording) >= 6
    for rule in recording:
        assert observed.prom.query(rule["expr"]), f"{rule['record']}: {rule['expr']}"
        assert observed.prom.query(rule["record"]), f"{rule['record']} was never recorded"


def test_every_alert_expression_evaluates(observed: Observed) -> None:
    # An alert's condition is empty unless it holds; here only "no error" is asserted
    # (the query itself), and that Prometheus evaluates every rule without error.
    for rule in rules():
        if "alert" in rule:
            observed.prom.query(rule["expr"])
    groups = observed.prom.api("rules")["groups"]
    evaluated = {r.get("name") for g in groups for r in g["rules"]}
    assert evaluated == {r.get("record") or r.get("alert") for r in rules()}
    broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not broken, broken


def test_values_are_sane(observed: Observed) -> None:
    finite = [(e, v) for e in dashboard_expressions() for v in observed.values(e) if not math.isfinite(v)]
    assert not finite, f"NaN or infinite values: {finite}"
    for expr in dashboard_expressions():
        if "_ratio" in expr and "forgetting" not in expr and "backward_transfer" not in expr:
            assert all(0.0 <= v <= 1.0 for v in observed.values(expr)), expr
        if "forgetting" in expr or "backward_transfer" in expr:
            assert all(-1.0 <= v <= 1.0 for v in observed.values(expr)), expr
        if expr.startswith(("sum(rate", "sum by", "time() -", "histogram_quantile")):
            assert all(v >= 0 for v in observed.values(expr)), expr

    assert observed.one('sum(up{job="spacenet"})') == 1
    assert observed.one("max(spacenet_model_version)") == 3
    assert observed.one("max(spacenet_current_task)") == 2
    assert observed.one("max(spacenet_tasks_learned)") == 3
    assert observed.one("max(spacenet_classes_learned)") == 6
    assert observed.one("max(spacenet_known_classes)") == 6
    assert observed.one("min(spacenet_tasks_remaining)") >= 0
    assert observed.one("avg(spacenet_accuracy_ratio)") == pytest.approx(
        observed.events[-1]["final_accuracy"]
    )
    per_task = observed.values("max by (task) (spacenet_task_accuracy_ratio)")
    assert len(per_task) == 3
    assert len(observed.values("max by (trained_through, task) (spacenet_accuracy_matrix_ratio)")) == 6
    assert observed.one("sum(spacenet_messages_rejected_total)") == 1
    assert observed.one('sum(spacenet_dead_letter_messages_total{reason="undecodable"})') == 1
    records = 3 * 2 * PER_CLASS + LATE
    assert observed.one("sum(spacenet_records_consumed_total)") == records
    # Late records of known classes, scored before being learned: a sample of them, all right.
    assert 0 < observed.one("sum(spacenet_prequential_records_total)") <= LATE
    assert observed.one("max(spacenet_prequential_accuracy_ratio)") == 1.0
    assert observed.one("sum(spacenet_accuracy_drift_total)") == 0
    assert observed.one("sum(spacenet_predicted_records_total)") == 60
    age = observed.one("time() - max(spacenet_last_checkpoint_timestamp_seconds > 0)")
    assert 0 <= age <= time.time() - observed.started_at
    # The sparse learner state against the dense model (FAST_SETTINGS: 784-64-64-10); the
    # state also holds the task-inference statistics, which have their own series.
    dense = observed.one("max(spacenet_dense_model_bytes)")
    assert dense == 4 * (784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10)
    sparse = observed.one("max(spacenet_learner_state_bytes - spacenet_task_inference_bytes)")
    assert 0 < sparse < 0.4 * dense
    held = observed.one("max(spacenet_holdout_records)")
    assert held > 0 and observed.one("max(spacenet_holdout_bytes)") >= held * 784
    assert observed.one("max(spacenet_checkpoint_bytes)") < 2_000_000


def test_task_boundaries_count_openings_plus_the_closing_timeout(observed: Observed) -> None:
    by_reason = {
        s["metric"]["reason"]: _value(s)
        for s in observed.prom.query("sum by (reason) (spacenet_task_boundaries_total)")
    }
    assert by_reason["new_class"] == len(TASKS)  # one opening per streamed task
    assert by_reason["timeout"] == 1  # the last task closed by the idle timeout
    assert sum(by_reason.values()) == len(TASKS) + 1
    assert observed.one(
        'sum(spacenet_task_boundaries_total) - sum(spacenet_task_boundaries_total{reason="timeout"})'
    ) == len(TASKS)


def test_free_neurons_fall_after_each_task(observed: Observed) -> None:
    hidden = sorted(layer for layer in observed.free_before if "hidden" in layer)
    assert len(hidden) == 2
    # Per task, from the model events (the collector exports the same capacity report).
    free = [
        {layer["name"]: layer["free_neurons"] for layer in event["capacity"]["layers"]}
        for event in observed.events
    ]
    for layer in hidden:
        levels = [observed.free_before[layer]] + [f[layer] for f in free]
        assert all(a > b for a, b in itertools.pairwise(levels)), (layer, levels)
    # Over the scraped history: never rising, from the untouched layer to the final value.
    # Range points fall at start + k * step: start a whole number of steps before ``end``,
    # so the last point is ``end`` itself, after the scrape that showed the final model.
    end = time.time()
    start = end - math.ceil(end - observed.started_at)
    data = observed.prom.api(
        "query_range",
        {
            "query": "spacenet_layer_free_neurons",
            "start": str(start),
            "end": str(end),
            "step": "1",
        },
    )
    raw = {s["metric"]["layer"]: s["values"] for s in data["result"]}
    series = {layer: [float(v) for _, v in points] for layer, points in raw.items()}
    for layer in hidden:
        values = series[layer]
        assert values[0] == observed.free_before[layer]
        assert values[-1] == free[-1][layer], (layer, raw[layer][-5:], end)
        assert all(a >= b for a, b in itertools.pairwise(values)), (layer, values)


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium")
    assert browser, "Debian's chromium is missing: scripts/system-deps.sh installs it"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,1300"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_the_status_page_in_a_real_browser(observed: Observed, tmp_path: Path) -> None:
    """The page of a service that learned three tasks, rendered by headless Chromium.
    SPACENET_STATUS_SCREENSHOT=docs/status-page.png keeps the screenshot (the README shows it)."""
    import matplotlib.image

    url = f"http://127.0.0.1:{observed.service.metrics_port}/"
    status, page = http_get(observed.service.metrics_port, "/")
    assert status == 200 and "<title>SpaceNet-Stream</title>" in page
    dom = _chromium("--dump-dom", url).stdout
    assert "model version<b>3</b>" in dom and "tasks learned<b>3</b>" in dom and "current task<b>2</b>" in dom
    assert dom.count('<td class="h"') == 9  # the 3 x 3 accuracy matrix as a heat map
    assert dom.count("opened</td>") == 3 and "<th>undecodable</th><td>1</td>" in dom
    shot = tmp_path / "status.png"
    _chromium(f"--screenshot={shot}", url)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1300, 1000) and float(pixels[..., :3].std()) > 0.05  # not a blank page
    keep = os.environ.get("SPACENET_STATUS_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
