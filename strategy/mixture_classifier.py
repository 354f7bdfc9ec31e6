"""The ``mixtures`` baseline: SpaceNet's task-inference statistics alone, as a classifier.

``spacenet_ti`` chooses the task of an input with per-class mixtures of probabilistic
PCA (``TaskInference``) and the class within it with the task's sub-network. This
strategy keeps only the first half: the class with the highest log-likelihood wins. It
shows how much of ``spacenet_ti``'s accuracy the network itself contributes. Like SLDA
and NCM it is exemplar-free: each class's statistics come from its own experience.

    >>> import torch
    >>> from spacenet.strategy.task_inference import TaskInference
    >>> scores = MixtureScores(TaskInference(components=1, rank=1), num_classes=3)
    >>> scores.fit(torch.rand(40, 4) * 0.2, torch.zeros(40, dtype=torch.long), task=0)
    >>> scores(torch.rand(2, 4) * 0.2)[:, 1:].isinf().all().item()
    True
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from spacenet.strategy.task_inference import TaskInference


class MixtureScores(nn.Module):
    """Class log-likelihoods as logits; ``-inf`` for classes not seen yet."""

    def __init__(self, task_inference: TaskInference, num_classes: int) -> None:
        super().__init__()
        self.task_inference = task_inference
        self.num_classes = num_classes

    def fit(self, x: Tensor, y: Tensor, task: int) -> None:
        self.task_inference.fit_task(task, x, y)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), device=x.device)
        if self.task_inference.units_:
            out[:, self.task_inference.units_] = self.task_inference.class_log_likelihood(x).to(out)
        return out


class MixtureClassifier(SupervisedTemplate):  # type: ignore[misc]
    """One pass over each experience gathers its inputs; then its classes are fitted."""

    def __init__(self, *, task_inference: TaskInference, num_classes: int, **kwargs: Any) -> None:
        super().__init__(model=MixtureScores(task_inference, num_classes), optimizer=None, **kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        """No optimizer: nothing is trained by gradients."""

    def training_epoch(self, **kwargs: Any) -> None:
        xs, ys = [], []
        for batch in self.dataloader:
            self.mbatch = batch
            self._unpack_minibatch()
            xs.append(self.mb_x.cpu())
            ys.append(self.mb_y.cpu())
        self.model.fit(torch.cat(xs), torch.cat(ys), task=self.clock.train_exp_counter)
