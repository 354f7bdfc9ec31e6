"""Memory figures of a Linux process, read from ``/proc/<pid>/status``.

>>> rss = status_bytes("VmRSS")            # this process
>>> rss is None or rss > 0                 # None off Linux
True
"""

from __future__ import annotations

from pathlib import Path


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """``field`` (``VmRSS``, ``VmHWM``: peak RSS, ...) of process ``pid`` in bytes; None
    where it cannot be read (not Linux, process gone, no such field)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
