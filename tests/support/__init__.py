"""Helpers shared by the tests: real services started as subprocesses, never mocks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA_GENERATOR = REPO_ROOT / "deploy" / "grafana" / "generate.py"


def load_script(path: Path, name: str) -> ModuleType:
    """A script of the repository (not a package module) as a module, loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_grafana_generator() -> ModuleType:
    """``deploy/grafana/generate.py``, loaded once."""
    return load_script(GRAFANA_GENERATOR, "spacenet_tests_grafana_generate")
