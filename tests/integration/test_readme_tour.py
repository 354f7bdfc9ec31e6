"""The README's service tour, run exactly as the README shows it (between its tour markers)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from spacenet.stream.tools import local_kafka
from tests.support import REPO_ROOT


def tour_commands() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- tour:start -->\n```bash\n(.*?)```\n<!-- tour:end -->", text, re.S)
    assert block, "README.md has no ```bash block between <!-- tour:start --> and <!-- tour:end -->"
    return block.group(1)


def test_the_tour_is_one_bash_block_with_no_job_control() -> None:
    commands = tour_commands()
    assert "%1" not in commands and "spacenet serve" in commands and "spacenet predict" in commands
    assert "\nspacenet " not in "\n" + commands, (
        "call .venv/bin/spacenet: the tour does not activate the venv"
    )


@pytest.mark.kafka
@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    if not local_kafka.port_is_free(9109):
        pytest.skip("the tour's metrics port 9109 is taken on this machine")
    local_kafka.fetch_jars()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPACENET_BOOTSTRAP")}
    env["TMPDIR"] = str(tmp_path)  # where the tour's mktemp -d puts its files
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", tour_commands()],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = re.search(r"^10000 records, stream 0, model version 5, accuracy (0\.\d+)$", proc.stdout, re.M)
    assert summary, out[-4000:]
    assert float(summary.group(1)) > 0.9  # task inference on a 1000-a-class slice: about 0.95
    (serve_log,) = tmp_path.glob("*/serve.log")
    log = serve_log.read_text()
    assert " INFO spacenet." in log and " INFO kafka." not in log  # kafka-python's INFO lines are off
    free = r'^spacenet_layer_free_neurons\{layer="[^"]*hidden\.0",stream="0"\} \d'
    assert re.search(free, proc.stdout, re.M), out[-3000:]
