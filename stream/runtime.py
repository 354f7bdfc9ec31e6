"""Wiring of one service process: Kafka clients, the stream unit, the poll loop, predictions, HTTP.

``spacenet serve`` builds one ``Runtime`` and calls ``run()``, which returns when
``stop()`` (signal-safe) is called; nothing connects before ``run()``:

>>> runtime = Runtime(ServiceConfig(), CollectorRegistry())
>>> runtime.stop(); runtime.loop is None          # run() would stop after restoring
True
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from spacenet.stream import wire
from spacenet.stream.config import ServiceConfig
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.kafka_config import KafkaSettings, ensure_topics, training_consumer_options
from spacenet.stream.learner import Learner
from spacenet.stream.loop import Loop
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.predict import PredictionWorker
from spacenet.stream.unit import StreamUnit

log = logging.getLogger(__name__)


class Runtime:
    """Builds and runs everything ``spacenet serve`` needs; ``stop()`` is signal-safe."""

    def __init__(
        self, cfg: ServiceConfig, registry: CollectorRegistry, kafka: KafkaSettings | None = None
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.kafka = kafka or KafkaSettings.from_env(bootstrap=cfg.bootstrap)
        self.stop_ = threading.Event()
        self.unit: StreamUnit | None = None
        self.loop: Loop | None = None
        self.predictions: PredictionWorker | None = None

    def stop(self) -> None:
        self.stop_.set()
        if self.loop is not None:
            self.loop.stop()

    def _healthy(self) -> bool:
        """The poll loop runs and the prediction worker has not failed (``/healthz``)."""
        loop_ok = self.loop is None or self.loop.healthy
        return loop_ok and (self.predictions is None or self.predictions.error_ is None)

    def run(self) -> int:
        from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer

        cfg = self.cfg
        log.info("starting with %s; kafka %s", cfg.redacted(), self.kafka)
        learner = Learner(cfg)
        device_name = torch.cuda.get_device_name(learner.device) if learner.device.type == "cuda" else ""
        telemetry = Telemetry(
            self.registry,
            device=str(learner.device),
            device_name=device_name,
            layers=learner.spacenet.layer_names_,
        )
        telemetry.snapshot(learner.spacenet, None, 0)
        http = telemetry.serve_http(
            cfg.metrics_host,
            cfg.metrics_port,
            ready=lambda: self.loop.ready if self.loop else (False, "starting"),
            health=self._healthy,
        )
        ensure_topics(self.kafka, cfg.topics)
        client = self.kafka.client_kwargs()
        producer = KafkaProducer(
            **client, max_request_size=max(cfg.max_message_bytes * 2, 1 << 20), linger_ms=5
        )
        consumer = KafkaConsumer(**client, group_id=cfg.group, **training_consumer_options(cfg))
        dead_letters = DeadLetters(producer.send, cfg.dead_letter_topic, telemetry.metrics)
        # One unit for every partition of the topic: they are learned as one stream.
        unit = StreamUnit(cfg, telemetry, dead_letters, learner)
        loop = Loop(cfg, consumer, producer, telemetry, [unit])
        self.unit, self.loop = unit, loop
        if self.stop_.is_set():
            loop.stop()

        class Seek(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            def on_partitions_assigned(self, assigned: Any) -> None:
                loop.on_assigned(list(assigned))

        loop.restore()
        consumer.subscribe([cfg.topic], listener=Seek())
        predict_consumer = KafkaConsumer(
            cfg.requests_topic,
            **client,
            group_id=f"{cfg.group}.predict",
            session_timeout_ms=cfg.session_timeout_ms,
            auto_offset_reset="earliest",
            enable_auto_commit=True,
        )
        self.predictions = PredictionWorker(
            predict_consumer,
            producer,
            cfg.predictions_topic,
            dead_letters=dead_letters,
            model_source=lambda: unit.predictor_,
            limits=wire.WireLimits(
                max_message_bytes=cfg.max_message_bytes,
                max_records=cfg.max_records_per_message,
                expected_shape=tuple(cfg.input_shape),
                require_label=False,
            ),
            on_request=lambda n, seconds: telemetry.metrics.prediction(seconds, records=n),
        )
        self.predictions.start()
        try:
            return int(loop.run(restored=True))
        finally:
            self.predictions.stop()
            producer.flush()
            producer.close()
            if http is not None:
                http.stop()
