"""Generate ``dashboards/spacenet.json``, the SpaceNet-Stream Grafana dashboard.

The panels are plain data (``ROWS``) so that ``expressions()`` lists every PromQL
expression without the SDK; ``build()`` renders them with Grafana's own
``grafana-foundation-sdk``. The ``stream`` variable (a partition of the training topic,
each learned by its own model) selects which streams the per-stream panels show; the
process panels show every process. Run from the checkout:

    python deploy/grafana/generate.py            # rewrite dashboards/spacenet.json
    python deploy/grafana/generate.py --check    # exit 1 if the committed file is stale

    >>> len(expressions()) > 40, expressions()[0]
    (True, 'sum(spacenet_streams)')
    >>> queryable("rate(spacenet_batches_total[$__rate_interval])")
    'rate(spacenet_batches_total[1m])'
    >>> queryable(f"min(spacenet_model_version{STREAM})")
    'min(spacenet_model_version{stream=~".*"})'
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "spacenet.json"
UID = "spacenet-stream"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana replaces these before the query reaches Prometheus; ``queryable`` does too.
MACROS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$stream": ".*"}
STREAM = '{stream=~"$stream"}'  # the streams the dashboard's variable selects

PanelKind = Literal["stat", "timeseries", "heatmap", "table"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: PanelKind
    queries: tuple[Query, ...]
    description: str = ""
    unit: str = "short"
    width: int = 8
    height: int = 8
    min: float | None = None
    max: float | None = None
    # (from value, colour) steps; the first step's value is ignored (it is the base).
    thresholds: tuple[tuple[float, str], ...] = ()
    stacked: bool = False
    decimals: int | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def q(expr: str, legend: str = "", **kwargs: Any) -> Query:
    return Query(" ".join(expr.split()), legend, **kwargs)


RATE = "$__rate_interval"
PERCENT: dict[str, Any] = {"unit": "percentunit", "min": 0, "max": 1}
TRAFFIC_LIGHT = ((0.0, "red"), (0.5, "orange"), (0.8, "green"))


def stat(title: str, expr: str, description: str, **kwargs: Any) -> Panel:
    return Panel(title, "stat", (q(expr),), description, width=4, height=4, **kwargs)


def graph(title: str, *queries: Query, **kwargs: Any) -> Panel:
    return Panel(title, "timeseries", queries, **kwargs)


def quantile(phi: float, histogram: str, window: str = RATE) -> str:
    return f"histogram_quantile({phi}, sum by (le) (rate({histogram}_bucket[{window}])))"


def per_stream(metric: str, agg: str = "max", legend: str = "stream {{stream}}") -> Query:
    """``metric`` of the streams the dashboard's variable selects, one series per stream."""
    return q(f"{agg} by (stream) ({metric}{STREAM})", legend)


def per_second(counter: str, by: str = "") -> str:
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({counter}[{RATE}]))"


OVERVIEW = Row(
    "Overview",
    (
        stat("Streams", "sum(spacenet_streams)", "Streams (partitions) learned over all processes."),
        stat(
            "Model version",
            f"min(spacenet_model_version{STREAM})",
            "Published model version of the selected streams (the least advanced).",
        ),
        stat(
            "Accuracy (seen classes)",
            f"avg(spacenet_accuracy_ratio{STREAM})",
            "Mean held-out accuracy over the tasks learned so far, averaged over the selected streams.",
            thresholds=TRAFFIC_LIGHT,
            **PERCENT,
        ),
        stat(
            "Tasks remaining",
            f"min(spacenet_tasks_remaining{STREAM})",
            "Estimated further tasks that fit in the free capacity of the fullest selected stream.",
            thresholds=((0.0, "red"), (1.0, "orange"), (3.0, "green")),
        ),
        stat(
            "Consumer lag",
            'sum(spacenet_consumer_lag_messages{partition=~"$stream"})',
            "Messages waiting in the selected streams' partitions.",
        ),
        stat(
            "Service up",
            'sum(up{job="spacenet"})',
            "Scrape targets of job spacenet that answer.",
            thresholds=((0.0, "red"), (1.0, "green")),
        ),
    ),
)

