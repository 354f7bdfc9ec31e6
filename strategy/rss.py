"""Resident memory of a process: now (psutil) and at its peak (Linux ``VmHWM``).

The benchmark runner reports each run's peak, ``spacenet demo`` the service's and
``spacenet ingest-bench`` each path's; all read it here.

    >>> now, peak = rss_bytes(), peak_rss_bytes()
    >>> now > 0 and peak >= now
    True
    >>> rss_bytes(pid=2**22 + 1) is None       # no such process (above Linux's largest pid)
    True
"""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

import psutil


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size of process ``pid`` (default: this one) now; None when it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def peak_rss_bytes(pid: int | None = None) -> int | None:
    """Peak resident set size of process ``pid`` (default: this one); None where unknown.

    Linux: ``VmHWM`` from ``/proc/<pid>/status`` (psutil does not expose it there).
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used on Linux because a spawned child
    inherits its parent's peak through exec: a child of a 1.5 GB parent reports 1.5 GB
    before it allocates anything. Elsewhere, for this process only: ``ru_maxrss`` (KiB
    on Linux and BSD, bytes on macOS).
    """
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid is not None or sys.platform.startswith("linux"):
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Restart this process's ``VmHWM`` from its current RSS (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``): after a task
    trains, the memory its batches and gradients took is free but stays resident otherwise.
    False where there is no glibc.

    >>> isinstance(trim_heap(), bool)
    True
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))
