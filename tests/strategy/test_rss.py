"""Resident memory of a process, now and at its peak."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spacenet.strategy.rss import peak_rss_bytes, rss_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def _current_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_rss_and_peak_of_this_process() -> None:
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
    now, peak = rss_bytes(), peak_rss_bytes()
    assert now is not None and peak is not None
    assert peak >= now > block.nbytes


def test_peak_rss_bytes_is_at_least_the_current_rss() -> None:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
    peak = peak_rss_bytes()
    assert peak is not None and peak >= _current_rss_bytes() > block.numel()


def test_unknown_process_is_none() -> None:
    assert rss_bytes(pid=2**22 + 1) is None  # above Linux's largest pid
    assert peak_rss_bytes(pid=2**22 + 1) is None
