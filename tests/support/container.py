"""The service's image run with podman, for the image test (``make image-test``).

``ContainerService`` is ``ServiceProcess`` with ``spacenet serve`` run by ``podman run`` in the
foreground: the image's own command, configured as the docs say, only through ``SPACENET_*``
variables (the same settings, the health check's port among them); the container's output goes
to the same log file, and its ``/metrics`` is read the same way. The container uses the host's network
(``--network host``): the local broker advertises 127.0.0.1, which a container reaches only
when it shares the host's loopback, and the service's endpoints bind to 127.0.0.1 there too.
It runs hardened as the docs say (read-only root, a tmpfs on /tmp, no capabilities, no new
privileges) with its state in a named volume. ``stop()`` is ``podman stop``: the image's
STOPSIGNAL (SIGTERM), SIGKILL only after the grace period.

Podman reads ``deploy/podman/containers.conf`` through ``CONTAINERS_CONF``, as ``make image`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support import REPO_ROOT
from tests.support.service import ServiceProcess, http_get, unique_name

IMAGE = os.environ.get("SPACENET_IMAGE", "localhost/spacenet-stream:cpu")
STATE_DIR = "/var/lib/spacenet"  # the image's SPACENET_STATE_DIR and VOLUME
HARDENING = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def podman_env() -> dict[str, str]:
    conf = os.environ.get("CONTAINERS_CONF") or str(REPO_ROOT / "deploy" / "podman" / "containers.conf")
    return {**os.environ, "CONTAINERS_CONF": conf}


def podman(*args: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """``podman ARGS``; raises with podman's own message when it fails and ``check``."""
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout_s, env=podman_env(), check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result


def volume_path(volume: str) -> Path:
    """Where a (rootful) podman volume's files are on the host."""
    return Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())


def http_status(port: int, path: str) -> int | None:
    """The status of ``GET 127.0.0.1:port/path``; None while nothing answers."""
    return http_get(port, path)[0]


class ContainerService(ServiceProcess):
    """``spacenet serve`` in a container of ``image``, state in ``volume``; see the module doc."""

    def __init__(
        self, settings: Mapping[str, str], log_path: str | os.PathLike[str], volume: str, image: str = IMAGE
    ) -> None:
        super().__init__(settings, log_path, env=podman_env())
        self.volume = volume
        self.image = image
        self.name = unique_name("spacenet-image-test")
        self.started_at = 0.0
        self.ready_s: float | None = None  # from `podman run` to /readyz answering 200

    @property
    def command(self) -> list[str]:
        settings = {**self.settings, "metrics_port": str(self.metrics_port)}
        env = [f"--env=SPACENET_{name.upper()}={value}" for name, value in settings.items()]
        env.append("--env=SPACENET_KAFKA_LOG_LEVEL=INFO")  # kafka-python's group joins: wait_assigned()
        run = ["podman", "run", "--name", self.name, "--network", "host", *HARDENING]
        return [*run, "--volume", f"{self.volume}:{STATE_DIR}", *env, self.image]  # its CMD: serve

    def start(self) -> ContainerService:
        self.started_at = time.monotonic()
        super().start()
        return self

    def wait_assigned(self, timeout_s: float = 15.0, start_timeout_s: float = 180.0) -> bool:
        """Times readiness first (``ready_s``), then waits for the partitions as a process does."""
        deadline = self.started_at + start_timeout_s
        while http_status(self.metrics_port, "/readyz") != 200:
            if not self.alive or time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        self.ready_s = time.monotonic() - self.started_at
        return super().wait_assigned(timeout_s, start_timeout_s)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, check=check)

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """``podman stop`` (SIGTERM, the image's STOPSIGNAL) or ``podman kill --signal``; returns
        the container's exit status and removes the container (its log file and volume stay)."""
        if self.proc is None:
            raise RuntimeError("not started")
        if sig == signal.SIGTERM:
            podman("stop", "--time", str(int(timeout_s)), self.name, timeout_s=timeout_s + 60)
        else:
            podman("kill", "--signal", str(int(sig)), self.name, check=False)
        code = self.proc.wait(timeout=timeout_s + 60)
        self.remove()
        return code

    def remove(self) -> None:
        podman("rm", "--force", "--ignore", self.name, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(timeout=60)

    def __exit__(self, *exc: Any) -> None:
        self.remove()
