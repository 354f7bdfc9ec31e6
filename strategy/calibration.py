"""Old- vs new-task logit calibration without replay (an option beyond the paper).

SpaceNet trains each task's classes only against each other: while task t trains,
the other tasks' output rows are zeroed. Their logits therefore live on different,
uncalibrated scales, and the newest task tends to win the argmax. ``TaskLogitNorm``
records, at the end of each task and on that task's own training data (no sample
is kept), the mean and standard deviation of the task's winning logit; at inference
every task's logits are standardised with its own statistics, so tasks compete on
"how typical is this score for me" instead of raw magnitude. Units that no class
owns get ``-inf``. Within a task the order of classes is unchanged.

    >>> norm = TaskLogitNorm()
    >>> norm.stats_                     # task -> (mean, std), filled by fit_task
    {}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from spacenet.strategy.spacenet import SpaceNet


class TaskLogitNorm:
    """Standardise each task's logits by the statistics of its winning logit."""

    def __init__(self, batch_size: int = 1024, min_std: float = 1e-3) -> None:
        self.batch_size = batch_size
        self.min_std = min_std
        self.stats_: dict[int, tuple[float, float]] = {}

    @torch.no_grad()
    def fit_task(
        self,
        model: nn.Module,
        net: SpaceNet,
        task: int,
        dataset: Dataset[Any],
        device: torch.device | str = "cpu",
    ) -> None:
        units = net.task_units()[task].to(device)
        was_training = model.training
        model.eval()
        winners: list[Tensor] = []
        for batch in DataLoader(dataset, batch_size=self.batch_size, shuffle=False):
            x = batch[0].to(device)
            winners.append(model(x)[:, units].max(dim=1).values.float().cpu())
        model.train(was_training)
        top = torch.cat(winners)
        self.stats_[task] = (
            float(top.mean()),
            max(float(top.std()) if top.numel() > 1 else 1.0, self.min_std),
        )

    def apply(self, logits: Tensor, net: SpaceNet) -> Tensor:
        out = torch.full_like(logits, float("-inf"))
        for task, units in net.task_units().items():
            units = units.to(logits.device)
            if task in self.stats_:
                mean, std = self.stats_[task]
                out[:, units] = (logits[:, units] - mean) / std
            else:  # the task being trained: not calibrated yet
                out[:, units] = logits[:, units]
        return out

    def state_dict(self) -> dict[str, Tensor]:
        tasks = sorted(self.stats_)
        return {
            "tasks": torch.tensor(tasks, dtype=torch.long),
            "stats": torch.tensor([self.stats_[t] for t in tasks], dtype=torch.float64).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.stats_ = {
            int(t): (float(m), float(s))
            for t, (m, s) in zip(state["tasks"].tolist(), state["stats"].tolist(), strict=True)
        }
