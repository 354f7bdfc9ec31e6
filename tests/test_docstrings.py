"""Every docstring example runs, here, in the default test run, and none is skipped: the
modules of both packages, the test-support modules and the dashboard generator."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import spacenet.strategy
import spacenet.stream
import tests.support
from tests.support import load_grafana_generator

NEEDS_KAFKA = {"spacenet.stream.tools.local_kafka"}  # its example starts a broker


def _modules() -> list[str]:
    names = []
    for package in (spacenet.strategy, spacenet.stream, tests.support):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return [*names, "deploy/grafana/generate.py"]


def _load(name: str) -> ModuleType:
    return load_grafana_generator() if name.endswith(".py") else importlib.import_module(name)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.kafka) if n in NEEDS_KAFKA else n for n in _modules()]
)
def test_every_docstring_example_runs(name: str) -> None:
    module = _load(name)
    examples = [e for t in doctest.DocTestFinder().find(module) for e in t.examples]
    assert not [e.source for e in examples if e.options.get(doctest.SKIP)], "an example is skipped"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted == len(examples)
