"""SpaceNet component invariants, driven directly (no Avalanche)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from spacenet.strategy import CapacityExhaustedError, SmallCNN, SpaceNet, SpaceNetMLP
from spacenet.strategy.layers import FREE

BUDGET = (10000, 1640, 80)


def train_task(
    net: SpaceNet,
    model: nn.Module,
    classes: list[int],
    *,
    epochs: int = 3,
    steps: int = 5,
    optimizer: torch.optim.Optimizer | None = None,
    sgd_lr: float | None = 0.05,
) -> None:
    """Run one task with random data of ``classes``, checking the budget after every epoch."""
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.05)
    net.begin_task(classes)
    task = net.task_
    budget = [int((layer.conn_owner_ == task).sum()) for layer in net.layers_]
    for epoch in range(epochs):
        for _ in range(steps):
            x = torch.randn(32, 1, 28, 28)
            y = torch.tensor(classes)[torch.randint(len(classes), (32,))]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), net.units_of(y)).backward()
            net.mask_gradients()
            net.before_step(sgd_lr)
            opt.step()
            net.after_step(sgd_lr)
        net.end_epoch(last=epoch == epochs - 1)
        assert [int((layer.conn_owner_ == task).sum()) for layer in net.layers_] == budget
    net.end_task()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_allocation_matches_reference_budget_and_selection() -> None:
    model = SpaceNetMLP()
    net = SpaceNet(seed=1).attach(model)
    net.begin_task([0, 1])
    for layer, budget in zip(net.layers_, BUDGET, strict=True):
        own = layer.conn_owner_ == 0
        assert int(own.sum()) == budget
        # Connections only among the task's selected neurons.
        assert not (own & ~layer.selected_out_[:, None]).any()
        assert not (own & ~layer.selected_in_[None, :]).any()
        # Placed weights take the dense init values; everything else is zero.
        torch.testing.assert_close(layer.weight[own], layer.init_[own], rtol=0, atol=0)
        assert layer.weight[~own].abs().sum() == 0
    assert [int(layer.selected_out_.sum()) for layer in net.layers_] == [80, 80, 2]
    assert int(net.layers_[0].selected_in_.sum()) == 784


def test_tasks_never_share_connections_and_frozen_state_is_bit_exact() -> None:
    torch.manual_seed(0)
    model = SpaceNetMLP()
    net = SpaceNet(seed=0).attach(model)
    train_task(net, model, [0, 1])
    after_first = snapshot(model)
    owner0 = [layer.conn_owner_ == 0 for layer in net.layers_]
    reserved0 = [layer.reserved_by_ == 0 for layer in net.hidden]
    assert [int(r.sum()) for r in reserved0] == [40, 40]
    for classes in ([2, 3], [4, 5]):
        train_task(net, model, classes)
    for i, layer in enumerate(net.layers_):
        # Task 0 kept exactly its connections; no later task took any of them.
        assert torch.equal(layer.conn_owner_ == 0, owner0[i])
        w = layer.weight.detach()
        w0 = after_first[f"{net.layer_names_[i]}.weight"]
        assert torch.equal(w[owner0[i]], w0[owner0[i]])
    for i, layer in enumerate(net.hidden):
        b0 = after_first[f"{net.layer_names_[i]}.bias"]
        assert torch.equal(layer.bias.detach()[reserved0[i]], b0[reserved0[i]])
    # Output biases of task 0's classes are frozen too.
    assert torch.equal(net.output.bias.detach()[:2], after_first["out.bias"][:2])
    owners = torch.stack([layer.conn_owner_.flatten() for layer in net.layers_[:1]])
    assert set(torch.unique(owners).tolist()) <= {FREE, 0, 1, 2}


def test_momentum_and_weight_decay_cannot_move_frozen_weights() -> None:
    torch.manual_seed(0)
    model = SpaceNetMLP()
    net = SpaceNet(seed=0).attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    train_task(net, model, [0, 1], optimizer=opt, sgd_lr=None)
    before = snapshot(model)
    frozen = [layer.conn_owner_ == 0 for layer in net.layers_]
    train_task(net, model, [2, 3], optimizer=opt, sgd_lr=None)
    for i, layer in enumerate(net.layers_):
        w0 = before[f"{net.layer_names_[i]}.weight"]
        assert torch.equal(layer.weight.detach()[frozen[i]], w0[frozen[i]])
        unowned = layer.conn_owner_ == FREE
        assert layer.weight.detach()[unowned].abs().sum() == 0


def test_drop_and_grow_keeps_budget_and_moves_connections() -> None:
    torch.manual_seed(0)
    model = SpaceNetMLP()
    net = SpaceNet(seed=0).attach(model)
    net.begin_task([0, 1])
    first = net.layers_[0].conn_owner_.eq(0).clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        x, y = torch.randn(32, 784), torch.randint(2, (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        net.mask_gradients()
        opt.step()
        net.after_step(0.05)
    net.end_epoch(last=False)
    now = net.layers_[0].conn_owner_.eq(0)
    moved = int((first & ~now).sum())
    assert moved == int(0.2 * 10000)  # 20% dropped and as many grown elsewhere
    assert int(now.sum()) == 10000
    # Grown connections start at zero; the output layer is never rewired.
    grown = now & ~first
    assert net.layers_[0].weight.detach()[grown].abs().sum() == 0
    net.end_epoch(last=True)  # the last epoch does not rewire
    assert torch.equal(net.layers_[0].conn_owner_.eq(0), now)


def test_capacity_report_matches_masks() -> None:
    model = SpaceNetMLP()
    net = SpaceNet(seed=0).attach(model)
    for classes in ([0, 1], [2, 3]):
        train_task(net, model, classes, epochs=1, steps=1)
    report = net.capacity()
    for cap, layer in zip(report.layers, net.layers_, strict=True):
        assert cap.used_connections == int((layer.conn_owner_ != FREE).sum())
        assert cap.reserved_neurons == int((layer.reserved_by_ != FREE).sum())
        assert cap.free_neurons == layer.out_units - cap.reserved_neurons
    assert [c.reserved_neurons for c in report.layers] == [80, 80, 4]
    assert report.tasks_learned == 2 and report.classes_known == 4
    # Hidden: (320 - 80) // 40 + 1 = 7 tasks; output: 6 free units / 2 per task = 3.
    assert report.tasks_remaining == 3 and report.limiting_layer == "out"


def test_capacity_exhaustion_raises_or_shrinks() -> None:
    model = SpaceNetMLP(hidden=(100, 100))
    net = SpaceNet(n_select=60, n_reserve=50, connections=(0.1, 0.1, 0.5), seed=0).attach(model)
    train_task(net, model, [0, 1], epochs=1, steps=1)
    with pytest.raises(CapacityExhaustedError, match="free neurons left") as exhausted:
        net.begin_task([2, 3])
    assert exhausted.value.layer == "hidden.0"  # the layer that ran out, for the metric's label
    shrink = SpaceNet(
        n_select=60, n_reserve=50, connections=(0.1, 0.1, 0.5), seed=0, on_exhausted="shrink"
    ).attach(SpaceNetMLP(hidden=(100, 100)))
    shrink.begin_task([0, 1])
    shrink.end_task()
    shrink.begin_task([2, 3])
    assert [int(layer.selected_out_.sum()) for layer in shrink.hidden] == [50, 50]
    shrink.end_task()
    with pytest.raises(CapacityExhaustedError):
        shrink.begin_task([4, 5])  # nothing left: never trains on nothing


def test_output_layer_class_map_and_limit() -> None:
    model = SpaceNetMLP(num_classes=4)
    net = SpaceNet(seed=0, n_select=10, n_reserve=5, connections=(0.1, 0.1, 0.5)).attach(model)
    net.begin_task([205, 100])
    assert net.units_of(torch.tensor([100, 205, 7])).tolist() == [0, 1, -100]
    assert net.labels_of(torch.tensor([1, 0, 3])).tolist() == [205, 100, -1]
    assert not net.identity_map
    net.end_task()
    with pytest.raises(ValueError, match="learned by an earlier task"):
        net.begin_task([100, 3])
    with pytest.raises(CapacityExhaustedError, match="output layer has 4 units") as exhausted:
        net.begin_task([1, 2, 3])
    assert exhausted.value.layer == "out"


def test_old_rows_hidden_while_training_and_restored() -> None:
    model = SpaceNetMLP()
    net = SpaceNet(seed=0).attach(model)
    train_task(net, model, [0, 1], epochs=1)
    rows = model.out.weight.detach()[:2].clone()
    net.begin_task([2, 3])
    assert model.out.weight.detach()[:2].abs().sum() == 0
    net.show_all_tasks()
    assert torch.equal(model.out.weight.detach()[:2], rows)
    net.hide_other_tasks()
    net.end_task()
    assert torch.equal(model.out.weight.detach()[:2], rows)


def _seeded_mlp() -> SpaceNetMLP:
    torch.manual_seed(0)
    return SpaceNetMLP()


def test_state_round_trip_with_weights_only_load() -> None:
    model = _seeded_mlp()
    net = SpaceNet(seed=3).attach(model)
    train_task(net, model, [0, 1], epochs=2)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)  # the weights travel in SpaceNet's state
    buf.seek(0)
    clone = _seeded_mlp()  # built as the saved one was: the same initial weights
    restored = SpaceNet(seed=3).attach(clone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "initial weights differ" warning
        restored.load_state_dict(torch.load(buf, weights_only=True))
    pairs = zip(model.state_dict().values(), clone.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    for a, b in zip(net.layers_, restored.layers_, strict=True):
        assert torch.equal(a.conn_owner_, b.conn_owner_) and torch.equal(a.reserved_by_, b.reserved_by_)
    assert restored.label_to_unit_ == net.label_to_unit_ and restored.tasks_learned_ == 1
    # The same next allocation, from the same initial values: generator and init travelled too.
    net.begin_task([2, 3])
    restored.begin_task([2, 3])
    for a, b in zip(net.layers_, restored.layers_, strict=True):
        assert torch.equal(a.conn_owner_, b.conn_owner_) and torch.equal(a.weight, b.weight)
    with pytest.raises(RuntimeError, match="between tasks"):
        net.state_dict()


def test_state_is_sparse_a_fraction_of_the_dense_model() -> None:
    model = _seeded_mlp()
    net = SpaceNet(seed=0).attach(model)
    for task in range(5):
        train_task(net, model, [2 * task, 2 * task + 1], epochs=1)
    report = net.capacity()
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert report.dense_bytes == dense
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    # 5 x 11,720 used connections: 4 bytes of weight and 1 of owner each, a bit per position
    assert report.state_bytes < 0.2 * dense and len(buf.getvalue()) < 0.2 * dense
    assert report.state_bytes <= len(buf.getvalue())


def test_a_model_built_otherwise_restores_the_weights_and_warns() -> None:
    model = _seeded_mlp()
    net = SpaceNet(seed=0).attach(model)
    train_task(net, model, [0, 1], epochs=1)
    torch.manual_seed(1)
    other = SpaceNetMLP()
    with pytest.warns(UserWarning, match="initial weights differ"):
        SpaceNet(seed=0).attach(other).load_state_dict(net.state_dict())
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(model(x), other(x))


def test_conv_connections_are_kernel_slices() -> None:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10)
    net = SpaceNet(seed=0, **model.spacenet_defaults()).attach(model)  # type: ignore[arg-type]
    net.begin_task([0, 1])
    conv = net.layers_[1]
    own = conv.conn_owner_ == 0
    w = conv.weight.detach()
    # A whole 3x3 slice is placed or not.
    assert torch.equal(w[own].flatten(1).ne(0).all(dim=1), torch.ones(int(own.sum()), dtype=torch.bool))
    assert w[~own].abs().sum() == 0
    # The Linear after the last conv sees each selected channel as 4x4 = 16 inputs.
    fc = net.layers_[3]
    assert int(fc.selected_in_.sum()) == 16 * int(net.layers_[2].selected_out_.sum())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(2):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(2, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        net.mask_gradients()
        opt.step()
        net.after_step(0.05)
        net.end_epoch(last=epoch == 1)
    net.end_task()
    assert net.capacity().layers[0].reserved_neurons == 5
