"""Connection settings shared by every Kafka client the project opens.

``KafkaSettings`` turns a bootstrap string and optional TLS/SASL settings into the keyword
arguments that kafka-python's ``KafkaProducer``, ``KafkaConsumer`` and ``KafkaAdminClient``
all accept. The SASL password comes from a value or a file (a mounted secret); it is never
part of ``repr()``, so settings can be logged.

    >>> s = KafkaSettings.from_env(env={"SPACENET_BOOTSTRAP": "k1:9093,k2:9093",
    ...     "SPACENET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SPACENET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    ...     "SPACENET_KAFKA_SASL_USERNAME": "svc", "SPACENET_KAFKA_SASL_PASSWORD": "s3cret"})
    >>> s.client_kwargs()["bootstrap_servers"], s.client_kwargs()["sasl_plain_password"]
    (['k1:9093', 'k2:9093'], 's3cret')
    >>> "s3cret" in repr(s)
    False
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spacenet.stream.config import ENV_PREFIX as SERVICE_ENV_PREFIX
from spacenet.stream.config import ServiceConfig, parse_bool

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ENV_PREFIX = "SPACENET_KAFKA_"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaSettings:
    """Where the brokers are and how to authenticate; ``client_kwargs()`` feeds kafka-python.

    ``bootstrap`` is ``host:port[,host:port...]``. A SASL protocol needs a mechanism, a
    username and exactly one of ``sasl_password`` / ``sasl_password_file`` (read when the
    kwargs are built, so a rotated secret file is picked up by the next client).
    ``bootstrap_timeout_ms`` bounds how long a client tries to reach a broker at start.
    """

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    client_id: str = "spacenet"
    bootstrap_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        servers = self.servers
        if not servers or any(":" not in s or not s.rsplit(":", 1)[1].isdigit() for s in servers):
            raise ValueError(f"bootstrap must be host:port[,host:port...], got {self.bootstrap!r}")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security_protocol must be one of {SECURITY_PROTOCOLS}")
        if self.bootstrap_timeout_ms < 1:
            raise ValueError("bootstrap_timeout_ms must be positive")
        sasl = self.security_protocol.startswith("SASL_")
        if not sasl:
            extra = [
                f.name
                for f in dataclasses.fields(self)
                if f.name.startswith("sasl_") and getattr(self, f.name)
            ]
            if extra:
                raise ValueError(f"{', '.join(extra)} set but security_protocol is {self.security_protocol}")
            return
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"{self.security_protocol} needs sasl_mechanism in {SASL_MECHANISMS}")
        if not self.sasl_username:
            raise ValueError(f"{self.security_protocol} needs a SASL username")
        if (self.sasl_password is None) == (self.sasl_password_file is None):
            raise ValueError("give exactly one of a SASL password and a SASL password file")

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "sasl_password" and value is not None:
                value = "<redacted>"
            shown.append(f"{f.name}={value!r}")
        return f"KafkaSettings({', '.join(shown)})"

    __str__ = __repr__

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap.split(",") if s.strip()]

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments valid for KafkaProducer, KafkaConsumer and KafkaAdminClient alike."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs.update(
                ssl_cafile=self.ssl_cafile,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_check_hostname=self.ssl_check_hostname,
            )
        if self.security_protocol.startswith("SASL_"):
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self._password(),
            )
        return kwargs

    def replace(self, **changes: Any) -> KafkaSettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls, prefix: str = ENV_PREFIX, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> KafkaSettings:
        """Read ``<prefix><FIELD>`` variables (``SPACENET_KAFKA_SASL_PASSWORD_FILE=/run/secrets/kafka``),
        but the bootstrap servers from ``SPACENET_BOOTSTRAP``, the variable ``spacenet serve``
        reads too (``SPACENET_KAFKA_BOOTSTRAP`` still works, with a warning); ``overrides``
        that are not None win over the environment (e.g. a ``--bootstrap`` flag)."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = source.get(prefix + f.name.upper())
            if f.name == "bootstrap":
                raw = _bootstrap_from(source, legacy=prefix + "BOOTSTRAP")
            if raw is None or raw == "":
                continue
            if f.name == "bootstrap_timeout_ms":
                values[f.name] = int(raw)
            elif f.name == "ssl_check_hostname":
                values[f.name] = parse_bool(prefix + f.name.upper(), raw)
            elif f.name in ("security_protocol", "sasl_mechanism"):
                values[f.name] = raw.strip().upper()
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def _password(self) -> str | None:
        if self.sasl_password_file is None:
            return self.sasl_password
        try:
            return Path(self.sasl_password_file).read_text().rstrip("\r\n")
        except OSError as e:  # the message names the file, never its content
            raise ValueError(
                f"cannot read the SASL password file {self.sasl_password_file}: {e.strerror}"
            ) from e


