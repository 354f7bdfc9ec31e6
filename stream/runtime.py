"""Wiring of one service process: Kafka clients, the state store, the poll loop, predictions, HTTP.

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

from prometheus_client import CollectorRegistry

from spacenet.stream import wire
from spacenet.stream.changelog import Changelog, chunk_bytes_for, ensure_changelog
from spacenet.stream.config import ServiceConfig, state_path
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.kafka_config import (
    KafkaSettings,
    ensure_topics,
    partition_count,
    training_consumer_options,
    wait_for_broker,
)
from spacenet.stream.learner import Learner
from spacenet.stream.loop import Loop
from spacenet.stream.observability.telemetry import Telemetry
from spacenet.stream.predict import PredictionWorker
from spacenet.stream.state_store import ChangelogStates, LocalStates, StateStore
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
        self.loop: Loop | None = None
        self.predictions: PredictionWorker | None = None
        self.status_ = "starting"  # what /readyz says before the loop runs

    def stop(self) -> None:
        self.stop_.set()
        if self.loop is not None:
            self.loop.stop()

    def _healthy(self) -> bool:
        """The poll loop runs and the prediction worker has not failed (``/healthz``)."""
        loop_ok = self.loop is None or self.loop.healthy
        return loop_ok and (self.predictions is None or self.predictions.error_ is None)

    def _topics(self) -> int:
        """Create the topics that are missing; returns the training topic's partition count.
        Requests and predictions are co-partitioned with the training topic."""
        cfg = self.cfg
        ensure_topics(self.kafka, [cfg.topic])
        partitions = partition_count(self.kafka, cfg.topic)
        ensure_topics(self.kafka, [cfg.requests_topic, cfg.predictions_topic], partitions=partitions)
        ensure_topics(self.kafka, [cfg.models_topic, cfg.dead_letter_topic])
        requests = partition_count(self.kafka, cfg.requests_topic)
        if requests < partitions:
            log.warning(
                "%s has %d partitions, %s %d: streams from %d on get no prediction requests",
                cfg.requests_topic,
                requests,
                cfg.topic,
                partitions,
                requests,
            )
        return partitions

    def _store(self, producer: Any, max_request_bytes: int, partitions: int) -> StateStore:
        from kafka import KafkaConsumer

        cfg = self.cfg
        local = LocalStates(state_path(cfg) / "checkpoints", keep=cfg.keep_checkpoints)
        if not cfg.changelog:
            return local
        found, max_message_bytes = ensure_changelog(self.kafka, cfg.changelog_topic, partitions)
        fetch = max(max_message_bytes, 1 << 20) + (1 << 20)
        reader = KafkaConsumer(
            **self.kafka.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=fetch,
            fetch_max_bytes=max(fetch, 64 << 20),
        )
        chunk = chunk_bytes_for(max_message_bytes, max_request_bytes)
        changelog = Changelog(cfg.changelog_topic, producer, reader, found, chunk)
        log.info("state in %s (%d partitions, chunks of %d bytes)", cfg.changelog_topic, found, chunk)
        return ChangelogStates(changelog, local)

    def run(self) -> int:
        from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer

        cfg = self.cfg
        log.info("starting with %s; kafka %s", cfg.redacted(), self.kafka)
        spare = [Learner(cfg)]  # the first stream's: its device and layers name the metrics
        learner = spare[0]
        telemetry = Telemetry(
            self.registry,
            device=str(learner.device),
            device_name=learner.device_name,
            layers=learner.spacenet.layer_names_,
            checkpoint_max_age_s=cfg.checkpoint_max_age_s,
        )
        http = telemetry.serve_http(
            cfg.metrics_host,
            cfg.metrics_port,
            ready=lambda: self.loop.ready if self.loop else (False, self.status_),
            health=self._healthy,
        )
        self.status_ = f"waiting for a Kafka broker at {self.kafka.bootstrap}"
        try:
            if not wait_for_broker(self.kafka, self.stop_, cfg.broker_wait_s):
                return 0  # stopped while waiting
        except BaseException:
            if http is not None:
                http.stop()
            raise
        self.status_ = "starting"
        partitions = self._topics()
        client = self.kafka.client_kwargs()
        max_request_bytes = max(cfg.max_message_bytes * 2, 1 << 20)
        producer = KafkaProducer(**client, max_request_size=max_request_bytes, linger_ms=5)
        store = self._store(producer, max_request_bytes, partitions)
        consumer = KafkaConsumer(**client, group_id=cfg.group, **training_consumer_options(cfg))
        dead_letters = DeadLetters(producer.send, cfg.dead_letter_topic, telemetry.metrics)
        self.predictions = PredictionWorker(
            KafkaConsumer(
                **client,
                group_id=f"{cfg.group}.predict",
                auto_offset_reset="earliest",
                enable_auto_commit=True,
            ),
            producer,
            cfg.requests_topic,
            cfg.predictions_topic,
            dead_letters=dead_letters,
            limits=wire.WireLimits(
                max_message_bytes=cfg.max_message_bytes,
                max_records=cfg.max_records_per_message,
                expected_shape=tuple(cfg.input_shape),
                require_label=False,
            ),
            on_request=lambda n, seconds: telemetry.metrics.prediction(seconds, records=n),
        )

        def make_unit(partition: int) -> StreamUnit:
            return StreamUnit(cfg, telemetry, dead_letters, partition, spare.pop() if spare else None)

        loop = Loop(cfg, consumer, producer, telemetry, make_unit, store, self.predictions)
        self.loop = loop
        if self.stop_.is_set():
            loop.stop()

        class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                loop.on_revoked(sorted(revoked))

            def on_partitions_assigned(self, assigned: Any) -> None:
                loop.on_assigned(sorted(assigned))

            def on_partitions_lost(self, lost: Any) -> None:
                loop.on_lost(sorted(lost))

        consumer.subscribe([cfg.topic], listener=Rebalance())
        self.predictions.start()
        try:
            return int(loop.run())
        finally:
            self.predictions.stop()
            producer.flush()
            producer.close()
            if http is not None:
                http.stop()
