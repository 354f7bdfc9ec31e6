"""Prediction serving: requests topic in, predictions topic out, with the stream and model version.

The requests topic is co-partitioned with the training topic: a request on partition ``p``
is answered by the model of stream ``p`` (the training topic's partition ``p``), in the
process that learns that stream. A request is a wire-v1 message whose labels may be absent.
The reply, keyed like the request, is one Arrow IPC stream with one batch: ``prediction``
(int64, the predicted label, -1 while no class is known), ``score`` (float32, the softmax
probability of the predicted class over the known classes) and, when the request had
labels, ``label``. It goes to the same partition of the predictions topic (when that topic
has it). Headers: ``spacenet-stream`` and ``spacenet-model-version`` (ASCII ints) and the
request's partition/offset as ``spacenet-request``. A request that does not decode
goes to the dead-letter topic like any bad record.

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
STREAM_HEADER = "spacenet-stream"
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
    """Serves requests from its own consumer in a thread, for the streams it is told to.

    ``serve(stream, predictor)`` (the loop calls it when it takes a stream on and when it
    publishes a model) makes the worker read partition ``stream`` of ``requests_topic`` and
    answer with ``predictor`` (None: no model yet); swapping it is atomic, so training never
    blocks serving. ``release(stream)`` stops that: the worker commits the partition's
    position (group ``<group>.predict``, for the stream's next owner) and unassigns it. Until
    then it keeps answering with the stream's last published model.
    """

    def __init__(
        self,
        consumer: Any,
        producer: Any,
        requests_topic: str,
        predictions_topic: str,
        dead_letters: DeadLetters,
        limits: wire.WireLimits,
        on_request: Callable[[int, float], None] | None = None,
        poll_timeout_ms: int = 200,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.requests_topic = requests_topic
        self.predictions_topic = predictions_topic
        self.dead_letters = dead_letters
        self.limits = limits
        self.on_request = on_request
        self.poll_timeout_ms = poll_timeout_ms
        self.stop_ = threading.Event()
        self.served_ = 0
        self.error_: BaseException | None = None
        self._models: dict[int, Predictor | None] = {}  # of the streams assigned; the worker thread's
        self._wanted: dict[int, Predictor | None] = {}  # what the loop asks for, under the lock
        self._lock = threading.Lock()
        self._reply_partitions: set[int] | None = None  # of the predictions topic
        self._thread = threading.Thread(target=self._run, name="spacenet-predict", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def serve(self, stream: int, predictor: Predictor | None) -> None:
        """Answer stream ``stream``'s requests with ``predictor`` from now on."""
        with self._lock:
            self._wanted[stream] = predictor

    def release(self, stream: int) -> None:
        """Stop answering stream ``stream``'s requests (another process will)."""
        with self._lock:
            self._wanted.pop(stream, None)

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
                self._follow()
                if not self._models:
                    self.stop_.wait(self.poll_timeout_ms / 1000)
                    continue
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

    def _follow(self) -> None:
        """Take the loop's streams over: assign the new ones' partitions, hand the released
        ones' over with their positions committed, take newly published models."""
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata, TopicPartition

        with self._lock:
            wanted = dict(self._wanted)
        if wanted.keys() == self._models.keys():
            self._models = wanted
            return
        released = [TopicPartition(self.requests_topic, s) for s in self._models.keys() - wanted.keys()]
        if released:
            self.producer.flush()  # the replies before the positions that cover them
            try:
                positions = {tp: OffsetAndMetadata(self.consumer.position(tp), "", -1) for tp in released}
                self.consumer.commit(positions)
            except KafkaError as e:  # the next owner answers from the last commit: some twice
                log.warning("committing the positions of released request partitions failed: %s", e)
        self.consumer.assign([TopicPartition(self.requests_topic, s) for s in sorted(wanted)])
        self._models = wanted
        log.info("serving prediction requests of streams %s of %s", sorted(wanted), self.requests_topic)

    def handle(self, msg: Any) -> None:
        start = time.perf_counter()
        try:
            decoded = wire.decode(msg.value, msg.headers, self.limits)
        except wire.WireError as e:
            self.dead_letters.message(msg, e.reason.value, e.detail)
            return
        if decoded.is_control:
            return
        with self._lock:  # the newest model, even if published while this request was polled
            predictor = self._wanted.get(msg.partition, self._models.get(msg.partition))
        n = decoded.num_records
        if predictor is None:
            labels, scores, version = np.full(n, -1, np.int64), np.zeros(n, np.float32), 0
        else:
            pred = predictor.predict(decoded.features)
            labels, scores, version = pred.labels.numpy(), pred.scores.numpy(), predictor.version
        headers = [
            (STREAM_HEADER, str(msg.partition).encode()),
            (MODEL_VERSION_HEADER, str(version).encode()),
            (REQUEST_HEADER, f"{msg.partition}:{msg.offset}".encode()),
        ]
        if self._reply_partitions is None:
            self._reply_partitions = set(self.producer.partitions_for(self.predictions_topic) or ())
        self.producer.send(
            self.predictions_topic,
            partition=msg.partition if msg.partition in self._reply_partitions else None,
            key=msg.key,
            value=encode_reply(labels, scores, decoded.labels),
            headers=headers,
        )
        self.served_ += n
        if self.on_request is not None:
            self.on_request(n, time.perf_counter() - start)
