"""`peft compare RECIPE... [--methods a,b,...] [--out DIR] [key=value ...]`: train several recipes, or
one recipe once per method, and compare them in one table and one plot (comparison.json,
comparison.md, report.html). A finished run directory is read instead of trained.

Each run trains through `peft train`'s run_train, in a process of its own (own_process.py): what a
run measures must be its own. A run that fails, or whose process dies, becomes a failed row; the
other runs go on.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from peftcli.adapter_io import atomic_write_text, write_json
from peftcli.config.load import load_recipe
from peftcli.config.safe_yaml import read_yaml
from peftcli.errors import PeftcliError, RecipeError
from peftcli.methods import METHODS
from peftcli.reporting.compare_tables import ended_line, ended_row, markdown, read_report, run_row, sort_rows, to_json
from peftcli.reporting.html import comparison_html
from peftcli.tasks.registry import TASKS, higher_is_better
from peftcli.training.own_process import Job, run_jobs
from peftcli.training.run_dir import check_run_dir, kept_paths
from peftcli.training.slots import Slot, machine_slots

# emoji=False: a run named `a:fire:b` is printed as it is written (escape() leaves emoji codes).
console = Console(stderr=True, soft_wrap=True, emoji=False)


@dataclass(frozen=True)
class Entry:
    """One row to come: a recipe to train into `run_dir`, or a finished run to read (`recipe` None)."""

    label: str
    name: str  # the recipe's or the finished run's name, for the default --out
    method: str
    metric: str
    run_dir: Path | None = None
    recipe: Path | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    title: str
    out: Path
    metric: str
    entries: list[Entry]


def run_compare(
    arguments: list[str],
    methods: list[str] | None,
    out: Path | None,
    overwrite: bool = False,
    debug: bool = False,
    setup: Callable[[bool], None] | None = None,
    parallel: int = 1,
) -> int:
    """Returns the exit code: 1 when a run failed, else 0. `setup(debug)` runs first in each
    training process (the CLI passes what quiets the libraries); `parallel` runs train at once."""
    paths, overrides = split_arguments(arguments)
    plan, slots = make_plan(paths, overrides, methods, out, overwrite, parallel)
    rows: list[dict[str, Any]] = []

    def to_train() -> Iterator[Job]:
        for i, entry in enumerate(plan.entries, 1):
            assert entry.run_dir is not None
            what = "training" if entry.recipe is not None else f"reading the finished run {entry.run_dir}"
            console.print(f"[bold]compare {i}/{len(plan.entries)}[/]: {escape(entry.label)} ({escape(what)})")
            if entry.recipe is None:
                rows.append(run_row(entry.label, entry.run_dir, plan.metric, "read"))
            else:
                yield Job(entry.label, entry.recipe, entry.overrides, entry.run_dir, overwrite, entry)

    def ended(job: Job, reason: str | None) -> None:
        entry = job.tag
        row = ended_row(entry.label, job.run_dir, plan.metric, entry.method, reason)
        if (line := ended_line(row, plan.metric, announce=len(slots) > 1)) is not None:
            console.print(line)
        rows.append(row)

    run_jobs(to_train(), slots, ended, plan.out / "logs", debug, setup, "peft compare", "the comparison")
    rows = sort_rows(rows, higher_is_better(plan.metric))
    write_comparison(plan, rows)
    print(markdown(plan.title, plan.metric, higher_is_better(plan.metric), rows))
    console.print(f"comparison: {plan.out / 'report.html'} (and comparison.md, comparison.json)", markup=False)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def split_arguments(arguments: list[str]) -> tuple[list[Path], list[str]]:
    """RECIPE... and key.path=value overrides may come in any order; a path that exists is a path
    even with `=` in its name."""
    paths = [Path(a) for a in arguments if "=" not in a or Path(a).exists()]
    overrides = [a for a in arguments if "=" in a and not Path(a).exists()]
    return paths, overrides


def make_plan(
    paths: list[Path], overrides: list[str], methods: list[str] | None, out: Path | None, overwrite: bool, parallel: int
) -> tuple[Plan, list[Slot]]:
    """Every entry checked before anything trains (recipes, finished runs, folders that would be
    replaced, --parallel): the problems of all of them at once, one line each, and nothing written."""
    slots, problems = machine_slots(parallel)
    if not paths:
        raise PeftcliError(
            "peft compare: no recipe or run directory given. Give recipes, finished run directories, or one recipe "
            "with --methods."
        )
    if any(o.partition("=")[0] == "output_dir" for o in overrides):
        problems.append("override 'output_dir=...': peft compare writes each run into --out. Set --out instead.")
    entries = (
        method_entries(paths, overrides, methods, problems)
        if methods is not None
        else path_entries(paths, overrides, problems)
    )
    if problems or not entries:
        raise PeftcliError(*problems)
    names = list(dict.fromkeys(e.name for e in entries))
    title = (
        names[0]
        if len(names) == 1
        else "-vs-".join(names[:3]) + (f"-and-{len(names) - 3}-more" if len(names) > 3 else "")
    )
    out = out if out is not None else Path("compare") / title
    entries = [e if e.run_dir is not None else dataclasses.replace(e, run_dir=out / e.label) for e in entries]
    problems += out_problems(out, entries, overwrite)
    if problems:
        raise PeftcliError(*problems)
    return Plan(f"peft compare: {title}", out, entries[0].metric, entries), slots


def method_entries(paths: list[Path], overrides: list[str], methods: list[str], problems: list[str]) -> list[Entry]:
    """One recipe, trained once per method with that method's defaults: the recipe's `method:` block
    is replaced by {name: M}, since its keys (rank, target_modules...) belong to its own method."""
    if len(paths) != 1 or paths[0].is_dir():
        problems.append(
            f"--methods trains one recipe once per method (got {', '.join(map(str, paths)) or 'none'}). "
            "Give one recipe file."
        )
        return []
    if not methods:
        problems.append("--methods: no method given. Give names separated by commas, e.g. --methods lora,ia3,bitfit.")
    for m in sorted({m for m in methods if methods.count(m) > 1}):
        problems.append(f"--methods: {m} is given more than once. Give each method once.")
    try:
        read_yaml(paths[0])  # a missing or broken file is said once, not once per method
    except RecipeError as exc:
        problems.extend(exc.lines)
        return []
    entries = []
    for m in dict.fromkeys(methods):
        if m not in METHODS:
            close = difflib.get_close_matches(m, list(METHODS), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append(f"--methods: unknown method {m!r}.{hint} Available: {', '.join(sorted(METHODS))}.")
            continue
        entry = recipe_entry(paths[0], (f"method={json.dumps({'name': m})}", *overrides), m, problems)
        if entry is not None:
            entries.append(entry)
    return entries


def path_entries(paths: list[Path], overrides: list[str], problems: list[str]) -> list[Entry]:
    entries: list[Entry] = []
    for path in paths:
        entry = (
            finished_entry(path, problems) if path.is_dir() else recipe_entry(path, tuple(overrides), None, problems)
        )
        if entry is not None:
            entries.append(dataclasses.replace(entry, label=unique(entry.label, {e.label for e in entries})))
    return entries


def unique(label: str, taken: set[str]) -> str:
    """The label, or label-2, label-3...: each run gets its own folder under --out."""
    candidate, k = label, 1
    while candidate in taken:
        k += 1
        candidate = f"{label}-{k}"
    return candidate


def recipe_entry(path: Path, overrides: tuple[str, ...], method: str | None, problems: list[str]) -> Entry | None:
    """A recipe to train; with `method` (from --methods) the lines of its problems say which."""
    try:
        recipe = load_recipe(path, list(overrides))
    except RecipeError as exc:
        problems.extend(f"--methods {method}: {line}" if method else line for line in exc.lines)
        return None
    metric = recipe.train.best_metric or TASKS[recipe.task].best_metric
    name = recipe.name or path.stem
    return Entry(method or name, name, recipe.method.name, metric, recipe=path, overrides=overrides)


def finished_entry(run_dir: Path, problems: list[str]) -> Entry | None:
    if not (run_dir / "report.json").is_file():
        problems.append(
            f"{run_dir}: not a finished run (no report.json): it is still training, or it stopped. "
            "Finish it with `peft train RECIPE --resume`, or give its recipe to train it here."
        )
        return None
    try:
        report = read_report(run_dir)
    except PeftcliError as exc:
        problems.extend(exc.lines)
        return None
    if (problem := name_problem(run_dir / "report.json", report["name"])) is not None:
        problems.append(problem)
        return None
    label = run_dir.resolve().name
    return Entry(label, report["name"], str(report["method"]), str(report["best_metric"]), run_dir=run_dir)


def name_problem(path: Path, name: Any) -> str | None:
    """A finished run's name, read from its report.json, names the default --out (compare/<name>): it
    is held to the recipe's rule for `name` (one folder name), so that an edited file cannot send the
    comparison's files elsewhere."""
    if isinstance(name, str) and name.strip() not in ("", ".", "..") and not any(c in name for c in "/\\\0"):
        return None
    return (
        f"{path}: name: not a run name, one folder name without / or \\ (got {name!r}). "
        "Write the run's name there, or give the run's recipe to train it here."
    )


