"""Writes docs/recipe-reference.md from the recipe schema, the single source of defaults and help.

    python scripts/recipe_reference.py        # rewrite the file
A test checks the file is up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from peftcli.config.schema import Columns, DataSpec, ModelSpec, OptimizerSpec, Recipe, ScheduleSpec, TrainSpec
from peftcli.methods import METHODS

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"


def rows(prefix: str, schema: type[BaseModel]) -> list[str]:
    out = []
    for name, field in schema.model_fields.items():
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "see below" if isinstance(field.default_factory, type) else "(default)"
        else:
            default = f"`{field.default!r}`" if field.default is not None else "`null`"
        out.append(f"| `{prefix}{name}` | {default} | {field.description or ''} |")
    return out


def render() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from the schema by `python scripts/recipe_reference.py`; every key, its default and meaning.",
        "Any key can be overridden on the command line: `peft train RECIPE key.path=value`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    lines += [
        r
        for r in rows("", Recipe)
        if not r.startswith(("| `model`", "| `data`", "| `optimizer`", "| `schedule`", "| `train`"))
    ]
    for prefix, schema in [
        ("model.", ModelSpec),
        ("data.", DataSpec),
        ("data.columns.", Columns),
        ("optimizer.", OptimizerSpec),
        ("schedule.", ScheduleSpec),
        ("train.", TrainSpec),
    ]:
        lines += [r for r in rows(prefix, schema) if not r.startswith("| `data.columns` ")]
    for name, method in METHODS.items():
        lines += [
            "",
            f"## method: {name}",
            "",
            f"{method.summary} ({method.paper}).",
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        lines += rows("method.", method.params)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
