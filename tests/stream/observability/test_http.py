"""MetricsServer over a real loopback socket."""

from __future__ import annotations

import gzip
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from spacenet.stream.observability.http import MetricsServer
from spacenet.stream.observability.metrics import ServiceMetrics

# Loopback only: never route through an HTTP proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with OPENER.open(request, timeout=10) as resp:
            return resp.status, resp.headers.get_content_type(), dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), dict(e.headers), e.read()


class Probe:
    """Health and readiness the test flips while the server runs."""

    def __init__(self) -> None:
        self.healthy = True
        self.ready: tuple[bool, str] = (False, "restoring checkpoint")

    def health(self) -> bool:
        return self.healthy

    def readiness(self) -> tuple[bool, str]:
        return self.ready


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, ServiceMetrics, Probe]]:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    probe = Probe()
    server = MetricsServer(registry, health=probe.health, ready=probe.readiness)
    server.start()
    try:
        yield server, metrics, probe
    finally:
        server.stop()


def test_metrics_endpoint_serves_the_registry(served: tuple[MetricsServer, ServiceMetrics, Probe]) -> None:
    server, metrics, _ = served
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    metrics.consumed("train", 0, records=5)
    status, ctype, _, body = get(f"{server.url}/metrics")
    assert status == 200 and ctype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (sample,) = [s for s in families["spacenet_records_consumed"].samples if s.name.endswith("_total")]
    assert sample.labels == {"topic": "train", "partition": "0"} and sample.value == 5.0

    # prometheus_client's own negotiation: OpenMetrics and gzip, and name filters.
    status, ctype, _, body = get(f"{server.url}/metrics", {"Accept": "application/openmetrics-text"})
    assert ctype == "application/openmetrics-text" and body.rstrip().endswith(b"# EOF")
    status, _, headers, body = get(f"{server.url}/metrics", {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip" and b"spacenet_batches_total" in gzip.decompress(body)
    _, _, _, body = get(f"{server.url}/metrics?name[]=spacenet_batches_total")
    assert b"spacenet_batches_total" in body and b"spacenet_records_consumed_total" not in body


def test_health_and_readiness(served: tuple[MetricsServer, ServiceMetrics, Probe]) -> None:
    server, _, probe = served
    assert get(f"{server.url}/healthz")[0] == 200
    status, ctype, _, body = get(f"{server.url}/readyz")
    assert (status, ctype, body) == (503, "text/plain", b"restoring checkpoint\n")

    probe.ready = (True, "")
    assert get(f"{server.url}/readyz")[0] == 200
    probe.healthy = False
    assert get(f"{server.url}/healthz")[0] == 503

    def broken() -> tuple[bool, str]:
        raise RuntimeError("consumer gone")

    server.ready = broken
    status, _, _, body = get(f"{server.url}/readyz")
    assert status == 503 and b"consumer gone" in body
    assert get(f"{server.url}/nope")[0] == 404
    assert get(f"{server.url}/")[0] == 200


def test_stop_releases_the_port_and_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    server = MetricsServer(CollectorRegistry())
    url = server.start()
    port = server.port
    with pytest.raises(RuntimeError, match="already serving"):
        server.start()
    assert get(f"{url}/healthz")[0] == 200
    server.stop()
    server.stop()  # idempotent
    assert {t.name for t in threading.enumerate()} <= before
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    # The same port can be bound again at once.
    with MetricsServer(CollectorRegistry(), port=port) as again:
        assert get(f"{again.url}/healthz")[0] == 200


def test_binds_loopback_by_default() -> None:
    with MetricsServer(CollectorRegistry()) as server:
        assert server.host == "127.0.0.1"


def test_the_status_page_is_html_and_a_failing_one_leaves_the_endpoints_up() -> None:
    pages = iter(["<!doctype html><title>ok</title>"])
    with MetricsServer(CollectorRegistry(), status=lambda: next(pages)) as server:
        status, ctype, headers, body = get(server.url + "/")
        assert (status, ctype, body) == (200, "text/html", b"<!doctype html><title>ok</title>")
        assert headers["Cache-Control"] == "no-store"
        status, ctype, _, body = get(server.url + "/")  # the iterator is spent: the page raises
        assert (status, ctype) == (500, "text/plain") and body.startswith(
            b"status page failed: StopIteration"
        )
        assert get(server.url + "/healthz")[0] == 200 and get(server.url + "/metrics")[0] == 200
