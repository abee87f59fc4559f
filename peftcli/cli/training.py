"""The `peft` commands that train or check recipes: train, validate, compare, sweep. Each parses its
arguments and calls one command function (imported when it runs, so `peft --help` loads no ML library)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli.cli.options import DebugOpt, OverridesArg, RecipeArg, quiet_libraries, run


def train_cmd(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="[CHECKPOINT]",
            help="continue the run from its latest step checkpoint, or from the checkpoint folder given",
        ),
    ] = None,
    num_processes: Annotated[
        int,
        typer.Option(
            "--num-processes", min=1, help="data-parallel processes (GPUs, or CPU processes): runs accelerate launch"
        ),
    ] = 1,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="load the tokenizer and data only: print one example with its trained tokens marked, and the counts; "
            "write nothing",
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Train an adapter from a recipe and write the run directory."""
    if dry_run:
        from peftcli.commands.dry_run import run_dry_run

        run(run_dry_run, recipe, overrides or [], debug=debug)
        return
    if num_processes > 1:
        from peftcli.commands.launch import run_launch

        code = run(run_launch, recipe, overrides or [], num_processes, overwrite, resume, debug, debug=debug)
        raise typer.Exit(code)
    from peftcli.commands.train import run_train_command

    run(run_train_command, recipe, overrides or [], overwrite=overwrite, resume=resume, debug=debug)


def validate_cmd(recipe: RecipeArg, overrides: OverridesArg = None, debug: DebugOpt = False) -> None:
    """Check a recipe (schema, method keys, files) without loading any weights."""
    from peftcli.commands.validate import run_validate

    # quiet=False: validate loads no weights and no data, so no library has output to quiet, and
    # importing datasets only to quiet it slowed it down (docs/benchmarks.md, Start-up time).
    r = run(run_validate, recipe, overrides or [], debug=debug, quiet=False)
    print(f"{recipe}: ok ({r.method.name} on {r.model.name}, {r.task}, run directory {r.run_dir()})")


def compare_cmd(
    entries: Annotated[
        list[str],
        typer.Argument(
            metavar="RECIPE... [key.path=value ...]",
            help="recipes to train, finished run directories to read (no training), and overrides for every recipe",
            show_default=False,
        ),
    ],
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            metavar="M1,M2,...",
            help="train the one RECIPE once per method, each with that method's defaults: the recipe's method: "
            "block is replaced by {name: M}, its method-specific keys (rank, target_modules, ...) are not carried over",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder for the runs and the comparison (default: compare/<recipe name>)"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace run directories and a comparison in --out")
    ] = False,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel", min=1, help="runs at once: a GPU each, or a share of the CPU cores; output in --out/logs/"
        ),
    ] = 1,
    debug: DebugOpt = False,
) -> None:
    """Train several recipes, or one recipe with several methods, and compare them.

    Writes a table sorted by the task's metric and a plot of it against trainable parameters
    (comparison.md, comparison.json, report.html). A failed run is a row of the table; the exit code is
    then 1."""
    from peftcli.commands.compare import run_compare

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    raise typer.Exit(run(run_compare, entries, names, out, overwrite, debug, quiet_libraries, parallel, debug=debug))


def sweep_cmd(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    space: Annotated[
        Path,
        typer.Option(
            "--space",
            help="the search space: strategy (grid, random, optuna), trials, seed, params",
            show_default=False,
        ),
    ] = ...,  # type: ignore[assignment]
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for the trials and the results (default: sweeps/<recipe name>)")
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel", min=1, help="trials at once: a GPU each, or a share of the CPU cores; output in --out/logs/"
        ),
    ] = 1,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="train every trial again, replacing the ones in --out")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Search recipe keys (rank, lr, ...) over a grid, seeded random draws or Optuna's TPE.

    One trial per point, each in its own process. Writes a table sorted by the task's metric (sweep.md,
    sweep.json, report.html) and the best trial's recipe (best.yaml). A failed trial is a row; the exit
    code is then 1. Finished trials in --out are read, not trained again."""
    from peftcli.commands.sweep import run_sweep

    code = run(run_sweep, recipe, space, overrides or [], out, parallel, overwrite, debug, quiet_libraries, debug=debug)
    raise typer.Exit(code)
