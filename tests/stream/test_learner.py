"""The service's model input: the same float32 values as the offline benchmarks'."""

from __future__ import annotations

import numpy as np
import torch

from spacenet.strategy.benchmarks import BENCHMARKS
from spacenet.stream.config import ServiceConfig
from spacenet.stream.learner import Standardize, build_model


def test_standardize_is_bit_identical_to_the_benchmarks_normalisation() -> None:
    """``strategy.benchmarks`` normalises images once as ``x / 255 - mean) / std``; the service
    does it inside the model. Any rounding difference would send the two trainings apart."""
    cfg = ServiceConfig()
    info = BENCHMARKS["split_mnist"]
    assert (cfg.input_mean, cfg.input_std) == (info.mean[0], info.std[0])
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8))
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    expected = x.float().div_(255.0).sub_(mean).div_(std)
    got = Standardize(cfg.input_scale, cfg.input_mean, cfg.input_std)(x.float())
    assert torch.equal(got, expected)
    assert isinstance(build_model(cfg)[0], Standardize)
