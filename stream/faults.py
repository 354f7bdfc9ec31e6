"""Crash points for fault-injection tests, armed only through ``SPACENET_CRASH_AT``.

A test starts the service with ``SPACENET_CRASH_AT=<point>`` (optionally
``<point>:<n>`` to crash at the n-th time the point is reached); the process then
dies there with ``os._exit(137)``, as abruptly as ``kill -9``: no cleanup, no flush.
The variable is read once, when this module is imported; unset, a call returns at once.

Points: ``checkpoint_mid_write`` (half of the checkpoint file written),
``changelog_mid_write`` (a checkpoint's chunks on the changelog topic, not its manifest),
``after_checkpoint`` (checkpoint written, offsets not yet committed),
``training`` (inside a training step), ``buffering`` (after records were buffered).

    >>> maybe_crash("training")   # unarmed: returns
"""

from __future__ import annotations

import os
from collections import Counter
from typing import IO, Any

ENV = "SPACENET_CRASH_AT"
_hits: Counter[str] = Counter()
_ARMED = os.environ.get(ENV)  # read once, at import: tests arm a child process's environment


def maybe_crash(point: str, file: IO[Any] | None = None) -> None:
    armed = _ARMED
    if not armed:
        return
    name, _, nth = armed.partition(":")
    if name != point:
        return
    _hits[point] += 1
    if _hits[point] < int(nth or 1):
        return
    if file is not None:
        file.flush()
        os.fsync(file.fileno())
    os._exit(137)
