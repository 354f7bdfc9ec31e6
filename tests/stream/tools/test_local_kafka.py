"""Lifecycle of the local broker in stream/tools/local_kafka.py: clear errors, no survivors."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from spacenet.stream.tools import local_kafka

LocalKafka = local_kafka.LocalKafka
KafkaError = local_kafka.KafkaError

# These tests start their own broker rather than use the session one.
pytestmark = pytest.mark.kafka


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(240)
def test_start_stop_leaves_no_jvm_and_second_stop_raises(tmp_path: Path) -> None:
    run_dir = tmp_path / "broker"
    broker = LocalKafka(run_dir)
    started = time.monotonic()
    try:
        bootstrap = broker.start()
        print(f"broker ready in {time.monotonic() - started:.1f}s at {bootstrap}")
        pid = broker.running_pid()
        assert pid is not None and _pid_alive(pid)
        assert bootstrap == f"127.0.0.1:{broker.port}"
        assert broker.bootstrap_file.read_text().strip() == bootstrap
        assert pid in _processes_mentioning(str(run_dir))

        with pytest.raises(KafkaError, match="already running"):
            broker.start()
        assert broker.running_pid() == pid, "a refused second start must not touch the running broker"
    finally:
        if broker.running_pid() is not None:
            broker.stop()

    assert not _pid_alive(pid)
    assert _processes_mentioning(str(run_dir)) == []
    assert not broker.pid_file.exists()
    assert not broker.bootstrap_file.exists()

    before = time.monotonic()
    with pytest.raises(KafkaError, match="no broker is running"):
        broker.stop()
    assert time.monotonic() - before < 5.0


@pytest.mark.parametrize("which", ["port", "controller_port"])
def test_start_on_a_busy_port_fails_fast_and_starts_nothing(tmp_path: Path, which: str) -> None:
    run_dir = tmp_path / "broker"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        broker = LocalKafka(run_dir, **{which: port})
        before = time.monotonic()
        with pytest.raises(KafkaError, match=f"port {port} on 127.0.0.1 is already in use"):
            broker.start()
        assert time.monotonic() - before < 5.0
    assert broker.running_pid() is None
    assert _processes_mentioning(str(run_dir)) == []


@pytest.mark.timeout(300)
def test_restart_with_kept_data_serves_the_same_topic_on_the_same_port(tmp_path: Path) -> None:
    """``start(keep_data=True)`` after ``stop()``: same address, the messages and the
    group's committed offset survive, and readiness is judged on the new start's log."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    run_dir = tmp_path / "broker"
    broker = LocalKafka(run_dir)
    with pytest.raises(KafkaError, match="no formatted data dir"):
        broker.start(keep_data=True)
    tp = TopicPartition("kept", 0)
    try:
        bootstrap = broker.start()
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for i in range(3):
            producer.send("kept", value=f"m{i}".encode(), partition=0).get(timeout=60)
        producer.close()
        group = KafkaConsumer(bootstrap_servers=bootstrap, group_id="g", enable_auto_commit=False)
        group.assign([tp])
        group.commit({tp: OffsetAndMetadata(2, "", -1)})
        group.close(autocommit=False)
        broker.stop()
        assert broker.running_pid() is None

        started = time.monotonic()
        assert broker.start(keep_data=True) == bootstrap
        print(f"broker restarted in {time.monotonic() - started:.1f}s")
        reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id="g", enable_auto_commit=False)
        reader.assign([tp])
        assert reader.committed(tp) == 2
        reader.seek_to_beginning(tp)
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(values) < 3 and time.monotonic() < deadline:
            values += [m.value for batch in reader.poll(timeout_ms=500).values() for m in batch]
        reader.close(autocommit=False)
        assert values == [b"m0", b"m1", b"m2"]
    finally:
        if broker.running_pid() is not None:
            broker.stop()
    assert _processes_mentioning(str(run_dir)) == []
