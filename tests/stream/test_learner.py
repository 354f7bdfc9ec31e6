"""The service's model input: the same float32 values as the offline benchmarks'."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_task_inference_setting_predicts_scores_and_round_trips() -> None:
    from spacenet.strategy.benchmarks import LabeledTensorDataset
    from spacenet.stream.learner import Learner
    from tests.support.service import synthetic_images

    cfg = ServiceConfig(
        task_inference=True, epochs=1, lr=0.05, n_select=40, n_reserve=20, connections=(2000, 400, 40)
    )
    learner = Learner(cfg, device="cpu")
    rng = np.random.default_rng(0)
    held_out = {}
    for task, classes in enumerate(([0, 1], [2, 3])):
        labels = rng.permutation(np.repeat(classes, 150))
        x = torch.from_numpy(synthetic_images(labels, seed=task)).float()
        y = torch.from_numpy(labels)
        learner.train_task(LabeledTensorDataset(x[:200], y[:200]), classes)
        held_out[task] = LabeledTensorDataset(x[200:], y[200:])
    assert learner.task_inference_accuracy(held_out) == 1.0  # synthetic classes are easy
    predictor = learner.frozen_copy(version=2)
    x = torch.cat([ds.tensors[0] for ds in held_out.values()])
    y = torch.cat([ds.tensors[1] for ds in held_out.values()])
    before = predictor.predict(x)
    assert (before.labels == y).float().mean() > 0.95
    assert predictor.task_inference is not learner.spacenet.task_inference  # the next fit changes that one

    again = Learner(cfg, device="cpu")
    again.load_state_dict(learner.state_dict())
    after = again.frozen_copy(version=2).predict(x)
    assert torch.equal(before.labels, after.labels) and torch.equal(before.scores, after.scores)
    assert Learner(ServiceConfig(), device="cpu").task_inference_accuracy(held_out) is None


def test_a_process_that_restores_and_serves_never_imports_avalanche(tmp_path: Path) -> None:
    """Avalanche's imports cost about 420 MiB of resident memory: loaded only to train."""
    root = Path(__file__).resolve().parents[2]
    script = """
import sys
from pathlib import Path
from spacenet.stream import serve, loop, runtime, predict, unit  # the whole service
from spacenet.stream.checkpoint import decode
from tests.support.checkpoint_fixture import build_unit, learn, probe
u = build_unit(Path(sys.argv[1]) / "a")
u.load_state_dict(decode(Path("tests/fixtures/checkpoint-format2.ckpt").read_bytes()))
u.predictor_.predict(probe())
heavy = [m for m in ("avalanche", "torchvision", "torchmetrics", "qpsolvers") if m in sys.modules]
assert not heavy, heavy
learn(build_unit(Path(sys.argv[1]) / "b"))  # training loads it
assert "avalanche" in sys.modules
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
