"""Class-incremental benchmarks without task labels, built from in-memory tensors.

Each builder loads the torchvision dataset once, converts it to one normalised float
tensor, and hands ``TensorDataset``s to Avalanche's ``nc_benchmark`` (task label 0
everywhere, fixed class order). Going through tensors avoids a PIL transform per
sample, several times faster than Avalanche's ``SplitMNIST`` and friends.

Normalisation (per channel, after scaling pixels to [0, 1]):

- MNIST: mean 0.1307, std 0.3081 (the SpaceNet reference code);
- Fashion-MNIST: mean 0.2860, std 0.3530 (training-set statistics);
- CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616) (training-set
  per-pixel statistics; not the often copied (0.2023, 0.1994, 0.2010));
- CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762).

    >>> bm = split_mnist(subset_per_class=100)
    >>> [exp.classes_in_this_experience for exp in bm.train_stream]
    [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]

CIFAR files are checked against torchvision's md5s. ``verify=False`` only checks that
the files exist: meant for small local files in the same pickle format (the tests'
synthetic CIFAR), never for real data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset
from torchvision import datasets

from spacenet.strategy.data import prepare_dataset


@dataclass(frozen=True)
class BenchmarkInfo:
    """What a benchmark is made of: dataset, shape, normalisation, default split."""

    name: str
    folder: str  # torchvision's folder name under the data root
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_experiences: int

    @property
    def input_range(self) -> tuple[float, float]:
        """The normalised values of a pixel at 0 and at 1 (lowest and highest over channels).

        >>> [round(v, 4) for v in BENCHMARKS["split_mnist"].input_range]
        [-0.4242, 2.8215]
        """
        return (
            min(-m / s for m, s in zip(self.mean, self.std, strict=True)),
            max((1 - m) / s for m, s in zip(self.mean, self.std, strict=True)),
        )

    @property
    def input_size(self) -> int:
        return self.in_channels * self.image_size**2


_CIFAR10_STATS = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
_CIFAR100_STATS = {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)}
BENCHMARKS: dict[str, BenchmarkInfo] = {
    "split_mnist": BenchmarkInfo("split_mnist", "MNIST", 10, 1, 28, (0.1307,), (0.3081,), 5),
    "split_fmnist": BenchmarkInfo("split_fmnist", "FashionMNIST", 10, 1, 28, (0.2860,), (0.3530,), 5),
    "split_cifar10": BenchmarkInfo(
        "split_cifar10", "cifar-10-batches-py", 10, 3, 32, n_experiences=5, **_CIFAR10_STATS
    ),
    "split_cifar100": BenchmarkInfo(
        "split_cifar100", "cifar-100-python", 100, 3, 32, n_experiences=10, **_CIFAR100_STATS
    ),
}


class LabeledTensorDataset(TensorDataset):
    """``TensorDataset(x, y)`` with the ``targets`` list Avalanche reads class ids from."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(x, y)
        self.targets: list[int] = y.tolist()


class UnverifiedCIFAR10(datasets.CIFAR10):  # type: ignore[misc]
    """CIFAR-10 loader that only checks the files exist (md5 None): for local test files."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class UnverifiedCIFAR100(datasets.CIFAR100):  # type: ignore[misc]
    """CIFAR-100 loader that only checks the files exist (md5 None): for local test files."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


def normalise(images: Tensor, info: BenchmarkInfo) -> Tensor:
    """uint8 N x C x H x W -> float32, scaled to [0, 1] and standardised per channel
    (in place on the one float copy, to keep peak memory low)."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


def load_images(
    info: BenchmarkInfo, train: bool, root: str | os.PathLike[str], verify: bool = True, download: bool = True
) -> tuple[Tensor, Tensor]:
    """One split as (uint8 images N x C x H x W, int64 labels)."""
    if info.folder in ("MNIST", "FashionMNIST"):
        cls = datasets.MNIST if info.folder == "MNIST" else datasets.FashionMNIST
        mnist = cls(str(root), train=train, download=download)
        images = mnist.data.unsqueeze(1)
        labels = torch.as_tensor(mnist.targets, dtype=torch.long)
    else:
        ds: Any
        if info.folder == "cifar-10-batches-py":
            ds = datasets.CIFAR10 if verify else UnverifiedCIFAR10
        else:
            ds = datasets.CIFAR100 if verify else UnverifiedCIFAR100
        cifar = ds(str(root), train=train, download=download and verify)
        images = torch.from_numpy(np.ascontiguousarray(cifar.data.transpose(0, 3, 1, 2)))
        labels = torch.as_tensor(cifar.targets, dtype=torch.long)
    return images, labels


class DatasetUnavailable(RuntimeError):
    """A benchmark's files are neither under the data root nor downloadable."""


