"""Session set-up: a throw-away HOME, seeded RNGs and property tests, and real Kafka and
Prometheus fixtures.

Importing avalanche or matplotlib writes into ``$HOME``, so the environment is
redirected here, at import time, before any test module imports them. Tests that use
``kafka_bootstrap`` are marked ``kafka`` and tests that use ``prometheus_factory`` are
marked ``prometheus``, so ``pytest -m "not kafka and not prometheus and not slow"``
(``make test-fast``) runs only the fast tests. Tests marked ``image`` (tests/image: the built
container image) run only when ``-m`` names them, as ``make image-test`` does (``-m image``).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import settings

from spacenet.stream.tools import local_kafka
from tests.support.prometheus import PrometheusFactory, PrometheusServer


def _isolate_environment() -> None:
    # The real user cache holds the Kafka jars; compute it the way local_kafka does,
    # before HOME and XDG_CACHE_HOME stop pointing at the user's folders.
    if not os.environ.get("SPACENET_CACHE"):
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = Path(xdg) if xdg else Path.home() / ".cache"
        os.environ["SPACENET_CACHE"] = str(cache / "spacenet-stream")
    session_dir = Path(tempfile.mkdtemp(prefix="spacenet-tests-"))
    atexit.register(shutil.rmtree, session_dir, ignore_errors=True)
    for var, sub in (("HOME", "home"), ("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "cache")):
        (session_dir / sub).mkdir()
        os.environ[var] = str(session_dir / sub)
    if not os.environ.get("SPACENET_DATA"):
        os.environ["SPACENET_DATA"] = str(session_dir / "data")


_isolate_environment()

# Property tests draw the same examples on every run (seeded from each test's name), so a
# failure is the code's, not the draw's. HYPOTHESIS_PROFILE=explore searches afresh each run.
settings.register_profile("seeded", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seeded"))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "kafka_bootstrap" in names:
            item.add_marker(pytest.mark.kafka)
        if "prometheus_factory" in names:
            item.add_marker(pytest.mark.prometheus)
    # The image test needs a built image (`make image-test`): left out unless -m names it.
    if "image" not in (config.getoption("markexpr") or ""):
        image = [item for item in items if item.get_closest_marker("image")]
        if image:
            config.hook.pytest_deselected(items=image)
            items[:] = [item for item in items if not item.get_closest_marker("image")]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real single-node KRaft broker for the whole session: its bootstrap address."""
    broker = local_kafka.LocalKafka(tmp_path_factory.mktemp("kafka"))
    try:
        # start() stops its own JVM when it fails after launching it.
        yield broker.start()
    finally:
        if broker.running_pid() is not None:
            broker.stop()


@pytest.fixture
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Start real Prometheus servers: ``factory(targets, rule_files=(), scrape_interval="1s", **kw)``.

    Every server started through it is stopped at teardown, whatever the test did.
    """
    servers: list[PrometheusServer] = []

    def start(
        scrape_targets: Sequence[str],
        rule_files: Sequence[str | os.PathLike[str]] = (),
        scrape_interval: str = "1s",
        **kwargs: object,
    ) -> PrometheusServer:
        server = PrometheusServer(
            tmp_path_factory.mktemp("prometheus"), scrape_targets, rule_files, scrape_interval, **kwargs
        )
        servers.append(server)
        server.start()
        return server

    yield start
    errors = []
    for server in servers:
        try:
            server.stop()
        except Exception as e:  # stop the others before reporting
            errors.append(e)
    if errors:
        raise errors[0]
