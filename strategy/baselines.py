"""Strategies for the benchmark runner: SpaceNet variants beside Avalanche's baselines.

``REGISTRY`` maps a name to a ``Baseline`` whose ``build(model, settings, seed,
plugins, evaluator)`` returns a fresh Avalanche strategy. Every strategy trains with
plain SGD (``settings.lr``, no momentum, no weight decay), ``settings.batch_size`` and
``settings.epochs`` per experience; the defaults (0.01, 128, 4) are the SpaceNet
reference settings.

    >>> settings = TrainSettings(epochs=1)
    >>> from spacenet.strategy.benchmarks import BENCHMARKS
    >>> model = make_model(BENCHMARKS["split_mnist"])
    >>> strategy = build_strategy("replay", model, settings, seed=0)
    >>> type(model).__name__, type(strategy).__name__
    ('SpaceNetMLP', 'Replay')

Fixed hyper-parameters, stated once here and in each entry's description: EWC lambda
1000 (separate mode), SI lambda 1, LwF alpha 1 and temperature 2, Replay and GDumb
200 samples (``replay1000``: 1000), GEM and A-GEM 256 patterns per experience
(GEM memory strength 0.5, A-GEM sample size 256).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spacenet.strategy.benchmarks import BenchmarkInfo
from spacenet.strategy.calibration import TaskLogitNorm
from spacenet.strategy.models import SmallCNN, SpaceNetMLP
from spacenet.strategy.task_inference import TaskInference

SLDA_SHRINKAGE = 0.1


@dataclass(frozen=True)
class TrainSettings:
    """Training settings shared by every strategy of a benchmark run."""

    epochs: int = 4
    lr: float = 0.01
    batch_size: int = 128
    eval_batch_size: int = 1024
    device: str = "cpu"
    n_experiences: int = 5  # of the benchmark (recorded with the results)
    # Of the benchmark's inputs, for the strategies that model them directly: the values
    # a pixel of 0 and of 1 take after normalisation, the flattened size, the classes.
    input_range: tuple[float, float] = (-0.1307 / 0.3081, (1 - 0.1307) / 0.3081)
    input_size: int = 784
    num_classes: int = 10


StrategyFactory = Callable[[nn.Module, TrainSettings, int, list[Any], Any], Any]


@dataclass(frozen=True)
class Baseline:
    """A named strategy: how to build it, what it is, and what to keep in mind."""

    name: str
    build: StrategyFactory
    description: str
    caveat: str | None = None


def make_model(info: BenchmarkInfo) -> nn.Module:
    """``SpaceNetMLP`` for 28x28 grey images, ``SmallCNN`` for CIFAR."""
    model: nn.Module
    if info.in_channels == 1:
        model = SpaceNetMLP(input_size=info.image_size**2, num_classes=info.num_classes)
    else:
        model = SmallCNN(
            in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size
        )
    return model


def spacenet_kwargs(model: nn.Module, num_tasks: int = 5) -> dict[str, Any]:
    """SpaceNet plugin arguments for ``model``: none (the paper's defaults) for the MLP;
    for ``SmallCNN``, ``model.spacenet_defaults(num_tasks)``, sized so the tasks fit."""
    if not isinstance(model, SmallCNN):
        return {}
    return model.spacenet_defaults(num_tasks)


# ------------------------------------------------------------------------ factories
def _common(model: nn.Module, s: TrainSettings, plugins: list[Any], evaluator: Any) -> dict[str, Any]:
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=s.lr),
        "criterion": nn.CrossEntropyLoss(),
        "train_mb_size": s.batch_size,
        "train_epochs": s.epochs,
        "eval_mb_size": s.eval_batch_size,
        "device": s.device,
        "plugins": plugins,
        "evaluator": evaluator,
    }


def scale_hidden_budget(connections: Sequence[int | float], factor: float) -> tuple[int | float, ...]:
    """The hidden layers' connection budgets times ``factor`` (a density stays at most 1); the
    output layer's (the last) unchanged.

    >>> scale_hidden_budget((10000, 1640, 80), 2.0), scale_hidden_budget((0.6, 80), 2.0)
    ((20000, 3280, 80), (1.0, 80))
    """
    scaled = [min(1.0, c * factor) if isinstance(c, float) else round(c * factor) for c in connections[:-1]]
    return (*scaled, connections[-1])


def task_inference_for(settings: TrainSettings, seed: int) -> TaskInference:
    """The task-identity inference of ``spacenet_ti`` for a benchmark's inputs."""
    return TaskInference(input_range=settings.input_range, seed=seed)  # defaults: see TaskInference


def _spacenet(
    freeze_used_biases: bool = False,
    calibrate: bool = False,
    hidden_budget: float = 1.0,
    task_inference: bool = False,
) -> StrategyFactory:
    def build(model: nn.Module, s: TrainSettings, seed: int, plugins: list[Any], evaluator: Any) -> Any:
        from avalanche.training import Naive

        from spacenet.strategy.plugin import SpaceNetPlugin
        from spacenet.strategy.spacenet import PAPER_CONNECTIONS

        kwargs = spacenet_kwargs(model, s.n_experiences)
        if hidden_budget != 1.0:
            kwargs["connections"] = scale_hidden_budget(
                kwargs.get("connections", PAPER_CONNECTIONS), hidden_budget
            )
        plugin = SpaceNetPlugin(
            seed=seed,
            freeze_used_biases=freeze_used_biases,
            calibration=TaskLogitNorm() if calibrate else None,
            task_inference=task_inference_for(s, seed) if task_inference else None,
            **kwargs,
        )
        return Naive(**_common(model, s, [plugin, *plugins], evaluator))

    return build


def _slda(model: nn.Module, s: TrainSettings, seed: int, plugins: list[Any], evaluator: Any) -> Any:
    """Streaming LDA on the flattened inputs (no feature extractor): Avalanche's
    ``StreamingLDA`` with its per-sample covariance update replaced by an exact update per
    mini-batch (``BatchedStreamingLDA``), about 100x faster."""
    from spacenet.strategy.slda import BatchedStreamingLDA

    return BatchedStreamingLDA(
        slda_model=nn.Flatten(),
        criterion=nn.CrossEntropyLoss(),
        input_size=s.input_size,
        num_classes=s.num_classes,
        shrinkage_param=SLDA_SHRINKAGE,
        train_mb_size=s.batch_size,
        train_epochs=1,  # one pass: the statistics are exact running sums
        eval_mb_size=s.eval_batch_size,
        device=s.device,
        plugins=plugins,
        evaluator=evaluator,
    )


def _mixtures(model: nn.Module, s: TrainSettings, seed: int, plugins: list[Any], evaluator: Any) -> Any:
    """spacenet_ti's task-inference statistics alone, as a generative classifier."""
    from spacenet.strategy.mixture_classifier import MixtureClassifier

    return MixtureClassifier(
        task_inference=task_inference_for(s, seed),
        num_classes=s.num_classes,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=s.eval_batch_size,
        train_epochs=1,
        eval_mb_size=s.eval_batch_size,
        device=s.device,
        plugins=plugins,
        evaluator=evaluator,
    )


def _ncm(model: nn.Module, s: TrainSettings, seed: int, plugins: list[Any], evaluator: Any) -> Any:
    """Avalanche's NCMClassifier on the flattened inputs: class means of each experience's
    data (``CurrentDataNCMUpdate``); the linear training head is never used to predict."""
    from avalanche.models import NCMClassifier, TrainEvalModel
    from avalanche.training import Naive
    from avalanche.training.plugins import CurrentDataNCMUpdate

    ncm = TrainEvalModel(nn.Flatten(), nn.Linear(s.input_size, s.num_classes), NCMClassifier(normalize=False))
    return Naive(**_common(ncm, s, [CurrentDataNCMUpdate(), *plugins], evaluator))


def _avalanche(cls_name: str, **fixed: Any) -> StrategyFactory:
    def build(model: nn.Module, s: TrainSettings, seed: int, plugins: list[Any], evaluator: Any) -> Any:
        import avalanche.training as training

        return getattr(training, cls_name)(**_common(model, s, plugins, evaluator), **fixed)

    return build


_SI_CAVEAT = (
    "Avalanche's SynapticIntelligence is a no-op on the CPU (its weight snapshot is a view, "
    "not a copy), so on the CPU it trains exactly like Naive."
)
_EWC_CAVEAT = (
    "Avalanche's EWC estimates the Fisher from squared mini-batch-mean gradients, far smaller "
    "than per-sample estimates, so lambda 1000 is a weak penalty."
)
_LWF_CAVEAT = (
    "LwF in a single-head class-incremental setting distils only old logits; the new classes "
    "still win the argmax (the known ~0.2 result on split MNIST)."
)

REGISTRY: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("spacenet", _spacenet(), "SpaceNet plugin on Naive, the paper's settings"),
        Baseline("spacenet_fb", _spacenet(freeze_used_biases=True), "SpaceNet, used biases frozen"),
        Baseline("spacenet_cal", _spacenet(calibrate=True), "SpaceNet with per-task logit normalisation"),
        Baseline(
            "spacenet_plus",
            _spacenet(freeze_used_biases=True, calibrate=True),
            "SpaceNet, frozen used biases and per-task logit normalisation",
        ),
        Baseline(
            "spacenet_2x",
            _spacenet(hidden_budget=2.0),
            "SpaceNet with twice the paper's connection budget in each hidden layer",
        ),
        Baseline(
            "spacenet_ti",
            _spacenet(task_inference=True),
            "SpaceNet with task-identity inference (per-class input mixtures choose the task)",
        ),
        Baseline("naive", _avalanche("Naive"), "fine-tuning, no protection (lower bound)"),
        Baseline(
            "ewc", _avalanche("EWC", ewc_lambda=1000.0, mode="separate"), "EWC, lambda 1000", _EWC_CAVEAT
        ),
        Baseline(
            "si",
            _avalanche("SynapticIntelligence", si_lambda=1.0),
            "Synaptic Intelligence, lambda 1",
            _SI_CAVEAT,
        ),
        Baseline("lwf", _avalanche("LwF", alpha=1.0, temperature=2.0), "LwF, alpha 1, T 2", _LWF_CAVEAT),
        Baseline("replay", _avalanche("Replay", mem_size=200), "experience replay, 200 samples"),
        Baseline("replay1000", _avalanche("Replay", mem_size=1000), "experience replay, 1000 samples"),
        Baseline(
            "gem",
            _avalanche("GEM", patterns_per_exp=256, memory_strength=0.5),
            "GEM, 256 patterns per experience, memory strength 0.5",
        ),
        Baseline(
            "agem",
            _avalanche("AGEM", patterns_per_exp=256, sample_size=256),
            "A-GEM, 256 patterns per experience, sample size 256",
        ),
        Baseline("gdumb", _avalanche("GDumb", mem_size=200), "GDumb, 200 samples"),
        Baseline("cumulative", _avalanche("Cumulative"), "retrain on all data so far (upper bound)"),
        Baseline(
            "slda",
            _slda,
            f"streaming LDA on the flattened inputs (Avalanche's StreamingLDA, shrinkage {SLDA_SHRINKAGE}, "
            "exact per-batch updates), exemplar-free",
        ),
        Baseline(
            "mixtures",
            _mixtures,
            "spacenet_ti's per-class input mixtures alone as the classifier (no network), exemplar-free",
        ),
        Baseline(
            "ncm",
            _ncm,
            "nearest class mean on the flattened inputs (Avalanche's NCMClassifier), exemplar-free",
        ),
    )
}

SPACENET_VARIANTS = frozenset(name for name in REGISTRY if name.startswith("spacenet"))
# Fitted from statistics in one pass over each experience: no optimizer, one epoch.
STATISTICS_ONLY = frozenset({"slda", "mixtures"})


def build_strategy(
    name: str,
    model: nn.Module,
    settings: TrainSettings,
    seed: int,
    plugins: Sequence[Any] = (),
    evaluator: Any = None,
) -> Any:
    """A fresh strategy ``name``; ``plugins`` is copied (Avalanche wrappers append to it).

    ``evaluator=None`` gives an ``EvaluationPlugin`` with no metrics and no loggers
    (Avalanche's default one prints to the console)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(REGISTRY)}")
    if evaluator is None:
        from avalanche.training.plugins import EvaluationPlugin

        evaluator = EvaluationPlugin(loggers=[])
    return REGISTRY[name].build(model, settings, seed, list(plugins), evaluator)


__all__ = [
    "REGISTRY",
    "SPACENET_VARIANTS",
    "STATISTICS_ONLY",
    "Baseline",
    "TrainSettings",
    "build_strategy",
    "make_model",
    "spacenet_kwargs",
]
