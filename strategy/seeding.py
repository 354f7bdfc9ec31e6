"""Seeding for reproducible runs: what the benchmark runner and the service share.

Imports torch and NumPy only (Avalanche's RNG manager is imported when ``seed_everything``
runs), so the service can seed a task's training without loading the benchmarks.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU and CUDA) and Avalanche's RNG manager."""
    from avalanche.training.determinism.rng_manager import RNGManager

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    RNGManager.set_random_seeds(seed)


def seed_experience(seed: int, index: int) -> None:
    """Seed torch's global RNG for training experience ``index`` (0, 1, ...) of a run with
    ``seed``: what one experience's training draws (the loader's shuffling) then depends on
    the seed and the experience alone, not on what ran before it (evaluations draw from the
    same RNG). The benchmark runner and the streaming service both call it, so the service
    trains a task exactly as the runner trains the same experience.

    >>> seed_experience(3, 1); a = torch.rand(1)
    >>> seed_experience(3, 1); bool(torch.equal(a, torch.rand(1)))
    True
    """
    torch.manual_seed(seed * 1_000_003 + index)
