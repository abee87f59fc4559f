"""`peft validate RECIPE [key=value ...]`: check a recipe without loading any weights."""

from __future__ import annotations

from pathlib import Path

from peftcli.config.recipe import Recipe, load_recipe


def run_validate(recipe_path: Path, overrides: list[str]) -> Recipe:
    return load_recipe(recipe_path, overrides)
