#!/usr/bin/env python3
"""A real single-node Apache Kafka broker (KRaft), assembled from Maven Central jars.

Standard library only, so it runs before any virtual environment exists, as a script of
the checkout or a module of the installed package:

    python3 stream/tools/local_kafka.py fetch                # download the jars once
    python3 stream/tools/local_kafka.py start --dir RUN      # prints the bootstrap address
    python3 stream/tools/local_kafka.py stop --dir RUN
    python -m spacenet.stream.tools.local_kafka start --dir RUN

From Python (the test fixture and ``spacenet demo`` do this):

    >>> import tempfile
    >>> broker = LocalKafka(tempfile.mkdtemp())
    >>> bootstrap = broker.start()          # '127.0.0.1:<a free port>'
    >>> broker.stop()
    >>> broker.start(keep_data=True) == bootstrap
    True
    >>> broker.stop()

``start(keep_data=True)`` restarts a stopped broker on the same ports with its topics,
messages and committed offsets (for tests of a broker restart under a running client).

The jars are cached under ``$SPACENET_CACHE`` (default ``~/.cache/spacenet-stream``)
in ``kafka-<version>/libs``; once cached, starting needs no network.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

KAFKA_VERSION = os.environ.get("SPACENET_KAFKA_VERSION", "3.9.1")
POM = Path(__file__).with_name("local_kafka.pom.xml")
JVM_OPTS = [
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]
LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.org.apache.kafka.controller=INFO
"""


class KafkaError(RuntimeError):
    """The broker could not be fetched, started or stopped; the message says why."""


