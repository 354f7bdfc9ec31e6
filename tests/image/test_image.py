"""The built image end to end (``make image-test``; deselected from the default run).

Against the project's local Kafka broker on the host (the ``kafka_bootstrap`` fixture), with
the image ``make image`` built ($SPACENET_IMAGE, default localhost/spacenet-stream:cpu):

1. ``spacenet serve`` runs in a hardened container, its state in a named volume; the image's
   own ``spacenet produce`` (a second container) streams a 3-task split-MNIST slice.
2. Once the models are announced: ``/healthz``, ``/readyz``, ``/metrics``, ``podman healthcheck
   run``, and prediction replies from the model; uid 10001, read-only root, no capabilities.
3. ``podman stop`` (SIGTERM): a clean exit, and the checkpoint in the volume at the committed
   offsets.
4. A new container on the same volume resumes at those offsets: the same model version, no
   training step, nothing consumed again, no model announced, predictions still answered.

Start-to-ready times and the time to learn are printed (run with ``-s``); none is asserted.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spacenet.strategy.data import default_seed_dir
from spacenet.stream import wire
from spacenet.stream.checkpoint import CheckpointStore
from spacenet.stream.predict import MODEL_VERSION_HEADER, decode_reply
from spacenet.stream.tools.produce import load_dataset
from tests.support.container import HARDENING, IMAGE, ContainerService, http_status, podman, volume_path
from tests.support.service import (
    Message,
    Samples,
    TopicFollower,
    committed_offset,
    create_topics,
    header,
    make_producer,
    send_all,
    start_assigned,
    unique_name,
    wait_for_models,
)

pytestmark = [pytest.mark.image, pytest.mark.timeout(1200)]

TASKS = [[0, 1], [2, 3], [4, 5]]
PER_CLASS = 500  # records of each class streamed
# The image's defaults, but smaller batches and a larger step: 450 training records a class
# learn in 4 epochs (the paper's batch 128 and lr 0.01 give 32 steps a task: too few).
TRAINING = {"batch_size": "32", "lr": "0.1"}
PROBES_PER_CLASS = 50  # MNIST test records of each class sent as prediction requests
UID = "10001"


@pytest.fixture(scope="module", autouse=True)
def image_built() -> None:
    if shutil.which("podman") is None or podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: build it with `make image` (make image-test does)")


@pytest.fixture
def volume() -> Iterator[str]:
    name = unique_name("spacenet-image-state")
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


def produce(bootstrap: str, topic: str) -> str:
    """The image's own ``spacenet produce``, hardened too, MNIST seeded read-only from the
    checkout's dataset mirror (``SPACENET_DATA_SEED``) into a tmpfs at /data (its data root)."""
    seed = default_seed_dir()
    mounts = ["--volume", f"{seed}:/seed:ro", "--env", "SPACENET_DATA_SEED=/seed"] if seed else []
    order = ",".join(str(c) for task in TASKS for c in task)
    args = ["--topic", topic, "--bootstrap", bootstrap, "--markers", "--class-order", order]
    args += ["--limit-per-class", str(PER_CLASS), "--timeout", "60"]
    # U: the tmpfs belongs to the container's user (podman gives it the image folder's mode,
    # 0750, with root as owner); no health check: produce has no endpoint.
    run = [
        "run",
        "--rm",
        "--network",
        "host",
        *HARDENING,
        "--tmpfs",
        "/data:rw,U",
        "--no-healthcheck",
        *mounts,
    ]
    result = podman(*run, IMAGE, "produce", "--dataset", "split_mnist", *args, timeout_s=600)
    return result.stdout


def probes() -> tuple[np.ndarray, np.ndarray]:
    """The first ``PROBES_PER_CLASS`` MNIST test records of each class learned."""
    x, y, _ = load_dataset("split_mnist", train=False)
    rows = np.concatenate([np.flatnonzero(y == c)[:PROBES_PER_CLASS] for task in TASKS for c in task])
    return x[rows], y[rows]


def predict(bootstrap: str, producer: Any, topic: str, key: bytes, x: np.ndarray, y: np.ndarray) -> Any:
    """Send ``x`` (with labels) as one request keyed ``key``: (predictions, labels, model versions)."""

    def answered(messages: list[Any]) -> bool:
        return any(m.key == key for m in messages)

    send_all(producer, f"{topic}.requests", [Message(wire.encode(x, y), key, records=len(y))])
    with TopicFollower(bootstrap, f"{topic}.predictions") as replies:
        replies.wait_until(answered, 120, what="a prediction reply")
        (reply,) = [m for m in replies.messages if m.key == key]
    decoded = decode_reply(reply.value)
    return decoded["prediction"], decoded["label"], (header(reply, MODEL_VERSION_HEADER) or b"").decode()


def value(metrics: Samples, metric: str, /, **labels: str) -> float:
    return metrics.get((metric, frozenset(labels.items())), 0.0)


