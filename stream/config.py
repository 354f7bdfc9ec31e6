"""Service configuration: defaults, then a TOML file, then ``SPACENET_*`` variables, then flags.

Every field of ``ServiceConfig`` can be set in each layer; the environment name is the
field name in upper case with the ``SPACENET_`` prefix (``SPACENET_METRICS_PORT=9109``).
Tuples are written comma-separated (``SPACENET_HIDDEN=400,400``).

    >>> cfg = ServiceConfig.load(env={"SPACENET_TOPIC": "mnist", "SPACENET_EPOCHS": "2"})
    >>> cfg.topic, cfg.epochs, cfg.dead_letter_topic
    ('mnist', 2, 'mnist.dlq')
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "SPACENET_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``spacenet serve`` can be told. Topic names left empty derive from ``topic``."""

    # Kafka
    bootstrap: str = "127.0.0.1:9092"
    broker_wait_s: float = 0.0  # how long to wait for a broker at start; 0: as long as it takes
    topic: str = "spacenet.train"
    group: str = "spacenet"
    requests_topic: str = ""  # default: <topic>.requests
    predictions_topic: str = ""  # default: <topic>.predictions
    models_topic: str = ""  # default: <topic>.models
    dead_letter_topic: str = ""  # default: <topic>.dlq
    changelog_topic: str = ""  # default: <topic>.state
    changelog: bool = True  # state in the changelog topic (false: the state dir only)
    poll_timeout_ms: int = 500
    max_poll_records: int = 500
    session_timeout_ms: int = 45_000  # a dead member's partitions move after this long
    # State and endpoints
    state_dir: str = "./spacenet-state"
    keep_checkpoints: int = 3
    checkpoint_max_age_s: float = 7200.0  # the stale-checkpoint alert's threshold (a gauge)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9109  # 0: any free port; -1: no metrics/health server
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Model and input
    input_shape: tuple[int, ...] = (1, 28, 28)
    hidden: tuple[int, ...] = (400, 400)
    num_outputs: int = 10  # the most classes the model can ever learn
    input_scale: float = 1.0 / 255.0  # uint8 features are scaled first
    input_mean: float = 0.1307
    input_std: float = 0.3081
    # SpaceNet
    n_select: int = 80
    n_reserve: int = 40
    connections: tuple[float, ...] = (10000, 1640, 80)
    drop_fraction: float = 0.2
    freeze_used_biases: bool = False
    calibrate: bool = False
    task_inference: bool = False  # choose the task with per-class input statistics (spacenet_ti)
    on_exhausted: str = "error"
    seed: int = 0
    # Training
    epochs: int = 4
    lr: float = 0.01
    batch_size: int = 128
    # Boundary detection
    min_count: int = 20
    window: int = 1000
    group_window: int = 500
    idle_timeout_s: float = 0.0  # 0: off
    max_task_records: int = 0  # 0: off
    # Task buffer
    max_buffer_bytes: int = 256 << 20
    holdout_fraction: float = 0.1
    holdout_max_per_task: int = 1000
    holdout_max_records: int = 5000  # over all tasks: n tasks keep at most this // n each
    # Prequential accuracy and drift (monitoring only; stream/prequential.py)
    prequential_every: int = 256  # score records of every Nth message (by offset); 0: off
    prequential_sample: int = 32  # at most this many records of such a message
    prequential_window: int = 500  # scored records the accuracy is over
    drift_threshold: float = 25.0  # Page-Hinkley lambda on the error indicator
    # Wire limits
    max_message_bytes: int = 8 << 20
    max_records_per_message: int = 10_000
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.topic
        for name, suffix in (
            ("requests_topic", "requests"),
            ("predictions_topic", "predictions"),
            ("models_topic", "models"),
            ("dead_letter_topic", "dlq"),
            ("changelog_topic", "state"),
        ):
            if not getattr(self, name):
                object.__setattr__(self, name, f"{t}.{suffix}")
        if self.broker_wait_s < 0:
            raise ValueError("broker_wait_s must be 0 (wait as long as it takes) or positive")
        if self.on_exhausted not in ("error", "shrink"):
            raise ValueError("on_exhausted must be 'error' or 'shrink'")
        if self.calibrate and self.task_inference:
            raise ValueError("calibrate and task_inference both rescore the outputs: choose one")
        if len(self.connections) != len(self.hidden) + 1:
            raise ValueError(f"connections needs {len(self.hidden) + 1} values (hidden layers + output)")

    @property
    def topics(self) -> tuple[str, ...]:
        """The training topic and the four the service derives from it."""
        return (
            self.topic,
            self.requests_topic,
            self.predictions_topic,
            self.models_topic,
            self.dead_letter_topic,
        )

    @property
    def spacenet_connections(self) -> tuple[int | float, ...]:
        """Budgets as SpaceNet wants them: whole numbers are counts, fractions densities."""
        return tuple(int(c) if float(c).is_integer() and c > 1 else float(c) for c in self.connections)

    @classmethod
    def load(
        cls,
        file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ServiceConfig:
        """Defaults < TOML ``file`` < ``env`` (default ``os.environ``) < ``overrides``."""
        values: dict[str, Any] = {}
        if file:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
            values.update(data.get("spacenet", data))
        environ = os.environ if env is None else env
        for f in dataclasses.fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in environ and f.name != "extra":
                values[f.name] = environ[key]
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    def redacted(self) -> dict[str, Any]:
        """For logs: all settings (no secrets live here; Kafka credentials do not)."""
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            return parse_bool(name, value) if isinstance(value, str) else bool(value)
        if origin is tuple:
            item = typing.get_args(kind)[0]
            parts = value.split(",") if isinstance(value, str) else list(value)
            return tuple(item(p) for p in parts if str(p).strip() != "")
        if origin is dict or isinstance(kind, types.GenericAlias):
            return dict(value)
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"setting {name}: cannot read {value!r} as {kind}") from e


def parse_bool(name: str, raw: str) -> bool:
    """``raw`` (1/0, true/false, yes/no, on/off, any case) as a bool; ``name`` is for the error."""
    value = raw.strip().lower()
    if value not in _TRUE | _FALSE:
        raise ValueError(f"{name} must be true or false, got {raw!r}")
    return value in _TRUE


def state_path(cfg: ServiceConfig) -> Path:
    return Path(cfg.state_dir).expanduser()
