"""deploy/grafana: the committed dashboard is the generator's output, and every PromQL
expression in it parses in a real Prometheus and finds series a real exporter serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spacenet.stream.observability.http import MetricsServer
from tests.support import load_grafana_generator
from tests.support.prometheus import PrometheusFactory
from tests.support.service_metrics import drive, exposed_names, populated_registry, referenced_names

GRAFANA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "spacenet.json"
RULES = GRAFANA_DIR.parent / "prometheus" / "rules" / "spacenet.yml"


generate = load_grafana_generator()


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def expressions_in(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in board["annotations"]["list"] if "expr" in a]


def test_committed_dashboard_is_the_generators_output() -> None:
    assert DASHBOARD.read_text() == generate.render(), "run: python deploy/grafana/generate.py"


def test_expressions_are_exported_once_in_dashboard_order() -> None:
    assert list(dict.fromkeys(expressions_in(dashboard()))) == generate.expressions()


def test_layout_rows_and_annotation() -> None:
    board = dashboard()
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [
        "Overview",
        "Streams",
        "Stream health",
        "Learning quality",
        "SpaceNet capacity",
        "Training and resources",
    ]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert {p["type"] for p in panels} == {"stat", "timeseries", "heatmap", "table"}
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
    (annotation,) = board["annotations"]["list"]
    assert annotation["enable"] and "spacenet_task_boundaries_total" in annotation["expr"]
    assert "filter" not in annotation  # shown on every panel
    overview = {p["title"] for p in panels if p["gridPos"]["y"] == 1}
    assert {
        "Streams",
        "Model version",
        "Accuracy (seen classes)",
        "Tasks remaining",
        "Consumer lag",
    } <= overview


def test_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    prov = GRAFANA_DIR / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "spacenet.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_dashboard_and_rules_name_only_series_the_service_exports() -> None:
    registry, _ = populated_registry(process=True)
    exposed = exposed_names(registry)
    for source, text in (("dashboard", DASHBOARD.read_text()), ("rules", RULES.read_text())):
        missing = referenced_names(text) - exposed
        assert not missing, f"{source} names series nobody exports: {sorted(missing)}"


@pytest.fixture
def exporter() -> Iterator[tuple[str, Any]]:
    registry, metrics = populated_registry(process=True)
    with MetricsServer(registry) as server:
        yield f"127.0.0.1:{server.port}", metrics


def test_every_expression_is_valid_and_finds_data(
    exporter: tuple[str, Any], prometheus_factory: PrometheusFactory
) -> None:
    target, metrics = exporter
    prom = prometheus_factory([target], job_name="spacenet")
    prom.wait_for('up{job="spacenet"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
    # Rates need two scrapes with activity between them; boundaries show as changes.
    prom.wait_for("count(spacenet_batches_total)", lambda r: bool(r))
    drive(metrics, task=2)
    prom.wait_for("spacenet_batches_total", lambda r: bool(r) and float(r[0]["value"][1]) >= 2, timeout=30)
    drive(metrics, task=3)
    prom.wait_for("spacenet_batches_total", lambda r: bool(r) and float(r[0]["value"][1]) >= 3, timeout=30)

    empty = []
    for expr in generate.expressions():
        result = prom.query(generate.queryable(expr))  # bad PromQL raises PrometheusError (bad_data)
        if not result:
            empty.append(expr)
    assert not empty, f"expressions without data: {empty}"
