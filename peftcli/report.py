"""The run's report: metrics.jsonl lines in, report.json, report.md and a loss/metric plot (SVG) out."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from peftcli.checkpoint import atomic_write_text, write_json


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl (flushed, so a crash keeps what was logged).
    It starts from `history`: empty for a new run, the checkpoint's log for a resumed one (dropping
    what was logged after that checkpoint)."""

    def __init__(self, path: Path, history: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history or []))

    def __call__(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def write_report(run_dir: Path, report: dict[str, Any], history: list[dict[str, Any]], eval_metric: str) -> None:
    write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", markdown(report))
    atomic_write_text(run_dir / "curves.svg", curves_svg(history, eval_metric))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Run `{report['name']}`", ""]
    lines += [f"{report['method']} on `{report['model']}`, task {report['task']}.", ""]
    lines += ["| | |", "|---|---|"]
    for key, value in report["summary"].items():
        lines.append(f"| {key} | {fmt_value(value)} |")
    if report.get("final_metrics"):
        lines += ["", "## Eval", "", "| metric | final | best |", "|---|---|---|"]
        best = report.get("best_metrics") or {}
        for key, value in report["final_metrics"].items():
            lines.append(f"| {key} | {fmt_value(value)} | {fmt_value(best.get(key, ''))} |")
        if report.get("best_step") is not None:
            lines += ["", f"The saved adapter is from step {report['best_step']} (best {report['best_metric']})."]
    lines += ["", "## Versions", ""] + [f"- {k} {v}" for k, v in report["versions"].items()]
    lines += ["", "![loss and eval metric](curves.svg)", ""]
    return "\n".join(lines)


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def curves_svg(history: list[dict[str, Any]], eval_metric: str, width: int = 720, height: int = 300) -> str:
    """Training loss (left axis) and the eval metric (right axis) against the step, as plain SVG."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    key = f"eval_{eval_metric}"
    evals = [(r["step"], r[key]) for r in history if key in r]
    pad, w, h = 50, width - 100, height - 80
    steps = [s for s, _ in train + evals] or [0, 1]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)

    def path(points: list[tuple[float, float]], color: str) -> tuple[str, float, float]:
        if not points:
            return "", 0.0, 1.0
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        hi = hi if hi > lo else lo + 1.0
        xy = [(pad + (s - x0) / (x1 - x0) * w, 30 + h - (v - lo) / (hi - lo) * h) for s, v in points]
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        dots = (
            "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in xy) if len(xy) < 60 else ""
        )
        return f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>{dots}', lo, hi

    loss_path, loss_lo, loss_hi = path(train, "#1f77b4")
    eval_path, ev_lo, ev_hi = path(evals, "#d62728")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<rect x="{pad}" y="30" width="{w}" height="{h}" fill="none" stroke="#999"/>',
        f'<text x="{pad}" y="20" fill="#1f77b4">train loss ({loss_lo:.3g} to {loss_hi:.3g})</text>',
        f'<text x="{pad + w}" y="20" text-anchor="end" fill="#d62728">{escape(key)} ({ev_lo:.3g} to {ev_hi:.3g})</text>'
        if evals
        else "",
        f'<text x="{pad}" y="{height - 25}">step {x0}</text>',
        f'<text x="{pad + w}" y="{height - 25}" text-anchor="end">step {x1}</text>',
        loss_path,
        eval_path,
        "</svg>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
