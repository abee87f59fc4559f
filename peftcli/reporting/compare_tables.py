"""The comparison table of `peft compare`: one row per run, read from its report.json (or why it
failed), sorted by the task's main metric, and written as JSON and Markdown. The cells are
formatted once, here, for the Markdown, the HTML page and the terminal alike."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.markup import escape

from peftcli.errors import PeftcliError

REPORT_KEYS = ("name", "method", "summary", "final_metrics", "best_metrics", "best_metric")
MAPPING_KEYS = ("summary", "final_metrics", "best_metrics")
# Right-aligned: the columns of numbers.
NUMERIC_COLUMNS = frozenset(range(2, 10))


def read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeftcliError(
            f"{path}: not a readable run report ({exc}). Train the run again, or leave it out."
        ) from None
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise PeftcliError(f"{path}: not a run report of peftcli (missing {', '.join(missing)}). Leave it out.")
    for key in MAPPING_KEYS:  # read with .get() below: a hand-edited list or number would be a traceback
        if not isinstance(report[key], dict) and (key == "summary" or report[key] is not None):
            raise PeftcliError(
                f"{path}: {key}: not a mapping (got {report[key]!r}). Train the run again, or leave it out."
            )
    return report


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_row(label: str, run_dir: Path, metric: str, status: str) -> dict[str, Any]:
    """A finished run's row. The adapter folder's bytes count everything a user ships (tokenizer and
    labels too, the same for every method), the weights' bytes what the method itself adds."""
    report = read_report(run_dir)
    s = report["summary"]
    best, final = report.get("best_metrics") or {}, report.get("final_metrics") or {}
    return {
        "run": label,
        "method": str(report["method"]),
        "status": status,
        "error": None,
        "run_dir": str(run_dir),
        "trainable_parameters": s.get("trainable_parameters"),
        "adapter_folder_bytes": folder_bytes(run_dir / "adapter"),
        "adapter_weights_bytes": s.get("adapter_bytes"),
        "metric_best": best.get(metric),
        "metric_final": final.get(metric),
        "wall_seconds": s.get("wall_seconds"),
        "tokens_per_s": s.get("tokens_per_s"),
        "peak_memory_mb": s.get("peak_memory_mb"),
    }


def failed_row(label: str, method: str, run_dir: Path, reason: str) -> dict[str, Any]:
    keys = ("trainable_parameters", "adapter_folder_bytes", "adapter_weights_bytes", "metric_best", "metric_final")
    empty = dict.fromkeys(keys + ("wall_seconds", "tokens_per_s", "peak_memory_mb"))
    return {"run": label, "method": method, "status": "failed", "error": reason, "run_dir": str(run_dir)} | empty


def ended_row(label: str, run_dir: Path, metric: str, method: str, reason: str | None) -> dict[str, Any]:
    """The row of a run that ended: read from its report when it finished (reason None), else failed
    with the reason (or with why its report cannot be read)."""
    if reason is None:
        try:
            return run_row(label, run_dir, metric, "trained")
        except PeftcliError as exc:
            reason = " ".join(exc.lines)
    return failed_row(label, method, run_dir, reason)


def ended_line(row: dict[str, Any], metric: str, announce: bool) -> str | None:
    """What the terminal says as a run ends (rich markup): a failure always; a finished run when
    `announce`, since its own output went to its log (runs at once)."""
    if row["status"] == "failed":
        return f"[bold red]failed[/]: {escape(row['run'])}: {escape(row['error'])}"
    if not announce:
        return None
    value, wall = row["metric_best"], row["wall_seconds"]
    said = f"{metric} {value:.4f}" if isinstance(value, float) else f"{metric} {value}"
    took = f" in {wall:.0f} s" if isinstance(wall, (int, float)) else ""
    return f"[bold green]done[/]: {escape(row['run'])}: {escape(said)}{took}"


def sort_rows(rows: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Best metric first; runs without the metric, then failed runs, last (each in input order)."""

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row["metric_best"]
        if row["status"] == "failed":
            return (2, 0.0)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return (1, 0.0)
        return (0, -value if higher_is_better else value)

    return sorted(rows, key=key)


def plot_points(rows: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(run, trainable parameters, best metric) of every row that has both."""
    return [
        (r["run"], r["trainable_parameters"], r["metric_best"])
        for r in rows
        if isinstance(r["trainable_parameters"], int)
        and r["trainable_parameters"] > 0
        and isinstance(r["metric_best"], (int, float))
        and math.isfinite(r["metric_best"])
    ]


def headers(metric: str) -> list[str]:
    return [
        "run",
        "method",
        "trainable params",
        "adapter folder",
        "adapter weights",
        f"{metric} best",
        f"{metric} final",
        "wall time",
        "tokens/s",
        "peak memory",
        "status",
    ]


def cells(row: dict[str, Any]) -> list[str]:
    status = f"failed: {row['error']}" if row["status"] == "failed" else row["status"]
    return [
        row["run"],
        row["method"],
        _number(row["trainable_parameters"], "{:,}"),
        _bytes(row["adapter_folder_bytes"]),
        _bytes(row["adapter_weights_bytes"]),
        _number(row["metric_best"], "{:.4f}"),
        _number(row["metric_final"], "{:.4f}"),
        _number(row["wall_seconds"], "{:,.1f} s"),
        _number(row["tokens_per_s"], "{:,.0f}"),
        _number(row["peak_memory_mb"], "{:,.0f} MB"),
        status,
    ]


def _number(value: Any, form: str) -> str:
    return form.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(values: list[str]) -> str:
        # A `|` in a run name or an error message would split the cell.
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def markdown(title: str, metric: str, higher_is_better: bool, rows: list[dict[str, Any]]) -> str:
    order = "higher is better" if higher_is_better else "lower is better"
    lines = [f"# {title}", "", f"Sorted by the best eval {metric} ({order}).", ""]
    lines += markdown_table(headers(metric), [cells(r) for r in rows])
    lines += ["", f"{metric} against trainable parameters, plotted: [report.html](report.html)", ""]
    return "\n".join(lines)


def to_json(title: str, metric: str, higher_is_better: bool, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"title": title, "metric": metric, "higher_is_better": higher_is_better, "rows": rows}
