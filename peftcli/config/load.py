"""`load_recipe`: YAML + `key.path=value` overrides -> a validated Recipe, every problem reported at once.

Each problem reads `<file>: <key.path>: <what is wrong> (got <value>). <what to do>`. Relative input
paths in a recipe file are resolved against the recipe's folder (so it runs from anywhere); paths given
as command-line overrides against the current directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from peftcli.config.checks import (
    method_task_problems,
    method_train_problems,
    name_problems,
    optimizer_problems,
    schedule_problems,
    tracker_problems,
    train_problems,
)
from peftcli.config.data_checks import data_problems
from peftcli.config.describe import Problems, describe, did_you_mean
from peftcli.config.model_checks import method_quantization_problems, model_problems, model_task_problems
from peftcli.config.overrides import override_origin, parse_override, set_path
from peftcli.config.paths import resolve_data_paths, resolve_model_path
from peftcli.config.positions import position_problems
from peftcli.config.safe_yaml import read_yaml
from peftcli.config.schema import DataSpec, ModelSpec, OptimizerSpec, Recipe, ScheduleSpec, TrainSpec
from peftcli.errors import RecipeError
from peftcli.methods import METHODS
from peftcli.tasks.registry import TASKS


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    raw = read_yaml(path)
    where: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_path(raw, key, value)
        where[key] = f"override {item!r}"
    raw.setdefault("name", path.stem)
    return validate_recipe(raw, source=str(path), base_dir=path.parent, override_keys=where)


def validate_recipe(
    raw: dict[str, Any],
    source: str = "recipe",
    base_dir: Path | None = None,
    override_keys: dict[tuple[str, ...], str] | None = None,
) -> Recipe:
    """Checks everything and raises one RecipeError listing every problem."""
    override_keys = override_keys or {}
    problems: Problems = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [(tuple(str(p) for p in e["loc"]), describe(e, Recipe)) for e in exc.errors()]

    method_params = None
    method_raw = raw.get("method")
    if isinstance(method_raw, dict):
        method_params, method_problems = validate_method(method_raw)
        problems += method_problems
    elif "method" in raw:
        problems.append((("method",), f"expected a mapping with a `name:` key (got {method_raw!r})."))

    model, data, cross_problems = _cross_checks(raw, method_params, base_dir or Path.cwd(), override_keys)
    problems += cross_problems
    if problems:
        raise _recipe_error(problems, source, override_keys)
    assert recipe is not None
    return recipe.model_copy(update={"method": method_params, "model": model, "data": data})


def _cross_checks(
    raw: dict[str, Any], method_params: Any, root: Path, override_keys: dict[tuple[str, ...], str]
) -> tuple[ModelSpec | None, DataSpec | None, Problems]:
    """Cross-field and file checks, run on every section that is valid on its own, so a typo in one
    section does not hide a missing file in another. Returns the model and data sections with their
    paths resolved (None where invalid) and the problems found."""
    task = raw.get("task") if isinstance(raw.get("task"), str) and raw.get("task") in TASKS else None
    method = METHODS[method_params.name] if method_params is not None else None
    problems = name_problems(raw.get("name"))
    model, data, schedule = (
        _valid(schema, raw.get(key))
        for key, schema in (("model", ModelSpec), ("data", DataSpec), ("schedule", ScheduleSpec))
    )
    if model is not None:
        model = resolve_model_path(model, root, override_keys)
        problems += model_problems(model)
    if data is not None:
        data = resolve_data_paths(data, root, override_keys)
        problems += data_problems(data, task)
    if schedule is not None:
        problems += schedule_problems(schedule)
    optimizer = _valid(OptimizerSpec, raw.get("optimizer"))
    if optimizer is not None:
        problems += optimizer_problems(optimizer)
    train = _valid(TrainSpec, raw.get("train"))
    if train is not None:
        problems += tracker_problems(train.report_to)
    if train is not None and task is not None:
        problems += train_problems(train, task)
    if train is not None and method is not None:
        problems += method_train_problems(method, train)
    if task is not None and method is not None:
        problems += method_task_problems(method, task)
    if model is not None and task is not None:
        problems += model_task_problems(model, task)
    if model is not None and method is not None:
        problems += method_quantization_problems(method, model)
    if model is not None and data is not None and task is not None:
        problems += position_problems(model, data, method_params, task)
    return model, data, problems


def _recipe_error(problems: Problems, source: str, override_keys: dict[tuple[str, ...], str]) -> RecipeError:
    """One RecipeError, a line per problem, each naming the override that set its key or else the file."""
    lines = []
    for loc, message in problems:
        origin = override_keys.get(loc) or override_origin(loc, override_keys) or source
        lines.append(f"{origin}: {'.'.join(loc) or '(top level)'}: {message}")
    return RecipeError(*lines)


def _valid(schema: type[BaseModel], raw: Any) -> Any:
    """The section if it is given and valid on its own, else None (its problems are reported already)."""
    if raw is None:
        return None
    try:
        return schema.model_validate(raw)
    except ValidationError:
        return None


def validate_method(raw: dict[str, Any]) -> tuple[Any, Problems]:
    name = raw.get("name")
    if not isinstance(name, str) or name not in METHODS:
        choices = sorted(METHODS)
        hint = did_you_mean(str(name), choices)
        return None, [(("method", "name"), f"unknown method (got {name!r}).{hint} Available: {', '.join(choices)}.")]
    schema = METHODS[name].params
    try:
        params = schema.model_validate(raw)
    except ValidationError as exc:
        return None, [(("method",) + tuple(str(p) for p in e["loc"]), describe(e, schema)) for e in exc.errors()]
    # As Strict's allow_inf_nan=False does for the other sections: a method's schema is its own.
    infinite = [
        (("method", k), f"input should be a finite number (got {v}).")
        for k, v in params
        if isinstance(v, float) and not math.isfinite(v)
    ]
    return (None, infinite) if infinite else (params, [])
