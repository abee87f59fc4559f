"""The run's report: metrics.jsonl lines in, report.json and report.md out (the plots: html.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftcli.adapter_io import atomic_write_text, finite


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl (flushed, so a crash keeps what was logged).
    It starts from `history`: empty for a new run, the checkpoint's log for a resumed one (dropping
    what was logged after that checkpoint)."""

    def __init__(
        self, path: Path, history: list[dict[str, Any]] | None = None, warn: Callable[[str], None] = print
    ) -> None:
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
    """report.json and report.md; html.py and curves.py draw the curves (curves.svg, report.html)."""
    atomic_write_text(run_dir / "report.json", json_text(report, indent=2) + "\n")
    atomic_write_text(run_dir / "report.md", markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Run `{report['name']}`", ""]
    lines += [f"{report['method']} on `{report['model']}`, task {report['task']}.", ""]
    lines += [sources(report), ""] if sources(report) else []
    lines += [headline(report), ""] if headline(report) else []
    lines += ["| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in summary_rows(report["summary"])]
    if report.get("final_metrics"):
        header, rows, note = eval_table(report)
        lines += ["", "## Eval", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", note] if note else []
    lines += ["", "## Versions", ""] + [f"- {k} {v}" for k, v in report["versions"].items()]
    lines += ["", "![loss and eval metrics](curves.svg)", ""]
    return "\n".join(lines)


def sources(report: dict[str, Any]) -> str:
    """The Hub commits the run loaded, which repeat it when given as model.revision / data.revision."""
    found = [
        f"{what} commit `{report[key]}`"
        for what, key in (("model", "model_commit"), ("data", "data_commit"))
        if report.get(key)
    ]
    return f"Loaded from the Hub at {' and '.join(found)} (model.revision, data.revision repeat them)." if found else ""


def headline(report: dict[str, Any]) -> str:
    """The result in one sentence: the best eval (the saved adapter) and the final one, with their steps."""
    metric, best, final = report.get("best_metric"), report.get("best_metrics") or {}, report.get("final_metrics") or {}
    steps = report["summary"].get("steps")
    of = f" of {steps:,}" if isinstance(steps, int) else ""
    if report.get("best_step") is None or metric not in best:
        return "No eval: the adapter is the last step's." if not final else ""
    text = (
        f"Best {metric_label(metric)}: {fmt_value(best[metric])} at step {report['best_step']}{of}, the saved adapter."
    )
    if report.get("final_step") not in (None, report["best_step"]) and metric in final:
        text += f" Final eval (step {report['final_step']}): {fmt_value(final[metric])}."
    return text


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary as a reader wants it: in words, rounded, related figures on one row (report.json
    keeps each raw value). Keys this does not know (added later) follow as they are, spaced."""
    rows: list[tuple[str, str]] = []
    used: set[str] = set()
    for label, keys, text in SUMMARY_ROWS:
        if all(is_number(summary.get(k)) or (k in TEXT_KEYS and k in summary) for k in keys):
            rows.append((label, text(*(summary[k] for k in keys))))
            used.update(keys)
    return rows + [(k.replace("_", " "), fmt_value(v)) for k, v in summary.items() if k not in used]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number that is neither NaN nor infinite (a bool is not a number here)."""
    return is_number(value) and math.isfinite(value)


def size_text(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def weights_text(n: int, unquantized: int, quantization: str | None) -> str:
    """`69.0 MB in 4 bits (nf4), 0.13x the 531.8 MB they take unquantized`: what a quantized base saved."""
    if not quantization:
        return size_text(n)
    return (
        f"{size_text(n)} in {quantization}, {n / max(unquantized, 1):.2f}x the {size_text(unquantized)} they take "
        "unquantized"
    )


def plural(n: int, word: str, words: str = "") -> str:
    return f"{n:,} {word if n == 1 else words or word + 's'}"


TEXT_KEYS = {"device", "mixed_precision", "mixed_precision_requested", "tf32", "quantization"}

SUMMARY_ROWS: list[tuple[str, tuple[str, ...], Callable[..., str]]] = [
    (
        "trainable parameters",
        ("trainable_parameters", "total_parameters", "trainable_percent"),
        lambda n, total, pct: f"{n:,} of {total:,} ({pct:.3g}%)",
    ),
    ("adapter weights", ("adapter_bytes",), lambda n: f"{size_text(n)} (adapter_model.safetensors)"),
    (
        "trained on",
        ("steps", "examples", "tokens"),
        lambda steps, ex, tok: (
            f"{plural(steps, 'step')}: {plural(ex, 'example')}, {plural(tok, 'token')} (padding not counted)"
        ),
    ),
    (
        "wall time",
        ("wall_seconds", "train_seconds"),
        lambda wall, train: (
            f"{wall:,.1f} s, of which {train:,.1f} s in the training steps (the rest: loading, evals, saving)"
        ),
    ),
    (
        "speed",
        ("tokens_per_s", "examples_per_s"),
        lambda tps, eps: f"{tps:,.0f} tokens/s, {eps:,.1f} examples/s in the training steps",
    ),
    (
        "peak memory",
        ("peak_memory_mb", "device"),
        lambda mb, device: (
            f"{mb:,.0f} MB "
            + (
                "(torch's largest allocation on the GPU)"
                if str(device).startswith("cuda")
                else "(the process's peak resident memory)"
            )
        ),
    ),
    (
        "base weights",
        ("weights_bytes", "weights_bytes_unquantized", "quantization"),
        lambda n, full, q: weights_text(n, full, q),
    ),
    (
        "device",
        ("device", "num_processes", "cpu_threads"),
        lambda device, n, threads: f"{device}, {plural(n, 'process', 'processes')}, {plural(threads, 'CPU thread')}",
    ),
    (
        "mixed precision",
        ("mixed_precision", "mixed_precision_requested"),
        lambda used, asked: str(used) + (f" (the recipe asked for {asked})" if asked != used else ""),
    ),
    ("TF32 matmuls", ("tf32",), lambda on: "on" if on else "off"),
]


def eval_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]], str]:
    """The final eval beside the best one (the saved adapter's), each column named by its step; the
    metric that chose the best comes first, and a sentence says that the best eval's other values (its
    loss) are that eval's, not the best of each."""
    final, best = report["final_metrics"], report.get("best_metrics") or {}
    metric, best_step, final_step = report.get("best_metric"), report.get("best_step"), report.get("final_step")
    names = sorted(final, key=lambda k: k != metric)
    final_header = f"final (step {final_step})" if final_step is not None else "final"
    if best_step is None or not best:
        return ["metric", final_header], [[metric_label(k), fmt_value(final[k])] for k in names], ""
    header = ["metric", final_header, f"best {metric_label(metric)} (step {best_step})"]
    rows = [[metric_label(k), fmt_value(final[k]), fmt_value(best.get(k, ""))] for k in names]
    note = (
        f"The saved adapter is from step {best_step}, the eval with the best {metric_label(metric)} "
        f"({fmt_value(best.get(metric, ''))}); the other values in its column are that eval's, not the best of each."
    )
    return header, rows, note


def metric_label(key: str | None) -> str:
    """An eval metric's name where a training loss could be meant too."""
    return "eval loss" if key == "loss" else key


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
