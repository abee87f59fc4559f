"""What `peft eval`, `peft merge` and `peft inspect` act on: a run directory, an adapter folder (ours
or HF peft's), or a recipe. resolve_target finds the base model, the task and the labels for each."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftcli.adapter_io import CONFIG_NAME, LABELS_NAME, PREFIX, read_adapter_config, unreadable, weights_file
from peftcli.config.describe import describe
from peftcli.config.load import load_recipe
from peftcli.config.overrides import parse_override, set_path
from peftcli.config.schema import ModelSpec, Recipe
from peftcli.data.labels import LABEL_SETS
from peftcli.data.loading import load_trimmed
from peftcli.errors import CheckpointError, DataError, PeftcliError, RecipeError
from peftcli.methods import Method, context_for, get_method
from peftcli.methods.base import Adapted
from peftcli.models.adapters import load_adapter
from peftcli.models.loading import head_kwargs, load_base_model, load_tokenizer
from peftcli.tasks.registry import BY_PEFT_TASK_TYPE, TASKS, Task

RUN_RECIPE = "recipe.yaml"


@dataclass
class Target:
    path: Path
    adapter_dir: Path | None  # None for a recipe: the method is applied fresh
    recipe: Recipe | None  # the run's (or given) recipe, when there is one
    model: ModelSpec
    task: Task
    label_names: list[str] | None

    @property
    def run_dir(self) -> Path | None:
        if self.adapter_dir is not None and (self.adapter_dir.parent / RUN_RECIPE).is_file():
            return self.adapter_dir.parent
        return None


def resolve_target(path: Path, overrides: list[str]) -> Target:
    """`overrides` (key.path=value) change the recipe or, for a bare adapter, the model (model.name=...)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path, overrides)
        return Target(path, None, recipe, recipe.model, TASKS[recipe.task], None)
    if not path.exists():
        raise PeftcliError(f"{path}: not found. Give a run directory, an adapter folder or a recipe file.")
    if (path / "adapter" / CONFIG_NAME).is_file():
        adapter_dir = path / "adapter"
    elif (path / CONFIG_NAME).is_file():
        adapter_dir = path
    else:
        raise PeftcliError(
            f"{path}: not a run directory (no adapter/{CONFIG_NAME}), an adapter folder (no {CONFIG_NAME}) or a recipe."
        )
    config = read_adapter_config(adapter_dir)
    weights_file(adapter_dir)  # missing, pickled or truncated weights fail here, before a model loads
    run_recipe = adapter_dir.parent / RUN_RECIPE
    if run_recipe.is_file():
        recipe = load_recipe(run_recipe, overrides)
        return Target(
            path, adapter_dir, recipe, recipe.model, TASKS[recipe.task], read_labels(adapter_dir, TASKS[recipe.task])
        )
    task = task_of(config, adapter_dir)
    model = model_of(config, adapter_dir, overrides)
    return Target(path, adapter_dir, None, model, task, read_labels(adapter_dir, task))


def task_of(config: dict[str, Any], adapter_dir: Path) -> Task:
    task_type = config.get("task_type")
    if task_type not in BY_PEFT_TASK_TYPE:
        raise CheckpointError(
            f"{adapter_dir / CONFIG_NAME}: task_type {task_type!r} is not supported "
            f"(supported: {', '.join(sorted(BY_PEFT_TASK_TYPE))})."
        )
    return BY_PEFT_TASK_TYPE[task_type]


def model_of(config: dict[str, Any], adapter_dir: Path, overrides: list[str]) -> ModelSpec:
    raw: dict[str, Any] = {
        "model": run_model(config, adapter_dir)
        or {"name": config.get("base_model_name_or_path"), "revision": config.get("revision")}
    }
    for item in overrides:
        key, value = parse_override(item)
        if key[0] == "data":  # the eval data of a bare adapter; see peftcli.commands.evaluate
            continue
        if key[0] != "model":
            raise RecipeError(
                f"override {item!r}: an adapter folder without a run recipe takes only model.* overrides here."
            )
        set_path(raw, key, value)
    if not raw["model"]["name"]:
        raise CheckpointError(
            f"{adapter_dir / CONFIG_NAME}: base_model_name_or_path is empty. Name the base model: "
            "model.name=<hub id or folder>."
        )
    try:
        return ModelSpec.model_validate(raw["model"])
    except ValidationError as exc:
        raise RecipeError(
            *(f"model.{'.'.join(map(str, e['loc']))}: {describe(e, ModelSpec)}" for e in exc.errors())
        ) from None


