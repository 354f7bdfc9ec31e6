"""Many class-incremental streams on the partitions of one topic, for the tests of issue 14.

Stream ``p`` (partition ``p``) learns its own class order: the classes 0..9 shuffled by
``p``, cut into tasks of two. ``stream_labels`` gives its labels, ``stream_messages`` its
messages; ``StreamEvents`` reads the models topic back per stream (announcements are at
least once: a version announced twice counts once, and must say the same both times);
``handovers`` reads the service's log lines of taking streams on and handing them over.

    >>> stream_tasks(0, tasks=3)
    [[3, 7], [2, 5], [1, 6]]
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.support.service import Message, chunk, shuffled_task, synthetic_images

LINE = re.compile(r"^(\S+ \S+) INFO spacenet\.stream\.loop: stream (\d+):? (.*)$")


def stream_tasks(stream: int, tasks: int) -> list[list[int]]:
    """Stream ``stream``'s tasks: its class order cut in pairs."""
    order = np.random.default_rng(100 + stream).permutation(10).tolist()
    return [sorted(order[2 * t : 2 * t + 2]) for t in range(tasks)]


def stream_classes(stream: int, tasks: int) -> list[int]:
    """Every class stream ``stream`` learns, in its order."""
    return [c for task in stream_tasks(stream, tasks) for c in task]


def stream_labels(stream: int, tasks: int, per_class: int) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(stream)
    return np.concatenate([shuffled_task(c, per_class, rng) for c in stream_tasks(stream, tasks)])


def stream_messages(stream: int, labels: npt.NDArray[np.int64], per_message: int = 20) -> list[Message]:
    return chunk(synthetic_images(labels, seed=stream), labels, per_message=per_message)


def expected_steps(event: dict[str, Any], task_records: Sequence[int], epochs: int, batch: int) -> int:
    """Optimizer steps when each task trains once on all its records but its held-out sample."""
    held_out = event["accuracy"]["n_samples"][-1]
    return sum(epochs * math.ceil((n - held_out[t]) / batch) for t, n in enumerate(task_records))


@dataclass
class StreamEvents:
    """The models topic's announcements, by stream and version."""

    by_stream: dict[int, dict[int, dict[str, Any]]]

    @classmethod
    def of(cls, messages: Iterable[Any]) -> StreamEvents:
        by_stream: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
        for msg in messages:
            event = json.loads(msg.value)
            seen = by_stream[event["stream"]].setdefault(event["model_version"], event)
            same = ("classes", "steps", "tasks_learned", "accuracy")
            assert all(seen[k] == event[k] for k in same), f"version {event['model_version']} changed"
        return cls(dict(by_stream))

    def learned(self, stream: int) -> int:
        versions = self.by_stream.get(stream, {})
        return max((e["tasks_learned"] for e in versions.values()), default=0)

    def tasks(self, stream: int) -> list[list[int]]:
        """The classes each version added, in version order (versions must run 1, 2, ...)."""
        versions = self.by_stream[stream]
        assert sorted(versions) == list(range(1, len(versions) + 1)), sorted(versions)
        known: set[int] = set()
        out = []
        for v in sorted(versions):
            classes = set(versions[v]["classes"])
            out.append(sorted(classes - known))
            known |= classes
        return out

    def last(self, stream: int) -> dict[str, Any]:
        versions = self.by_stream[stream]
        return versions[max(versions)]


@dataclass(frozen=True)
class Handover:
    stream: int
    at: float  # Unix time of the log line
    what: str  # "taken on", "handed over", "first message"
    offset: int | None
    seconds: float  # what the line reports it took


def handovers(log_text: str) -> list[Handover]:
    """The service's take-on, hand-over and first-message lines, in order."""
    out = []
    for line in log_text.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        stamp, stream, rest = m.groups()
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        offset = re.search(r"offset (\d+)", rest)
        took = re.search(r"in (\d+\.\d+) s", rest)
        for what in ("taken on", "handed over", "first message"):
            if rest.startswith(what):
                number = int(offset.group(1)) if offset else None
                out.append(Handover(int(stream), at, what, number, float(took.group(1)) if took else 0.0))
    return out


def owned(log_text: str) -> set[int]:
    """The streams a process learns now, by its log."""
    streams: set[int] = set()
    for h in handovers(log_text):
        if h.what == "taken on":
            streams.add(h.stream)
        elif h.what == "handed over":
            streams.discard(h.stream)
    return streams
