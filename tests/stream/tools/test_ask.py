"""spacenet predict (stream/tools/ask.py): its inputs and its errors; the README tour test
(tests/integration/test_readme_tour.py) runs it against a live service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spacenet.stream.tools import ask
from tests.support.service import unique_name


def _parquet(path: Path, n: int, labels: bool) -> Path:
    features = pa.array([np.arange(4, dtype=np.uint8) + i for i in range(n)], pa.list_(pa.uint8()))
    cols = {"features": features} | ({"label": pa.array(np.arange(n) % 2, pa.int64())} if labels else {})
    pq.write_table(pa.table(cols), path)
    return path


def test_records_without_labels_are_sent_without_labels(tmp_path: Path) -> None:
    args = ask._parser().parse_args(
        ["--topic", "t", "--file", str(_parquet(tmp_path / "r.parquet", 5, False))]
    )
    x, y = ask._records(args)
    assert x.shape == (5, 4) and y is None
    args = ask._parser().parse_args(
        ["--topic", "t", "--file", str(_parquet(tmp_path / "l.parquet", 5, True)), "--limit", "3"]
    )
    x, y = ask._records(args)
    assert x.shape == (3, 4) and y is not None and y.tolist() == [0, 1, 0]


def test_json_lines_carry_each_record_and_the_summary_goes_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = {
        "prediction": np.array([1, 0]),
        "score": np.array([0.9, 0.6], np.float32),
        "model_version": np.array([3, 3]),
    }
    args = ask._parser().parse_args(["--topic", "t", "--dataset", "split_mnist", "--json"])
    ask.report(out, np.array([1, 1]), args)
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows[0] == {"index": 0, "prediction": 1, "score": 0.9, "label": 1, "model_version": 3, "stream": 0}
    assert captured.err.strip() == "2 records, stream 0, model version 3, accuracy 0.5000"


def test_no_service_on_the_topic_is_a_clear_error(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _parquet(tmp_path / "r.parquet", 3, True)
    code = ask.main(
        [
            "--bootstrap",
            kafka_bootstrap,
            "--topic",
            unique_name("none"),
            "--file",
            str(path),
            "--timeout",
            "5",
        ]
    )
    assert code == 1
    assert "spacenet predict: error: no topic" in capsys.readouterr().err
