"""Command-line overrides (`key.path=value`): parsed as YAML values, set into the raw recipe, and traced
back to the override that set a key, so a problem names its origin."""

from __future__ import annotations

from typing import Any

import yaml

from peftcli.config.safe_yaml import Refused, safe_yaml
from peftcli.errors import RecipeError


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r}: expected key.path=value, e.g. train.max_steps=50")
    try:
        parsed = safe_yaml(value) if value else ""
    except Refused as exc:
        raise RecipeError(f"override '{key}=...': {exc.message}") from None
    except yaml.YAMLError:
        parsed = value
    # Only an explicit [..] or {..} makes a list or mapping: "Q: {question}" stays a string.
    if isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("[", "{")):
        parsed = value
    return tuple(key.split(".")), parsed


def set_path(data: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    node = data
    for part in key[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key[-1]] = value


def override_origin(loc: tuple[str, ...], override_keys: dict[tuple[str, ...], str]) -> str | None:
    for key, origin in override_keys.items():
        if loc[: len(key)] == key or key[: len(loc)] == loc:
            return origin
    return None
