"""report.html for a run and for a comparison, and a run's curves.svg: one self-contained page each, its plots drawn here as
inline SVG (no plotting or JavaScript library, no network, no external font or stylesheet), so the
file opens anywhere, offline, years later. Every string a user chose (run and model names, the
recipe's text, error messages) is escaped, and a link is a relative path with each part
percent-encoded: a run named `javascript:alert(1)` links to its folder, never runs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from peftcli.adapter_io import atomic_write_text
from peftcli.reporting.compare_tables import NUMERIC_COLUMNS, cells, headers, plot_points
from peftcli.reporting.report import eval_table, headline, metric_label, summary_rows
from peftcli.reporting.sweep_tables import best_sentence, numeric_columns, table_cells, table_headers, value_text

CHART_WIDTH, CHART_HEIGHT = 640, 340
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

CSS = """
body { font-family: sans-serif; color: #222; max-width: 1100px; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { color: #a00; }
pre { background: #f7f7f7; padding: 1rem; overflow: auto; }
svg { display: block; margin: 1rem 0; max-width: 100%; height: auto; }
svg.wide, svg.panel { width: 100%; margin: 0.5rem 0; }
.panels { display: grid; grid-template-columns: 1fr 1fr; gap: 0 1rem; }
.panels svg.panel[width="1040"] { grid-column: 1 / -1; }
@media (max-width: 800px) { .panels { grid-template-columns: 1fr; } }
p.headline { font-size: 1.15rem; }
"""


# -- axes and charts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """A linear or log10 axis: its title, its range and its ticks as (value, label)."""

    title: str
    lo: float
    hi: float
    ticks: tuple[tuple[float, str], ...]
    log: bool = False

    def fraction(self, value: float) -> float:
        """Where `value` lies between lo (0) and hi (1)."""
        if self.log:
            return (math.log10(value) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (value - self.lo) / (self.hi - self.lo)


def linear_axis(title: str, values: list[float]) -> Axis:
    """Ticks at round steps (1, 2 or 5 x 10^k), the range widened to whole steps."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # one value, or all equal: a range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step((hi - lo) / 5)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    decimals = max(0, -math.floor(math.log10(step)))
    ticks = tuple((lo + i * step, f"{lo + i * step:.{decimals}f}") for i in range(round((hi - lo) / step) + 1))
    return Axis(title, lo, hi, ticks)


def nice_step(raw: float) -> float:
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def log_axis(title: str, values: list[float]) -> Axis:
    """Whole decades around the values, a tick at each power of ten. Parameter counts of methods
    span four or more orders of magnitude (BitFit's thousands to full fine-tuning's millions)."""
    positive = [v for v in values if v > 0] or [1.0, 10.0]
    lo = math.floor(math.log10(min(positive)))
    hi = max(math.ceil(math.log10(max(positive))), lo + 1)
    ticks = tuple((10.0**e, power_label(e)) for e in range(lo, hi + 1))
    return Axis(f"{title} (log scale)", 10.0**lo, 10.0**hi, ticks, log=True)


def power_label(exponent: int) -> str:
    """10^exponent as parameter counts are written: 1, 10, 100, 1k, 10k, 100k, 1M, ..., 1B."""
    for e, suffix in ((9, "B"), (6, "M"), (3, "k")):
        if exponent >= e:
            return f"{10 ** (exponent - e)}{suffix}"
    return str(10**exponent) if exponent >= 0 else f"1e{exponent}"


@dataclass(frozen=True)
class Series:
    """Points of one colour: joined by a line, or (`labelled`) single points with their name beside."""

    name: str
    points: list[tuple[float, float]]
    color: str
    labelled: bool = False


@dataclass(frozen=True)
class Frame:
    """The plot area inside the SVG and the mapping from data to pixels."""

    x: Axis
    y: Axis
    left: float = 72
    top: float = 40
    width: float = 540
    height: float = 250

    def px(self, v: float) -> float:
        return self.left + self.x.fraction(v) * self.width

    def py(self, v: float) -> float:
        return self.top + self.height - self.y.fraction(v) * self.height


def svg_chart(
    title: str,
    x: Axis,
    y: Axis,
    series: list[Series],
    width: int = 640,
    height: int = 340,
    extras: Callable[[Frame], list[str]] | None = None,
    css_class: str = "",
) -> str:
    """One chart; `extras` draws more over the series (the run page's best-step mark and values)."""
    frame = Frame(x, y, width=width - 72 - 28, height=height - 40 - 50)
    css = f' class="{css_class}"' if css_class else ""
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"{css} '
            f'font-family="sans-serif" font-size="12" role="img" aria-label="{escape(title)}">'
        ),
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{frame.left}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        *grid(frame),
        *[svg_series(s, frame) for s in series],
        *(extras(frame) if extras is not None else []),
        *point_labels([s for s in series if s.labelled], frame),
        *legend([s for s in series if not s.labelled], width),
        "</svg>",
    ]
    return "\n".join(parts)


