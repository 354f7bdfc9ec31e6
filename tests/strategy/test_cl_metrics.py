"""Accuracy matrix metrics against hand-computed values."""

from __future__ import annotations

import json

import pytest

from spacenet.strategy.cl_metrics import AccuracyMatrix, mean_matrix

# R[i][j]: accuracy on task j after training task i; n_j test samples per task.
R = [
    [0.9, 0.0, 0.0],
    [0.6, 0.8, 0.1],
    [0.5, 0.7, 0.95],
]
N = [100, 200, 300]


def _matrix(rows: list[list[float]], counts: list[int] = N) -> AccuracyMatrix:
    m = AccuracyMatrix()
    for i, row in enumerate(rows):
        for j, acc in enumerate(row):
            m.record(i, j, acc, counts[j])
    return m


def test_final_accuracy_is_the_mean_of_the_last_row_over_seen_tasks() -> None:
    assert _matrix(R).final_accuracy() == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_final_accuracy_ignores_unseen_tasks_of_the_last_row() -> None:
    m = _matrix(R[:2])  # two tasks trained, task 2 evaluated (0.1) but not seen
    assert m.final_accuracy() == pytest.approx((0.6 + 0.8) / 2)


def test_sample_weighted_accuracy_pools_the_test_samples() -> None:
    # (0.5 * 100 + 0.7 * 200 + 0.95 * 300) / 600
    assert _matrix(R).sample_weighted_accuracy() == pytest.approx(475 / 600)


def test_forgetting_is_best_earlier_accuracy_minus_last() -> None:
    m = _matrix(R)
    forgetting = m.forgetting()
    assert forgetting.keys() == {0, 1}
    assert forgetting[0] == pytest.approx(0.9 - 0.5)
    assert forgetting[1] == pytest.approx(0.8 - 0.7)
    assert m.average_forgetting() == pytest.approx(0.25)


def test_forgetting_takes_the_maximum_over_rows_not_the_diagonal() -> None:
    rows = [row[:] for row in R]
    rows[1][0] = 0.95  # task 0 improved after task 1: forgetting uses the best value
    m = _matrix(rows)
    assert m.forgetting()[0] == pytest.approx(0.95 - 0.5)
    # BWT compares with the diagonal only
    assert m.backward_transfer() == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forgetting_ignores_rows_before_the_task_was_trained() -> None:
    rows = [row[:] for row in R]
    rows[0][1] = 0.99  # task 1 scored high before it was trained: not "learned" yet
    assert _matrix(rows).forgetting()[1] == pytest.approx(0.8 - 0.7)


def test_backward_transfer() -> None:
    assert _matrix(R).backward_transfer() == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert _matrix(R).summary() == pytest.approx(
        {"final_accuracy": 2.15 / 3, "sample_accuracy": 475 / 600, "average_forgetting": 0.25, "bwt": -0.25}
    )


def test_accuracy_curve_is_the_seen_mean_of_each_row() -> None:
    assert _matrix(R).accuracy_curve() == pytest.approx([0.9, 0.7, 2.15 / 3])


def test_a_single_task_has_no_forgetting() -> None:
    m = AccuracyMatrix()
    m.record(0, 0, 0.97, 50)
    assert m.forgetting() == {}
    assert m.average_forgetting() == 0.0
    assert m.backward_transfer() == 0.0
    assert m.final_accuracy() == pytest.approx(0.97)


def test_growing_support_for_a_stream() -> None:
    m = AccuracyMatrix()
    m.record(0, 0, 0.9, 10)
    assert (m.n_trained, m.n_tasks) == (1, 1)
    m.record(1, 0, 0.4, 10)
    m.record(1, 1, 0.8, 30)
    assert (m.n_trained, m.n_tasks) == (2, 2)
    assert m.matrix() == [[0.9, None], [0.4, 0.8]]
    assert m.get(0, 1) is None


def test_empty_and_missing_entries_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        AccuracyMatrix().final_accuracy()
    m = AccuracyMatrix()
    m.record(0, 0, 0.9, 10)
    m.record(1, 1, 0.8, 10)  # R[1][0] missing
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        m.final_accuracy()
    assert m.accuracy_curve() == [0.9, None]


@pytest.mark.parametrize(
    ("after", "task", "acc", "n"),
    [(-1, 0, 0.5, 1), (0, -1, 0.5, 1), (0, 0, 1.5, 1), (0, 0, float("nan"), 1), (0, 0, 0.5, -1)],
)
def test_invalid_records_are_rejected(after: int, task: int, acc: float, n: int) -> None:
    with pytest.raises(ValueError):
        AccuracyMatrix().record(after, task, acc, n)


def test_dict_roundtrip_is_json_able() -> None:
    m = _matrix(R[:2])
    data = json.loads(json.dumps(m.as_dict()))
    assert data == {
        "accuracy": [[0.9, 0.0, 0.0], [0.6, 0.8, 0.1]],
        "n_samples": [[100, 200, 300], [100, 200, 300]],
    }
    again = AccuracyMatrix.from_dict(data)
    assert again == m
    assert again.sample_weighted_accuracy() == m.sample_weighted_accuracy()


def test_dict_roundtrip_keeps_gaps() -> None:
    m = AccuracyMatrix()
    m.record(0, 0, 1.0, 5)
    m.record(1, 1, 0.5, 5)
    data = m.as_dict()
    assert data["accuracy"] == [[1.0, None], [None, 0.5]]
    assert AccuracyMatrix.from_dict(data) == m


def test_table_lists_rows_and_the_seen_mean() -> None:
    m = _matrix(R[:2])
    m.record(2, 2, 0.95, 300)  # a row with gaps
    lines = m.table().splitlines()
    assert lines[0].split() == ["after\\task", "0", "1", "2", "seen"]
    assert lines[1].split() == ["0", "0.900", "0.000", "0.000", "0.900"]
    assert lines[2].split() == ["1", "0.600", "0.800", "0.100", "0.700"]
    assert lines[3].split() == ["2", "-", "-", "0.950", "-"]
    assert str(m) == m.table()


def test_mean_matrix_averages_present_entries() -> None:
    a, b = _matrix(R), _matrix([[0.7, 0.2, 0.0], [0.4, 0.6, 0.1]])
    mean = mean_matrix([a, b])
    assert mean[0] == pytest.approx([0.8, 0.1, 0.0])
    assert mean[1] == pytest.approx([0.5, 0.7, 0.1])
    assert mean[2] == pytest.approx([0.5, 0.7, 0.95])  # only a has a third row
    assert mean_matrix([]) == []
