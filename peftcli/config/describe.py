"""pydantic's validation errors as peftcli's messages: `<what is wrong> (got <value>). <what to do>`."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel

# A problem of a recipe: the key path it is at, and the message.
Problems = list[tuple[tuple[str, ...], str]]


def describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    """One pydantic error as `<what is wrong> (got <value>). <what to do>`."""
    loc = [str(p) for p in error["loc"]]
    kind = error["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(schema, loc[:-1])
        hint = did_you_mean(loc[-1], fields)
        return f"unknown key.{hint}" if hint else f"unknown key. Valid keys here: {', '.join(fields)}."
    if kind == "missing":
        desc = _description(schema, loc)
        return "required key is missing." + (f" Set it: {desc}." if desc else "")
    message = error["msg"][0].lower() + error["msg"][1:]
    got = f" (got {shown(error.get('input'))})"
    hint = ""
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        hint = did_you_mean(str(error.get("input")), choices) or ""
    return f"{message}{got}.{hint}"


def shown(value: Any, limit: int = 200) -> str:
    """repr of a user's value, cut short: a wrong value may be a megabyte list."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _walk(schema: type[BaseModel], loc: list[str]) -> Any:
    node: Any = schema
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        annotation = node.model_fields[part].annotation
        node = annotation
    return node


def _fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    node = _walk(schema, loc) if loc else schema
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _description(schema: type[BaseModel], loc: list[str]) -> str | None:
    if not loc:
        return None
    parent = _walk(schema, loc[:-1]) if len(loc) > 1 else schema
    if isinstance(parent, type) and issubclass(parent, BaseModel) and loc[-1] in parent.model_fields:
        return parent.model_fields[loc[-1]].description
    return None
