"""The `peft` command line. Parses arguments, calls one command function, and turns a PeftcliError
into `error: ...` lines on stderr with exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from peftcli import __version__
from peftcli.errors import PeftcliError

app = typer.Typer(
    name="peft",
    help="Parameter-efficient fine-tuning of Hugging Face models from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="recipe overrides as key.path=value, e.g. train.max_steps=50", show_default=False)
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show the full traceback of errors")]


def run(fn: Callable[..., T], *args: Any, debug: bool = False, **kwargs: Any) -> T:
    quiet_libraries(debug)
    try:
        return fn(*args, **kwargs)
    except PeftcliError as exc:
        if debug:
            raise
        for line in exc.lines:
            err.print(f"[bold red]error:[/] {line}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def quiet_libraries(debug: bool) -> None:
    """Library warnings (newly initialized heads, progress bars) drown the output a user needs."""
    if debug:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Read when tqdm is first imported: transformers' GGUF loader draws a bar of its own.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()


@app.command("train")
def train_cmd(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")] = False,
    debug: DebugOpt = False,
) -> None:
    """Train an adapter from a recipe and write the run directory."""
    from peftcli.commands.train import run_train

    run(run_train, recipe, overrides or [], overwrite=overwrite, debug=debug)


@app.command("validate")
def validate_cmd(recipe: RecipeArg, overrides: OverridesArg = None, debug: DebugOpt = False) -> None:
    """Check a recipe (schema, method keys, files) without loading any weights."""
    from peftcli.commands.validate import run_validate

    r = run(run_validate, recipe, overrides or [], debug=debug)
    print(f"{recipe}: ok ({r.method.name} on {r.model.name}, {r.task}, run directory {r.run_dir()})")


def version_callback(value: bool) -> None:
    if value:
        print(f"peftcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version")] = False,
) -> None:
    """Parameter-efficient fine-tuning of Hugging Face models from YAML recipes."""


def main() -> None:
    app(prog_name="peft")


if __name__ == "__main__":
    sys.exit(main())