def out_problems(out: Path, entries: list[Entry], overwrite: bool) -> list[str]:
    """What a comparison would replace: refused without --overwrite, as `peft train` does."""
    problems = []
    if out.exists() and not out.is_dir():
        return [f"--out {out}: a file, not a folder. Choose another --out."]
    if (out / "comparison.json").exists() and not overwrite:
        problems.append(f"{out}: holds a comparison already. Pass --overwrite to replace it, or choose another --out.")
    read = {e.run_dir.resolve() for e in entries if e.recipe is None and e.run_dir is not None}
    for e in entries:
        if e.recipe is None or e.run_dir is None:
            continue
        if e.run_dir.resolve() in read:
            problems.append(
                f"{e.run_dir}: a finished run given to compare would be replaced by training {e.label}. "
                "Choose another --out."
            )
        elif e.run_dir.exists() and any(e.run_dir.iterdir()) and not overwrite:
            problems.append(
                f"{e.run_dir}: run directory already exists. Pass --overwrite to replace it, choose another --out, "
                "or give the folder itself to compare it without training."
            )
        else:
            try:
                check_run_dir(e.run_dir, overwrite, kept_paths(None, e.recipe))
            except PeftcliError as exc:
                problems.extend(exc.lines)
    return problems


def write_comparison(plan: Plan, rows: list[dict[str, Any]]) -> None:
    better = higher_is_better(plan.metric)
    write_json(plan.out / "comparison.json", to_json(plan.title, plan.metric, better, rows))
    atomic_write_text(plan.out / "comparison.md", markdown(plan.title, plan.metric, better, rows))
    atomic_write_text(plan.out / "report.html", comparison_html(plan.title, plan.metric, better, rows, plan.out))
