"""Per-layer SpaceNet bookkeeping: who owns each connection and neuron.

A *connection* of a ``Linear`` layer is one weight ``W[out, in]``; of a ``Conv2d`` it is
one input-channel x output-channel kernel slice ``W[out, in, :, :]``. A *neuron* is an
output unit (``Linear``) or an output channel (``Conv2d``).

Ownership is stored as integer maps rather than one mask per task, so masks of
different tasks cannot overlap by construction:

- ``conn_owner_[out, in]``: task id owning the connection, ``FREE`` (-1) when unused;
- ``reserved_by_[out]``: task id that reserved the neuron, ``FREE`` when free.

    >>> import torch
    >>> layer = SparseLayer(torch.nn.Linear(4, 3), index=0, is_output=False)
    >>> layer.num_connections, int(layer.conn_owner_.eq(FREE).sum())
    (12, 12)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

FREE = -1


class SparseLayer:
    """Ownership, stored initial weights and importance of one Linear or Conv2d layer."""

    def __init__(self, module: nn.Module, index: int, is_output: bool) -> None:
        if not isinstance(module, nn.Linear | nn.Conv2d):
            raise TypeError(f"SpaceNet handles nn.Linear and nn.Conv2d, not {type(module).__name__}")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise TypeError("grouped convolutions are not supported")
        self.module = module
        self.index = index
        self.is_output = is_output
        weight = module.weight
        dev = weight.device
        self.out_units, self.in_units = int(weight.shape[0]), int(weight.shape[1])
        # The dense initialisation is kept aside: a connection, when placed, takes its value.
        self.init_: Tensor = weight.detach().clone()
        self.conn_owner_: Tensor = torch.full(
            (self.out_units, self.in_units), FREE, dtype=torch.int16, device=dev
        )
        self.reserved_by_: Tensor = torch.full((self.out_units,), FREE, dtype=torch.int16, device=dev)
        # Current task only (reset at each task start). Neuron importance is the sum
        # of connection importance plus what dropped connections had carried.
        self.conn_importance_: Tensor = torch.zeros(self.out_units, self.in_units, device=dev)
        self.dropped_out_importance_: Tensor = torch.zeros(self.out_units, device=dev)
        self.dropped_in_importance_: Tensor = torch.zeros(self.in_units, device=dev)
        self.selected_out_: Tensor = torch.zeros(self.out_units, dtype=torch.bool, device=dev)
        self.selected_in_: Tensor = torch.zeros(self.in_units, dtype=torch.bool, device=dev)
        # Derived, refreshed by ``refresh_masks``: what the current task may change.
        self.train_w_: Tensor = torch.zeros_like(weight, dtype=torch.bool)
        self.mask_w_: Tensor = torch.zeros_like(weight)
        self.train_b_: Tensor | None = None
        self.mask_b_: Tensor | None = None
        self._prev_w: Tensor | None = None
        self._prev_b: Tensor | None = None
        if module.bias is not None:
            self.train_b_ = torch.zeros_like(module.bias, dtype=torch.bool)
            self.mask_b_ = torch.zeros_like(module.bias)

    # ------------------------------------------------------------------ views
    @property
    def weight(self) -> Tensor:
        w: Tensor = self.module.weight
        return w

    @property
    def bias(self) -> Tensor | None:
        b: Tensor | None = self.module.bias
        return b

    @property
    def num_connections(self) -> int:
        return self.out_units * self.in_units

    def _expand(self, conn: Tensor) -> Tensor:
        """Broadcast an [out, in] map over the kernel dimensions of a conv weight."""
        return conn.view(*conn.shape, *([1] * (self.weight.dim() - 2)))

    def conn_magnitude(self, per_weight: Tensor) -> Tensor:
        """Sum a per-weight quantity over the kernel: one value per connection."""
        return per_weight if per_weight.dim() == 2 else per_weight.sum(dim=(2, 3))

    # ------------------------------------------------------------- placement
    def reset_task_state(self) -> None:
        for t in (
            self.conn_importance_,
            self.dropped_out_importance_,
            self.dropped_in_importance_,
            self.selected_out_,
            self.selected_in_,
        ):
            t.zero_()

    @property
    def out_importance(self) -> Tensor:
        """Importance of each neuron: the summed importance of its incoming connections."""
        return self.conn_importance_.sum(dim=1) + self.dropped_out_importance_

    @property
    def in_importance(self) -> Tensor:
        """Importance of each input unit: summed over its outgoing connections."""
        return self.conn_importance_.sum(dim=0) + self.dropped_in_importance_

    def place(self, positions: Tensor, task: int, from_init: bool) -> None:
        """Give the [out, in] positions (a bool map) to ``task``; weights from init or 0."""
        self.conn_owner_[positions] = task
        with torch.no_grad():
            full = self._expand(positions).expand_as(self.weight)
            values = self.init_ if from_init else torch.zeros_like(self.init_)
            self.weight.copy_(torch.where(full, values, self.weight))

    def remove(self, positions: Tensor) -> None:
        """Free the [out, in] positions and zero their weights and importance."""
        self.conn_owner_[positions] = FREE
        gone = self.conn_importance_ * positions
        self.dropped_out_importance_.add_(gone.sum(dim=1))
        self.dropped_in_importance_.add_(gone.sum(dim=0))
        self.conn_importance_[positions] = 0.0
        with torch.no_grad():
            self.weight.masked_fill_(self._expand(positions).expand_as(self.weight), 0.0)

    def refresh_masks(self, task: int, bias_trainable: Tensor) -> None:
        """Recompute which weights and biases the current task may change."""
        self.train_w_ = self._expand(self.conn_owner_ == task).expand_as(self.weight).contiguous()
        self.mask_w_ = self.train_w_.to(self.weight.dtype)
        if self.train_b_ is not None:
            self.train_b_ = bias_trainable.clone()
            self.mask_b_ = self.train_b_.to(self.weight.dtype)

    # --------------------------------------------------------------- training
    def mask_gradients(self) -> None:
        if self.weight.grad is not None:
            self.weight.grad.mul_(self.mask_w_)
        if self.bias is not None and self.bias.grad is not None and self.mask_b_ is not None:
            self.bias.grad.mul_(self.mask_b_)

    def snapshot(self) -> None:
        """Keep the weights before an optimizer step (only needed by ``after_step(None)``)."""
        self._prev_w = self.weight.detach().clone()
        if self.bias is not None:
            self._prev_b = self.bias.detach().clone()

    def after_step(self, sgd_lr: float | None) -> None:
        """Accumulate the step's importance |dw * g| per connection.

        With plain SGD (``sgd_lr`` given: no momentum, no weight decay) masked
        gradients already leave frozen weights bit-identical and dw = -lr * g, so the
        importance is lr * g^2 and no snapshot is needed. Otherwise every change
        outside the trainable set is undone from the snapshot taken before the step,
        so momentum or weight decay cannot move frozen weights either.
        """
        w, g = self.weight, self.weight.grad
        if g is None:
            return
        with torch.no_grad():
            if sgd_lr is not None:
                if w.dim() == 2:
                    self.conn_importance_.addcmul_(g, g, value=sgd_lr)
                else:
                    self.conn_importance_.add_(g.square().sum(dim=(2, 3)), alpha=sgd_lr)
                return
            if self._prev_w is None:
                raise RuntimeError("after_step(None) needs snapshot() before the optimizer step")
            w.copy_(torch.where(self.train_w_, w, self._prev_w))
            if self.bias is not None and self._prev_b is not None and self.train_b_ is not None:
                self.bias.copy_(torch.where(self.train_b_, self.bias, self._prev_b))
            self.conn_importance_.add_(self.conn_magnitude(((w - self._prev_w) * g).abs_()))

    # ----------------------------------------------------------------- state
    # What the first state version kept: every map dense, the initial weights included.
    DENSE_STATE_KEYS = (
        "init_",
        "conn_owner_",
        "reserved_by_",
        "conn_importance_",
        "dropped_out_importance_",
        "dropped_in_importance_",
        "selected_out_",
        "selected_in_",
    )

    def state_dict(self) -> dict[str, Tensor]:
        """What the method needs between tasks, sparse: which connections are used (a bit
        per connection), the task owning each used one, their weights, the biases and the
        neuron reservations. The open task's working state (importance, selection) is
        reset by the next ``begin_task``, so it is not kept; nor is ``init_`` (see
        ``SpaceNet.state_dict``)."""
        used = (self.conn_owner_ != FREE).cpu()
        owners = self.conn_owner_.cpu()[used]
        narrow = owners.numel() == 0 or int(owners.max()) < 256
        state = {
            "used": torch.from_numpy(np.packbits(used.flatten().numpy())),
            "owner": owners.to(torch.uint8 if narrow else torch.int16),
            "values": self.weight.detach().cpu()[used].clone(),
            "reserved_by": self.reserved_by_.cpu().clone(),
        }
        if self.bias is not None:
            state["bias"] = self.bias.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore ``state_dict()`` output, weights included; the open task's working state
        starts empty, as ``begin_task`` leaves it."""
        dev = self.conn_owner_.device
        used = torch.from_numpy(np.unpackbits(state["used"].numpy(), count=self.num_connections).astype(bool))
        used = used.view(self.out_units, self.in_units)
        n = int(used.sum())
        values, owners = state["values"], state["owner"]
        if owners.shape != (n,) or values.shape != (n, *self.weight.shape[2:]):
            raise ValueError(
                f"layer {self.index}: {n} used connections, but {owners.numel()} owners and "
                f"{values.shape[0]} values; a state for another model?"
            )
        if state["reserved_by"].shape != self.reserved_by_.shape:
            raise ValueError(f"layer {self.index}: reservations for {state['reserved_by'].numel()} neurons")
        owner_map = torch.full((self.out_units, self.in_units), FREE, dtype=torch.int16)
        owner_map[used] = owners.to(torch.int16)
        self.conn_owner_ = owner_map.to(dev)
        self.reserved_by_ = state["reserved_by"].to(device=dev, dtype=torch.int16).clone()
        with torch.no_grad():
            weight = torch.zeros(self.weight.shape, dtype=self.weight.dtype)
            weight[used] = values.to(self.weight.dtype)
            self.weight.copy_(weight)
            if self.bias is not None:
                self.bias.copy_(state["bias"])
        self.reset_task_state()

    def load_dense_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the first version's state (the weights come with the model's own state)."""
        for k in self.DENSE_STATE_KEYS:
            current: Tensor = getattr(self, k)
            value = state[k]
            if value.shape != current.shape:
                raise ValueError(
                    f"layer {self.index}: {k} has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
                )
            setattr(self, k, value.to(device=current.device, dtype=current.dtype).clone())
