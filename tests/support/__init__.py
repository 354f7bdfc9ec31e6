"""Helpers shared by the tests: real services started as subprocesses, never mocks."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