def run_model(config: dict[str, Any], adapter_dir: Path) -> dict[str, Any] | None:
    """The `model` section of the run a checkpoint's adapter belongs to (<run>/checkpoints/step-N or
    its best/), when the adapter names that run's model.hub_id: the weights then load from where the
    run loaded them, not from the Hub."""
    for up in adapter_dir.resolve().parents[:3]:
        if up.name != "checkpoints" or not (up.parent / RUN_RECIPE).is_file():
            continue
        try:
            model = yaml.safe_load((up.parent / RUN_RECIPE).read_text(encoding="utf-8"))["model"]
        except (OSError, yaml.YAMLError, TypeError, KeyError):
            return None
        if (
            isinstance(model, dict)
            and model.get("hub_id")
            and model.get("hub_id") == config.get("base_model_name_or_path")
        ):
            return dict(model)
        return None
    return None


def read_labels(adapter_dir: Path, task: Task) -> list[str] | None:
    """Classification labels: labels.json (ours), else the trained head's size (HF peft's adapters)."""
    if task.label_column is None:
        return None
    labels = adapter_dir / LABELS_NAME
    if labels.is_file():
        try:
            return [str(x) for x in json.loads(labels.read_text(encoding="utf-8"))["labels"]]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f'{labels}: expected {{"labels": [...]}}; the file is corrupt.') from None
    weights = weights_file(adapter_dir)
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict: it has keys(), no __iter__)
                name = key.removeprefix(PREFIX)
                if any(
                    name == f"{h}.weight" or name.endswith(f".{h}.weight") or name == f"{h}.out_proj.weight"
                    for h in task.head_modules
                ):
                    return [str(i) for i in range(f.get_slice(key).get_shape()[0])]
    except (SafetensorError, OSError) as exc:
        raise unreadable(weights, exc) from None
    raise CheckpointError(
        f"{adapter_dir}: no labels.json and no trained classification head; cannot tell the number of labels."
    )


@dataclass
class Built:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    method: Method | None  # None for the bare base model
    params: Any
    adapted: Adapted | None


def build(target: Target, with_adapter: bool = True) -> Built:
    """The target's base model with its adapter loaded (or, for a recipe, freshly applied)."""
    tokenizer = load_tokenizer(target.model)
    labels = target.label_names
    if labels is None and target.recipe is not None and target.task.label_column is not None:
        labels = labels_from_recipe(target.recipe, target.task)
        target.label_names = labels
    model = load_base_model(target.model, target.task, **head_kwargs(target.task, labels, tokenizer))
    if not with_adapter:
        return Built(model, tokenizer, None, None, None)
    if target.adapter_dir is not None:
        method, params, adapted = load_adapter(target.adapter_dir, model, target.task)
        return Built(model, tokenizer, method, params, adapted)
    assert target.recipe is not None
    method = get_method(target.recipe.method.name)
    adapted = method.apply(model, target.recipe.method, context_for(model, target.task.head_modules))
    return Built(model, tokenizer, method, target.recipe.method, adapted)


def labels_from_recipe(recipe: Recipe, task: Task) -> list[str]:
    """The label set of the training split, as `peft train` computes it (the head's size depends on it)."""
    key = str(task.label_column)
    column = getattr(recipe.data.columns, key)
    if column is None:
        raise DataError(f"data.columns.{key}: {task.name} needs the {key} column's name.")
    ds = load_trimmed(recipe.data, recipe.data.train_split, recipe.data.max_train_examples)
    if column not in ds.column_names:
        raise DataError(
            f"data.columns.{key}: column {column!r} is not in split {recipe.data.train_split!r} (columns: "
            f"{', '.join(ds.column_names)})."
        )
    return LABEL_SETS[key](ds, column)
