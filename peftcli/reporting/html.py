"""The HTML pages: report.html for a run, a comparison and a sweep, and the run's curves.svg beside
it. One self-contained page each, its plots inline SVG (reporting/svg_charts.py, no plotting or
JavaScript library, no network, no external font or stylesheet), so the file opens anywhere, offline,
years later. Every string a user chose (run and model names, the recipe's text, error messages) is
escaped, and a link is a relative path with each part percent-encoded: a run named
`javascript:alert(1)` links to its folder, never runs."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from peftcli.adapter_io import atomic_write_text
from peftcli.reporting.compare_tables import NUMERIC_COLUMNS, cells, headers, plot_points
from peftcli.reporting.curves import NOTHING_LOGGED, curves_svg, run_charts
from peftcli.reporting.report import eval_table, headline, is_finite_number, summary_rows
from peftcli.reporting.svg_charts import COLORS, Axis, Series, linear_axis, log_axis, padded_axis, svg_chart
from peftcli.reporting.sweep_tables import best_sentence, numeric_columns, table_cells, table_headers, value_text

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
    y = padded_axis(f"{metric} (best)", [p[2] for p in points])
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
    scored = sorted((int(r["run"].rsplit("-", 1)[-1]), r) for r in rows if is_finite_number(r["metric_best"]))
    scores = [r["metric_best"] for _, r in scored]
    y = padded_axis(f"{metric} (best)", scores)
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
    numbers = [v for v in values if is_finite_number(v)]
    if values and len(numbers) == len(values):
        listed = [v for v in spec if is_finite_number(v)] if isinstance(spec, list) else []
        log = (
            spec.get("log", False)
            if isinstance(spec, dict)
            else bool(listed) and min(listed) > 0 and max(listed) >= 10 * min(listed)
        )
        if log:
            return log_axis(key, numbers), float
        return padded_axis(key, numbers), float
    choices = list(dict.fromkeys(value_text(v) for v in (spec if isinstance(spec, list) else values)))
    ticks = tuple((float(i), c) for i, c in enumerate(choices))
    return Axis(key, -0.5, len(choices) - 0.5, ticks), lambda v: float(choices.index(value_text(v)))
