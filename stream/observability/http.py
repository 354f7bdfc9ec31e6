"""The service's HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``, on a daemon thread.

``/metrics`` is prometheus_client's own WSGI exposition of the given registry (text or
OpenMetrics by content negotiation, gzip when asked), served by prometheus_client's own
threaded WSGI server. ``/healthz`` answers 200 while
``health()`` is true (the process is alive and its loop is not stuck); ``/readyz``
answers 200 when ``ready()`` says so and 503 with its reason otherwise. A callback
that raises answers 503 with the error. The default bind address is loopback.

    >>> import urllib.request
    >>> from prometheus_client import CollectorRegistry, Counter
    >>> registry = CollectorRegistry()
    >>> Counter("spacenet_demo", "A demo counter.", registry=registry).inc()
    >>> no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    >>> with MetricsServer(registry, ready=lambda: (False, "restoring checkpoint")) as server:
    ...     body = no_proxy.open(f"{server.url}/metrics").read().decode()
    ...     "spacenet_demo_total 1.0" in body
    True
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, for a server started just after."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the debug log, not stderr (Prometheus scrapes every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def _status(code: HTTPStatus) -> str:
    return f"{code.value} {code.phrase}"


def _send(
    start_response: StartResponse, code: HTTPStatus, data: bytes, content_type: str, *headers: tuple[str, str]
) -> list[bytes]:
    start_response(
        _status(code), [("Content-Type", content_type), ("Content-Length", str(len(data))), *headers]
    )
    return [data]


def _text(start_response: StartResponse, code: HTTPStatus, body: str) -> list[bytes]:
    return _send(start_response, code, (body.rstrip("\n") + "\n").encode(), "text/plain; charset=utf-8")


def _html(start_response: StartResponse, body: str) -> list[bytes]:
    html = "text/html; charset=utf-8"
    return _send(start_response, HTTPStatus.OK, body.encode(), html, ("Cache-Control", "no-store"))


def _always_healthy() -> bool:
    return True


def _always_ready() -> tuple[bool, str]:
    return True, "ready"


class MetricsServer:
    """Serve ``registry`` and the health checks on ``host:port`` (port 0: a free port).

    ``start()`` binds and returns the base URL; ``stop()`` shuts the server down and
    joins its thread (idempotent). Also a context manager.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        health: Callable[[], bool] = _always_healthy,
        ready: Callable[[], tuple[bool, str]] = _always_ready,
        status: Callable[[], str] | None = None,
    ) -> None:
        self.registry = registry
        self.status = status  # the HTML page at / (a plain index without it)
        self.host = host
        self.port = port
        self.health = health
        self.ready = ready
        self._metrics_app: WSGIApp = make_wsgi_app(registry)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the metrics server is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> str:
        if self._server is not None:
            raise RuntimeError(f"already serving on {self.url}")
        server_class = _Server6 if ":" in self.host else ThreadingWSGIServer
        self._server = make_server(self.host, self.port, self.app, server_class, _QuietHandler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name=f"metrics-http-{self.port}", daemon=True
        )
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s", self.url)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ WSGI
    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application: usable on its own, e.g. mounted in another server."""
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            return self._check(start_response, lambda: (self.health(), "not healthy"))
        if path == "/readyz":
            return self._check(start_response, self.ready)
        if path == "/":
            if self.status is None:
                return _text(start_response, HTTPStatus.OK, "SpaceNet-Stream: /metrics /healthz /readyz")
            try:
                page = self.status()
            except Exception as e:  # a broken page must not take the endpoints down
                log.warning("status page failed", exc_info=True)
                return _text(start_response, HTTPStatus.INTERNAL_SERVER_ERROR, f"status page failed: {e!r}")
            return _html(start_response, page)
        return _text(start_response, HTTPStatus.NOT_FOUND, f"not found: {path}")

    @staticmethod
    def _check(start_response: StartResponse, check: Callable[[], tuple[bool, str]]) -> list[bytes]:
        try:
            ok, reason = check()
        except Exception as e:  # a failing probe reports itself instead of dropping the connection
            log.warning("health check raised", exc_info=True)
            ok, reason = False, f"check failed: {type(e).__name__}: {e}"
        if ok:
            return _text(start_response, HTTPStatus.OK, "ok")
        return _text(start_response, HTTPStatus.SERVICE_UNAVAILABLE, reason)
