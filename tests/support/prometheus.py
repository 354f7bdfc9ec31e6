"""A real Prometheus server for tests: Debian's ``prometheus`` binary as a subprocess.

Usage (``tests/integration/test_prometheus_scrape.py`` runs it against the real binary)::

    with PrometheusServer(tmp, ["127.0.0.1:9100"]) as prom:
        prom.wait_for("up", lambda r: r and r[0]["value"][1] == "1")
        # [{'metric': {'__name__': 'up', 'instance': '127.0.0.1:9100', 'job': 'test'}, 'value': [...]}]

The configuration is written as JSON, which YAML (and so Prometheus) reads as is, so
target and path strings never need YAML quoting.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from spacenet.stream.observability.http import free_port

Result = list[dict[str, Any]]
# Loopback only: never route through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusError(RuntimeError):
    """Prometheus could not start or stop, or answered a query with an error."""


class PrometheusServer:
    """One Prometheus on a free 127.0.0.1 port, scraping ``scrape_targets`` ("host:port").

    All its files (config, TSDB, log) live under ``workdir``. It runs in its own
    process group so that ``stop`` leaves nothing behind.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        scrape_targets: Sequence[str],
        rule_files: Sequence[str | os.PathLike[str]] = (),
        scrape_interval: str = "1s",
        *,
        job_name: str = "test",
        metrics_path: str = "/metrics",
        binary: str = "prometheus",
        start_timeout_s: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.scrape_targets = list(scrape_targets)
        self.rule_files = [Path(f).resolve() for f in rule_files]
        self.scrape_interval = scrape_interval
        self.job_name = job_name
        self.metrics_path = metrics_path
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # files -----------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def log_file(self) -> Path:
        return self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise PrometheusError("Prometheus has not been started")
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The configuration this server runs with (also written to ``config_file``)."""
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": [str(f) for f in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job_name,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.scrape_targets}],
                }
            ],
        }

    # lifecycle ---------------------------------------------------------------
    def start(self) -> str:
        """Start Prometheus and wait until ``/-/ready`` answers; returns the base URL."""
        if self._proc is not None and self._proc.poll() is None:
            raise PrometheusError(f"Prometheus from {self.workdir} is already running")
        exe = shutil.which(self.binary)
        if exe is None:
            raise PrometheusError(f"{self.binary!r} is not on PATH (Debian package 'prometheus')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.config(), indent=2) + "\n")
        # A free port can be taken between choosing and binding it: retry then.
        for _ in range(3):
            self.port = free_port()
            if self._launch(exe):
                return self.url
        raise PrometheusError(f"Prometheus could not bind a free port:\n{self._log_tail()}")

    def _launch(self, exe: str) -> bool:
        """Run the binary once; False when it lost a race for its port."""
        cmd = [
            exe,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=info",
        ]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self._log_tail()
                self._proc = None
                if "address already in use" in tail:
                    return False
                raise PrometheusError(f"Prometheus exited at start:\n{tail}")
            if self._ready():
                return True
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(
            f"Prometheus was not ready within {self.start_timeout_s:.0f}s:\n{self._log_tail()}"
        )

    def _ready(self) -> bool:
        try:
            with _OPENER.open(f"{self.url}/-/ready", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers; a no-op when not running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            raise PrometheusError(f"Prometheus (pid {proc.pid}) survived SIGKILL")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # HTTP API ------------------------------------------------------------------
    def api(self, path: str, params: dict[str, str] | None = None, timeout_s: float = 10.0) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; an API error raises ``PrometheusError``."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.url}/api/v1/{path}{query}"
        try:
            with _OPENER.open(url, timeout=timeout_s) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            # Bad PromQL comes back as 400 with a JSON body that says why.
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"GET {url} failed: HTTP {e.code}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params or ''}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> Result:
        """Evaluate an instant query now; every result type is returned as a list of samples.

        A vector gives one ``{"metric": {...}, "value": [ts, "v"]}`` per series; a scalar
        or string gives one such dict with empty labels; a matrix gives ``"values"``.
        """
        data = self.api("query", {"query": promql})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[Result], bool] = bool,
        timeout: float = 60.0,
        interval: float = 0.5,
    ) -> Result:
        """Query until ``predicate(result)`` holds and return that result; raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"{promql!r} did not satisfy the predicate within {timeout}s; last: {result}"
                )
            time.sleep(interval)


# What the ``prometheus_factory`` fixture yields: ``factory(targets, rule_files, scrape_interval, **kw)``.
PrometheusFactory = Callable[..., PrometheusServer]
