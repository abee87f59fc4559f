"""What every `peft` command shares: the argument and option types, and `run`, which calls a command
function and turns a PeftcliError into `error: ...` lines on stderr with its exit code."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from peftcli.errors import PeftcliError

# emoji=False: escape() leaves `:name:` codes, and an error line echoes what the user wrote.
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
T = TypeVar("T")

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe YAML file", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[key.path=value ...]",
        help="recipe overrides as key.path=value, e.g. train.max_steps=50",
        show_default=False,
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show the full traceback of errors")]

TargetArg = Annotated[
    Path, typer.Argument(metavar="TARGET", help="a run directory, an adapter folder, or a recipe", show_default=False)
]


def run(fn: Callable[..., T], *args: Any, debug: bool = False, quiet: bool = True, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` with the libraries quieted (unless `quiet` is False); a PeftcliError becomes its
    `error:` lines and exit code (the traceback with `debug`), Ctrl-C exit code 130."""
    if quiet:
        quiet_libraries(debug)
    try:
        return fn(*args, **kwargs)
    except PeftcliError as exc:
        if debug:
            raise
        if int(os.environ.get("RANK", "0")) != 0:  # under a launcher, one process reports
            raise typer.Exit(exc.exit_code) from None
        for line in exc.lines:
            # The line echoes user input ([down_proj], {name: ia3}): escape it so rich prints it as is.
            err.print(f"[bold red]{exc.prefix}:[/] {escape(line)}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def quiet_libraries(debug: bool) -> None:
    """Library warnings (newly initialized heads, progress bars) drown the output a user needs."""
    if debug:
        return
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()
