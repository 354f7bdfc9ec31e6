"""A real Prometheus scrapes a prometheus_client exporter with its own registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.support.prometheus import PrometheusError, PrometheusFactory, Result

RULES = """\
groups:
  - name: tests
    rules:
      - record: spacenet_test_value:doubled
        expr: spacenet_test_value * 2
"""


@pytest.fixture
def exporter() -> Iterator[tuple[str, Gauge]]:
    """An exporter on a free loopback port serving only its own registry."""
    registry = CollectorRegistry()
    gauge = Gauge("spacenet_test_value", "A value the test sets.", registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}", gauge
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _one_value(expected: float) -> Callable[[Result], bool]:
    return lambda result: len(result) == 1 and float(result[0]["value"][1]) == expected


def test_prometheus_scrapes_the_exporter_and_evaluates_rules(
    exporter: tuple[str, Gauge], prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    target, gauge = exporter
    gauge.set(42.5)
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    prom = prometheus_factory([target], rule_files=[rules])

    up = prom.wait_for(f'up{{instance="{target}"}}', _one_value(1.0))
    assert up[0]["metric"]["job"] == "test"

    result = prom.wait_for("spacenet_test_value", _one_value(42.5))
    assert result[0]["metric"] == {"__name__": "spacenet_test_value", "instance": target, "job": "test"}

    # A later value arrives through later scrapes; the recording rule follows it.
    gauge.set(-3.25)
    prom.wait_for("spacenet_test_value", _one_value(-3.25))
    prom.wait_for("spacenet_test_value:doubled", _one_value(-6.5))

    assert prom.query("1 + 1")[0]["value"][1] == "2"
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("sum(")