STREAMS = Row(
    "Streams",
    (
        graph(
            "Streams per process",
            q("sum by (instance) (spacenet_streams)", "{{instance}}"),
            description="Each stream is learned by one process; they move when processes come and go.",
            stacked=True,
        ),
        graph(
            "Model version per stream",
            per_stream("spacenet_model_version"),
        ),
        graph(
            "Current task per stream",
            per_stream("spacenet_current_task"),
            description="Open (or last) task; -1 before the first.",
        ),
        graph(
            "Checkpoint age per stream",
            q(
                f"time() - max by (stream) (spacenet_last_checkpoint_timestamp_seconds{STREAM})",
                "stream {{stream}}",
            ),
            q("max(spacenet_checkpoint_max_age_seconds)", "alert threshold"),
            description="Seconds since each stream's newest checkpoint (or its take-on). It alerts past "
            "the threshold while the stream has uncheckpointed messages.",
            unit="s",
        ),
        graph(
            "Uncheckpointed messages per stream",
            per_stream("spacenet_uncheckpointed_messages"),
            description="Messages handled since the stream's newest checkpoint: replayed after a crash.",
        ),
        graph(
            "State size per stream",
            per_stream("spacenet_checkpoint_bytes", legend="checkpoint {{stream}}"),
            per_stream("spacenet_learner_state_bytes", legend="learner state {{stream}}"),
            per_stream("spacenet_dense_model_bytes", legend="dense model {{stream}}"),
            per_stream("spacenet_holdout_bytes", legend="held-out in memory {{stream}}"),
            description="Bytes of the stream's newest checkpoint in the changelog topic; of its learner's "
            "sparse state beside a dense model of the same shape; of its held-out records in memory "
            "(compressed in the checkpoint).",
            unit="bytes",
        ),
        graph(
            "Stream restore time",
            q(
                "histogram_quantile(0.95, sum by (instance, le) "
                "(spacenet_stream_restore_duration_seconds_bucket))",
                "{{instance}} p95",
            ),
            description="Time to restore a stream a process was assigned, before it consumes it: the 95th "
            "percentile over the process's restores since it started (they are rare).",
            unit="s",
        ),
    ),
)

HEALTH = Row(
    "Stream health",
    (
        graph(
            "Ingest rate",
            q(per_second("spacenet_records_consumed_total", "topic"), "{{topic}} records/s"),
            q(per_second("spacenet_messages_consumed_total"), "messages/s"),
            description="Accepted records and messages per second.",
            unit="ops",
        ),
        graph(
            "Rejected messages by reason",
            q(per_second("spacenet_messages_rejected_total", "reason"), "{{reason}}"),
            description="Messages that failed to decode or validate; they go to the dead-letter topic.",
            unit="ops",
            stacked=True,
        ),
        graph(
            "Records by outcome",
            q(per_second("spacenet_records_routed_total", "outcome"), "{{outcome}}"),
            description="train, pending (candidate new class), late (task closed), noise.",
            unit="ops",
            stacked=True,
        ),
        graph(
            "Consumer lag per partition",
            q(
                'sum by (topic, partition) (spacenet_consumer_lag_messages{partition=~"$stream"})',
                "{{topic}}/{{partition}}",
            ),
            description="Messages between the consumer position and the end of each partition.",
        ),
        graph(
            "Last record age",
            q("time() - max(spacenet_last_record_timestamp_seconds > 0)", "age"),
            description="Seconds since a record was last accepted.",
            unit="s",
        ),
        graph(
            "Dead-lettered messages",
            q(per_second("spacenet_dead_letter_messages_total", "reason"), "{{reason}}"),
            unit="ops",
            stacked=True,
        ),
        graph(
            "Decode latency",
            q(quantile(0.5, "spacenet_decode_duration_seconds"), "p50"),
            q(quantile(0.99, "spacenet_decode_duration_seconds"), "p99"),
            description="Time to decode and validate one message.",
            unit="s",
        ),
        graph(
            "Prediction requests",
            q(per_second("spacenet_prediction_requests_total"), "requests/s"),
            q(per_second("spacenet_predicted_records_total"), "records/s"),
            unit="ops",
        ),
        graph(
            "Prediction latency",
            q(quantile(0.5, "spacenet_prediction_duration_seconds"), "p50"),
            q(quantile(0.99, "spacenet_prediction_duration_seconds"), "p99"),
            unit="s",
        ),
    ),
)

