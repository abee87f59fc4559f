"""The run's report: metrics.jsonl lines in, report.json and report.md out (the plots: html_report)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftcli.checkpoint import atomic_write_text, finite


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl (flushed, so a crash keeps what was logged).
    It starts from `history`: empty for a new run, the checkpoint's log for a resumed one (dropping
    what was logged after that checkpoint)."""

    def __init__(self, path: Path, history: list[dict[str, Any]] | None = None, warn: Callable[[str], None] = print) -> None:
        self.path = path
        self.warn = warn
        self.failed = False
        atomic_write_text(path, "".join(json_text(record) + "\n" for record in history or []))

    def __call__(self, record: dict[str, Any]) -> None:
        """A line that cannot be written (a full disk) is reported once and training goes on: the log
        is also in the checkpoints and report.json, and a save that fails stops the run anyway, on
        every process (an error raised here, on the main process alone, would leave the others waiting)."""
        if self.failed:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json_text(record) + "\n")
        except OSError as exc:
            self.failed = True
            self.warn(f"{self.path}: cannot append ({exc.strerror or exc}); the log stops here, training goes on.")


def json_text(value: Any, indent: int | None = None) -> str:
    """Strict JSON: a non-finite float is written as null."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """report.json and report.md; html_report draws the curves (curves.svg, report.html)."""
    atomic_write_text(run_dir / "report.json", json_text(report, indent=2) + "\n")
    atomic_write_text(run_dir / "report.md", markdown(report))


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
