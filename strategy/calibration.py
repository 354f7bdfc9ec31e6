"""Old- vs new-task logit calibration without replay (an option beyond the paper).

SpaceNet trains each task's classes only against each other: while task t trains,
the other tasks' output rows are zeroed. Tasks' logits therefore live on different,
uncalibrated scales, and a task's head can fire strongly on another task's inputs.
Calibration decides *which task* an input belongs to from each head's winning
logit ``m_j(x)`` (the largest logit among task j's classes), then the class inside
that task by the raw logits. It keeps no samples, only a few numbers per task, all
computed from the data of the task being learned:

- ``mode="zscore"`` (default; the better of the two on split MNIST): at the end of
  task j, the mean and standard deviation of ``m_j`` on task j's own data; the task
  score is ``(m_j - mean_j) / std_j``.
- ``mode="llr"``: also, at the end of every later task t, the statistics
  of ``m_j`` on task t's data, i.e. how head j responds to inputs that are *not*
  its own. The task score is the Gaussian log-likelihood ratio "own vs foreign".
  The newest head has seen no foreign data yet; its foreign statistics are
  borrowed from the older heads (the average gap between own and foreign means,
  in units of own standard deviations, and the average ratio of spreads).

Units that no class owns get ``-inf``. Within a task the order of classes is unchanged.

    >>> norm = TaskLogitNorm()
    >>> norm.own_, norm.foreign_        # task -> (mean, std) / (count, sum, sum of squares)
    ({}, {})
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from spacenet.strategy.spacenet import SpaceNet

Mode = Literal["zscore", "llr"]


class TaskLogitNorm:
    """Per-task calibration of the winning logit; see the module docstring."""

    def __init__(self, mode: Mode = "zscore", batch_size: int = 1024, min_std: float = 1e-3) -> None:
        if mode not in ("zscore", "llr"):
            raise ValueError("mode must be 'zscore' or 'llr'")
        self.mode = mode
        self.batch_size = batch_size
        self.min_std = min_std
        self.own_: dict[int, tuple[float, float]] = {}
        self.foreign_: dict[int, tuple[float, float, float]] = {}

    @property
    def stats_(self) -> dict[int, tuple[float, float]]:
        """Own statistics per calibrated task (mean, std of its winning logit)."""
        return self.own_

    @torch.no_grad()
    def fit_task(
        self,
        model: nn.Module,
        net: SpaceNet,
        task: int,
        dataset: Dataset[Any],
        device: torch.device | str = "cpu",
    ) -> None:
        """After ``task`` is learned: its own statistics, and foreign ones for older heads."""
        heads = {t: u.to(device) for t, u in net.task_units().items() if t == task or t in self.own_}
        was_training = model.training
        model.eval()
        winners: dict[int, list[Tensor]] = {t: [] for t in heads}
        for batch in DataLoader(dataset, batch_size=self.batch_size, shuffle=False):
            logits = model(batch[0].to(device))
            for t, units in heads.items():
                winners[t].append(logits[:, units].max(dim=1).values.double().cpu())
        model.train(was_training)
        for t, parts in winners.items():
            m = torch.cat(parts)
            if t == task:
                std = float(m.std()) if m.numel() > 1 else 1.0
                self.own_[t] = (float(m.mean()), max(std, self.min_std))
            else:
                n, s, ss = self.foreign_.get(t, (0.0, 0.0, 0.0))
                self.foreign_[t] = (n + m.numel(), s + float(m.sum()), ss + float((m * m).sum()))

    def _foreign(self, task: int) -> tuple[float, float] | None:
        """(mean, std) of head ``task`` on other tasks' data, measured or borrowed."""
        if task in self.foreign_:
            n, s, ss = self.foreign_[task]
            mean = s / n
            return mean, max(math.sqrt(max(ss / n - mean * mean, 0.0)), self.min_std)
        gaps, ratios = [], []
        for t, (mu, sd) in self.own_.items():
            if t in self.foreign_:
                fmu, fsd = self._foreign(t) or (mu, sd)
                gaps.append((mu - fmu) / sd)
                ratios.append(fsd / sd)
        if not gaps or task not in self.own_:
            return None
        mu, sd = self.own_[task]
        return mu - sd * sum(gaps) / len(gaps), sd * sum(ratios) / len(ratios)

    def task_scores(self, winning: Tensor, task: int) -> Tensor:
        """How strongly inputs look like ``task``'s own, from its winning logits."""
        mu, sd = self.own_[task]
        z = (winning - mu) / sd
        if self.mode == "zscore":
            return z
        foreign = self._foreign(task)
        if foreign is None:
            return z
        fmu, fsd = foreign
        zf = (winning - fmu) / fsd
        return 0.5 * (zf * zf - z * z) + math.log(fsd / sd)

    def apply(self, logits: Tensor, task_units: dict[int, Tensor]) -> Tensor:
        """Calibrated logits; ``task_units`` maps each task to its output units
        (``SpaceNet.task_units()``). Units of no task get ``-inf``."""
        out = torch.full_like(logits, float("-inf"))
        for task, units in task_units.items():
            units = units.to(logits.device)
            own = logits[:, units]
            if task in self.own_:
                winning = own.max(dim=1, keepdim=True).values
                out[:, units] = own - winning + self.task_scores(winning.double(), task).to(logits.dtype)
            else:  # the task being trained: not calibrated yet
                out[:, units] = own
        return out

    def state_dict(self) -> dict[str, Tensor]:
        own = sorted(self.own_)
        foreign = sorted(self.foreign_)
        return {
            "own_tasks": torch.tensor(own, dtype=torch.long),
            "own": torch.tensor([self.own_[t] for t in own], dtype=torch.float64).reshape(-1, 2),
            "foreign_tasks": torch.tensor(foreign, dtype=torch.long),
            "foreign": torch.tensor([self.foreign_[t] for t in foreign], dtype=torch.float64).reshape(-1, 3),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.own_ = {
            int(t): (float(m), float(s))
            for t, (m, s) in zip(state["own_tasks"].tolist(), state["own"].tolist(), strict=True)
        }
        self.foreign_ = {
            int(t): (float(n), float(a), float(b))
            for t, (n, a, b) in zip(state["foreign_tasks"].tolist(), state["foreign"].tolist(), strict=True)
        }
