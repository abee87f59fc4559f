"""A run's curves: the loss across the page's width and one panel per other eval metric, with the
best eval's step marked, for report.html and, laid out the same, as the standalone curves.svg."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any

from peftcli.reporting.report import is_finite_number, metric_label
from peftcli.reporting.svg_charts import (
    COLORS,
    Axis,
    Box,
    Frame,
    Series,
    is_free,
    linear_axis,
    nice_step,
    svg_chart,
)

RUN_WIDTH, LOSS_HEIGHT, PANEL_WIDTH, PANEL_HEIGHT = 1040, 340, 520, 280


@dataclass(frozen=True)
class RunCharts:
    """A run's charts: the loss across the page's width, then one panel per other eval metric, two to
    a row. A panel each, not one chart: accuracy and F1 of a balanced binary task lie on top of each
    other, and perplexity is on another scale altogether."""

    loss: str | None
    panels: list[str]
    panel_width: int = 0

    def __bool__(self) -> bool:
        return self.loss is not None or bool(self.panels)


def step_axis(last: float) -> Axis:
    """Step 0 to the last step, so that the curves end at the frame's right edge (linear_axis would
    widen the range to the next round step: 200 for 152 steps): ticks at round whole steps, and the
    last step labelled too where there is room beside the tick before it."""
    hi = max(float(last), 1.0)
    step = max(1.0, nice_step(hi / 6))
    ticks = [i * step for i in range(int(hi / step + 1e-9) + 1)]
    if hi - ticks[-1] >= 0.4 * step:
        ticks.append(hi)
    return Axis("step", 0.0, hi, tuple((t, f"{t:,.0f}") for t in ticks))


def best_mark(step: float, text: str) -> Callable[[Frame], list[str]]:
    """A dashed line at the best eval's step, named above the frame (below the title and legend, so it
    covers no curve)."""

    def draw(f: Frame) -> list[str]:
        x = f.px(step)
        width = 7 * len(text)
        start = min(max(x - width / 2, 4.0), f.left + f.width + 24 - width)
        return [
            (
                f'<line x1="{x:.1f}" y1="{f.top}" x2="{x:.1f}" y2="{f.top + f.height}" stroke="#444" '
                'stroke-dasharray="5 4"/>'
            ),
            f'<text x="{start:.1f}" y="{f.top - 6}" fill="#444">{escape(text)}</text>',
        ]

    return draw


def value_labels(
    points: list[tuple[float, float]], steps: list[float], color: str, ring: float | None
) -> Callable[[Frame], list[str]]:
    """The values at the given steps (the best and the final eval) written above their points, beside
    the best step's line rather than across it, and a ring around the best point of the metric that
    chose it. A label that would meet the one before it goes below its point instead."""

    def draw(f: Frame) -> list[str]:
        parts: list[str] = []
        boxes: list[Box] = []
        for step, value in (p for p in points if p[0] in steps):
            x, y = f.px(step), f.py(value)
            if ring is not None and step == ring:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="{color}" stroke-width="2"/>')
            text, width = f"{value:.4f}", 44.0
            left = x - 10 - width if x + 10 + width > f.left + f.width else x + 10
            for ty in (y - 10, y + 20):
                box = (left, ty - 11, left + width, ty + 2)
                if is_free(box, boxes):
                    break
            boxes.append(box)
            parts.append(f'<text x="{left:.1f}" y="{box[3] - 2:.1f}" fill="{color}" font-weight="bold">{text}</text>')
        return parts

    return draw


def run_charts(
    history: list[dict[str, Any]], best_step: int | None = None, best_metric: str | None = None
) -> RunCharts:
    """The loss (training, and eval where there is one) and each other eval metric against the step,
    every chart from step 0 to the run's last step, with the best eval's step marked."""

    def points(key: str) -> list[tuple[float, float]]:
        return [
            (r["step"], r[key]) for r in history if is_finite_number(r.get(key)) and is_finite_number(r.get("step"))
        ]

    steps = [r["step"] for r in history if is_finite_number(r.get("step"))]
    if not steps:
        return RunCharts(None, [])
    x = step_axis(max(steps))
    evals = [r["step"] for r in history if is_finite_number(r.get("step")) and any(k.startswith("eval_") for k in r)]
    best = best_step if best_step is not None and best_step in evals else None
    chosen = metric_label(best_metric)
    marked = f"step {best}: best {chosen} (the saved adapter)" if best is not None else ""
    mark = best_mark(best, marked) if best is not None else None

    losses = [
        s
        for s in (Series("train loss", points("loss"), COLORS[0]), Series("eval loss", points("eval_loss"), COLORS[1]))
        if s.points
    ]
    loss = None
    if losses:
        title = "Loss" if len(losses) > 1 else losses[0].name.capitalize()
        y = linear_axis("loss", [p[1] for s in losses for p in s.points])
        loss = svg_chart(title, x, y, losses, RUN_WIDTH, LOSS_HEIGHT, mark, "wide")

    metrics = dict.fromkeys(
        k for r in history for k, v in r.items() if k.startswith("eval_") and k != "eval_loss" and is_finite_number(v)
    )
    panels = []
    width = RUN_WIDTH if len(metrics) == 1 else PANEL_WIDTH  # a lone metric spans the page, as the loss
    for i, key in enumerate(metrics):
        name, color, series = key.removeprefix("eval_"), COLORS[2 + i % 6], points(key)
        values = [p[1] for p in series]
        headroom = 0.15 * (max(values) - min(values))  # room above the top point for its value
        y = linear_axis(name, [*values, max(values) + headroom])
        labelled = [s for s in (best, evals[-1] if evals else None) if s is not None]
        label = value_labels(series, labelled, color, best if name == best_metric else None)
        short = best_mark(best, f"best {chosen}, step {best}") if best is not None else None
        extras = lambda f, a=short, b=label: (a(f) if a else []) + b(f)
        panels.append(
            svg_chart(f"Eval {name}", x, y, [Series(name, series, color)], width, PANEL_HEIGHT, extras, "panel")
        )
    return RunCharts(loss, panels, width)


NOTHING_LOGGED = "Nothing was logged: the run was shorter than train.log_every and had no eval."


def curves_svg(history: list[dict[str, Any]], best_step: int | None = None, best_metric: str | None = None) -> str:
    """curves.svg: the run page's charts in one standalone SVG file, laid out as on the page."""
    charts = run_charts(history, best_step, best_metric)
    placed: list[tuple[int, int, str]] = []
    top = 0
    if charts.loss is not None:
        placed.append((0, 0, charts.loss))
        top = LOSS_HEIGHT
    for i, panel in enumerate(charts.panels):
        per_row = RUN_WIDTH // charts.panel_width
        placed.append(((i % per_row) * charts.panel_width, top + (i // per_row) * PANEL_HEIGHT, panel))
    rows = math.ceil(len(charts.panels) / (RUN_WIDTH // charts.panel_width)) if charts.panels else 0
    height = top + rows * PANEL_HEIGHT or 40
    size = f'width="{RUN_WIDTH}" height="{height}" viewBox="0 0 {RUN_WIDTH} {height}"'
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" {size} font-family="sans-serif" font-size="12">']
    parts += [f'<g transform="translate({x},{y})">\n{chart}\n</g>' for x, y, chart in placed]
    if not charts:
        parts.append(f'<text x="10" y="24">{escape(NOTHING_LOGGED)}</text>')
    return "\n".join([*parts, "</svg>", ""])
