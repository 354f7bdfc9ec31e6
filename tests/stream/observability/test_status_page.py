"""The status page's rendering (stream/observability/status_page.py); the integration test in
tests/integration/test_service_observability.py looks at it in a real Chromium."""

from __future__ import annotations

from spacenet.strategy import SpaceNet, SpaceNetMLP
from spacenet.strategy.cl_metrics import AccuracyMatrix
from spacenet.stream.observability.metrics import Boundary
from spacenet.stream.observability.metrics_collector import ModelState
from spacenet.stream.observability.status_page import StatusView, StreamView, render


def _state() -> ModelState:
    net = SpaceNet(seed=0).attach(SpaceNetMLP())
    acc = AccuracyMatrix()
    for task, classes in enumerate(([0, 1], [2, 3])):
        net.begin_task(classes)
        net.end_task()
        for j in range(task + 1):
            acc.record(task, j, 0.9 - 0.3 * (task - j), 100)
    return ModelState.of(net, acc, model_version=2)


def test_a_stream_shows_its_tasks_capacity_matrix_and_forgetting() -> None:
    view = StatusView(
        streams={"0": StreamView(_state(), current_task=1, model_version=2)},
        counters={"spacenet_dead_letter_messages_total": {"undecodable": 3.0, "too_large": 0.0}},
        boundaries=(Boundary(0.0, "0", 1, "new_class"), Boundary(0.0, "0", 0, "new_class")),
        device="cpu",
    )
    page = render(view, now=0.0)
    assert '<meta http-equiv="refresh" content="5">' in page and "<script" not in page
    assert (
        "current task<b>1</b>" in page and "model version<b>2</b>" in page and "tasks learned<b>2</b>" in page
    )
    assert page.count('<td class="h"') == 4  # a 2 x 2 heat map, one cell not measured
    assert "0.300</td>" in page  # task 0's forgetting: 0.9 -> 0.6
    assert "320 / 400 neurons free" in page and "6 / 10 neurons free" in page  # 2 tasks reserved 40 each
    cap = view.streams["0"].state.capacity  # type: ignore[union-attr]
    assert f"learner state ({cap.state_ratio:.2f}x dense)<b>{cap.state_bytes / 1000:,.1f} KB</b>" in page
    assert 0 < cap.state_ratio < 0.3
    assert "<th>undecodable</th><td>3</td>" in page and "too_large" not in page  # zero counts left out
    assert (
        page.count("opened</td>") == 2 and "http://" not in page and "https://" not in page
    )  # no external asset


def test_values_are_escaped_and_an_empty_process_says_so() -> None:
    view = StatusView(
        streams={"<b>x</b>": StreamView(None, None, 0)},
        counters={"spacenet_messages_rejected_total": {"<script>": 1.0}},
        boundaries=(),
        device="cuda:0 (<gpu>)",
    )
    page = render(view)
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "<script>" not in page and "&lt;gpu&gt;" in page
    assert "no model yet" in page and "current task<b>none yet</b>" in page
    assert "no stream yet" in render(StatusView({}, {}, (), "cpu"))
