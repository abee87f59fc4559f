"""The `peft` command line. Parses arguments, calls one command function, and turns a PeftcliError
into `error: ...` lines on stderr with exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # typer 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

from peftcli import __version__
from peftcli.errors import PeftcliError

# Set before any command imports tqdm (it reads the variable once, on import): transformers' GGUF
# loader draws a progress bar of its own, and peftcli draws its own with rich.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes, where installed, is imported by transformers for every command and warns on import that
# an optional kernel package is missing: one line of noise before every error line. Its errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class PlainArgument(TyperArgument):
    """An argument as CLIs usually show it: `RECIPE`, `[PROMPT]`, `[key.path=value ...]` in the usage
    line (typer writes `{recipe}`), and no type column beside it: its name and help say what it is."""

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.metavar or self.name.upper()
        if self.metavar is None and self.nargs != 1:
            name += "..."
        return [name if self.required or name.startswith("[") else f"[{name}]"]

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class FlagOption(TyperOption):
    """A flag (`--overwrite`, `--chat/--no-chat`) shows no value type: typer writes `--overwrite <bool>`,
    as if it took a value."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class PlainHelp:
    """The help of the `peft` group and of each command, in the usual shape. Typer builds the parameter
    objects itself, so their display class is set here, as the help is drawn; parsing is unchanged."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperArgument):
                param.__class__ = PlainArgument
            elif isinstance(param, TyperOption) and param.is_flag:
                param.__class__ = FlagOption
        return params


class Command(PlainHelp, TyperCommand):
    """Every `peft` command. Help paragraphs are whole: typer's rich help keeps a docstring's line
    breaks, so a description wrapped in the source broke mid-sentence in the terminal. The commands
    list of `peft --help` shows the first paragraph, a sentence."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:
        if help:
            paragraphs = inspect.cleandoc(help).split("\n\n")
            help = "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)
        super().__init__(*args, help=help, **kwargs)


