"""Resuming a run: the recipe it started with (its recipe.yaml), the checks before it goes on, and the
command that resumes it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from peftcli.config.schema import Recipe
from peftcli.errors import CheckpointError
from peftcli.reporting.flat import flatten
from peftcli.training.accelerator import make_accelerator
from peftcli.training.distributed import on_main, partitioned_optimizer
from peftcli.training.run_dir import refuse_if_busy, settle_replacement

RESUME_MAY_CHANGE = {
    "train.save_every",
    "train.save_total_limit",
    "train.log_every",
    "train.skip_nonfinite_steps",
    "train.report_to",
    "train.return_freed_memory",
}


def check_resumable(recipe: Recipe, accelerator: Any, trackers: list[Any]) -> tuple[Any, list[str]]:
    """Before anything loads: the run can resume here, with this recipe. Returns the accelerator (made
    again when a key kept the run's own value: its precision may differ from what the default picks
    now) and the kept keys' lines."""
    run_dir = recipe.run_dir()
    if partitioned_optimizer(accelerator):
        raise CheckpointError(
            "--resume: runs under FSDP or DeepSpeed cannot resume yet (their optimizer state is partitioned "
            "across processes and peftcli saves the adapter only). Start a new run, or resume under DDP."
        )
    on_main(accelerator, lambda: (settle_replacement(run_dir), refuse_if_busy(run_dir)))
    kept = check_same_recipe(run_dir, recipe)
    if kept:  # the run's own precision may differ from what the default picks now
        accelerator = make_accelerator(recipe.train, trackers)
    return accelerator, kept


def resume_command(recipe_path: Path, overrides: list[str], accelerator: Any = None) -> str:
    """The command that resumes this run from its latest checkpoint, with as many processes."""
    processes = accelerator.num_processes if accelerator is not None else 1
    launch = ["--num-processes", str(processes)] if processes > 1 else []
    return " ".join(["peft train", shlex.quote(str(recipe_path)), *map(shlex.quote, overrides), "--resume", *launch])


def check_same_recipe(run_dir: Path, recipe: Recipe) -> list[str]:
    """A run resumes with the recipe it started with; only where and how often it saves may change.
    A default that changed since the run started (train.mixed_precision's, from no to auto) keeps the
    run's own value, and a key newer than the run takes its default: the recipe is set so, and the
    keys kept are returned to be said."""
    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        raise CheckpointError(
            f"--resume: {saved_path} not found; {run_dir} is not a run directory to resume. Check name= or output_dir=."
        )
    saved = flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")))
    now = flatten(recipe.model_dump(mode="json"))
    changed, kept = [], []
    for key in sorted(saved.keys() | now.keys()):
        if key in RESUME_MAY_CHANGE or saved.get(key) == now.get(key) or key not in saved:
            continue
        if key in now and not explicitly_set(recipe, key):
            set_value(recipe, key, saved[key])
            kept.append(f"{key}: {saved[key]}")
        else:
            changed.append(key)
    if changed:
        raise CheckpointError(
            f"--resume: the recipe differs from the one {run_dir} was started with, in {', '.join(changed)}. "
            f"Resume with the same recipe and overrides (the run's own copy is {saved_path})."
        )
    return kept


def explicitly_set(recipe: Recipe, key: str) -> bool:
    """Whether the recipe file or an override gave `key` (section.field), rather than its default."""
    node: Any = recipe
    for part in key.split("."):
        if not isinstance(node, BaseModel):
            return True  # inside a mapping (data.files): given
        if part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def set_value(recipe: Recipe, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node: Any = recipe
    for part in parents:
        node = getattr(node, part)
    setattr(node, last, value)


def resolved_recipe_text(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> str:
    header = f"# Resolved from {recipe_path}" + (f" with {' '.join(overrides)}" if overrides else "")
    return (
        f"{header}\n# Repeat this run: peft train {recipe.run_dir() / 'recipe.yaml'} "
        f"output_dir=NEW_DIR\n{recipe.to_yaml()}"
    )
