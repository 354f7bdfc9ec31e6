"""SpaceNet (Sokar et al., 2021): one sparse sub-network per task in a fixed-size model.

Framework-free component: the Avalanche plugin (``plugin.py``) and the streaming
service drive it through ``begin_task`` / ``mask_gradients`` / ``before_step`` /
``after_step`` / ``end_epoch`` / ``end_task``.

    >>> import torch
    >>> from spacenet.strategy.models import SpaceNetMLP
    >>> model = SpaceNetMLP()
    >>> net = SpaceNet(seed=0).attach(model)
    >>> net.begin_task([0, 1])
    >>> [int(layer.conn_owner_.eq(0).sum()) for layer in net.layers_]
    [10000, 1640, 80]
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from spacenet.strategy.capacity import CapacityExhaustedError, CapacityReport, LayerCapacity, tasks_that_fit
from spacenet.strategy.layers import FREE, SparseLayer
from spacenet.strategy.task_inference import TaskInference

ExhaustedPolicy = Literal["error", "shrink"]
STATE_VERSION = 2
PAPER_CONNECTIONS: tuple[int, ...] = (10000, 1640, 80)  # the reference code's budgets, split MNIST MLP


def _per_layer(value: int | float | Sequence[int | float], n: int, what: str) -> list[int | float]:
    values = list(value) if isinstance(value, Sequence) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values given for {n} layers")
    return values


def _tensor_bytes(obj: object) -> int:
    """Bytes of the tensors in nested dicts and lists (numbers and strings count 0)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class SpaceNet:
    """Sparse, reservation-based continual learning over a model's Linear/Conv2d layers.

    Parameters (defaults reproduce the authors' split-MNIST settings):
        n_select: free neurons picked at random per hidden layer for each task.
        n_reserve: most important free neurons reserved per hidden layer after each task.
        connections: connection budget per layer (hidden layers then output): an int, or
            a float in (0, 1] meaning a density of the free positions of the task's
            selected x selected block.
        drop_fraction: share of the task's connections dropped and regrown per epoch.
        seed: seeds allocation, so runs are reproducible.
        on_exhausted: ``"error"`` raises ``CapacityExhaustedError`` when a task cannot
            get ``n_select`` free neurons or its connection budget; ``"shrink"`` gives it
            what is left (and raises only when nothing is left).
        freeze_used_biases: option beyond the paper: also freeze the biases of neurons
            that carry earlier tasks' connections (the reference code lets them leak).
        hide_old_outputs: the paper zeroes the output rows of earlier tasks' classes
            while a task trains (only their biases remain). ``False`` (an option beyond
            the paper) keeps them, frozen, so the new task's classes learn to outscore
            the old classes on the new task's own data.
        layer_names: which modules to manage, in forward order; default all Linear/Conv2d.
        task_inference: option beyond the paper: a ``TaskInference`` that chooses the
            task of an input at inference; the class within it comes from the task's own
            output units (``infer``). It is fitted at ``end_task`` from the task's own
            records, as passed to ``observe`` during the task's first epoch (then
            discarded). ``None`` (faithful mode): argmax over all output units.
    """

    def __init__(
        self,
        n_select: int | Sequence[int] = 80,
        n_reserve: int | Sequence[int] = 40,
        connections: Sequence[int | float] = PAPER_CONNECTIONS,
        drop_fraction: float = 0.2,
        seed: int = 0,
        on_exhausted: ExhaustedPolicy = "error",
        freeze_used_biases: bool = False,
        hide_old_outputs: bool = True,
        layer_names: Sequence[str] | None = None,
        task_inference: TaskInference | None = None,
    ) -> None:
        self.n_select = n_select
        self.n_reserve = n_reserve
        self.connections = connections
        self.drop_fraction = drop_fraction
        self.seed = seed
        self.on_exhausted = on_exhausted
        self.freeze_used_biases = freeze_used_biases
        self.hide_old_outputs = hide_old_outputs
        self.layer_names = layer_names
        self.task_inference = task_inference
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError("drop_fraction must be in [0, 1)")
        if on_exhausted not in ("error", "shrink"):
            raise ValueError("on_exhausted must be 'error' or 'shrink'")

    # ------------------------------------------------------------------ set-up
    def attach(self, model: nn.Module, reset: bool = True) -> SpaceNet:
        """Take over ``model``'s layers: keep their dense init aside and zero them.

        ``reset=False`` leaves the weights alone, for a model whose trained weights were
        loaded and whose SpaceNet state of version 1 ``load_state_dict`` restores next
        (later versions carry the weights: attach a model built as the saved one was)."""
        if self.layer_names is not None:
            named = dict(model.named_modules())
            modules = [named[n] for n in self.layer_names]
            names = list(self.layer_names)
        else:
            pairs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
            names, modules = [n for n, _ in pairs], [m for _, m in pairs]
        if len(modules) < 2:
            raise ValueError("SpaceNet needs at least one hidden layer and an output layer")
        n = len(modules)
        self.layers_ = [SparseLayer(m, i, is_output=i == n - 1) for i, m in enumerate(modules)]
        self.layer_names_ = names
        self.n_select_ = [int(v) for v in _per_layer(self.n_select, n - 1, "n_select")]
        self.n_reserve_ = [int(v) for v in _per_layer(self.n_reserve, n - 1, "n_reserve")]
        self.connections_ = _per_layer(tuple(self.connections), n, "connections")
        for prev, layer in zip(self.layers_, self.layers_[1:], strict=False):
            if layer.in_units % prev.out_units:
                raise ValueError(
                    f"{names[layer.index]} has {layer.in_units} inputs, not a multiple of "
                    f"{names[prev.index]}'s {prev.out_units} outputs"
                )
        self.label_to_unit_: dict[int, int] = {}
        self.tasks_learned_ = 0
        self.task_: int | None = None
        self.epoch_ = 0
        self.hidden_rows_: Tensor | None = None
        self.hidden_units_: Tensor | None = None
        self.task_records_: list[tuple[Tensor, Tensor]] = []  # the open task's, for task_inference
        self.generator_ = torch.Generator().manual_seed(self.seed)
        if not reset:
            return self
        with torch.no_grad():
            for layer in self.layers_:
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()
        return self

    @property
    def output(self) -> SparseLayer:
        return self.layers_[-1]

    @property
    def hidden(self) -> list[SparseLayer]:
        return self.layers_[:-1]

    def _inputs_of(self, layer: SparseLayer, per_neuron: Tensor | None) -> Tensor | None:
        """Map a per-neuron quantity of the previous layer onto this layer's inputs
        (a conv channel feeds H*W inputs of a following Linear layer)."""
        if per_neuron is None:
            return None
        return per_neuron.repeat_interleave(layer.in_units // per_neuron.numel())

    # ------------------------------------------------------------ task start
    def begin_task(self, classes: Iterable[int]) -> None:
        """Allocate neurons and connections for a task made of ``classes`` (labels)."""
        if self.task_ is not None:
            raise RuntimeError(f"task {self.task_} is still open: call end_task() first")
        labels = sorted({int(c) for c in classes})
        if not labels:
            raise ValueError("a task needs at least one class")
        known = [c for c in labels if c in self.label_to_unit_]
        if known:
            raise ValueError(
                f"classes {known} were learned by an earlier task; SpaceNet learns each class once"
            )
        task = self.tasks_learned_
        units = self._claim_output_units(labels, task)
        prev_selected: Tensor | None = None
        for i, layer in enumerate(self.layers_):
            layer.reset_task_state()
            if layer.is_output:
                layer.selected_out_[units] = True
            else:
                layer.selected_out_[self._select_neurons(layer, self.n_select_[i])] = True
            sel_in = self._inputs_of(layer, prev_selected)
            layer.selected_in_ = sel_in.clone() if sel_in is not None else torch.ones_like(layer.selected_in_)
            self._place_connections(layer, self.connections_[i], task)
            prev_selected = layer.selected_out_
        for unit, label in zip(units.tolist(), labels, strict=True):
            self.label_to_unit_[label] = unit
        self.task_ = task
        self.epoch_ = 0
        self.task_records_ = []
        self.hide_other_tasks()
        self._refresh_masks()

    def _claim_output_units(self, labels: list[int], task: int) -> Tensor:
        out = self.output
        free = out.reserved_by_ == FREE
        if int(free.sum()) < len(labels):
            raise CapacityExhaustedError(
                f"the output layer has {out.out_units} units and {int((~free).sum())} are taken; "
                f"a task with {len(labels)} new classes does not fit (declare a larger output layer)",
                layer=self.layer_names_[out.index],
            )
        chosen: list[int] = []
        # Prefer unit == label, so benchmarks with labels 0..C-1 keep an identity map.
        for label in labels:
            if 0 <= label < out.out_units and bool(free[label]) and label not in chosen:
                chosen.append(label)
            else:
                chosen.append(-1)
        spare = [u for u in torch.nonzero(free).flatten().tolist() if u not in chosen]
        units = [u if u >= 0 else spare.pop(0) for u in chosen]
        result = torch.tensor(units, dtype=torch.long, device=out.reserved_by_.device)
        out.reserved_by_[result] = task
        return result

    def _select_neurons(self, layer: SparseLayer, n: int) -> Tensor:
        free = torch.nonzero(layer.reserved_by_ == FREE).flatten().cpu()
        if free.numel() < n:
            if self.on_exhausted == "error" or free.numel() == 0:
                raise CapacityExhaustedError(
                    f"layer {self.layer_names_[layer.index]}: {free.numel()} free neurons left, "
                    f"a task needs {n} (on_exhausted={self.on_exhausted!r})",
                    layer=self.layer_names_[layer.index],
                )
            n = free.numel()
        pick = free[torch.randperm(free.numel(), generator=self.generator_)[:n]]
        return pick.to(layer.reserved_by_.device)

    def _place_connections(self, layer: SparseLayer, budget: int | float, task: int) -> None:
        block = layer.selected_out_[:, None] & layer.selected_in_[None, :]
        candidates = torch.nonzero((block & (layer.conn_owner_ == FREE)).flatten().cpu()).flatten()
        # An int is a count; a float a density of the block's positions still free.
        wanted = int(budget) if isinstance(budget, int) else max(1, round(float(budget) * candidates.numel()))
        if candidates.numel() < wanted:
            if self.on_exhausted == "error" or candidates.numel() == 0:
                raise CapacityExhaustedError(
                    f"layer {self.layer_names_[layer.index]}: {candidates.numel()} free connections "
                    f"among the task's neurons, budget {wanted} (on_exhausted={self.on_exhausted!r})",
                    layer=self.layer_names_[layer.index],
                )
            wanted = candidates.numel()
        pick = candidates[torch.randperm(candidates.numel(), generator=self.generator_)[:wanted]]
        positions = torch.zeros(layer.num_connections, dtype=torch.bool)
        positions[pick] = True
        layer.place(positions.view_as(layer.conn_owner_).to(layer.conn_owner_.device), task, from_init=True)

    def _refresh_masks(self) -> None:
        task = -2 if self.task_ is None else self.task_  # -2 owns nothing: all frozen
        for layer in self.layers_:
            if self.task_ is None:
                bias_ok = torch.zeros_like(layer.reserved_by_, dtype=torch.bool)
            elif layer.is_output:
                bias_ok = layer.selected_out_.clone()
            else:
                bias_ok = layer.reserved_by_ == FREE
                if self.freeze_used_biases:
                    old = (layer.conn_owner_ != FREE) & (layer.conn_owner_ != task)
                    bias_ok &= ~old.any(dim=1)
            layer.refresh_masks(task, bias_ok)

    # ---------------------------------------------------------------- training
    def mask_gradients(self) -> None:
        """Zero the gradients of everything the current task may not change."""
        for layer in self.layers_:
            layer.mask_gradients()

    def before_step(self, sgd_lr: float | None = None) -> None:
        """Call before the optimizer step; ``sgd_lr`` as for ``after_step``."""
        if sgd_lr is None:
            for layer in self.layers_:
                layer.snapshot()

    def after_step(self, sgd_lr: float | None = None) -> None:
        """Keep frozen weights bit-exact and accumulate importance. Pass ``sgd_lr`` when
        the optimizer is plain SGD (no momentum, no weight decay): a faster exact path."""
        for layer in self.layers_:
            layer.after_step(sgd_lr)

    def observe(self, inputs: Tensor, labels: Tensor) -> None:
        """Show a training batch (inputs as the model gets them, labels as given to
        ``begin_task``). With ``task_inference``, the first epoch's batches are kept until
        ``end_task`` fits the task's statistics from them; otherwise nothing happens."""
        if self.task_inference is not None and self.task_ is not None and self.epoch_ == 0:
            self.task_records_.append((inputs.detach().cpu(), labels.detach().cpu()))

    def end_epoch(self, last: bool) -> None:
        """After every epoch but the task's last: drop and regrow hidden connections."""
        self.epoch_ += 1
        if last or self.task_ is None or self.drop_fraction == 0.0:
            return
        for layer in self.hidden:
            self._drop_and_grow(layer, self.task_)
        self._refresh_masks()

    def _drop_and_grow(self, layer: SparseLayer, task: int) -> None:
        own = layer.conn_owner_ == task
        k = int(self.drop_fraction * int(own.sum()))
        if k == 0:
            return
        scores = layer.conn_importance_.masked_fill(~own, float("inf")).flatten()
        drop_idx = torch.topk(scores, k, largest=False).indices
        dropped = torch.zeros(layer.num_connections, dtype=torch.bool, device=scores.device)
        dropped[drop_idx] = True
        dropped = dropped.view_as(own)
        layer.remove(dropped)
        pre = (
            layer.in_importance
            if layer.index == 0
            else self._inputs_of(layer, self.layers_[layer.index - 1].out_importance)
        )
        assert pre is not None
        grow_ok = (
            layer.selected_out_[:, None]
            & layer.selected_in_[None, :]
            & (layer.conn_owner_ == FREE)
            & ~dropped
        )
        score = (layer.out_importance[:, None] * pre[None, :]).masked_fill(~grow_ok, -1.0).flatten()
        n_grow = min(k, int(grow_ok.sum()))
        grow_idx = torch.topk(score, n_grow).indices
        grown = torch.zeros(layer.num_connections, dtype=torch.bool, device=score.device)
        grown[grow_idx] = True
        layer.place(grown.view_as(own), task, from_init=False)

    def end_task(self) -> None:
        """Reserve each hidden layer's most important free neurons; freeze the task; with
        ``task_inference``, fit the task's statistics from its observed records."""
        if self.task_ is None:
            raise RuntimeError("no task is open")
        if self.task_inference is not None:
            if not self.task_records_:
                raise RuntimeError("task_inference needs the task's records: call observe() for each batch")
            inputs, labels = (torch.cat(parts) for parts in zip(*self.task_records_, strict=True))
            self.task_inference.fit_task(self.task_, inputs, self.units_of(labels.to(torch.long)))
            self.task_records_ = []
        for i, layer in enumerate(self.hidden):
            free = layer.reserved_by_ == FREE
            n = min(self.n_reserve_[i], int(free.sum()))
            score = layer.out_importance.masked_fill(~free, -1.0)
            layer.reserved_by_[torch.topk(score, n).indices] = self.task_
        self.show_all_tasks()
        self.tasks_learned_ += 1
        self.task_ = None
        self._refresh_masks()

    # ------------------------------------------------------- task inference
    def infer(self, logits: Tensor, inputs: Tensor) -> Tensor:
        """Output scores for class-incremental prediction: with ``task_inference``, class
        log-probabilities (task from the inputs, class from the task's units); without
        it, ``logits`` unchanged."""
        if self.task_inference is None:
            return logits
        return self.task_inference.apply(logits, inputs)

    # -------------------------------------------------- output rows of other tasks
    def hide_other_tasks(self) -> None:
        """While a task trains, zero the output rows of other tasks' classes (kept aside)."""
        if self.task_ is None or self.hidden_rows_ is not None or not self.hide_old_outputs:
            return
        out = self.output
        others = (out.reserved_by_ != FREE) & (out.reserved_by_ != self.task_)
        units = torch.nonzero(others).flatten()
        with torch.no_grad():
            self.hidden_rows_ = out.weight[units].detach().clone()
            self.hidden_units_ = units
            out.weight[units] = 0.0

    def show_all_tasks(self) -> None:
        """Restore the rows hidden by ``hide_other_tasks`` (for evaluation)."""
        if self.hidden_rows_ is None or self.hidden_units_ is None:
            return
        with torch.no_grad():
            self.output.weight[self.hidden_units_] = self.hidden_rows_
        self.hidden_rows_, self.hidden_units_ = None, None

    # ------------------------------------------------------------- class map
    @property
    def identity_map(self) -> bool:
        """True when every known label is its own output unit (no remapping needed)."""
        return all(k == v for k, v in self.label_to_unit_.items())

    def task_units(self) -> dict[int, Tensor]:
        """Output units of each task learned or being learned."""
        owner = self.output.reserved_by_
        return {
            int(t): torch.nonzero(owner == t).flatten() for t in torch.unique(owner).tolist() if t != FREE
        }

    def units_of(self, labels: Tensor) -> Tensor:
        """Output units of ``labels``; -100 (cross-entropy's ignore index) if unknown."""
        if not self.label_to_unit_:
            return torch.full_like(labels, -100)
        pairs = torch.tensor(sorted(self.label_to_unit_.items()), dtype=torch.long, device=labels.device)
        keys, units = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
        pos = torch.searchsorted(keys, labels).clamp_(max=keys.numel() - 1)
        return torch.where(keys[pos] == labels, units[pos], torch.full_like(labels, -100))

    def labels_of(self, units: Tensor) -> Tensor:
        """Labels of output units; -1 for a unit no class owns."""
        inverse = torch.full((self.output.out_units,), -1, dtype=torch.long)
        for label, unit in self.label_to_unit_.items():
            inverse[unit] = label
        return inverse.to(units.device)[units]

    # ---------------------------------------------------------------- capacity
    def capacity(self) -> CapacityReport:
        layers: list[LayerCapacity] = []
        fits: list[tuple[int, str]] = []
        for i, layer in enumerate(self.layers_):
            name = self.layer_names_[i]
            used = (layer.conn_owner_ != FREE).any(dim=1) | (layer.reserved_by_ != FREE)
            reserved = int((layer.reserved_by_ != FREE).sum())
            layers.append(
                LayerCapacity(
                    name=name,
                    neurons=layer.out_units,
                    reserved_neurons=reserved,
                    used_neurons=int(used.sum()),
                    connections=layer.num_connections,
                    used_connections=int((layer.conn_owner_ != FREE).sum()),
                    is_output=layer.is_output,
                )
            )
            if layer.is_output:
                per_task = max(1, round(len(self.label_to_unit_) / max(1, self.tasks_learned_)))
                fits.append(((layer.out_units - reserved) // per_task, name))
            else:
                fits.append(
                    (tasks_that_fit(layer.out_units - reserved, self.n_select_[i], self.n_reserve_[i]), name)
                )
        remaining, limiting = min(fits)
        return CapacityReport(
            tuple(layers),
            self.tasks_learned_,
            len(self.label_to_unit_),
            remaining,
            limiting,
            task_inference_bytes=self.task_inference.nbytes if self.task_inference is not None else 0,
            state_bytes=_tensor_bytes(self._state()),
            dense_bytes=sum(
                t.numel() * t.element_size()
                for layer in self.layers_
                for t in (layer.weight, layer.bias)
                if t is not None
            ),
        )

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, object]:
        """The learned state, sparse, as plain tensors and numbers (loadable with
        ``torch.load(weights_only=True)``): per layer the used connections' positions (a bit
        each), owners and weights, the biases and reservations; the class map; the
        allocation generator; the task-inference statistics if any. It includes the managed
        layers' weights, so the model's own ``state_dict`` is needed only for the rest of it.

        The dense initial weights (``init_``), whose values connections placed by later tasks
        take, are not stored: they are regenerated by building the model again as it was
        built (e.g. ``torch.manual_seed(seed)`` first). ``init_digest`` (SHA-256) tells
        ``load_state_dict`` whether they were."""
        if self.task_ is not None:
            raise RuntimeError("save between tasks: a task is being trained")
        return self._state()

    def _state(self) -> dict[str, object]:
        pairs = sorted(self.label_to_unit_.items())
        state: dict[str, object] = {
            "version": STATE_VERSION,
            "layer_names": list(self.layer_names_),
            "layers": [layer.state_dict() for layer in self.layers_],
            "class_map": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
            "tasks_learned": self.tasks_learned_,
            "generator": self.generator_.get_state(),
            "init_digest": self.init_digest(),
        }
        if self.task_inference is not None:
            state["task_inference"] = self.task_inference.state_dict()
        return state

    def init_digest(self) -> Tensor:
        """SHA-256 of the layers' initial weights, as 32 uint8."""
        h = hashlib.sha256()
        for layer in self.layers_:
            h.update(layer.init_.detach().cpu().contiguous().numpy().tobytes())
        return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)

    @staticmethod
    def carries_weights(state: dict[str, object]) -> bool:
        """Whether ``state`` (``state_dict`` output) holds the managed layers' weights; the
        first version's did not: they came with the model's ``state_dict``."""
        version = state.get("version")
        return isinstance(version, int) and version >= 2

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore ``state_dict`` output into the attached model, weights included. A state of
        version 1 (dense maps, stored initial weights) loads too; its weights must have been
        loaded into the model first (``attach(model, reset=False)`` keeps them)."""
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"unsupported SpaceNet state version {version!r}")
        if state["layer_names"] != self.layer_names_:
            raise ValueError(f"state is for layers {state['layer_names']}, model has {self.layer_names_}")
        layer_states = state["layers"]
        assert isinstance(layer_states, list)
        for layer, ls in zip(self.layers_, layer_states, strict=True):
            if version == 1:
                layer.load_dense_state_dict(ls)
            else:
                layer.load_state_dict(ls)
        digest = state.get("init_digest")
        if isinstance(digest, Tensor) and not torch.equal(digest, self.init_digest()):
            warnings.warn(
                "this model's initial weights differ from those of the model the state was saved "
                f"from (build it as that one was, e.g. torch.manual_seed({self.seed}) first): "
                "predictions are as saved, but connections placed for new tasks start from "
                "this model's values",
                stacklevel=2,
            )
        class_map = state["class_map"]
        assert isinstance(class_map, Tensor)
        self.label_to_unit_ = {int(a): int(b) for a, b in class_map.tolist()}
        tasks = state["tasks_learned"]
        assert isinstance(tasks, int)
        self.tasks_learned_ = tasks
        gen = state["generator"]
        assert isinstance(gen, Tensor)
        self.generator_.set_state(gen)
        if self.task_inference is not None:
            ti = state.get("task_inference")
            if not isinstance(ti, dict):
                raise ValueError("the state has no task_inference statistics, but this SpaceNet uses them")
            self.task_inference.load_state_dict(ti)
        self.task_ = None
        self._refresh_masks()

    def parameter_names(self) -> list[str]:
        """The names, in the attached model's ``state_dict``, of the parameters this SpaceNet's
        ``state_dict`` carries (the managed layers' weights and biases)."""
        names = []
        for name, layer in zip(self.layer_names_, self.layers_, strict=True):
            names.append(f"{name}.weight")
            if layer.bias is not None:
                names.append(f"{name}.bias")
        return names