def check_available(name: str, root: str | os.PathLike[str] | None = None, verify: bool = True) -> Path:
    """The data root once both splits of benchmark ``name`` load (downloading what torchvision
    can); ``DatasetUnavailable`` naming the benchmark, the root and the cause otherwise."""
    info = BENCHMARKS[name]
    data_root = prepare_dataset(info.folder, root)
    for train in (True, False):
        try:
            load_images(info, train, data_root, verify=verify)
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
            raise DatasetUnavailable(
                f"cannot load {name} ({'train' if train else 'test'} split) under {data_root}: "
                f"{type(e).__name__}: {e}. Offline, put torchvision's files for {info.folder} there "
                "(or point --data-root / SPACENET_DATA at a folder that has them)"
            ) from e
    return data_root


def first_per_class(labels: Tensor, n: int, classes: Sequence[int]) -> Tensor:
    """Indices of the first ``n`` samples of each class (dataset order), sorted."""
    picks = [torch.nonzero(labels == c).flatten()[:n] for c in classes]
    return torch.cat(picks).sort().values


def build_benchmark(
    name: str,
    *,
    n_experiences: int | None = None,
    class_order: Sequence[int] | None = None,
    subset_per_class: int | None = None,
    test_subset_per_class: int | None = None,
    root: str | os.PathLike[str] | None = None,
    verify: bool = True,
    download: bool = True,
) -> Any:
    """A class-incremental Avalanche benchmark (``NCScenario``) without task labels.

    Args:
        name: a key of ``BENCHMARKS``.
        n_experiences: default from ``BENCHMARKS`` (5, or 10 for CIFAR-100).
        class_order: default ``0..num_classes-1``, so experience k holds consecutive classes.
        subset_per_class: keep the first N training samples of each class (fast runs).
        test_subset_per_class: the same for the test set (default: the whole test set).
        root: data root (see ``data.prepare_dataset``; seeded from a local mirror if any).
        verify: check CIFAR files against torchvision's md5s; False only for local test files.
        download: let torchvision fetch missing files (MNIST-type files already present
            are only extracted).
    """
    from avalanche.benchmarks import nc_benchmark

    info = BENCHMARKS[name]
    order = list(range(info.num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(info.num_classes)):
        raise ValueError(f"class_order must be a permutation of 0..{info.num_classes - 1}")
    data_root = prepare_dataset(info.folder, root)
    splits = []
    for train, per_class in ((True, subset_per_class), (False, test_subset_per_class)):
        x, y = load_images(info, train, data_root, verify=verify, download=download)
        if per_class is not None:
            keep = first_per_class(y, per_class, order)
            x, y = x[keep], y[keep]
        splits.append(LabeledTensorDataset(normalise(x, info), y))
    return nc_benchmark(
        splits[0],
        splits[1],
        n_experiences=n_experiences or info.n_experiences,
        task_labels=False,
        shuffle=False,
        fixed_class_order=order,
    )


def split_mnist(**kwargs: Any) -> Any:
    """Split MNIST: 5 experiences of 2 classes; see ``build_benchmark`` for options."""
    return build_benchmark("split_mnist", **kwargs)


def split_fmnist(**kwargs: Any) -> Any:
    """Split Fashion-MNIST: 5 experiences of 2 classes."""
    return build_benchmark("split_fmnist", **kwargs)


def split_cifar10(**kwargs: Any) -> Any:
    """Split CIFAR-10: 5 experiences of 2 classes."""
    return build_benchmark("split_cifar10", **kwargs)


def split_cifar100(**kwargs: Any) -> Any:
    """Split CIFAR-100: 10 experiences of 10 classes by default (``n_experiences=``)."""
    return build_benchmark("split_cifar100", **kwargs)
