"""`peft sweep RECIPE --space SPACE [--out DIR] [key=value ...]`: train the recipe once per point of a
search space (grid, seeded random draws, or Optuna's TPE), each trial in a process of its own as
`peft compare` runs do, and write the results table (sweep.json, sweep.md, report.html) and the best
trial's recipe (best.yaml). A failed trial is a row; the sweep goes on and exits 1 at the end. A
finished trial in --out with the same resolved recipe is read instead of trained again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftcli.adapter_io import atomic_write_text, write_json
from peftcli.config.load import load_recipe
from peftcli.config.schema import Recipe
from peftcli.errors import PeftcliError, RecipeError
from peftcli.reporting.compare_tables import ended_line, ended_row, run_row, sort_rows
from peftcli.reporting.flat import flatten
from peftcli.reporting.html import sweep_html
from peftcli.reporting.sweep_tables import (
    best_sentence,
    override,
    param_text,
    sweep_markdown,
    table_cells,
    table_headers,
)
from peftcli.tasks.registry import TASKS, higher_is_better
from peftcli.training.own_process import Job, run_jobs
from peftcli.training.search import Search, Space, read_space
from peftcli.training.slots import Slot, machine_slots

console = Console(stderr=True, soft_wrap=True, emoji=False)


@dataclass(frozen=True)
class Plan:
    recipe: Path
    space: Space
    overrides: tuple[str, ...]  # the command line's, for every trial
    out: Path
    metric: str
    method: str
    recipe_values: dict[str, Any]  # the recipe's own values of the swept keys

    @property
    def title(self) -> str:
        return f"peft sweep: {self.out.name}"


def run_sweep(
    recipe: Path,
    space_path: Path,
    overrides: list[str],
    out: Path | None,
    parallel: int = 1,
    overwrite: bool = False,
    debug: bool = False,
    setup: Callable[[bool], None] | None = None,
) -> int:
    """Returns the exit code: 1 when a trial failed, else 0."""
    space = read_space(space_path)
    plan, slots = make_plan(recipe, space, overrides, out, parallel)
    better = higher_is_better(plan.metric)
    rows = run_trials(plan, Search(space, better), slots, overwrite, debug, setup)
    summary = write_sweep(plan, sort_rows(rows, better))
    show(summary, plan.out)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def run_trials(
    plan: Plan,
    search: Search,
    slots: list[Slot],
    overwrite: bool,
    debug: bool,
    setup: Callable[[bool], None] | None,
) -> list[dict[str, Any]]:
    """Every trial the search asks for, as many at once as there are slots (own_process.run_jobs):
    a trial is asked for when a slot is free and its result is told when it ends, so Optuna
    suggests from every result so far. Finished trials are read, not trained."""
    rows: list[dict[str, Any]] = []

    def told(number: int, row: dict[str, Any]) -> None:
        search.tell(number, row["metric_best"] if row["status"] != "failed" else None)
        rows.append(row)

    def trials() -> Iterator[Job]:
        while (asked := search.ask()) is not None:
            number, params = asked
            label = trial_label(number)
            console.print(f"[bold]sweep {number}/{search.total()}[/]: {label} {escape(param_text(params))}")
            if (row := settled_row(plan, label, params, overwrite)) is not None:
                told(number, row)
                continue
            overrides = tuple(trial_overrides(plan, params))
            yield Job(label, plan.recipe, overrides, plan.out / label, True, (number, params))

    def ended(job: Job, reason: str | None) -> None:
        number, params = job.tag
        told(number, trial_row(plan, job.label, params, reason, announce=len(slots) > 1))

    run_jobs(trials(), slots, ended, plan.out / "logs", debug, setup, "peft sweep", "the sweep's table")
    return rows


def make_plan(
    recipe_path: Path, space: Space, overrides: list[str], out: Path | None, parallel: int
) -> tuple[Plan, list[Slot]]:
    """The recipe checked with every listed value (or both bounds) of every swept key, and the slots
    for --parallel, before anything trains: all problems at once, one line each."""
    slots, problems = machine_slots(parallel)
    if any(o.partition("=")[0] in ("output_dir", "name") for o in overrides):
        problems.append(
            "override 'output_dir=...' or 'name=...': peft sweep writes each trial into --out. Set --out instead."
        )
    if space.metric is not None:  # the trials keep their best eval by the metric the sweep ranks by
        overrides = [*overrides, override("train.best_metric", space.metric)]
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as exc:
        raise PeftcliError(*problems, *exc.lines) from None
    for param in space.params:
        for value in param.examples():
            try:
                load_recipe(recipe_path, [*overrides, override(param.key, value)])
            except RecipeError as exc:
                problems += [value_problem(space.path, param.key, value, line) for line in exc.lines]
    out = out if out is not None else Path("sweeps") / (recipe.name or recipe_path.stem)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out}: a file, not a folder. Choose another --out.")
    if problems:
        raise PeftcliError(*dict.fromkeys(problems))
    metric = recipe.train.best_metric or TASKS[recipe.task].best_metric
    own = {p.key: value_at(recipe, p.key) for p in space.params}
    return Plan(recipe_path, space, tuple(overrides), out, metric, recipe.method.name, own), slots


def value_problem(space_path: Path, key: str, value: Any, line: str) -> str:
    """The recipe's line about `override 'key=value'` said of the space file's key."""
    said = line.removeprefix(f"override {override(key, value)!r}: ")
    if said.startswith(f"{key}:"):
        return f"{space_path}: params.{said}"
    return f"{space_path}: params.{key} = {override(key, value).partition('=')[2]}: {said}"


def value_at(recipe: Recipe, key: str) -> Any:
    node: Any = recipe.model_dump(mode="json")
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def trial_label(number: int) -> str:
    return f"trial-{number:03d}"


def trial_overrides(plan: Plan, params: dict[str, Any]) -> list[str]:
    return [*plan.overrides, *(override(k, v) for k, v in params.items())]


def settled_row(plan: Plan, label: str, params: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The row of a trial that needs no training: a finished run of these values, read; or a finished
    run of other values, kept unless --overwrite, and the trial failed saying so. None: train it
    (replacing a trial of this sweep that failed or stopped, or with --overwrite any trial before)."""
    run_dir = plan.out / label
    if not overwrite and finished_with(run_dir, plan.recipe, trial_overrides(plan, params)):
        console.print(f"  reading the finished trial {run_dir}", markup=False)
        return run_row(label, run_dir, plan.metric, "read") | {"params": params}
    reason = stale_trial(run_dir, overwrite)
    return None if reason is None else trial_row(plan, label, params, reason)