class OneLineUsageErrors(PlainHelp, TyperGroup):
    """A usage error (an unknown option, a missing argument, a value of the wrong type) is one
    `error:` line and exit code 2, like every other refusal, instead of click's usage box."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()  # bare `peft` or `peft COMMAND`-with-nothing prints the help
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            err.print(f"[bold red]error:[/] {escape(usage_error_line(exc, argv))}", markup=True, highlight=False)
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_error_line(exc: click_errors.UsageError, argv: list[str]) -> str:
    """`peft generate: --temperature 'abc': Input should be a valid number... Run `peft generate --help`."""
    command = exc.ctx.command_path if exc.ctx is not None else "peft"
    message = exc.format_message()
    param = getattr(exc, "param", None)
    if isinstance(exc, click_errors.BadParameter) and param is not None and param.opts:
        given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in param.opts]
        given += [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in param.opts and "=" in a]
        if given:
            message = f"{message} (got {given[-1]!r})"
    message = message[0].lower() + message[1:] if message else message
    return f"{command}: {message.rstrip('.')}. Run `{command} --help` for the options."


app = typer.Typer(
    cls=OneLineUsageErrors,
    name="peft",
    help="Parameter-efficient fine-tuning of Hugging Face models from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
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


def run(fn: Callable[..., T], *args: Any, debug: bool = False, quiet: bool = True, **kwargs: Any) -> T:
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


@app.command("train", cls=Command)
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
            help="load the tokenizer and data only: print one example with its trained tokens marked, and the counts; write nothing",
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
    from peftcli.training.run import run_train

    run(run_train, recipe, overrides or [], overwrite=overwrite, resume=resume, debug=debug)


@app.command("validate", cls=Command)
def validate_cmd(recipe: RecipeArg, overrides: OverridesArg = None, debug: DebugOpt = False) -> None:
    """Check a recipe (schema, method keys, files) without loading any weights."""
    from peftcli.commands.validate import run_validate

    # quiet=False: validate loads no weights and no data, so no library has output to quiet, and
    # importing datasets only to quiet it slowed it down (docs/benchmarks.md, Start-up time).
    r = run(run_validate, recipe, overrides or [], debug=debug, quiet=False)
    print(f"{recipe}: ok ({r.method.name} on {r.model.name}, {r.task}, run directory {r.run_dir()})")


TargetArg = Annotated[
    Path, typer.Argument(metavar="TARGET", help="a run directory, an adapter folder, or a recipe", show_default=False)
]


@app.command("eval", cls=Command)
def eval_cmd(
    target: TargetArg,
    overrides: OverridesArg = None,
    split: Annotated[str | None, typer.Option(help="split to evaluate (default: the recipe's eval split)")] = None,
    max_examples: Annotated[int | None, typer.Option(min=1, help="evaluate the first N examples only")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per batch")] = 64,
    out: Annotated[
        Path | None, typer.Option(help="where to write the JSON report (default: RUN/eval.json, or ./eval.json)")
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="evaluate the base model without the adapter")] = False,
    generate: Annotated[
        int, typer.Option(min=0, help="causal LM, seq2seq: write greedy answers to the first N prompts")
    ] = 0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="with --generate: tokens per answer")] = 128,
    labels: Annotated[
        str | None, typer.Option(help="class names in id order, comma-separated, for adapters without labels.json")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Evaluate an adapter (or the base model) and write eval.json. Other data: data.* overrides."""
    from peftcli.commands.evaluate import run_eval

    names = [x.strip() for x in labels.split(",")] if labels else None
    run(
        run_eval,
        target,
        overrides or [],
        split,
        max_examples,
        batch_size,
        out,
        base,
        generate,
        max_new_tokens,
        names,
        debug=debug,
    )


@app.command("generate", cls=Command)
def generate_cmd(
    target: Annotated[
        Path,
        typer.Argument(metavar="TARGET", help="a run directory or an adapter folder (causal LM)", show_default=False),
    ],
    prompt: Annotated[
        str | None, typer.Argument(metavar="PROMPT", help="the text to complete (or --file)", show_default=False)
    ] = None,
    overrides: OverridesArg = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", help='prompts: a text file, one a line, or JSONL of {"messages": [...]} or {"prompt": ...}'
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate at most")] = 128,
    temperature: Annotated[float, typer.Option(help="sampling temperature; 0 is greedy")] = 0.0,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="sample from the smallest set of tokens with this much probability")
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="sample from the k likeliest tokens")] = None,
    greedy: Annotated[
        bool,
        typer.Option("--greedy", help="the likeliest token every step (the default, unless --temperature is above 0)"),
    ] = False,
    seed: Annotated[int, typer.Option(help="seed for sampling: the same seed gives the same sample")] = 0,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="wrap the prompt as a user message in the chat template (default: on for a run trained on messages)",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Complete a prompt (or every prompt of --file) with a trained adapter; prints only the new text."""
    from peftcli.commands.generate import run_generate
    from peftcli.tasks.generation import Decoding

    decoding = Decoding(max_new_tokens, temperature, top_p, top_k, seed)
    run(run_generate, target, prompt, file, decoding, chat, overrides or [], greedy, debug=debug)


@app.command("merge", cls=Command)
def merge_cmd(
    target: TargetArg,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="folder for the standalone model (with --format gguf: the .gguf file)", show_default=False
        ),
    ],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="safetensors (a transformers folder) or gguf (one file for llama.cpp; llama-family models)"
        ),
    ] = "safetensors",
    gguf_type: Annotated[
        str | None,
        typer.Option(
            "--gguf-type",
            help="with --format gguf: f16 (the default) or q8_0, as llama.cpp's --outtype",
            show_default=False,
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="largest logit difference accepted between adapted and merged")
    ] = 1e-3,
    overrides: OverridesArg = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an existing --out folder (or .gguf file)")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Fold the adapter into the base weights and write a standalone transformers model."""
    from peftcli.commands.merge import run_merge
    from peftcli.errors import PeftcliError

    def checked() -> None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise PeftcliError(f"--dtype: unknown dtype (got {dtype!r}). Use float32, bfloat16 or float16.")
        if fmt not in ("safetensors", "gguf"):
            raise PeftcliError(f"--format: unknown format (got {fmt!r}). Use safetensors or gguf.")
        if gguf_type is not None and (fmt != "gguf" or gguf_type not in ("f16", "q8_0")):
            raise PeftcliError(
                f"--gguf-type: f16 or q8_0, with --format gguf (got {gguf_type!r}{'' if fmt == 'gguf' else ' with --format ' + fmt})."
            )
        if fmt == "gguf" and dtype != "float32":
            raise PeftcliError(
                f"--dtype: sets the safetensors folder's dtype (got {dtype!r} with --format gguf). Choose the GGUF's with --gguf-type f16 or q8_0."
            )
        run_merge(target, out, dtype, overrides or [], tolerance, overwrite, fmt, gguf_type or "f16")

    run(checked, debug=debug)


@app.command("inspect", cls=Command)
def inspect_cmd(
    target: TargetArg,
    overrides: OverridesArg = None,
    modules: Annotated[
        bool, typer.Option("--modules", help="list the model's linear layers (candidate target_modules)")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Show what is trained: adapted modules, parameter counts, adapter size and memory."""
    from peftcli.commands.inspection import run_inspect

    run(run_inspect, target, overrides or [], modules, debug=debug)


@app.command("compare", cls=Command)
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


@app.command("sweep", cls=Command)
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


@app.command("push", cls=Command)
def push_cmd(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN", help="a run directory, or an adapter folder", show_default=False)
    ],
    repo_id: Annotated[
        str,
        typer.Argument(
            metavar="REPO_ID",
            help="the Hub model repo, e.g. your-name/lora-sst2 (created if missing)",
            show_default=False,
        ),
    ],
    private: Annotated[
        bool, typer.Option("--private", help="create the repo private (an existing repo keeps its visibility)")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Upload a run's adapter and its model card to a model repo on the Hugging Face Hub.

    Creates the repo if it is missing, then uploads the adapter folder in one commit. Needs a token with
    write access: `hf auth login`, or HF_TOKEN."""
    from peftcli.commands.push import run_push

    # quiet=False: push loads no model and no data, and uploads with huggingface_hub alone.
    run(run_push, run_dir, repo_id, private, debug=debug, quiet=False)


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


if __name__ == "__main__":
    sys.exit(main())
