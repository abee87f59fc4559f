"""The results of `peft sweep` as tables: the comparison table's cells (compare_tables.py) with a column
per swept key, in sweep.md, report.html and the terminal, and the sentence naming the best trial."""

from __future__ import annotations

import json
from typing import Any

from peftcli.reporting.compare_tables import cells, headers, markdown_table


def override(key: str, value: Any) -> str:
    """`key=value` as `peft train` reads it: JSON is YAML, so lists and strings come back as they were."""
    return f"{key}={json.dumps(value)}"


def param_text(params: dict[str, Any]) -> str:
    return " ".join(override(k, v) for k, v in params.items())


def value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def table_headers(keys: list[str], metric: str) -> list[str]:
    h = headers(metric)  # run, method, trainable, folder, weights, best, final, wall, tokens/s, memory, status
    return ["trial", *keys, h[5], h[6], h[2], h[7], h[8], h[9], h[10]]


def table_cells(row: dict[str, Any], keys: list[str]) -> list[str]:
    c = cells(row)
    return [row["run"], *(value_text(row["params"].get(k)) for k in keys), c[5], c[6], c[2], c[7], c[8], c[9], c[10]]


def numeric_columns(keys: list[str]) -> frozenset[int]:
    return frozenset(range(1, len(keys) + 7))


def sweep_markdown(summary: dict[str, Any]) -> str:
    keys, metric = list(summary["params"]), summary["metric"]
    order = "higher is better" if summary["higher_is_better"] else "lower is better"
    lines = [
        f"# {summary['title']}",
        "",
        f"{summary['strategy']} search; sorted by the best eval {metric} ({order}).",
        "",
    ]
    lines += markdown_table(table_headers(keys, metric), [table_cells(r, keys) for r in summary["rows"]])
    lines += [
        "",
        best_sentence(summary),
        "",
        f"{metric} per trial and per swept key, plotted: [report.html](report.html)",
        "",
    ]
    return "\n".join(lines)


def best_sentence(summary: dict[str, Any]) -> str:
    """The best trial, and the trial with the recipe's own values for the swept keys when there is one."""
    rows = {r["run"]: r for r in summary["rows"]}
    metric = summary["metric"]
    if summary["best"] is None:
        return "No trial finished with a value of the metric: no best.yaml."
    best = rows[summary["best"]]
    text = f"Best: {best['run']}, {param_text(best['params'])}: {metric} {best['metric_best']:.4f} (best.yaml)."
    own = [r for r in summary["rows"] if r["params"] == summary["recipe_values"]]
    if own and isinstance(own[0]["metric_best"], (int, float)):
        text += (
            f" The recipe's own {param_text(own[0]['params'])}: {own[0]['run']}, {metric} {own[0]['metric_best']:.4f}."
        )
    return text