LEARNING = Row(
    "Learning quality",
    (
        graph(
            "Accuracy over time",
            per_stream("spacenet_accuracy_ratio", "avg", "stream {{stream}}: mean over seen tasks"),
            per_stream("spacenet_sample_accuracy_ratio", "avg", "stream {{stream}}: samples pooled"),
            description="Held-out accuracy after each task.",
            **PERCENT,
        ),
        graph(
            "Task inference",
            per_stream("spacenet_task_inference_accuracy_ratio", "avg", "stream {{stream}}: task right"),
            description="Held-out records whose task the task inference (setting task_inference) "
            "chose right: class-incremental accuracy is this times accuracy within the task.",
            **PERCENT,
        ),
        graph(
            "Prequential accuracy and drifts",
            per_stream("spacenet_prequential_accuracy_ratio", "avg", "stream {{stream}}: prequential"),
            q(
                f"sum by (stream) (increase(spacenet_accuracy_drift_total{STREAM}[1h]))",
                "stream {{stream}}: drifts in the last hour",
            ),
            description="Accuracy of the served model on arriving records of classes it has learned, "
            "scored before they are learned (test-then-train, a sample of them), and the drifts a "
            "Page-Hinkley test found in it (alert SpaceNetAccuracyDrift). Monitoring only.",
        ),
        graph(
            "Accuracy per task",
            q(
                f"max by (stream, task) (spacenet_task_accuracy_ratio{STREAM})",
                "stream {{stream}} task {{task}}",
            ),
            description="Held-out accuracy of each task after the stream's latest task.",
            **PERCENT,
        ),
        Panel(
            "Accuracy per task (heatmap)",
            "heatmap",
            (q(f"max by (task) (spacenet_task_accuracy_ratio{STREAM})", "{{task}}"),),
            "Rows: tasks; colour: accuracy (the best over the selected streams: select one). Each "
            "column is the accuracy matrix's latest row R[i][.] as it was published.",
            **PERCENT,
        ),
        Panel(
            "Accuracy matrix R[trained through][task]",
            "table",
            (
                q(
                    f"max by (trained_through, task) (spacenet_accuracy_matrix_ratio{STREAM})",
                    instant=True,
                    table=True,
                ),
            ),
            "Accuracy on each task (columns) after training each task (rows), of one selected stream.",
            thresholds=TRAFFIC_LIGHT,
            decimals=2,
            **PERCENT,
        ),
        graph(
            "Forgetting and backward transfer",
            per_stream("spacenet_average_forgetting_ratio", "avg", "stream {{stream}} forgetting"),
            per_stream("spacenet_backward_transfer_ratio", "avg", "stream {{stream}} backward transfer"),
            description="Average forgetting: mean over earlier tasks of best earlier minus latest accuracy "
            "(alert above 0.3). Backward transfer: mean of R[last][j] - R[j][j].",
            unit="percentunit",
            thresholds=((0.0, "green"), (0.3, "red")),
        ),
        graph(
            "Forgetting per task",
            q(
                f"max by (stream, task) (spacenet_task_forgetting_ratio{STREAM})",
                "stream {{stream}} task {{task}}",
            ),
            unit="percentunit",
            min=0,
        ),
        graph(
            "Tasks and classes",
            per_stream("spacenet_tasks_learned", "max", "stream {{stream}} tasks learned"),
            per_stream("spacenet_classes_learned", "max", "stream {{stream}} classes learned"),
        ),
        graph(
            "Task boundaries",
            q("sum by (reason) (increase(spacenet_task_boundaries_total[5m]))", "{{reason}}"),
            description="Boundary events in the last 5 minutes, by reason.",
            stacked=True,
        ),
    ),
)