def check_hardening(svc: ContainerService) -> None:
    """What docs/deployment.md claims: uid/gid 10001, read-only root, no capabilities."""
    assert svc.exec("id", "-u").stdout.strip() == UID and svc.exec("id", "-g").stdout.strip() == UID
    assert svc.inspect("{{.Config.User}}") == f"{UID}:{UID}"
    write = svc.exec("touch", "/opt/venv/probe", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    assert svc.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    status = svc.exec("cat", "/proc/1/status").stdout  # pid 1 is `spacenet serve` itself
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert re.search(rf"^{field}:\s+0+$", status, re.M), f"{field} not empty:\n{status}"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert "/tmp " in svc.exec("sh", "-c", "grep tmpfs /proc/mounts").stdout


def test_image_learns_stops_cleanly_and_resumes_from_its_volume(
    kafka_bootstrap: str, volume: str, tmp_path: Path
) -> None:
    topic = unique_name("image")
    create_topics(kafka_bootstrap, topic)
    settings = {
        **TRAINING,
        "bootstrap": kafka_bootstrap,
        "topic": topic,
        "group": f"{topic}-g",
        "metrics_host": "127.0.0.1",
    }
    producer = make_producer(kafka_bootstrap)
    x_probe, y_probe = probes()
    models = TopicFollower(kafka_bootstrap, f"{topic}.models")
    try:
        # ---- 1-2: learn three tasks, then every check on the running container
        first = start_assigned(lambda: ContainerService(settings, tmp_path / "serve-1.log", volume))
        try:
            check_hardening(first)
            started = time.monotonic()
            print(produce(kafka_bootstrap, topic).strip())
            events = wait_for_models(models, len(TASKS), first, timeout_s=900)
            learn_s = time.monotonic() - started
            assert [e["new_classes"] for e in events] == TASKS
            assert [e["model_version"] for e in events] == [1, 2, 3]
            port = first.metrics_port
            assert (http_status(port, "/healthz"), http_status(port, "/readyz")) == (200, 200)
            assert podman("healthcheck", "run", first.name).returncode == 0
            metrics = first.metrics()
            assert value(metrics, "spacenet_model_version", stream="0") == 3
            consumed = value(metrics, "spacenet_records_consumed_total", topic=topic, partition="0")
            assert consumed == len(TASKS) * 2 * PER_CLASS
            assert value(metrics, "spacenet_device_info", device="cpu", name="") == 1
            predicted, labels, version = predict(kafka_bootstrap, producer, topic, b"p1", x_probe, y_probe)
            assert version == "3" and labels.tolist() == y_probe.tolist()
            assert set(predicted.tolist()) <= {c for task in TASKS for c in task}
            accuracy = float((predicted == labels).mean())
            assert accuracy > 0.5, f"accuracy {accuracy:.3f} on {len(labels)} test records"
            # ---- 3: SIGTERM, a clean stop, the checkpoint in the volume at the committed offsets
            assert first.stop() == 0, first.log_tail()
        finally:
            first.remove()
        assert "stream 0: published model version 3" in first.log_tail(200)
        assert "signal 15: stopping" in first.log_tail(200)
        # The state dir caches each stream's checkpoints (the changelog topic is the record).
        found = CheckpointStore(volume_path(volume) / "checkpoints" / "partition-0").latest()
        assert found is not None and found[0] == 3
        checkpoint_file = volume_path(volume) / "checkpoints" / "partition-0" / "ckpt-00000003.pt"
        assert checkpoint_file.stat().st_uid == int(UID)
        position = int(found[1]["positions"]["0"])
        assert committed_offset(kafka_bootstrap, settings["group"], topic) == position > 0

        # ---- 4: a new container on the same volume resumes there, without retraining
        second = start_assigned(lambda: ContainerService(settings, tmp_path / "serve-2.log", volume))
        try:
            assert f"stream 0 taken on at offset {position} (model version 3, restored in" in second.log_tail(
                500
            )
            assert http_status(second.metrics_port, "/readyz") == 200
            predicted, labels, version = predict(kafka_bootstrap, producer, topic, b"p2", x_probe, y_probe)
            assert version == "3" and float((predicted == labels).mean()) == accuracy
            metrics = second.metrics()
            assert value(metrics, "spacenet_model_version", stream="0") == 3
            assert value(metrics, "spacenet_training_steps_total") == 0
            assert value(metrics, "spacenet_records_consumed_total", topic=topic, partition="0") == 0
            models.poll(timeout_ms=2000)
            assert len(models.messages) == len(TASKS), "a model was announced again"
            assert second.stop() == 0, second.log_tail()
        finally:
            second.remove()
        assert committed_offset(kafka_bootstrap, settings["group"], topic) == position
    finally:
        models.close()
        producer.close(timeout=10)
    print(
        f"\nimage {IMAGE}: start to ready {first.ready_s:.1f} s (fresh volume), "
        f"{second.ready_s:.1f} s (restored); 3 tasks streamed and learned in {learn_s:.1f} s; "
        f"test accuracy on {len(y_probe)} records {accuracy:.3f}"
    )
