"""SpaceNet as an Avalanche plugin: drops into any ``SupervisedTemplate``.

    >>> from avalanche.benchmarks import nc_benchmark
    >>> from avalanche.training import Naive
    >>> from avalanche.training.plugins import EvaluationPlugin
    >>> from torch.utils.data import TensorDataset
    >>> from spacenet.strategy.models import SpaceNetMLP
    >>> _ = torch.manual_seed(0)
    >>> data = TensorDataset(torch.rand(64, 1, 28, 28), torch.arange(64) % 4)
    >>> data.targets = data.tensors[1]
    >>> benchmark = nc_benchmark(data, data, n_experiences=2, task_labels=False, shuffle=False,
    ...                          fixed_class_order=[0, 1, 2, 3])
    >>> model = SpaceNetMLP()
    >>> plugin = SpaceNetPlugin(seed=0)
    >>> strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
    ...                  train_mb_size=32, train_epochs=1, plugins=[plugin],
    ...                  evaluator=EvaluationPlugin(loggers=[]))
    >>> for exp in benchmark.train_stream:
    ...     _ = strategy.train(exp)
    >>> report = plugin.capacity()                 # report.table() prints it for people
    >>> report.tasks_learned, [layer.reserved_neurons for layer in report.layers]
    (2, [80, 80, 4])

The plugin is a thin adapter: the method lives in ``SpaceNet`` (``spacenet.py``),
which the streaming service drives directly as well.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from spacenet.strategy.calibration import TaskLogitNorm
from spacenet.strategy.capacity import CapacityReport
from spacenet.strategy.plugin_state import load_plugin_state, plugin_state
from spacenet.strategy.spacenet import SpaceNet


def plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """True for SGD with one parameter group, no momentum and no weight decay: then
    masked gradients alone keep frozen weights exact and dw = -lr * g."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    return bool(group["momentum"] == 0 and group["weight_decay"] == 0 and not group.get("maximize", False))


class SpaceNetPlugin(SupervisedPlugin):  # type: ignore[misc]
    """Avalanche plugin running SpaceNet: ``spacenet_options`` are ``SpaceNet``'s parameters
    (``n_select``, ``n_reserve``, ``connections``, ``seed``, ...; its defaults are the paper's);
    ``calibration`` is an option beyond the paper (see ``calibration.py``). With SpaceNet's
    ``task_inference``, the first epoch's batches are shown to ``SpaceNet.observe`` (the task's
    statistics are fitted from them at its end), and evaluation outputs are
    ``SpaceNet.infer``'s class log-probabilities."""

    def __init__(self, *, calibration: TaskLogitNorm | None = None, **spacenet_options: Any) -> None:
        super().__init__()
        self.spacenet = SpaceNet(**spacenet_options)
        if calibration is not None and self.spacenet.task_inference is not None:
            raise ValueError("calibration and task_inference both rescore the outputs: choose one")
        self.calibration = calibration
        self.model_: nn.Module | None = None
        self._plain_sgd = False
        self._pending_state: dict[str, Any] | None = None

    @classmethod
    def around(
        cls, spacenet: SpaceNet, model: nn.Module, calibration: TaskLogitNorm | None = None
    ) -> SpaceNetPlugin:
        """A plugin that drives ``spacenet``, already attached to ``model`` and left as it is
        (for code that holds a SpaceNet and imports Avalanche only to train)."""
        if calibration is not None and spacenet.task_inference is not None:
            raise ValueError("calibration and task_inference both rescore the outputs: choose one")
        plugin = cls(calibration=calibration)
        plugin.spacenet, plugin.model_ = spacenet, model
        return plugin

    # ---------------------------------------------------------------- set-up
    def attach(self, model: nn.Module) -> SpaceNetPlugin:
        """Bind to ``model`` now (otherwise done at the first training experience)."""
        if self.model_ is model:
            return self
        if self.model_ is not None:
            raise RuntimeError("this SpaceNetPlugin already manages another model")
        pending = self._pending_state
        # A first-version state leaves the trained weights to the model's own state: keep them.
        self.spacenet.attach(model, reset=pending is None or SpaceNet.carries_weights(pending["spacenet"]))
        self.model_ = model
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None
        return self

    def capacity(self) -> CapacityReport:
        if self.model_ is None:
            raise RuntimeError(
                "the plugin has not seen a model yet: attach(model) first (a loaded state applies then)"
            )
        return self.spacenet.capacity()

    # ------------------------------------------------------------- training
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.attach(strategy.model)
        self.spacenet.begin_task(strategy.experience.classes_in_this_experience)
        self._plain_sgd = plain_sgd(strategy.optimizer)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.spacenet.observe(strategy.mbatch[0], strategy.mbatch[1])
        self._map_labels(strategy)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.spacenet.mask_gradients()

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        self.spacenet.before_step(self._sgd_lr(strategy))

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self.spacenet.after_step(self._sgd_lr(strategy))

    def _sgd_lr(self, strategy: Any) -> float | None:
        return float(strategy.optimizer.param_groups[0]["lr"]) if self._plain_sgd else None

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.spacenet.end_epoch(last=self.spacenet.epoch_ + 1 >= strategy.train_epochs)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        task = self.spacenet.task_
        self.spacenet.end_task()
        if self.calibration is not None and task is not None:
            self.calibration.fit_task(
                strategy.model, self.spacenet, task, strategy.experience.dataset, device=strategy.device
            )

    # ----------------------------------------------------------- evaluation
    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        if self.model_ is not None:
            self.spacenet.show_all_tasks()

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        if self.model_ is not None:
            self.spacenet.hide_other_tasks()  # no-op unless evaluated in the middle of a task

    def before_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._map_labels(strategy)

    def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.calibration is not None and self.model_ is not None:
            strategy.mb_output = self.calibration.apply(strategy.mb_output, self.spacenet.task_units())
        if self.model_ is not None:
            strategy.mb_output = self.spacenet.infer(strategy.mb_output, strategy.mb_x)

    def _map_labels(self, strategy: Any) -> None:
        """Labels to output units, when the class map is not the identity."""
        if self.model_ is None or self.spacenet.identity_map:
            return
        y: Tensor = strategy.mbatch[1]
        strategy.mbatch[1] = self.spacenet.units_of(y)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """SpaceNet's sparse state (``SpaceNet.state_dict``: the managed layers' used weights,
        biases, ownership, reservations, class map) and the calibration's. For a model whose
        parameters SpaceNet all manages (``SpaceNetMLP``) it is the whole learned state."""
        if self.model_ is None:
            raise RuntimeError("nothing to save: the plugin has not seen a model yet")
        return plugin_state(self.spacenet, self.calibration)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; applied at once if a model is attached, else when one is."""
        if self.model_ is None:
            self._pending_state = state
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        load_plugin_state(state, self.spacenet, self.calibration)
