"""`peft validate RECIPE [key=value ...]`: check a recipe without loading any weights."""

from __future__ import annotations

from pathlib import Path

from peftcli.config.load import load_recipe
from peftcli.config.schema import Recipe


def run_validate(recipe_path: Path, overrides: list[str]) -> Recipe:
    return load_recipe(recipe_path, overrides)
