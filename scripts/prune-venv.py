#!/usr/bin/env python3
"""Strip a venv built from requirements.lock down to what a distribution needs to run.

The lock pins the runtime and the development closure together (one lock, one install path:
scripts/install-deps.sh). The image needs only the runtime part. The Dockerfile lists the
project's declared dependencies first (any Python 3.11, standard library only), then prunes
the installed venv with its own interpreter:

    python3 scripts/prune-venv.py --list pyproject.toml > requirements.in
    /opt/venv/bin/python scripts/prune-venv.py requirements.in

The list is a file of its own so that edits of pyproject.toml other than its dependencies
(tool settings, test markers) leave the build's dependency layer cached.

It keeps every distribution those requirements need, transitively, with markers
evaluated for this interpreter and the extras each requirement asks for (so the image keeps
exactly the locked versions the tests ran against), and removes the rest: the development
tools (pytest, hypothesis, ruff, mypy, hadolint, compose, ...), then every ``tests`` folder
inside the kept packages (their own test suites, never imported at run time). pip stays for
the project's own install; ``--drop-pip`` removes it too. ``--dry-run`` prints what would go.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # packaging is imported where it is used: --list runs without it
    from packaging.requirements import Requirement


def declared(pyproject: Path) -> list[str]:
    """The ``[project] dependencies`` of a pyproject.toml (no extras), as written."""
    dependencies: list[str] = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
    return dependencies


def read_requirements(path: Path) -> list[Requirement]:
    """One requirement a line; blank lines and ``#`` comments skipped."""
    from packaging.requirements import Requirement

    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def installed() -> dict[str, md.Distribution]:
    from packaging.utils import canonicalize_name

    return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}


def wanted(requirement: Requirement, extras: Iterable[str]) -> bool:
    """Whether ``requirement`` applies here when its parent is installed with ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def runtime_closure(roots: list[Requirement], dists: dict[str, md.Distribution]) -> set[str]:
    """Canonical names of everything ``roots`` require at run time, transitively."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    keep: dict[str, set[str]] = {}  # name -> the extras already followed
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in roots if wanted(r, ())]
    while todo:
        name, extras = todo.pop()
        if name in keep and extras <= keep[name]:
            continue
        if name not in dists:
            raise SystemExit(f"prune-venv: {name} is required but not installed")
        keep[name] = keep.get(name, set()) | extras
        for line in dists[name].requires or []:
            requirement = Requirement(line)
            if wanted(requirement, extras):
                followed = frozenset(canonicalize_name(e) for e in requirement.extras)
                todo.append((canonicalize_name(requirement.name), followed))
    return set(keep)


def test_folders(site_packages: Path) -> list[Path]:
    found = (p for p in site_packages.rglob("tests") if p.is_dir())
    return sorted(p for p in found if "tests" not in p.relative_to(site_packages).parent.parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("requirements", type=Path, help="requirements file whose run-time closure stays")
    parser.add_argument(
        "--list", action="store_true", help="print the dependencies a pyproject.toml declares"
    )
    parser.add_argument("--drop-pip", action="store_true", help="remove pip as well (last)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(declared(args.requirements)))
        return 0
    dists = installed()
    keep = runtime_closure(read_requirements(args.requirements), dists)
    drop = sorted(set(dists) - keep - ({"pip"} if not args.drop_pip else set()))
    site_packages = Path(sysconfig.get_paths()["purelib"])
    print(f"prune-venv: keeping {len(keep)} distributions, removing {len(drop)}: {' '.join(drop)}")
    if args.dry_run:
        print(f"prune-venv: and {len(test_folders(site_packages))} tests folders")
        return 0
    # pip last: it removes the others, then itself.
    others = [name for name in drop if name != "pip"]
    pip = [sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", "--disable-pip-version-check"]
    if others:
        subprocess.run([*pip, *others], check=True)
    folders = test_folders(site_packages)
    for folder in folders:
        shutil.rmtree(folder)
    print(f"prune-venv: removed {len(folders)} tests folders")
    if "pip" in drop:
        subprocess.run([*pip, "pip"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
