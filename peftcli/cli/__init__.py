"""The `peft` command line. Parses arguments, calls one command function, and turns a PeftcliError
into `error: ...` lines on stderr with exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from peftcli import __version__
from peftcli.cli import adapters, training
from peftcli.cli.help import Command, OneLineUsageErrors

# Set before any command imports tqdm (it reads the variable once, on import): transformers' GGUF
# loader draws a progress bar of its own, and peftcli draws its own with rich.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes, where installed, is imported by transformers for every command and warns on import that
# an optional kernel package is missing: one line of noise before every error line. Its errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

app = typer.Typer(
    cls=OneLineUsageErrors,
    name="peft",
    help="Parameter-efficient fine-tuning of Hugging Face models from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
COMMANDS = [  # in the order `peft --help` lists them
    ("train", training.train_cmd),
    ("validate", training.validate_cmd),
    ("eval", adapters.eval_cmd),
    ("generate", adapters.generate_cmd),
    ("merge", adapters.merge_cmd),
    ("inspect", adapters.inspect_cmd),
    ("compare", training.compare_cmd),
    ("sweep", training.sweep_cmd),
    ("push", adapters.push_cmd),
]
for _name, _function in COMMANDS:
    app.command(_name, cls=Command)(_function)


def version_callback(value: bool) -> None:
    if value:
        print(f"peftcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Parameter-efficient fine-tuning of Hugging Face models from YAML recipes."""


def main() -> None:
    app(args=optional_values(sys.argv[1:]), prog_name="peft")


OPTIONAL_VALUES = {"--resume": "latest"}


def optional_values(argv: list[str]) -> list[str]:
    """`--resume` takes an optional value: alone (last, or before another option or a key=value
    override) it means `latest`. Typer has no optional option values, so the default is filled in here."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in OPTIONAL_VALUES and (following is None or following.startswith("-") or "=" in following):
            out.append(OPTIONAL_VALUES[arg])
    return out
