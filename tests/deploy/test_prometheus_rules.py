"""deploy/prometheus: the config and rules pass promtool, and every alert is unit-tested."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "spacenet.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "spacenet_test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (Debian package 'prometheus'; `make system-deps`)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_names() -> set[str]:
    return {rule["alert"] for group in load(RULES)["groups"] for rule in group["rules"] if "alert" in rule}


@needs_promtool
def test_config_is_valid_and_loads_the_rules() -> None:
    out = promtool("check", "config", str(CONFIG)).stdout
    assert "1 rule files found" in out and "SUCCESS" in out


@needs_promtool
def test_rules_are_valid() -> None:
    out = promtool("check", "rules", str(RULES)).stdout
    assert "SUCCESS" in out


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", str(RULE_TESTS)).stdout
    assert "SUCCESS" in out


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in load(RULE_TESTS)["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = alert_names()
    assert len(alerts) >= 10
    assert alerts - firing == set(), "alerts without a firing test"
    assert alerts - quiet == set(), "alerts without a not-firing test"
    assert (firing | quiet) <= alerts, "tests for alerts that do not exist"


def test_conventions() -> None:
    config = load(CONFIG)
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"spacenet", "prometheus"}
    assert config["rule_files"] == ["rules/*.yml"]
    # The unit tests sit outside the rule glob: Prometheus would refuse to load them.
    assert RULE_TESTS.parent != RULES.parent
    for group in load(RULES)["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"].startswith("SpaceNet")
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert {"summary", "description"} <= set(rule["annotations"])
            else:
                level, _, ops = rule["record"].partition(":")
                assert level in {"instance", "instance_stream"} and ":" in ops, rule["record"]