def grid(f: Frame) -> list[str]:
    """Grid lines and tick labels for both axes, the frame, and the axis titles."""
    bottom, right = f.top + f.height, f.left + f.width
    parts = []
    for v, label in f.x.ticks:
        parts.append(f'<line x1="{f.px(v):.1f}" y1="{f.top}" x2="{f.px(v):.1f}" y2="{bottom}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{f.px(v):.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>')
    for v, label in f.y.ticks:
        parts.append(f'<line x1="{f.left}" y1="{f.py(v):.1f}" x2="{right}" y2="{f.py(v):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{f.left - 6}" y="{f.py(v) + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    parts.append(f'<rect x="{f.left}" y="{f.top}" width="{f.width}" height="{f.height}" fill="none" stroke="#999"/>')
    parts.append(
        f'<text x="{f.left + f.width / 2:.1f}" y="{bottom + 38}" text-anchor="middle">{escape(f.x.title)}</text>'
    )
    middle = f.top + f.height / 2
    parts.append(
        f'<text x="16" y="{middle:.1f}" text-anchor="middle" transform="rotate(-90 16 {middle:.1f})">{escape(f.y.title)}</text>'
    )
    return parts


def svg_series(s: Series, f: Frame) -> str:
    xy = [(f.px(x), f.py(y)) for x, y in s.points]
    parts = []
    if not s.labelled and len(xy) > 1:
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        parts.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="2"/>')
    if s.labelled or len(xy) <= 60:  # dots on a long curve are noise
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if s.labelled else 3}" fill="{s.color}"/>' for x, y in xy]
    return "".join(parts)


LABEL_OFFSETS = ((7, -6), (7, 14), (7, -20), (7, 28), (7, -34), (7, 42))


def point_labels(series: list[Series], f: Frame) -> list[str]:
    """Each labelled point's name beside it: above right, or the first place further up or down
    where it overlaps no name placed before (runs of similar size and score sit close together)."""
    placed: list[tuple[float, float, float, float]] = []

    def free(box: tuple[float, float, float, float]) -> bool:
        return all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed)

    parts = []
    for s in series:
        width = 7 * len(s.name)  # about 7 px a character at font size 12
        for x, y in ((f.px(a), f.py(b)) for a, b in s.points):
            boxes = [(x + dx, y + dy - 11, x + dx + width, y + dy + 2) for dx, dy in LABEL_OFFSETS]
            box = next((b for b in boxes if free(b)), boxes[0])
            placed.append(box)
            parts.append(f'<text x="{box[0]:.1f}" y="{box[3] - 2:.1f}" fill="{s.color}">{escape(s.name)}</text>')
    return parts


def legend(series: list[Series], width: int) -> list[str]:
    parts, x = [], width - 28
    for s in reversed(series):  # right-aligned: laid out from the right edge
        x -= 7 * len(s.name) + 24
        parts.append(f'<rect x="{x:.0f}" y="11" width="10" height="10" fill="{s.color}"/>')
        parts.append(f'<text x="{x + 14:.0f}" y="20">{escape(s.name)}</text>')
    return parts


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- pages -------------------------------------------------------------------------------------