def cache_root() -> Path:
    env = os.environ.get("SPACENET_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "spacenet-stream"


def fetch_jars(version: str = KAFKA_VERSION, cache: Path | None = None) -> Path:
    """Return the folder holding the broker's jars, downloading them on first use."""
    libs = (cache or cache_root()) / f"kafka-{version}" / "libs"
    done = libs / ".complete"
    if done.exists():
        return libs
    if shutil.which("mvn") is None:
        raise KafkaError("Maven (mvn) is needed to fetch the Kafka jars the first time")
    partial = libs.with_name("libs.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-Dkafka.version={version}",
        f"-DoutputDirectory={partial}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KafkaError(f"fetching Kafka {version} jars failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    if not any(partial.glob(f"kafka_2.13-{version}.jar")):
        raise KafkaError(f"Maven ran but kafka_2.13-{version}.jar is missing in {partial}")
    (partial / ".complete").write_text(version + "\n")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_id() -> str:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return "A" + cid[1:] if cid.startswith("-") else cid


class LocalKafka:
    """One combined broker+controller on 127.0.0.1, its files under ``run_dir``.

    ``port`` and ``controller_port`` default to free ports chosen at start. The JVM
    runs in its own process group so that ``stop`` leaves nothing behind.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        port: int | None = None,
        controller_port: int | None = None,
        version: str = KAFKA_VERSION,
        start_timeout_s: float = 90.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.port = port
        self.controller_port = controller_port
        self.version = version
        self.start_timeout_s = start_timeout_s

    # files -----------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.run_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "logs" / "server.log"

    @property
    def bootstrap_file(self) -> Path:
        return self.run_dir / "bootstrap"

    def _write_config(self, port: int, cport: int) -> Path:
        data = self.run_dir / "data"
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.dedupe.buffer.size": "16777216",
            "auto.create.topics.enable": "true",
            "message.max.bytes": "10485760",
        }
        cfg = self.run_dir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.run_dir / "log4j.properties").write_text(LOG4J.format(log=self.log_file))
        return cfg

    def _java(self, libs: Path, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaError("java is not on PATH (OpenJDK 17 or newer is needed)")
        return [
            java,
            *JVM_OPTS,
            f"-Djava.io.tmpdir={self.run_dir / 'tmp'}",
            f"-Dlog4j.configuration=file:{self.run_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.log_file.parent}",
            "-cp",
            f"{libs}/*",
            *args,
        ]

    # lifecycle ---------------------------------------------------------------
    def running_pid(self) -> int | None:
        """The broker's pid if one started from this run_dir is alive."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def start(self, keep_data: bool = False) -> str:
        """Format a fresh KRaft log dir, start the broker, wait until it serves.

        ``keep_data=True`` restarts a broker stopped earlier from this ``run_dir``: its
        data dir (topics, messages, committed offsets) is kept, and it listens on the
        same ports as before (clients reconnect to the address they know). Without an
        earlier start it raises ``KafkaError``.
        """
        if self.running_pid() is not None:
            raise KafkaError(f"a broker from {self.run_dir} is already running (pid {self.running_pid()})")
        if keep_data and not (self.run_dir / "data" / "meta.properties").is_file():
            raise KafkaError(f"no formatted data dir under {self.run_dir} to keep: start it fresh first")
        port = self.port or free_port()
        cport = self.controller_port or free_port()
        for p in {port, cport}:
            if not port_is_free(p):
                raise KafkaError(f"port {p} on 127.0.0.1 is already in use; choose another")
        libs = fetch_jars(self.version)
        cfg = self._write_config(port, cport)
        if not keep_data:
            self._format(libs, cfg)
        # Readiness is judged from log lines written by this start, not by an earlier one.
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.run_dir / "logs" / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                self._java(libs, "kafka.Kafka", str(cfg)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        bootstrap = f"127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise KafkaError(f"the broker exited with code {proc.returncode}:\n{self._log_tail()}")
            if self._ready(port, log_start):
                self.port, self.controller_port = port, cport
                self.bootstrap_file.write_text(bootstrap + "\n")
                return bootstrap
            time.sleep(0.2)
        self.stop()
        raise KafkaError(f"the broker was not ready within {self.start_timeout_s:.0f}s:\n{self._log_tail()}")

    def _format(self, libs: Path, cfg: Path) -> None:
        """A fresh, empty KRaft log dir with a new cluster id."""
        shutil.rmtree(self.run_dir / "data", ignore_errors=True)
        fmt = subprocess.run(
            self._java(
                libs,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                _cluster_id(),
                "-c",
                str(cfg),
                "--ignore-formatted",
            ),
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise KafkaError(f"formatting the KRaft log dir failed:\n{fmt.stdout}{fmt.stderr}")

    def _ready(self, port: int, log_start: int = 0) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            return False
        # The port opens when the socket server starts; the log line says the
        # broker has finished starting (metadata loaded, listeners enabled).
        try:
            with open(self.log_file, "rb") as f:
                f.seek(log_start)
                return b"Kafka Server started" in f.read()
        except OSError:
            return False

    def _log_tail(self, n: int = 40) -> str:
        lines: list[str] = []
        for f in (self.run_dir / "logs" / "stdout.log", self.log_file):
            with contextlib.suppress(OSError):
                lines += f.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines[-n:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); an error if none is running."""
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            raise KafkaError(f"no broker is running from {self.run_dir}")
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if not _alive(pid):
                break
        self.pid_file.unlink(missing_ok=True)
        self.bootstrap_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running_pid() is not None:
            self.stop()


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child; otherwise just probe.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download the broker jars into the cache")
    for name in ("start", "stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True, help="run folder (config, data, logs, pid)")
        if name == "start":
            p.add_argument("--port", type=int, default=None)
            p.add_argument("--controller-port", type=int, default=None)
            p.add_argument(
                "--keep-data", action="store_true", help="restart on the kept data dir (same ports needed)"
            )
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch_jars())
        elif args.cmd == "start":
            broker = LocalKafka(args.dir, args.port, args.controller_port)
            print(broker.start(keep_data=args.keep_data))
        elif args.cmd == "stop":
            LocalKafka(args.dir).stop()
        else:
            pid = LocalKafka(args.dir).running_pid()
            print(f"running (pid {pid})" if pid else "stopped")
            return 0 if pid else 1
    except KafkaError as e:
        print(f"local_kafka: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
