"""Helpers shared by the tests: real services started as subprocesses, never mocks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_KAFKA_PATH = REPO_ROOT / "deploy" / "kafka" / "local_kafka.py"
# deploy/ is not a package; the script is loaded once under this name so that every
# test sees the same ``LocalKafka`` and ``KafkaError`` classes.
_LOCAL_KAFKA_MODULE = "spacenet_tests_local_kafka"


def load_local_kafka() -> ModuleType:
    """Import ``deploy/kafka/local_kafka.py`` from the checkout (cached after the first call)."""
    module = sys.modules.get(_LOCAL_KAFKA_MODULE)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(_LOCAL_KAFKA_MODULE, LOCAL_KAFKA_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {LOCAL_KAFKA_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_LOCAL_KAFKA_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_LOCAL_KAFKA_MODULE]
        raise
    return module