def page(title: str, body: list[str]) -> str:
    head = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">']
    head += [f"<title>{escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    return "\n".join([*head, *body, "</body>", "</html>", ""])


def html_table(
    header: list[str],
    rows: list[list[str]],
    numeric: frozenset[int] = frozenset(),
    links: list[str | None] | None = None,
    row_classes: list[str] | None = None,
) -> str:
    """Plain text cells, escaped here; `links` makes the first cell of a row a link."""
    out = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        tds = []
        for j, cell in enumerate(row):
            text = escape(cell)
            if j == 0 and links and links[i]:
                text = f'<a href="{escape(links[i] or "")}">{text}</a>'
            tds.append(f'<td class="num">{text}</td>' if j in numeric else f"<td>{text}</td>")
        css = f' class="{escape(row_classes[i])}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{css}>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


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
            f'<line x1="{x:.1f}" y1="{f.top}" x2="{x:.1f}" y2="{f.top + f.height}" stroke="#444" stroke-dasharray="5 4"/>',
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
        boxes: list[tuple[float, float, float, float]] = []
        for step, value in (p for p in points if p[0] in steps):
            x, y = f.px(step), f.py(value)
            if ring is not None and step == ring:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="{color}" stroke-width="2"/>')
            text, width = f"{value:.4f}", 44.0
            left = x - 10 - width if x + 10 + width > f.left + f.width else x + 10
            for ty in (y - 10, y + 20):
                box = (left, ty - 11, left + width, ty + 2)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
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
        return [(r["step"], r[key]) for r in history if finite(r.get(key)) and finite(r.get("step"))]

    steps = [r["step"] for r in history if finite(r.get("step"))]
    if not steps:
        return RunCharts(None, [])
    x = step_axis(max(steps))
    evals = [r["step"] for r in history if finite(r.get("step")) and any(k.startswith("eval_") for k in r)]
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
        k for r in history for k, v in r.items() if k.startswith("eval_") and k != "eval_loss" and finite(v)
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


def run_html(report: dict[str, Any], history: list[dict[str, Any]], recipe_text: str) -> str:
    e = escape
    body = [f"<h1>Run {e(str(report['name']))}</h1>"]
    body.append(
        f"<p>{e(str(report['method']))} on <code>{e(str(report['model']))}</code>, task {e(str(report['task']))}.</p>"
    )
    if headline(report):
        body.append(f'<p class="headline">{e(headline(report))}</p>')
    charts = run_charts(history, report.get("best_step"), report.get("best_metric"))
    body += ["<h2>Curves</h2>", *([charts.loss] if charts.loss else [])]
    if charts.panels:
        body += ['<div class="panels">', *charts.panels, "</div>"]
    if not charts:
        body.append(f"<p>{e(NOTHING_LOGGED)}</p>")
    body += ["<h2>Summary</h2>", html_table(["", "value"], [list(row) for row in summary_rows(report["summary"])])]
    if report.get("final_metrics"):
        header, rows, note = eval_table(report)
        body += ["<h2>Eval</h2>", html_table(header, rows, frozenset(range(1, len(header))))]
        if note:
            body.append(f"<p>{e(note)}</p>")
    body += ["<h2>Recipe</h2>", f"<pre>{e(recipe_text)}</pre>"]
    body += [
        "<h2>Versions</h2>",
        "<ul>",
        *[f"<li>{e(str(k))} {e(str(v))}</li>" for k, v in report["versions"].items()],
        "</ul>",
    ]
    return page(f"Run {report['name']}", body)


def write_run_html(run_dir: Path, report: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """report.html, and its charts alone as curves.svg (which report.md shows)."""
    recipe = run_dir / "recipe.yaml"
    text = recipe.read_text(encoding="utf-8") if recipe.is_file() else ""
    atomic_write_text(run_dir / "curves.svg", curves_svg(history, report.get("best_step"), report.get("best_metric")))
    atomic_write_text(run_dir / "report.html", run_html(report, history, text))


def comparison_html(title: str, metric: str, higher_is_better: bool, rows: list[dict[str, Any]], out: Path) -> str:
    """The comparison table (each run linked to its own report.html) and the metric against the
    trainable parameters, one labelled point per finished run."""
    links = [link_from(out, r["run_dir"]) for r in rows]
    row_classes = ["failed" if r["status"] == "failed" else "" for r in rows]
    table = html_table(headers(metric), [cells(r) for r in rows], NUMERIC_COLUMNS, links, row_classes)
    points = plot_points(rows)
    series = [Series(label, [(x, y)], COLORS[i % len(COLORS)], labelled=True) for i, (label, x, y) in enumerate(points)]
    x = log_axis("trainable parameters", [p[1] for p in points])
    scores = [p[2] for p in points]
    margin = 0.05 * (max(scores) - min(scores)) if scores else 0.0  # no point on the frame's edge
    y = linear_axis(f"{metric} (best)", [*scores, *([min(scores) - margin, max(scores) + margin] if scores else [])])
    chart = svg_chart(f"{metric} (best) against trainable parameters", x, y, series)
    order = "higher is better" if higher_is_better else "lower is better"
    body = [f"<h1>{escape(title)}</h1>", f"<p>Sorted by the best eval {escape(metric)} ({order}).</p>", table, chart]
    return page(title, body)


def link_from(out: Path, run_dir: str | None) -> str | None:
    """The run's report.html relative to the page in `out`. Each part is percent-encoded, `:` too: a
    folder named `javascript:alert(1)` would otherwise be read as a scheme, and `#`, `?` or `%` in a
    name would cut or change the path."""
    if run_dir is None or not (Path(run_dir) / "report.html").is_file():
        return None
    relative = Path(os.path.relpath(Path(run_dir) / "report.html", out)).as_posix()
    return "/".join(quote(part, safe="") for part in relative.split("/"))


def sweep_html(summary: dict[str, Any], out: Path) -> str:
    """The sweep's table (each trial linked to its own report.html), the metric per trial with the best
    so far, and the metric against each swept key: a log axis for a log range or values spanning 10x
    or more, one tick per value for values that are not numbers."""
    metric, rows, keys = summary["metric"], summary["rows"], list(summary["params"])
    links = [link_from(out, r["run_dir"]) for r in rows]
    row_classes = ["failed" if r["status"] == "failed" else "" for r in rows]
    table = html_table(
        table_headers(keys, metric), [table_cells(r, keys) for r in rows], numeric_columns(keys), links, row_classes
    )
    scored = sorted((int(r["run"].rsplit("-", 1)[-1]), r) for r in rows if finite(r["metric_best"]))
    scores = [r["metric_best"] for _, r in scored]
    margin = 0.05 * (max(scores) - min(scores)) if scores else 0.0
    y = linear_axis(f"{metric} (best)", [*scores, *([min(scores) - margin, max(scores) + margin] if scores else [])])
    best = max if summary["higher_is_better"] else min
    so_far = [(n, best(scores[: i + 1])) for i, (n, _) in enumerate(scored)]
    by_trial = [
        Series("each trial", [(n, r["metric_best"]) for n, r in scored], COLORS[0]),
        Series("best so far", so_far, COLORS[1]),
    ]
    charts = [svg_chart(f"{metric} (best) per trial", linear_axis("trial", [n for n, _ in scored]), y, by_trial)]
    for key in keys:
        points = [(r["params"].get(key), r["metric_best"], n) for n, r in scored]
        x, at = key_axis(key, summary["params"][key], [p[0] for p in points])
        series = [Series(str(n), [(at(v), s)], COLORS[0], labelled=True) for v, s, n in points]
        charts.append(svg_chart(f"{metric} (best) against {key}", x, y, series))
    order = "higher is better" if summary["higher_is_better"] else "lower is better"
    body = [
        f"<h1>{escape(summary['title'])}</h1>",
        (
            f"<p>{escape(summary['strategy'])} search over {escape(summary['recipe'])}; sorted by the best eval "
            f"{escape(metric)} ({order}). Points are labelled with their trial number.</p>"
        ),
        table,
        f"<p>{escape(best_sentence(summary))}</p>",
        *charts,
    ]
    return page(summary["title"], body)


def key_axis(key: str, spec: Any, values: list[Any]) -> tuple[Axis, Any]:
    """The x axis for a swept key and the function placing a value on it."""
    numbers = [v for v in values if finite(v)]
    if values and len(numbers) == len(values):
        listed = [v for v in spec if finite(v)] if isinstance(spec, list) else []
        log = (
            spec.get("log", False)
            if isinstance(spec, dict)
            else bool(listed) and min(listed) > 0 and max(listed) >= 10 * min(listed)
        )
        if log:
            return log_axis(key, numbers), float
        margin = 0.05 * (max(numbers) - min(numbers))  # no point on the frame's edge
        return linear_axis(key, [*numbers, min(numbers) - margin, max(numbers) + margin]), float
    choices = list(dict.fromkeys(value_text(v) for v in (spec if isinstance(spec, list) else values)))
    ticks = tuple((float(i), c) for i, c in enumerate(choices))
    return Axis(key, -0.5, len(choices) - 0.5, ticks), lambda v: float(choices.index(value_text(v)))
