"""Prediction serving: requests topic in, predictions topic out, with the model version.

A request is a wire-v1 message whose labels may be absent. The reply, keyed like the
request, is one Arrow IPC stream with one batch: ``prediction`` (int64, the predicted
label, -1 while no class is known), ``score`` (float32, the softmax probability of
the predicted class over the known classes) and, when the request had labels,
``label``. Headers: ``spacenet-model-version`` (ASCII int) and the request's
partition/offset as ``spacenet-request``. A request that does not decode goes to the
dead-letter topic like any bad record.

    >>> reply = encode_reply(np.array([3]), np.array([0.9], np.float32), None)
    >>> decode_reply(reply)["prediction"].tolist()
    [3]
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from spacenet.stream import wire
from spacenet.stream.dead_letters import DeadLetters
from spacenet.stream.learner import Predictor

log = logging.getLogger(__name__)
MODEL_VERSION_HEADER = "spacenet-model-version"
REQUEST_HEADER = "spacenet-request"
RETRY_S = 1.0  # wait after a failed poll (broker unreachable) before the next


def encode_reply(
    prediction: npt.NDArray[np.int64], score: npt.NDArray[np.float32], label: npt.NDArray[np.int64] | None
) -> bytes:
    cols = {"prediction": pa.array(prediction, pa.int64()), "score": pa.array(score, pa.float32())}
    if label is not None:
        cols["label"] = pa.array(label, pa.int64())
    batch = pa.record_batch(cols)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def decode_reply(value: bytes) -> dict[str, npt.NDArray[Any]]:
    table = pa.ipc.open_stream(value).read_all()
    return {name: table.column(name).to_numpy() for name in table.column_names}


class PredictionWorker:
    """Serves requests from its own consumer (group ``<group>.predict``) in a thread.

    ``model_source`` returns the last published ``Predictor`` (or None before the
    first model); swapping it is atomic, so training never blocks serving.
    """

    def __init__(
        self,
        consumer: Any,
        producer: Any,
        predictions_topic: str,
        dead_letters: DeadLetters,
        model_source: Callable[[], Predictor | None],
        limits: wire.WireLimits,
        on_request: Callable[[int, float], None] | None = None,
        poll_timeout_ms: int = 200,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.predictions_topic = predictions_topic
        self.dead_letters = dead_letters
        self.model_source = model_source
        self.limits = limits
        self.on_request = on_request
        self.poll_timeout_ms = poll_timeout_ms
        self.stop_ = threading.Event()
        self.served_ = 0
        self.error_: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spacenet-predict", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        from kafka.errors import KafkaError

        try:
            while not self.stop_.is_set():
                try:
                    polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
                except KafkaError as e:
                    # The broker is away (restarting, unreachable): the client reconnects on
                    # the next poll; giving up here would end prediction serving for good.
                    log.warning("prediction consumer: %s; polling again in %.0f s", e, RETRY_S)
                    self.stop_.wait(RETRY_S)
                    continue
                for messages in polled.values():
                    for msg in messages:
                        self.handle(msg)
        except BaseException as e:  # reported through health; the service decides
            log.exception("prediction worker failed")
            self.error_ = e
        finally:
            self.consumer.close()

    def handle(self, msg: Any) -> None:
        start = time.perf_counter()
        try:
            decoded = wire.decode(msg.value, msg.headers, self.limits)
        except wire.WireError as e:
            self.dead_letters.message(msg, e.reason.value, e.detail)
            return
        if decoded.is_control:
            return
        predictor = self.model_source()
        n = decoded.num_records
        if predictor is None:
            labels, scores, version = np.full(n, -1, np.int64), np.zeros(n, np.float32), 0
        else:
            pred = predictor.predict(decoded.features)
            labels, scores, version = pred.labels.numpy(), pred.scores.numpy(), predictor.version
        headers = [
            (MODEL_VERSION_HEADER, str(version).encode()),
            (REQUEST_HEADER, f"{msg.partition}:{msg.offset}".encode()),
        ]
        self.producer.send(
            self.predictions_topic,
            key=msg.key,
            value=encode_reply(labels, scores, decoded.labels),
            headers=headers,
        )
        self.served_ += n
        if self.on_request is not None:
            self.on_request(n, time.perf_counter() - start)
