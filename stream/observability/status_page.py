"""The status page at ``/`` on the metrics port: one self-contained HTML page, no script.

It shows, per stream, what the metrics say: the current task and model version, each
layer's free capacity as a bar, the held-out accuracy matrix as a heat map and forgetting
per task (from the same ``ModelState`` snapshots the model-state collector reads), and,
for the process, the recent task boundaries and the dead-letter counts by reason (from
the registry's own series). It refreshes itself every ``refresh_s`` seconds (a meta
refresh); every value is escaped.

    >>> from prometheus_client import CollectorRegistry
    >>> page = render(StatusView(streams={}, counters={}, boundaries=(), device="cpu"))
    >>> "<title>SpaceNet-Stream</title>" in page and "no stream yet" in page
    True
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from spacenet.stream.observability.metrics import Boundary
from spacenet.stream.observability.metrics_collector import ModelState

REFRESH_S = 5


@dataclass(frozen=True)
class StreamView:
    state: ModelState | None
    current_task: int | None
    model_version: int


@dataclass(frozen=True)
class StatusView:
    """What the page shows, gathered at request time (``Telemetry.status_view``)."""

    streams: Mapping[str, StreamView]
    counters: Mapping[str, Mapping[str, float]]  # family -> reason -> count
    boundaries: Sequence[Boundary]  # newest first
    device: str


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 8px}
.sub{color:#5b6475;margin-bottom:16px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 18px;margin-bottom:16px}
.kpi{display:inline-block;margin-right:28px}.kpi b{display:block;font-size:22px}
.bar{background:#e6e9ef;border-radius:4px;height:14px;width:320px;display:inline-block;vertical-align:middle}
.bar i{display:block;height:14px;border-radius:4px;background:#2f7de1}
table{border-collapse:collapse}td,th{padding:4px 8px;text-align:right}th{color:#5b6475;font-weight:600}
td.h{color:#fff;min-width:44px;text-align:center}.muted{color:#8a93a3}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _pct(x: float | None) -> str:
    return "&ndash;" if x is None else f"{x:.3f}"


def _heat(x: float | None) -> str:
    if x is None:
        return '<td class="h" style="background:#c9ced8">&ndash;</td>'
    hue = int(max(0.0, min(1.0, x)) * 120)  # red (0) to green (1)
    return f'<td class="h" style="background:hsl({hue},62%,42%)">{x:.2f}</td>'


def _stream(name: str, view: StreamView) -> str:
    task = "none yet" if view.current_task is None or view.current_task < 0 else view.current_task
    parts = [
        f'<div class="card"><h2>Stream {_e(name)}</h2>',
        f'<div class="kpi">current task<b>{_e(task)}</b></div>',
        f'<div class="kpi">model version<b>{_e(view.model_version)}</b></div>',
    ]
    state = view.state
    if state is None:
        parts.append('<p class="muted">no model yet</p></div>')
        return "".join(parts)
    cap = state.capacity
    acc = state.accuracy
    parts.append(f'<div class="kpi">tasks learned<b>{_e(cap.tasks_learned)}</b></div>')
    parts.append(f'<div class="kpi">accuracy<b>{_pct(acc.final if acc else None)}</b></div>')
    parts.append(
        f'<div class="kpi">avg forgetting<b>{_pct(acc.average_forgetting if acc else None)}</b></div>'
    )
    state_kb = f"{cap.state_bytes / 1000:,.1f} KB"
    parts.append(f'<div class="kpi">learner state ({cap.state_ratio:.2f}x dense)<b>{state_kb}</b></div>')
    parts.append("<h2>Free capacity</h2><table>")
    for layer in cap.layers:
        share = layer.free_neurons / layer.neurons if layer.neurons else 0.0
        parts.append(
            f'<tr><th>{_e(layer.name)}</th><td><span class=bar><i style="width:{share * 100:.1f}%"></i>'
            f"</span></td><td>{_e(layer.free_neurons)} / {_e(layer.neurons)} neurons free</td></tr>"
        )
    parts.append("</table>")
    if acc is not None and acc.rows:
        n = max(len(r) for r in acc.rows)
        parts.append("<h2>Held-out accuracy (row: after task i; column: task j)</h2><table><tr><th></th>")
        parts += [f"<th>task {j}</th>" for j in range(n)]
        parts.append("</tr>")
        for i, row in enumerate(acc.rows):
            cells = "".join(_heat(row[j] if j < len(row) else None) for j in range(n))
            parts.append(f"<tr><th>after {i}</th>{cells}</tr>")
        parts.append("</table>")
        if acc.forgetting:
            parts.append("<h2>Forgetting per task</h2><table><tr>")
            parts += [f"<th>task {_e(t)}</th>" for t in sorted(acc.forgetting)]
            parts.append("</tr><tr>")
            parts += [f"<td>{acc.forgetting[t]:.3f}</td>" for t in sorted(acc.forgetting)]
            parts.append("</tr></table>")
    parts.append("</div>")
    return "".join(parts)


def _counts(title: str, counts: Mapping[str, float]) -> str:
    rows = "".join(f"<tr><th>{_e(r)}</th><td>{int(v)}</td></tr>" for r, v in sorted(counts.items()) if v)
    return f"<h2>{_e(title)}</h2>" + (f"<table>{rows}</table>" if rows else '<p class="muted">none</p>')


def render(view: StatusView, refresh_s: int = REFRESH_S, now: float | None = None) -> str:
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    streams = "".join(_stream(s, v) for s, v in sorted(view.streams.items())) or (
        '<div class="card muted">no stream yet: the service has not been assigned a partition</div>'
    )
    recent = "".join(
        f"<tr><th>{_e(time.strftime('%H:%M:%S', time.localtime(b.at)))}</th><td>stream {_e(b.stream)}</td>"
        f"<td>task {_e(b.task)} opened</td><td>{_e(b.reason)}</td></tr>"
        for b in view.boundaries
    )
    process = [
        '<div class="card">',
        "<h2>Recent task boundaries</h2>",
        f"<table>{recent}</table>" if recent else '<p class="muted">none</p>',
        _counts(
            "Dead-lettered messages, by reason", view.counters.get("spacenet_dead_letter_messages_total", {})
        ),
        _counts("Rejected messages, by reason", view.counters.get("spacenet_messages_rejected_total", {})),
        "</div>",
    ]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh_s)}"><title>SpaceNet-Stream</title>'
        f"<style>{CSS}</style></head><body><h1>SpaceNet-Stream</h1>"
        f'<div class="sub">device {_e(view.device)} · {_e(stamp)}'
        f' · refreshes every {int(refresh_s)} s · <a href="/metrics">/metrics</a></div>'
        f"{streams}{''.join(process)}</body></html>"
    )
