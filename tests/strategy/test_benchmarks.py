"""Benchmark builders: class order, no task labels, subsets, and the CIFAR file paths.

CIFAR is not available offline, so small synthetic files are written in its exact
on-disk pickle format and loaded through the same torchvision code path
(``verify=False`` skips only the md5 checks).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spacenet.strategy.benchmarks import (
    BENCHMARKS,
    UnverifiedCIFAR10,
    build_benchmark,
    first_per_class,
    split_cifar10,
    split_cifar100,
    split_mnist,
)


# ------------------------------------------------------------ synthetic CIFAR files
def _images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of 3072 uint8 (CIFAR's R, G, B planes) whose colour depends on the class,
    so a network can learn them."""
    hue = (labels[:, None] * 255 // max(1, num_classes - 1)).astype(np.int64)
    base = np.concatenate(
        [np.repeat(hue, 1024, 1), np.repeat(255 - hue, 1024, 1), np.full((len(labels), 1024), 128)], axis=1
    )
    noise = rng.integers(-30, 31, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _labels(per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    return labels


def _dump(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_synthetic_cifar10(root: Path, train_per_class: int = 20, test_per_class: int = 10) -> Path:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    train = _labels(train_per_class, 10, rng)
    for k, part in enumerate(np.array_split(train, 5), start=1):
        _dump(
            folder / f"data_batch_{k}",
            {
                "batch_label": f"training batch {k} of 5",
                "labels": part.tolist(),
                "data": _images(part, 10, rng),
                "filenames": [f"img_{k}_{i}.png" for i in range(len(part))],
            },
        )
    test = _labels(test_per_class, 10, rng)
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test.tolist(),
            "data": _images(test, 10, rng),
            "filenames": [f"t_{i}.png" for i in range(len(test))],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            "label_names": [f"class{c}" for c in range(10)],
            "num_cases_per_batch": len(train) // 5,
            "num_vis": 3072,
        },
    )
    return root


def write_synthetic_cifar100(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    """``root/cifar-100-python/{train, test, meta}``."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = _labels(per_class, 100, rng)
        _dump(
            folder / name,
            {
                "batch_label": name,
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
                "data": _images(fine, 100, rng),
                "filenames": [f"{name}_{i}.png" for i in range(len(fine))],
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine{c}" for c in range(100)],
            "coarse_label_names": [f"coarse{c}" for c in range(20)],
        },
    )
    return root


# ------------------------------------------------------------------------ helpers
def _exp_classes(stream: Any) -> list[list[int]]:
    return [sorted(int(c) for c in exp.classes_in_this_experience) for exp in stream]


def _check_no_task_labels(bm: Any) -> None:
    for stream in (bm.train_stream, bm.test_stream):
        for exp in stream:
            assert set(exp.task_labels) == {0}


def _class_counts(exp: Any) -> dict[int, int]:
    targets = torch.as_tensor(list(exp.dataset.targets))
    return {int(c): int((targets == c).sum()) for c in targets.unique()}


# -------------------------------------------------------------------------- tests
def test_first_per_class_takes_the_first_samples_in_dataset_order() -> None:
    labels = torch.tensor([1, 0, 1, 1, 0, 2])
    assert first_per_class(labels, 2, [0, 1, 2]).tolist() == [0, 1, 2, 4, 5]


def test_split_mnist_subset(tmp_path: Path) -> None:
    bm = split_mnist(subset_per_class=30, test_subset_per_class=7)
    assert _exp_classes(bm.train_stream) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert _exp_classes(bm.test_stream) == _exp_classes(bm.train_stream)
    _check_no_task_labels(bm)
    for exp in bm.train_stream:
        assert set(_class_counts(exp).values()) == {30}
    for exp in bm.test_stream:
        assert set(_class_counts(exp).values()) == {7}
    x, y, *_ = bm.train_stream[0].dataset[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    # normalised with mean 0.1307 and std 0.3081: the background pixel maps to -0.4242
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert int(y) in (0, 1)


def test_class_order_and_experience_count_are_configurable() -> None:
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    bm = split_mnist(subset_per_class=5, test_subset_per_class=5, class_order=order, n_experiences=2)
    assert _exp_classes(bm.train_stream) == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="permutation"):
        split_mnist(subset_per_class=5, class_order=[0, 1])


def test_split_cifar10_from_synthetic_files(tmp_path: Path) -> None:
    root = write_synthetic_cifar10(tmp_path)
    bm = split_cifar10(root=root, verify=False)
    assert _exp_classes(bm.train_stream) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    _check_no_task_labels(bm)
    assert [len(exp.dataset) for exp in bm.train_stream] == [40] * 5
    assert [len(exp.dataset) for exp in bm.test_stream] == [20] * 5
    x, _, *_ = bm.train_stream[0].dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_split_cifar10_subset(tmp_path: Path) -> None:
    bm = split_cifar10(root=write_synthetic_cifar10(tmp_path), verify=False, subset_per_class=3)
    for exp in bm.train_stream:
        assert set(_class_counts(exp).values()) == {3}


def test_cifar_pixels_match_torchvision_and_the_stated_normalisation(tmp_path: Path) -> None:
    root = write_synthetic_cifar10(tmp_path)
    raw = UnverifiedCIFAR10(str(root), train=False)
    bm = split_cifar10(root=root, verify=False)
    info = BENCHMARKS["split_cifar10"]
    first = raw.targets.index(0)
    expected = torch.from_numpy(raw.data[first]).permute(2, 0, 1).float() / 255
    expected = (expected - torch.tensor(info.mean)[:, None, None]) / torch.tensor(info.std)[:, None, None]
    exp0 = bm.test_stream[0].dataset
    matches = [i for i in range(len(exp0)) if torch.allclose(exp0[i][0], expected, atol=1e-6)]
    assert matches and all(int(exp0[i][1]) == 0 for i in matches)


def test_split_cifar100_from_synthetic_files(tmp_path: Path) -> None:
    root = write_synthetic_cifar100(tmp_path)
    bm = split_cifar100(root=root, verify=False)
    classes = _exp_classes(bm.train_stream)
    assert classes == [list(range(10 * k, 10 * k + 10)) for k in range(10)]
    _check_no_task_labels(bm)
    assert [len(exp.dataset) for exp in bm.train_stream] == [40] * 10
    assert [len(exp.dataset) for exp in bm.test_stream] == [20] * 10
    five = split_cifar100(root=root, verify=False, n_experiences=5, subset_per_class=2)
    assert [len(exp.dataset) for exp in five.train_stream] == [40] * 5


def test_real_cifar_loader_checks_md5(tmp_path: Path) -> None:
    root = write_synthetic_cifar10(tmp_path)
    with pytest.raises(RuntimeError, match="corrupted"):
        build_benchmark("split_cifar10", root=root, verify=True, download=False)


def test_unknown_benchmark() -> None:
    with pytest.raises(KeyError):
        build_benchmark("split_imagenet")