CAPACITY = Row(
    "SpaceNet capacity",
    (
        graph(
            "Free neurons per layer",
            q(f"max by (stream, layer) (spacenet_layer_free_neurons{STREAM})", "{{stream}}/{{layer}}"),
            description="Neurons no task has reserved.",
        ),
        graph(
            "Free neuron ratio per layer",
            q(f"max by (stream, layer) (spacenet_layer_free_neuron_ratio{STREAM})", "{{stream}}/{{layer}}"),
            description="Alert below 10%.",
            thresholds=((0.0, "red"), (0.1, "orange"), (0.25, "green")),
            **PERCENT,
        ),
        graph(
            "Used connections per layer",
            q(
                f"max by (stream, layer) (spacenet_layer_used_connection_ratio{STREAM})",
                "{{stream}}/{{layer}}",
            ),
            description="Connections owned by a task / all connections.",
            **PERCENT,
        ),
        graph(
            "Tasks remaining (estimate)",
            per_stream("spacenet_tasks_remaining", "min"),
        ),
        graph(
            "Reserved neurons per task",
            q(
                f"sum by (stream, task) (spacenet_task_reserved_neurons{STREAM})",
                "stream {{stream}} task {{task}}",
            ),
            description="Neurons (all layers) each task reserved.",
            stacked=True,
        ),
        graph(
            "Capacity exhausted",
            q("sum by (layer) (increase(spacenet_capacity_exhausted_total[1h]))", "{{layer}}"),
            description="Tasks refused for lack of capacity in the last hour, by limiting layer.",
        ),
    ),
)

TRAINING = Row(
    "Training and resources",
    (
        graph(
            "Training duration per task",
            q(
                f"max by (stream, task) (spacenet_task_training_duration_seconds{STREAM})",
                "stream {{stream}} task {{task}}",
            ),
            description="How long each task's last training took.",
            unit="s",
        ),
        graph("Training in progress", q("max(spacenet_training_in_progress)", "training"), min=0, max=1),
        graph("Training steps", q(per_second("spacenet_training_steps_total"), "steps/s"), unit="ops"),
        graph(
            "Checkpoint duration",
            q(quantile(0.95, "spacenet_checkpoint_duration_seconds", "30m"), "p95"),
            unit="s",
        ),
        graph(
            "Failures",
            q("sum(increase(spacenet_training_failures_total[1h]))", "training failures (1h)"),
            q("sum(increase(spacenet_checkpoint_failures_total[1h]))", "checkpoint failures (1h)"),
        ),
        graph(
            "Process memory",
            q('max by (instance) (process_resident_memory_bytes{job="spacenet"})', "{{instance}} resident"),
            description="From prometheus_client's process collector, when the service registers it.",
            unit="bytes",
        ),
        graph(
            "Process CPU",
            q(
                f'sum by (instance) (rate(process_cpu_seconds_total{{job="spacenet"}}[{RATE}]))',
                "{{instance}}",
            ),
            description="CPU cores in use.",
        ),
    ),
)

ROWS: tuple[Row, ...] = (OVERVIEW, STREAMS, HEALTH, LEARNING, CAPACITY, TRAINING)

# Task boundaries, marked on every panel: one event per boundary, titled by its reason.
ANNOTATION = q("sum by (reason) (changes(spacenet_task_boundaries_total[1m])) > 0")


def expressions() -> list[str]:
    """Every distinct PromQL expression of the dashboard (panels, then the annotation), in order."""
    panels = [query.expr for row in ROWS for panel in row.panels for query in panel.queries]
    return list(dict.fromkeys([*panels, ANNOTATION.expr]))


def queryable(expr: str) -> str:
    """``expr`` with Grafana's macros replaced, ready for Prometheus' HTTP API."""
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return expr


