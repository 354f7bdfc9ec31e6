"""The data root: where datasets live and how they are seeded from a read-only mirror."""

from __future__ import annotations

import os
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from spacenet.strategy.data import KNOWN_DATASETS, default_seed_dir, prepare_dataset, resolve_root

SHARED_SEED = Path("/work/shared/datasets")
SEED_FILES = {
    "MNIST/raw/t10k-images-idx3-ubyte.gz": b"images" * 100,
    "MNIST/raw/t10k-labels-idx1-ubyte.gz": b"labels",
    "MNIST/extra/nested/notes.txt": b"nested files are copied too\n",
}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (content, mtime in ns) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _set_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~bits)


@pytest.fixture
def seed(tmp_path: Path) -> Iterator[Path]:
    """A read-only fake mirror in torchvision's layout."""
    folder = tmp_path / "seed"
    for rel, content in SEED_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    _set_writable(folder, False)
    try:
        yield folder
    finally:
        _set_writable(folder, True)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("SPACENET_DATA", "SPACENET_DATA_SEED", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# resolution order ------------------------------------------------------------------


def test_argument_wins_over_environment(no_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_env.setenv("SPACENET_DATA", str(tmp_path / "env"))
    no_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_environment_wins_over_user_cache(no_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_env.setenv("SPACENET_DATA", str(tmp_path / "env"))
    no_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root() == tmp_path / "env"


def test_user_cache_is_the_fallback(no_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root() == tmp_path / "xdg" / "spacenet-stream" / "data"
    no_env.delenv("XDG_CACHE_HOME")
    no_env.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root() == tmp_path / "home" / ".cache" / "spacenet-stream" / "data"


def test_home_is_expanded(no_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_env.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root("~/data") == tmp_path / "home" / "data"
    no_env.setenv("SPACENET_DATA", "~/env-data")
    assert resolve_root() == tmp_path / "home" / "env-data"


def test_prepare_uses_the_resolved_root(no_env: pytest.MonkeyPatch, tmp_path: Path, seed: Path) -> None:
    no_env.setenv("SPACENET_DATA", str(tmp_path / "env"))
    assert prepare_dataset("MNIST", seed=seed) == tmp_path / "env"
    assert (tmp_path / "env" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read_bytes() == b"labels"


# seeding ---------------------------------------------------------------------------


def test_seeding_copies_every_file_and_never_writes_the_seed(tmp_path: Path, seed: Path) -> None:
    before = _snapshot(seed)
    root = prepare_dataset("MNIST", root=tmp_path / "root", seed=seed)

    assert root == tmp_path / "root"
    copied = {rel: content for rel, (content, _) in _snapshot(root).items()}
    assert copied == SEED_FILES
    assert _snapshot(seed) == before
    # the copies are the caller's: writable, unlike the seed
    assert all(os.access(root / rel, os.W_OK) for rel in SEED_FILES)


def test_second_call_is_idempotent(tmp_path: Path, seed: Path) -> None:
    root = prepare_dataset("MNIST", root=tmp_path / "root", seed=seed)
    first = _snapshot(root)
    assert prepare_dataset("MNIST", root=root, seed=seed) == root
    assert _snapshot(root) == first, "files already in place must not be copied again"
    assert not list(root.rglob("*.partial"))


def test_a_truncated_copy_is_replaced(tmp_path: Path, seed: Path) -> None:
    root = prepare_dataset("MNIST", root=tmp_path / "root", seed=seed)
    damaged = root / "MNIST/raw/t10k-images-idx3-ubyte.gz"
    damaged.write_bytes(b"imag")
    prepare_dataset("MNIST", root=root, seed=seed)
    assert damaged.read_bytes() == SEED_FILES["MNIST/raw/t10k-images-idx3-ubyte.gz"]


def test_dataset_missing_from_seed_copies_nothing(tmp_path: Path, seed: Path) -> None:
    root = prepare_dataset("FashionMNIST", root=tmp_path / "root", seed=seed)
    assert root.is_dir() and list(root.iterdir()) == []


def test_seed_from_environment(no_env: pytest.MonkeyPatch, tmp_path: Path, seed: Path) -> None:
    no_env.setenv("SPACENET_DATA_SEED", str(seed))
    assert default_seed_dir() == seed
    root = prepare_dataset("MNIST", root=tmp_path / "root")
    assert (root / "MNIST/extra/nested/notes.txt").is_file()

    no_env.setenv("SPACENET_DATA_SEED", str(tmp_path / "missing"))
    assert default_seed_dir() is None


def test_root_that_is_the_seed_is_refused(tmp_path: Path, seed: Path) -> None:
    before = _snapshot(seed)
    with pytest.raises(ValueError, match="is the seed folder itself"):
        prepare_dataset("MNIST", root=seed, seed=seed)
    link = tmp_path / "link-to-seed"
    link.symlink_to(seed)
    with pytest.raises(ValueError, match="is the seed folder itself"):
        prepare_dataset("MNIST", root=link, seed=seed)
    assert _snapshot(seed) == before


def test_unknown_dataset_is_an_error(tmp_path: Path, seed: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset folder 'ImageNet'"):
        prepare_dataset("ImageNet", root=tmp_path / "root", seed=seed)
    assert not (tmp_path / "root").exists()
    assert "MNIST" in KNOWN_DATASETS


# the real shared mirror --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_SEED / "MNIST").is_dir(), reason=f"no shared dataset mirror at {SHARED_SEED}")
def test_shared_seed_loads_mnist_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torchvision = pytest.importorskip("torchvision")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"torchvision tried to download: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    before = {p: p.stat().st_mtime_ns for p in (SHARED_SEED / "MNIST").rglob("*")}

    root = prepare_dataset("MNIST", root=tmp_path / "data", seed=SHARED_SEED)
    test_set = torchvision.datasets.MNIST(root, train=False, download=True)

    assert len(test_set) == 10000
    image, label = test_set[0]
    assert image.size == (28, 28) and 0 <= label <= 9
    assert {p: p.stat().st_mtime_ns for p in (SHARED_SEED / "MNIST").rglob("*")} == before
