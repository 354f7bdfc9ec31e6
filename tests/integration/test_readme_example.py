"""The README's Python example, run exactly as the README shows it (between its markers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT


def example_code() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- example:start -->\n```python\n(.*?)```\n<!-- example:end -->", text, re.S)
    assert block, "README.md has no ```python block between <!-- example:start --> and <!-- example:end -->"
    return block.group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", example_code()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    accuracy = re.search(r"^accuracy (0\.\d+)$", proc.stdout, re.M)
    assert accuracy and 0.6 < float(accuracy.group(1)) < 0.8, proc.stdout[-2000:]  # faithful SpaceNet: ~0.7
    assert "tasks learned 5" in proc.stdout and proc.stdout.rstrip().endswith("\n5")
    # the sparse state, weights included: under 0.3x the dense float32 model (1.9 MB)
    assert (tmp_path / "ckpt.pt").stat().st_size < 0.3 * 1_913_640
    assert "initial weights differ" not in proc.stderr  # model2 was built as model was
