#!/usr/bin/env python3
"""Build the folder the GPU check carries to the device machine (docs/gpu-check.md).

The device machine reaches no package registry and has its own Python (3.12) with a CUDA
torch and many common packages. This puts into ``--out``:

- ``wheels/``: the project's wheel and, for the device's Python, a wheel of every
  distribution of the project's run-time closure (``scripts/prune-venv.py``, at the locked
  versions of this venv) that the device does not have (``--device-packages``, one name
  per line or space separated, read off the device: /work/.library/device/KINDS.md), less
  the optional QP solvers of ``qpsolvers`` (Avalanche imports it; GEM uses quadprog);
- ``datasets/MNIST/raw``: the MNIST files from the local mirror (``strategy/data.py``);
- ``manifest.json``: what is there and its size.

Run with the project's venv: ``make gpu-check-prepare``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from spacenet.strategy.data import default_seed_dir

ROOT = Path(__file__).resolve().parent.parent
# Back-ends qpsolvers imports only when they are there; none is needed at run time.
OPTIONAL_SOLVERS = {
    "clarabel", "cmeel", "cvxopt", "daqp", "ecos", "highspy", "jaxopt", "osqp", "piqp",
    "proxsuite", "py-mkl-pardiso", "pyqpmad", "qpalm", "qpax", "qtqp", "scs", "sip-qp-python",
}  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64", "any"]
LIMIT_BYTES = 56 * 2**20  # the run tool carries 64 MiB in all, the working tree included


def runtime_closure() -> set[str]:
    spec = importlib.util.spec_from_file_location("prune_venv", ROOT / "scripts" / "prune-venv.py")
    assert spec is not None and spec.loader is not None
    prune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prune)
    roots = [Requirement(r) for r in prune.declared(ROOT / "pyproject.toml")]
    return set(prune.runtime_closure(roots, prune.installed()))


def download_wheels(pins: list[str], python_version: str, wheels: Path) -> None:
    """A wheel for the device's Python of each pin; one published only as a source archive
    is built here, and must then be pure Python (a ``py3-none-any`` wheel)."""
    abi = "cp" + python_version.replace(".", "")
    platforms = [a for plat in PLATFORMS for a in ("--platform", plat)]
    pip = [sys.executable, "-m", "pip"]
    binary = [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
              python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
              *platforms, "-d", str(wheels)]  # fmt: skip
    if subprocess.run([*binary, *pins], capture_output=True, check=False).returncode == 0:
        return
    for pin in pins:  # one at a time, to find those without a wheel
        if subprocess.run([*binary, pin], capture_output=True, check=False).returncode == 0:
            continue
        before = set(wheels.iterdir())
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(wheels), pin], check=True)
        built = [w.name for w in set(wheels.iterdir()) - before]
        if not all(
            name.endswith("-py3-none-any.whl") or name.endswith("-py2.py3-none-any.whl") for name in built
        ):
            raise SystemExit(f"gpu-check-prepare: {pin} has no wheel for Python {python_version}: {built}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-check-carry")
    p.add_argument("--python-version", default="3.12", help="the device's Python")
    p.add_argument("--device-packages", default=str(ROOT / "scripts" / "gpu-check-device-packages.txt"))
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    text = Path(args.device_packages).read_text()
    has = {w.lower() for w in text.split() if not w.startswith("#")}
    needed = sorted(runtime_closure() - has - OPTIONAL_SOLVERS)
    pins = [f"{name}=={md.version(name)}" for name in needed]
    download_wheels(pins, args.python_version, wheels)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(ROOT)],
        check=True,
    )  # fmt: skip
    seed = default_seed_dir()
    if seed is None or not (seed / "MNIST" / "raw").is_dir():
        print("gpu-check-prepare: no local MNIST mirror (SPACENET_DATA_SEED)", file=sys.stderr)
        return 2
    shutil.copytree(seed / "MNIST" / "raw", out / "datasets" / "MNIST" / "raw")
    files = sorted(f for f in out.rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in files)
    manifest = {
        "python_version": args.python_version,
        "pins": pins,
        "files": {str(f.relative_to(out)): f.stat().st_size for f in files},
        "bytes": total,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"gpu-check-prepare: {len(files)} files, {total / 2**20:.1f} MiB in {out}")
    if total > LIMIT_BYTES:
        print(f"gpu-check-prepare: over {LIMIT_BYTES / 2**20:.0f} MiB: it will not travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
