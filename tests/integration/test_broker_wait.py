"""A service started before its broker waits for it (readiness false, a log line a minute)
instead of crash-looping; only ``broker_wait_s`` ends the wait, with one clear line."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from spacenet.stream.kafka_config import BrokerUnavailable, KafkaSettings, wait_for_broker
from spacenet.stream.observability.http import free_port
from spacenet.stream.tools import local_kafka
from tests.support.service import ServiceProcess, eventually, http_get, service_settings, unique_name


def _nowhere() -> KafkaSettings:
    """Settings for a port nothing listens on, each try bounded to 0.3 s."""
    return KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", bootstrap_timeout_ms=300)


def test_wait_returns_false_at_once_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    assert wait_for_broker(_nowhere(), stop) is False


def test_wait_ends_at_its_deadline_with_what_it_last_saw(caplog: pytest.LogCaptureFixture) -> None:
    settings = _nowhere()
    with pytest.raises(
        BrokerUnavailable, match=rf"no Kafka broker answered at {settings.bootstrap} within 2 s"
    ):
        wait_for_broker(settings, threading.Event(), deadline_s=2.0)
    assert any("waiting for a Kafka broker" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_serve_gives_up_after_broker_wait_s_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    settings = service_settings(unique_name("nobroker"), bootstrap, tmp_path / "state", broker_wait_s=2)
    svc = ServiceProcess(settings, tmp_path / "serve.log", env={"SPACENET_KAFKA_BOOTSTRAP_TIMEOUT_MS": "500"})
    proc = subprocess.run(svc.command, capture_output=True, text=True, timeout=120, check=False, env=svc.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert f"no Kafka broker answered at {bootstrap} within 2 s (broker_wait_s)" in out
    assert "Traceback" not in out


@pytest.mark.kafka
@pytest.mark.slow
def test_serve_started_before_its_broker_waits_then_takes_its_stream_on(tmp_path: Path) -> None:
    local_kafka.fetch_jars()
    port = free_port()
    settings = service_settings(unique_name("late"), f"127.0.0.1:{port}", tmp_path / "state")
    broker = local_kafka.LocalKafka(tmp_path / "kafka", port=port)
    with ServiceProcess(
        settings, tmp_path / "serve.log", env={"SPACENET_KAFKA_BOOTSTRAP_TIMEOUT_MS": "1000"}
    ) as svc:
        eventually(lambda: http_get(svc.metrics_port, "/readyz")[0] == 503, 120, "/readyz", lambda: svc.alive)
        status, reason = http_get(svc.metrics_port, "/readyz")
        assert (status, reason.strip()) == (503, f"waiting for a Kafka broker at 127.0.0.1:{port}")
        assert http_get(svc.metrics_port, "/healthz")[0] == 200
        assert http_get(svc.metrics_port, "/metrics")[0] == 200
        eventually(
            lambda: "waiting for a Kafka broker" in svc.log_text(), 30, "the waiting line", lambda: svc.alive
        )
        try:
            broker.start()
            assert svc.wait_assigned(timeout_s=60, start_timeout_s=120), svc.log_tail()
            eventually(
                lambda: http_get(svc.metrics_port, "/readyz")[0] == 200, 60, "ready", lambda: svc.alive
            )
            assert "Traceback" not in svc.log_text()
            assert svc.stop() == 0
        finally:
            broker.stop()
