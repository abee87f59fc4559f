"""Nested mappings as flat `section.key` dicts: a run's recipe compared with its saved copy (resume,
sweep trials) and a tracker's hyperparameters."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """`{"train": {"seed": 0}}` as `{"train.seed": 0}`; a value that is not a mapping as `{prefix: value}`.
    An empty mapping has no keys and is left out, or with `keep_empty` kept as a value: a tracker stores
    it as the hyperparameter `{}`, where comparing recipes ignores it as before."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        nested = isinstance(value, dict) and (bool(value) or not keep_empty)
        flat |= flatten(value, f"{prefix}{key}.", keep_empty) if nested else {f"{prefix}{key}": value}
    return flat
