"""How `peft` draws its help and its usage errors: the usual usage line (`RECIPE`, no `{recipe}`), flags
without a value type, whole help paragraphs, and a usage error as one `error:` line with exit code 2."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # typer 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

from peftcli.cli.options import err


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
