"""The `peft` commands on a trained adapter: eval, generate, merge, inspect, push. Each parses its
arguments and calls one command function (imported when it runs, so `peft --help` loads no ML library)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli.cli.options import DebugOpt, OverridesArg, TargetArg, run


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
                "--gguf-type: f16 or q8_0, with --format gguf (got "
                f"{gguf_type!r}{'' if fmt == 'gguf' else ' with --format ' + fmt})."
            )
        if fmt == "gguf" and dtype != "float32":
            raise PeftcliError(
                f"--dtype: sets the safetensors folder's dtype (got {dtype!r} with --format gguf). "
                "Choose the GGUF's with --gguf-type f16 or q8_0."
            )
        run_merge(target, out, dtype, overrides or [], tolerance, overwrite, fmt, gguf_type or "f16")

    run(checked, debug=debug)


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
