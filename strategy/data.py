"""Where datasets live: resolve a data root and seed it from a local mirror.

Resolution order for the root: the ``root`` argument, then ``$SPACENET_DATA``, then
the user cache (``$XDG_CACHE_HOME/spacenet-stream/data``, default ``~/.cache/...``).
When a seed folder exists (``$SPACENET_DATA_SEED``, else ``../shared/datasets`` next
to the checkout), the dataset's files are copied from it into the root, never
written into the seed. Otherwise torchvision downloads as usual.

    >>> import tempfile
    >>> root = prepare_dataset("MNIST", root=tempfile.mkdtemp())
    >>> sorted(p.name for p in (root / "MNIST" / "raw").iterdir())[:1]
    ['t10k-images-idx3-ubyte.gz']
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV_ROOT = "SPACENET_DATA"
ENV_SEED = "SPACENET_DATA_SEED"
# Folder names in torchvision's layout.
KNOWN_DATASETS = ("MNIST", "FashionMNIST", "cifar-10-batches-py", "cifar-100-python")


def default_seed_dir() -> Path | None:
    """The read-only mirror to copy from, if one exists on this machine."""
    env = os.environ.get(ENV_SEED)
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve()
    # strategy/data.py -> checkout root -> ../shared/datasets
    for parent in here.parents[1:4]:
        candidate = parent.parent / "shared" / "datasets"
        if candidate.is_dir():
            return candidate
    return None


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The writable data root: argument, then ``$SPACENET_DATA``, then the user cache."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "spacenet-stream" / "data"


def seed_from(seed: Path, root: Path, name: str) -> bool:
    """Copy ``seed/name`` into ``root/name`` file by file; existing files are kept.

    Returns True when anything was found to copy. A copy goes to a temporary name
    first, so an interrupted run never leaves a truncated file behind.
    """
    src = seed / name
    if not src.is_dir():
        return False
    if src.resolve() == (root / name).resolve():
        raise ValueError(f"the data root {root} is the seed folder itself; it must be a writable copy")
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        dest = root / name / path.relative_to(src)
        if dest.exists() and dest.stat().st_size == path.stat().st_size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)
    return True


def prepare_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    seed: str | os.PathLike[str] | None = None,
) -> Path:
    """Resolve the root, seed ``name`` into it when a mirror has it, and return the root.

    ``name`` is the torchvision folder name (``"MNIST"``, ``"FashionMNIST"``, ...).
    Pass the returned root to torchvision or Avalanche as ``root``/``dataset_root``.
    """
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset folder {name!r}; expected one of {KNOWN_DATASETS}")
    resolved = resolve_root(root)
    resolved.mkdir(parents=True, exist_ok=True)
    seed_dir = Path(seed) if seed is not None else default_seed_dir()
    if seed_dir is not None:
        seed_from(seed_dir, resolved, name)
    return resolved
