"""A split's columns: the ones the recipe names must exist, and the text they hold must be text."""

from __future__ import annotations

import math
import string
from typing import Any

import datasets

from peftcli.config.schema import DataSpec
from peftcli.errors import DataError


def check_columns(ds: datasets.Dataset, split: str, spec: DataSpec, task: str) -> None:
    c = spec.columns
    template_cols = _template_fields(c.prompt_template) if c.prompt_template else []
    wanted = {
        "text": c.text,
        "text_pair": c.text_pair,
        "prompt": c.prompt,
        "response": c.response,
        "messages": c.messages,
    }
    wanted |= {"label": c.label} if task == "sequence_classification" else {}
    wanted |= {"tokens": c.tokens, "tags": c.tags}
    wanted |= {f"prompt_template ({{{f}}})": f for f in template_cols}
    _require_columns(ds, split, wanted)


def _require_columns(ds: datasets.Dataset, split: str, wanted: dict[str, str | None]) -> None:
    for key, column in wanted.items():
        if column is not None and column not in ds.column_names:
            raise DataError(
                f"data.columns.{key}: column {column!r} is not in split {split!r} "
                f"(columns: {', '.join(ds.column_names)}). Set data.columns.{key} to one of them."
            )


def _template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise DataError(
            f"data.columns.prompt_template: {exc} (got {template!r}). Write columns as {{name}}, literal braces as "
            "{{ }}."
        ) from None


def texts(rows: dict[str, list[Any]], column: str, key: str, where: list[str]) -> list[str]:
    """A text column's values as strings (numbers are written out); a missing or nested value is
    refused, not tokenized as "None" or "['a', 'b']"."""
    out = []
    for value, at in zip(rows[column], where):
        if value is None or isinstance(value, (list, dict)) or (isinstance(value, float) and math.isnan(value)):
            got = "null" if value is None else "NaN" if isinstance(value, float) else short_repr(value)
            raise DataError(
                f"data.columns.{key}: {at}: expected text in column {column!r} (got {got}). "
                "Fill it in, or remove the row."
            )
        out.append(str(value))
    return out


def require_texts(rows: dict[str, list[Any]], spec: DataSpec, where: list[str]) -> None:
    """The text columns a causal_lm or seq2seq_lm example is built from hold a value in every row: a
    null would be tokenized as the word "None"."""
    c = spec.columns
    for key in ("text", "prompt", "response"):
        column = getattr(c, key)
        if column is not None and not (key == "response" and c.response_names is not None):
            texts(rows, column, key, where)
    for name in _template_fields(c.prompt_template) if c.prompt_template else []:
        for value, at in zip(rows[name], where):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise DataError(
                    f"data.columns.prompt_template: {at}: column {name!r} has no value (got "
                    f"{'null' if value is None else 'NaN'}). Fill it in, or remove the row."
                )


def prompt_of(spec: DataSpec, rows: dict[str, list[Any]], i: int) -> str:
    """Row i's prompt: the prompt column, or the template filled from the row's columns."""
    c = spec.columns
    if c.prompt_template:
        return c.prompt_template.format_map({k: rows[k][i] for k in rows})
    return str(rows[c.prompt][i]) if c.prompt else ""


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