# ----------------------------------------------------------------------- rendering
def _panel(spec: Panel) -> Any:
    from grafana_foundation_sdk.builders import common, heatmap, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.builders.dashboard import ThresholdsConfig
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models.common import (
        BigValueColorMode,
        LegendDisplayMode,
        LegendPlacement,
        StackingMode,
    )
    from grafana_foundation_sdk.models.heatmap import HeatmapColorMode
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

    builders: dict[str, Any] = {
        "stat": stat.Panel,
        "timeseries": timeseries.Panel,
        "heatmap": heatmap.Panel,
        "table": table.Panel,
    }
    panel = builders[spec.kind]().title(spec.title).span(spec.width).height(spec.height).unit(spec.unit)
    panel = panel.datasource(dm.DataSourceRef(type_val=DATASOURCE["type"], uid=DATASOURCE["uid"]))
    if spec.description:
        panel = panel.description(spec.description)
    for i, query in enumerate(spec.queries):
        target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + i))
        target = target.datasource(DATASOURCE)
        if query.legend:
            target = target.legend_format(query.legend)
        target = target.instant() if query.instant else target.range()
        if query.table:
            target = target.format(PromQueryFormat.TABLE)
        panel = panel.with_target(target)
    if spec.min is not None:
        panel = panel.min(spec.min)
    if spec.max is not None:
        panel = panel.max(spec.max)
    if spec.decimals is not None:
        panel = panel.decimals(spec.decimals)
    if spec.thresholds:
        steps = [
            dm.Threshold(value=None if i == 0 else v, color=c) for i, (v, c) in enumerate(spec.thresholds)
        ]
        panel = panel.thresholds(ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps))
    if spec.kind == "stat":
        panel = panel.color_mode(BigValueColorMode.BACKGROUND if spec.thresholds else BigValueColorMode.VALUE)
        panel = panel.reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    elif spec.kind == "timeseries":
        panel = panel.fill_opacity(10).line_width(1).span_nulls(True)
        legend = common.VizLegendOptions().display_mode(LegendDisplayMode.LIST).show_legend(True)
        panel = panel.legend(legend.placement(LegendPlacement.BOTTOM))
        if spec.stacked:
            panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    elif spec.kind == "heatmap":
        colors = heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("RdYlGn").steps(64)
        colors = colors.fill("dark-orange").exponent(0.5).min(0).max(1)
        panel = panel.calculate(False).color(colors).show_tooltip()
        panel = panel.y_axis(heatmap.YAxisConfig().unit("none").axis_label("task"))
    elif spec.kind == "table":
        matrix = {"rowField": "trained_through", "columnField": "task", "valueField": "Value"}
        panel = panel.with_transformation(dm.DataTransformerConfig(id_val="groupingToMatrix", options=matrix))
        cells = dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"})
        panel = panel.override_by_field_type("number", [cells]).show_header(True)
    return panel


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    from grafana_foundation_sdk.builders.dashboard import (
        AnnotationQuery,
        Dashboard,
        DatasourceVariable,
        QueryVariable,
    )
    from grafana_foundation_sdk.builders.dashboard import Row as RowBuilder
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as dm

    board = (
        Dashboard("SpaceNet-Stream")
        .uid(UID)
        .description(
            "SpaceNet class-incremental learning service: stream, learning quality, capacity, training."
        )
        .tags(["spacenet", "continual-learning", "kafka"])
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .editable()
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("stream")
            .label("Stream")
            .description("Partitions of the training topic, each learned by its own model.")
            .datasource(dm.DataSourceRef(type_val=DATASOURCE["type"], uid=DATASOURCE["uid"]))
            .query("label_values(spacenet_model_version, stream)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.NUMERICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .annotation(
            AnnotationQuery()
            .name("Task boundaries")
            .datasource(dm.DataSourceRef(type_val=DATASOURCE["type"], uid=DATASOURCE["uid"]))
            .enable(True)
            .icon_color("purple")
            .expr(ANNOTATION.expr)
        )
    )
    # Expanded rows: a row header, then its panels at the top level (Grafana's layout for
    # rows that are open when the dashboard loads). Stable ids keep panel links working.
    next_id = 1
    for row in ROWS:
        board = board.with_row(RowBuilder(row.title).collapsed(False).id(next_id))
        next_id += 1
        for spec in row.panels:
            board = board.with_panel(_panel(spec).id(next_id))
            next_id += 1
    data: dict[str, Any] = json.loads(JSONEncoder().encode(board.build()))
    # Prometheus annotation fields the SDK's AnnotationQuery does not model.
    for annotation in data["annotations"]["list"]:
        if annotation.get("expr") == ANNOTATION.expr:
            annotation.update(step="1m", titleFormat="Task boundary: {{reason}}", tagKeys="reason")
    return data


def render() -> str:
    """The committed file's exact text."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed dashboard is stale")
    parser.add_argument(
        "--expressions", action="store_true", help="print every PromQL expression, one per line"
    )
    args = parser.parse_args(argv)
    if args.expressions:
        print("\n".join(expressions()))
        return 0
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
