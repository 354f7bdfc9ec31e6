"""Reading a process's memory figures from /proc."""

from __future__ import annotations

import doctest
import sys

import numpy as np
import pytest

from spacenet.stream import procfs
from spacenet.stream.procfs import status_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def test_doctests() -> None:
    assert doctest.testmod(procfs).failed == 0


def test_rss_and_peak_of_this_process() -> None:
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
    rss, peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    assert rss is not None and peak is not None
    assert peak >= rss > block.nbytes


def test_unknown_field_or_process_is_none() -> None:
    assert status_bytes("NoSuchField") is None
    assert status_bytes("VmRSS", pid=2**22 + 1) is None  # above Linux's largest pid