def _bootstrap_from(source: Mapping[str, str], legacy: str) -> str | None:
    name = SERVICE_ENV_PREFIX + "BOOTSTRAP"
    value, old = source.get(name) or None, source.get(legacy) or None
    if old is not None:
        log.warning(
            "%s is deprecated: set %s (the one variable every spacenet command reads)%s",
            legacy,
            name,
            "" if value is None else f"; {name} wins",
        )
    return value if value is not None else old


def training_consumer_options(cfg: ServiceConfig) -> dict[str, Any]:
    """How ``spacenet serve`` opens its training consumer, beside ``client_kwargs()`` and the
    group: no auto commit (offsets follow checkpoints), from the earliest offset, fetches
    sized for the largest accepted message, and the cooperative sticky assignor, so that a
    rebalance moves only the partitions that change owner (the others keep their stream
    units and trainings); kafka-python's defaults for everything else."""
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

    return {
        "partition_assignment_strategy": (CooperativeStickyAssignor,),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": cfg.max_poll_records,
        "session_timeout_ms": cfg.session_timeout_ms,
        "fetch_max_bytes": 64 << 20,
        "max_partition_fetch_bytes": max(cfg.max_message_bytes, 1 << 20),
    }


def ensure_topics(
    settings: KafkaSettings,
    names: Iterable[str],
    partitions: int = 1,
    replication_factor: int | None = None,
    configs: Mapping[str, str] | None = None,
    timeout_ms: int = 30_000,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    Idempotent: a topic that exists (or that another client creates meanwhile) is left as
    it is, partitions and configs included. ``replication_factor=None`` takes the broker's
    default. Returns once every created topic has a leader.
    """
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError, for_code

    wanted = list(dict.fromkeys(names))
    admin = KafkaAdminClient(**settings.client_kwargs(), request_timeout_ms=timeout_ms)
    try:
        missing = [name for name in wanted if name not in set(admin.list_topics())]
        if not missing:
            return []
        spec = {"num_partitions": partitions, "replication_factor": replication_factor or -1}
        request = {name: {**spec, "configs": dict(configs or {})} for name in missing}
        result = admin.create_topics(request, timeout_ms=timeout_ms, raise_errors=False)
        created = []
        for topic in result["topics"]:
            error = for_code(topic["error_code"])
            if error is TopicAlreadyExistsError:
                continue
            if topic["error_code"]:
                raise error(f"creating topic {topic['name']}: {topic.get('error_message') or error.__name__}")
            created.append(topic["name"])
        if created:
            admin.wait_for_topics(created, timeout_ms=timeout_ms)
        return created
    finally:
        admin.close()


class BrokerUnavailable(RuntimeError):
    """No broker answered within the wait's deadline."""


def broker_error(settings: KafkaSettings) -> str | None:
    """Why no broker answers at ``settings.bootstrap`` (an admin client that connects and lists
    the topics), or None when one does."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # its lines for each refused connection: the caller logs
    try:
        admin = KafkaAdminClient(**settings.client_kwargs())
        try:
            admin.list_topics()
        finally:
            admin.close()
    except (KafkaError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        kafka_log.setLevel(level)
    return None


def wait_for_broker(
    settings: KafkaSettings,
    stop: threading.Event,
    deadline_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    log_every_s: float = 60.0,
) -> bool:
    """Block until a broker answers: True; False when ``stop`` is set first. Tries again with
    a backoff (1 s, doubling, at most 30 s) and logs a line a minute while it waits;
    ``deadline_s`` > 0 ends the wait with ``BrokerUnavailable`` once that long has passed."""
    start = clock()
    logged: float | None = None
    backoff = 1.0
    while not stop.is_set():
        error = broker_error(settings)
        if error is None:
            if clock() - start >= 1.0:
                log.info("kafka broker at %s answers after %.0f s", settings.bootstrap, clock() - start)
            return True
        waited = clock() - start
        if deadline_s and waited >= deadline_s:
            raise BrokerUnavailable(
                f"no Kafka broker answered at {settings.bootstrap} within {deadline_s:g} s "
                f"(broker_wait_s); last error: {error}"
            )
        if logged is None or clock() - logged >= log_every_s:
            log.warning(
                "waiting for a Kafka broker at %s (%.0f s so far): %s", settings.bootstrap, waited, error
            )
            logged = clock()
        pause = backoff if not deadline_s else min(backoff, max(deadline_s - waited, 0.0))
        stop.wait(pause)
        backoff = min(backoff * 2, 30.0)
    return False


def partition_count(settings: KafkaSettings, topic: str) -> int:
    """How many partitions ``topic`` has."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**settings.client_kwargs())
    try:
        return len(admin.describe_topics([topic])[0]["partitions"])
    finally:
        admin.close()
