"""The service's learner: a SpaceNet model trained task by task through Avalanche.

``Learner`` owns the model and its ``SpaceNet``; ``train_task`` runs one
class-incremental experience (no task label) built from the task buffer with
Avalanche's ``Naive`` template and a ``SpaceNetPlugin`` around that SpaceNet; ``evaluate``
scores every task's held-out sample; ``frozen_copy`` gives the read-only ``Predictor``
that serves predictions while the next task trains.

Avalanche is imported, and the strategy built, when the first task trains: importing it
loads torchvision, torchmetrics, SciPy, the QP solvers and more (about 420 MiB of resident
memory here), which a process that restores and serves does not need.

    >>> import numpy as np
    >>> from spacenet.stream.buffer import TaskBuffer
    >>> from spacenet.stream.records import Records
    >>> cfg = ServiceConfig(input_shape=(1, 2, 2), hidden=(8, 8), n_select=4, n_reserve=2,
    ...                     connections=(0.5, 0.5, 0.5), epochs=1)
    >>> learner = Learner(cfg, device="cpu")
    >>> buffer = TaskBuffer((1, 2, 2), "uint8", holdout_fraction=0.0)
    >>> buffer.start_task(0)
    >>> labels = np.arange(32) % 2
    >>> features = (labels * 200).astype(np.uint8).repeat(4).reshape(32, 1, 2, 2)
    >>> buffer.add(Records(features, labels, np.zeros(32, np.int32), np.arange(32)))
    >>> seconds = learner.train_task(buffer.dataset(scale=1.0), classes=[0, 1])
    >>> predictor = learner.frozen_copy(version=1)
    >>> learner.spacenet.tasks_learned_, predictor.version, predictor.known.sum().item()
    (1, 1, 2)
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from spacenet.strategy.calibration import TaskLogitNorm
from spacenet.strategy.models import SpaceNetMLP
from spacenet.strategy.plugin_state import load_plugin_state, plugin_state
from spacenet.strategy.rss import trim_heap
from spacenet.strategy.seeding import seed_experience
from spacenet.strategy.spacenet import ExhaustedPolicy, SpaceNet
from spacenet.strategy.task_inference import TaskInference
from spacenet.stream.config import ServiceConfig
from spacenet.stream.faults import maybe_crash

log = logging.getLogger(__name__)


class TrainingAbandoned(RuntimeError):
    """Training stopped early on request (shutdown): the task is not learned."""


class Standardize(nn.Module):
    """(x * scale - mean) / std, kept inside the model so a checkpoint carries it; computed
    as (x / (1 / scale) - mean) / std in float32, bit for bit what the offline benchmarks
    do to their images (``x / 255``, then mean and std), so that both paths train alike."""

    def __init__(self, scale: float, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("divisor", torch.tensor(1.0 / float(scale)))
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: Tensor) -> Tensor:
        divisor, mean, std = self.divisor, self.mean, self.std
        return (x.float() / divisor - mean) / std  # type: ignore[operator]


def build_model(cfg: ServiceConfig) -> nn.Sequential:
    inputs = 1
    for d in cfg.input_shape:
        inputs *= d
    return nn.Sequential(
        Standardize(cfg.input_scale, cfg.input_mean, cfg.input_std),
        SpaceNetMLP(inputs, cfg.hidden, cfg.num_outputs),
    )


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA device found: training and predicting on the CPU")
        return torch.device("cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class Prediction:
    labels: Tensor  # int64, -1 where no class is known yet
    scores: Tensor  # float32 softmax probability of the predicted class


class Predictor:
    """A frozen model for serving: raw features in, labels and scores out."""

    def __init__(
        self,
        model: nn.Module,
        units_to_labels: Tensor,
        calibration: TaskLogitNorm | None,
        task_units: dict[int, Tensor],
        version: int,
        task_inference: TaskInference | None = None,
    ) -> None:
        self.model = model.eval()
        self.units_to_labels = units_to_labels
        self.calibration = calibration
        self.task_units = task_units
        self.version = version
        self.task_inference = task_inference
        self.known = units_to_labels >= 0

    @property
    def known_labels(self) -> npt.NDArray[np.int64]:
        """The labels this model can predict (the classes it has learned)."""
        return self.units_to_labels[self.known].cpu().numpy()

    def predict_labels(self, features: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """``predict`` on a NumPy batch, labels only."""
        return self.predict(torch.from_numpy(features)).labels.numpy()

    @torch.no_grad()
    def predict(self, features: Tensor) -> Prediction:
        device = self.units_to_labels.device
        logits = self.model(features.to(device))
        if self.calibration is not None:
            logits = self.calibration.apply(logits, self.task_units)
        if self.task_inference is not None:
            logits = self.task_inference.apply(logits, features)
        logits = logits.masked_fill(~self.known, float("-inf"))
        if not bool(self.known.any()):
            n = features.shape[0]
            return Prediction(torch.full((n,), -1, dtype=torch.long), torch.zeros(n))
        probs = logits.softmax(dim=1)
        score, unit = probs.max(dim=1)
        return Prediction(self.units_to_labels[unit].cpu(), score.float().cpu())


class Learner:
    """Model + SpaceNet on one device; the Avalanche strategy that trains them, once needed."""

    def __init__(self, cfg: ServiceConfig, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else pick_device(cfg.device)
        # The accelerator's name, for ``spacenet_device_info`` ("" on the CPU).
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
        with torch.random.fork_rng(devices=[]):  # initial weights from cfg.seed, not the global RNG
            torch.manual_seed(cfg.seed)
            self.model = build_model(cfg).to(self.device)
        self.spacenet = SpaceNet(
            n_select=cfg.n_select,
            n_reserve=cfg.n_reserve,
            connections=cfg.spacenet_connections,
            drop_fraction=cfg.drop_fraction,
            seed=cfg.seed,
            freeze_used_biases=cfg.freeze_used_biases,
            on_exhausted=cast(ExhaustedPolicy, cfg.on_exhausted),  # validated by ServiceConfig
            task_inference=(
                # The statistics see the raw features: 0 .. 1/input_scale.
                TaskInference(input_range=(0.0, 1.0 / cfg.input_scale), seed=cfg.seed)
                if cfg.task_inference
                else None
            ),
        ).attach(self.model)
        self.calibration = TaskLogitNorm() if cfg.calibrate else None
        self.stop_ = threading.Event()
        self.steps_ = 0
        self._strategy: Any = None  # built by the first train_task

    def _training_strategy(self) -> Any:
        """Avalanche's ``Naive`` with a ``SpaceNetPlugin`` around this SpaceNet (built once)."""
        if self._strategy is not None:
            return self._strategy
        from avalanche.training import Naive
        from avalanche.training.plugins import EvaluationPlugin

        from spacenet.strategy.plugin import SpaceNetPlugin

        plugin = SpaceNetPlugin.around(self.spacenet, self.model, self.calibration)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no loggers": on purpose, metrics go to Prometheus
            evaluator = EvaluationPlugin(loggers=[])
        self._strategy = Naive(
            model=self.model,
            optimizer=torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr),
            train_mb_size=self.cfg.batch_size,
            train_epochs=self.cfg.epochs,
            eval_mb_size=1024,
            device=self.device,
            plugins=[plugin, _step_hook(self)],
            evaluator=evaluator,
        )
        return self._strategy

    def train_task(self, dataset: Dataset[tuple[Tensor, int]], classes: list[int]) -> float:
        """Train one task; returns seconds. Raises ``TrainingAbandoned`` on ``stop_``."""
        from avalanche.benchmarks import nc_benchmark

        targets = getattr(dataset, "targets", None)
        if targets is None or len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("a task needs a non-empty dataset with .targets")
        bench = nc_benchmark(
            dataset,
            dataset,
            n_experiences=1,
            task_labels=False,
            shuffle=False,
            fixed_class_order=sorted(classes),
        )
        seed_experience(self.cfg.seed, self.spacenet.tasks_learned_)  # as the offline runner does
        strategy = self._training_strategy()
        start = time.perf_counter()
        try:
            strategy.train(bench.train_stream[0], num_workers=0)  # its cleanup drops the task's loader
            seconds = time.perf_counter() - start
        finally:
            trim_heap()
        if self.stop_.is_set():
            raise TrainingAbandoned("stopped during training")
        return seconds

    @torch.no_grad()
    def evaluate(self, datasets: Mapping[int, Dataset[tuple[Tensor, int]]]) -> dict[int, tuple[float, int]]:
        """Accuracy and size of each task's held-out sample (labels predicted over all classes)."""
        predictor = self.frozen_copy(version=-1, copy_model=False)
        results: dict[int, tuple[float, int]] = {}
        for task, ds in datasets.items():
            correct = total = 0
            for x, y in DataLoader(ds, batch_size=1024):
                pred = predictor.predict(x)
                correct += int((pred.labels == y).sum())
                total += int(y.numel())
            if total:
                results[task] = (correct / total, total)
        self.model.train()
        return results

    @torch.no_grad()
    def task_inference_accuracy(self, datasets: Mapping[int, Dataset[tuple[Tensor, int]]]) -> float | None:
        """Share of the held-out records whose task the task inference chooses right (None
        without the option or without records)."""
        net = self.spacenet
        if net.task_inference is None:
            return None
        task_of_unit = net.output.reserved_by_.long().cpu()
        correct = total = 0
        for ds in datasets.values():
            for x, y in DataLoader(ds, batch_size=1024):
                chosen = net.task_inference.predict_task(x)
                correct += int((chosen == task_of_unit[net.units_of(y.long())]).sum())
                total += int(y.numel())
        return correct / total if total else None

    def frozen_copy(self, version: int, copy_model: bool = True) -> Predictor:
        net = self.spacenet
        units = torch.arange(net.output.out_units, device=self.device)
        model = copy.deepcopy(self.model) if copy_model else self.model
        cal = copy.deepcopy(self.calibration) if self.calibration is not None else None
        return Predictor(
            model,
            net.labels_of(units),
            cal,
            {t: u.to(self.device) for t, u in net.task_units().items()},
            version,
            # the next task's fit changes the statistics: the predictor keeps its own copy
            copy.deepcopy(net.task_inference) if copy_model else net.task_inference,
        )

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state (``plugin_state``: SpaceNet's sparse state, which carries the
        managed weights, and the calibration's) and the rest of the model's state (the input
        standardisation)."""
        managed = set(self.spacenet.parameter_names())
        rest = {k: v for k, v in self.model.state_dict().items() if k not in managed}
        return {"model": rest, "plugin": plugin_state(self.spacenet, self.calibration)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output, or a first-format one whose ``model`` is dense."""
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        stray = set(missing) - set(self.spacenet.parameter_names())
        if unexpected or stray:
            raise ValueError(f"learner state does not fit this model: missing {stray}, extra {unexpected}")
        load_plugin_state(state["plugin"], self.spacenet, self.calibration)


def _step_hook(learner: Learner) -> Any:
    """An Avalanche plugin that counts steps, honours stop requests, and carries the
    ``training`` crash point (defined here: Avalanche is imported when training starts)."""
    from avalanche.core import SupervisedPlugin

    class StepHook(SupervisedPlugin):  # type: ignore[misc]
        def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            if learner.stop_.is_set():
                strategy.stop_training()
            maybe_crash("training")

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            learner.steps_ += 1

    return StepHook()
