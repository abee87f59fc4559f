"""Every recipe under recipes/ validates, as shipped and with the local-data overrides docs/recipes.md shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftcli.config.load import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SHARED = ROOT.parent / "shared" / "data"

SST2_LOCAL = [f"data.dataset={SHARED / 'sst2'}"]
GSM8K_LOCAL = [
    "data.dataset=null",
    f"data.files.train={SHARED / 'instruct' / 'gsm8k_train.jsonl'}",
    f"data.files.test={SHARED / 'instruct' / 'gsm8k_test.jsonl'}",
]
# Every SST-2 and SmolLM2 recipe also validates with the local-data overrides its comments show.
LOCAL_OVERRIDES = {p.name: SST2_LOCAL for p in RECIPES if p.name.endswith("-sst2.yaml")} | {
    p.name: GSM8K_LOCAL for p in RECIPES if p.name.endswith("-smollm2-instruct.yaml")
}


def test_the_three_documented_recipes_are_shipped() -> None:
    assert {"quickstart.yaml", "lora-sst2.yaml", "lora-smollm2-instruct.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    first_lines = path.read_text().splitlines()[:6]
    assert any(f"peft train recipes/{path.name}" in line for line in first_lines), (
        "a recipe's first lines show how to run it"
    )


@pytest.mark.parametrize("name", sorted(LOCAL_OVERRIDES))
def test_recipe_validates_with_local_data(name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    recipe = load_recipe(ROOT / "recipes" / name, LOCAL_OVERRIDES[name])
    assert recipe.data.dataset is None or Path(recipe.data.dataset).is_dir()


def test_recipe_reference_is_up_to_date() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_reference", ROOT / "scripts" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "recipe-reference.md").read_text() == module.render(), (
        "run python scripts/recipe_reference.py"
    )