def trial_row(
    plan: Plan, label: str, params: dict[str, Any], reason: str | None, announce: bool = False
) -> dict[str, Any]:
    """The row of a trial that ended (reason None: it finished) or could not train, said on the
    terminal when it failed, or when `announce` (its output went to its log)."""
    method = str(params.get("method.name", plan.method))
    row = ended_row(label, plan.out / label, plan.metric, method, reason) | {"params": params}
    if (line := ended_line(row, plan.metric, announce)) is not None:
        console.print(line)
    return row


def finished_with(run_dir: Path, recipe_path: Path, overrides: list[str]) -> bool:
    """A finished run whose saved recipe is the one this trial would train."""
    if not (run_dir / "report.json").is_file() or not (run_dir / "recipe.yaml").is_file():
        return False
    try:
        now = load_recipe(recipe_path, [*overrides, override("output_dir", str(run_dir))])
    except RecipeError:  # a drawn value the recipe refuses: training it says why, as a failed row
        return False
    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # not the recipe peft train saved: not this trial
        return False
    return flatten(saved) == flatten(now.model_dump(mode="json"))


def stale_trial(run_dir: Path, overwrite: bool) -> str | None:
    """A finished run of other values is kept unless --overwrite: the trial fails, saying so."""
    if overwrite or not (run_dir / "report.json").is_file():
        return None
    return (
        f"{run_dir} holds a finished trial of other values (the recipe or the space changed). "
        "Pass --overwrite to train it again, or choose another --out."
    )


def write_sweep(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """sweep.json, sweep.md, report.html and best.yaml, each written whole or not at all."""
    better = higher_is_better(plan.metric)
    best = next((r for r in rows if r["status"] != "failed" and finite(r["metric_best"])), None)
    summary = {
        "title": plan.title,
        "recipe": str(plan.recipe),
        "space": str(plan.space.path),
        "overrides": list(plan.overrides),
        "strategy": plan.space.strategy,
        "seed": plan.space.seed,
        "metric": plan.metric,
        "higher_is_better": better,
        "params": {p.key: param_spec(p) for p in plan.space.params},
        "recipe_values": plan.recipe_values,
        "best": best["run"] if best else None,
        "rows": rows,
    }
    write_json(plan.out / "sweep.json", summary)
    atomic_write_text(plan.out / "sweep.md", sweep_markdown(summary))
    atomic_write_text(plan.out / "report.html", sweep_html(summary, plan.out))
    if best is not None:
        atomic_write_text(plan.out / "best.yaml", best_yaml(plan, best))
    else:
        (plan.out / "best.yaml").unlink(missing_ok=True)  # a stale one would name a trial not in the table
    return summary


def param_spec(p: Any) -> Any:
    return list(p.values) if p.values is not None else {"low": p.low, "high": p.high, "log": p.log}


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_yaml(plan: Plan, best: dict[str, Any]) -> str:
    """The best trial's resolved recipe, its output_dir cleared so that `peft train best.yaml` trains
    a new run (runs/<name>) instead of refusing the trial's own folder."""
    recipe = yaml.safe_load((Path(best["run_dir"]) / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["output_dir"] = None
    header = (
        f"# The best trial of `peft sweep {plan.recipe} --space {plan.space.path}`: {best['run']} "
        f"({plan.metric} {best['metric_best']:.4f}), {param_text(best['params'])}.\n"
        f"# Its run: {best['run_dir']}. Train it again: peft train {plan.out / 'best.yaml'}\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def show(summary: dict[str, Any], out_dir: Path) -> None:
    keys = list(summary["params"])
    table = Table(title=escape(summary["title"]))  # the title names --out: text, not markup
    for h in table_headers(keys, summary["metric"]):
        table.add_column(escape(h))
    for row in summary["rows"]:
        table.add_row(*map(escape, table_cells(row, keys)))
    out = Console(soft_wrap=True, emoji=False)
    if not out.is_terminal:  # a pipe or a file: the whole table, not squeezed to 80 columns
        out = Console(soft_wrap=True, emoji=False, width=200)
    out.print(table)
    out.print(best_sentence(summary), markup=False, highlight=False)
    console.print(f"sweep: {out_dir / 'report.html'} (and sweep.md, sweep.json, best.yaml)", markup=False)
