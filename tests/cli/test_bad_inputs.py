"""Broken recipes and artifacts: each is refused with exit code 2, the exact error lines on stderr, no
traceback, and nothing written (the working folder and every output location are byte for byte as before).

The CLI runs in-process, through typer's CliRunner on `peftcli.cli.app` (what the `peft` script calls):
a subprocess per case would spend minutes importing torch. test_in_process_matches_a_subprocess checks
that the two give the same lines and exit code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.safe_yaml import MAX_ALIAS_VALUES, MAX_YAML_DEPTH
from peftcli.methods import BY_PEFT_TYPE, METHODS, context_for
from peftcli.models.adapters import adapter_config, method_state, save_adapter
from peftcli.tasks.registry import BY_PEFT_TASK_TYPE, TASKS
from tests.cli.test_cli import ROOT
from tests.conftest import make_tokenizer, tiny_model, tiny_recipe, write_jsonl
from tests.helpers import randomize_trainable

CLS = "sequence_classification"
# `peft train` names the run before it loads data; everything else it prints on a refusal is an error.
TRAIN_BANNER = re.compile(
    r"\S+: \S+ on .+ \((sequence_classification|causal_lm|seq2seq_lm|token_classification)\)|mixed precision: .+"
)
REGISTRY = ", ".join(sorted(METHODS))


# -- running the CLI and checking a refusal ------------------------------------------------------


def snapshot(root: Path) -> dict[str, Any]:
    """Every file and folder under `root` (hidden ones included) with its bytes' hash and mtime."""
    tree: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            tree[str(p.relative_to(root))] = "dir"
        else:
            st = p.stat()
            tree[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return tree


def refused(work: Path, *args: str, lines: list[str]) -> None:
    """`peft ARGS` run in `work` exits with 2, prints exactly `lines`, no traceback, and writes nothing."""
    before = snapshot(work)
    result = CliRunner().invoke(app, list(args))
    assert isinstance(result.exception, SystemExit), result.exception  # anything else is a peftcli bug
    assert "Traceback" not in result.output + result.stderr
    printed = [line for line in result.stderr.splitlines() if not (args[0] == "train" and TRAIN_BANNER.fullmatch(line))]
    assert printed == [f"error: {line}" for line in lines]
    assert result.exit_code == 2
    assert snapshot(work) == before


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder of every case: runs/<name> and a default eval.json would land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- broken recipes ------------------------------------------------------------------------------

# In the expected lines, RECIPE stands for the recipe file's path and WORK for the working folder.
RECIPE, WORK = "<recipe>", "<work>"
NAME_HINT = "Use letters, digits, - and _; to write the run elsewhere, set output_dir."
NOT_FOUND_HINT = "Relative paths in a recipe are relative to its folder."
MODEL_MISSING = (
    f"{RECIPE}: model: required key is missing. Set it: the base model, e.g. `model: {{name: "
    "<hub id, local folder or package:<pkg>/<folder>>}`."
)
DATA_MISSING = (
    f"{RECIPE}: data: required key is missing. Set it: `files:` (split -> local files) or `dataset:` (a hub id), and "
    "`columns:`."
)
TASK_MISSING = (
    f"{RECIPE}: task: required key is missing. Set it: sequence_classification, causal_lm, seq2seq_lm or "
    "token_classification."
)
NOT_A_MAPPING = (
    f"{RECIPE}: a recipe is a YAML mapping of keys (got {{}}). Write `key: value` lines: task, model, method, data, ..."
)
EMPTY = f"{RECIPE}: the recipe is empty. Write its keys: task, model, method and data at least."
BOMB_REFUSED = (
    f"aliases (*name) expand to more than {MAX_ALIAS_VALUES:,} values, refused as a possible YAML bomb. "
    "Write the values out instead."
)
INT_FROM_STRING = "input should be a valid integer, unable to parse string as an integer"


@dataclass
class Case:
    id: str
    edit: Callable[[dict[str, Any]], Any] | str  # changes the tiny recipe, or is the whole file's text
    lines: list[str]
    overrides: tuple[str, ...] = ()


def sets(**changes: Any) -> Callable[[dict[str, Any]], None]:
    """sets(train__batch_size="abc") sets recipe["train"]["batch_size"]."""

    def edit(recipe: dict[str, Any]) -> None:
        for path, value in changes.items():
            *parents, last = path.split("__")
            node = recipe
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value

    return edit


def drops(*keys: str) -> Callable[[dict[str, Any]], None]:
    return lambda recipe: [recipe.pop(k) for k in keys]


def unchanged(recipe: dict[str, Any]) -> None:
    pass


# Ten values, then eight levels of ten aliases each: 10^9 values once expanded, in keys the schema walks.
BOMB = "\n".join(
    ["task: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"l{i}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    + ["model: {name: *i}", "method: {name: lora, target_modules: *i}"]
)
ALIAS_OVERRIDE = (
    "method.target_modules=[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c "
    "[*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]]"
)

RECIPES = [
    # wrong types
    Case(
        "batch_size-string",
        sets(train__batch_size="abc"),
        [f"{RECIPE}: train.batch_size: {INT_FROM_STRING} (got 'abc')."],
    ),
    Case("lr-list", sets(optimizer__lr=[1]), [f"{RECIPE}: optimizer.lr: input should be a valid number (got [1])."]),
    Case(
        "many-wrong-types",
        sets(model__dtype="fp8", data__group_by_length="maybe", train__seed=1.5, schedule__name="cosin"),
        [
            f"{RECIPE}: model.dtype: input should be 'float32', 'bfloat16' or 'float16' (got 'fp8').",
            (
                f"{RECIPE}: data.group_by_length: input should be a valid boolean, unable to interpret input (got "
                "'maybe')."
            ),
            (
                f"{RECIPE}: schedule.name: input should be 'linear', 'cosine' or 'constant' (got 'cosin'). "
                "Did you mean 'cosine'?"
            ),
            f"{RECIPE}: train.seed: input should be a valid integer, got a number with a fractional part (got 1.5).",
        ],
    ),
    Case(
        "section-a-list",
        sets(train=[1, 2]),
        [f"{RECIPE}: train: input should be a valid dictionary or instance of TrainSpec (got [1, 2])."],
    ),
    Case(
        "task-a-list",
        sets(task=[1]),
        [
            (
                f"{RECIPE}: task: input should be 'sequence_classification', 'causal_lm', 'seq2seq_lm' or "
                "'token_classification' (got [1])."
            )
        ],
    ),
    Case(
        "method-name-a-list",
        sets(method__name=["lora"]),
        [f"{RECIPE}: method.name: unknown method (got ['lora']). Did you mean 'lora'? Available: {REGISTRY}."],
    ),
    Case(
        "huge-value-cut-short",
        sets(method__rank="x" * 5000),
        [f"{RECIPE}: method.rank: {INT_FROM_STRING} (got '{'x' * 199}... (5,002 characters))."],
    ),
    # unknown keys, with did-you-mean
    Case("unknown-top-level-key", sets(trian={"epochs": 1}), [f"{RECIPE}: trian: unknown key. Did you mean 'train'?"]),
    Case(
        "unknown-nested-key",
        sets(data__max_lenght=16),
        [f"{RECIPE}: data.max_lenght: unknown key. Did you mean 'max_length'?"],
    ),
    Case(
        "unknown-key-no-match",
        sets(optimizer__zzz=1),
        [
            (
                f"{RECIPE}: optimizer.zzz: unknown key. Valid keys here: name, lr, weight_decay, betas, eps, momentum, "
                "loraplus_lr_ratio."
            )
        ],
    ),
    # missing required keys
    Case("missing-task", drops("task"), [TASK_MISSING]),
    Case("missing-model", drops("model"), [MODEL_MISSING]),
    Case("missing-data", drops("data"), [DATA_MISSING]),
    Case("missing-task-model-data", drops("task", "model", "data"), [TASK_MISSING, MODEL_MISSING, DATA_MISSING]),
    Case(
        "missing-label-column-name",
        sets(data__columns={"text": "text"}),
        [f"{RECIPE}: data.columns.label: sequence_classification needs the label column's name (e.g. label: label)."],
    ),
    # data files
    Case(
        "missing-data-files",
        sets(data__files={"train": "nothere/train.jsonl", "validation": "/no/such/val.jsonl"}),
        [
            f"{RECIPE}: data.files.train: file not found (got '{WORK}/nothere/train.jsonl'). {NOT_FOUND_HINT}",
            f"{RECIPE}: data.files.validation: file not found (got '/no/such/val.jsonl'). {NOT_FOUND_HINT}",
        ],
    ),
    Case(
        "data-file-is-a-folder",
        sets(data__files__train="."),
        [
            (
                f"{RECIPE}: data.files.train: a folder, not a file (got '{WORK}'). "
                "Name its files, or give the folder as data.dataset."
            )
        ],
    ),
    Case(
        "empty-data-file",
        sets(data__files__train="empty.jsonl"),
        [f"{RECIPE}: data.files.train: the file is empty (got '{WORK}/empty.jsonl'). Give a file with examples."],
    ),
    Case(
        "blank-lines-only",
        sets(data__files__validation="blank.jsonl"),
        [f"{RECIPE}: data.files.validation: the file is empty (got '{WORK}/blank.jsonl'). Give a file with examples."],
    ),
    Case(
        "header-only-csv-and-tsv",
        sets(data__files={"train": "header.csv", "validation": "header.tsv"}),
        [
            (
                f"{RECIPE}: data.files.train: the file holds only a header row (got '{WORK}/header.csv'). "
                "Give a file with examples."
            ),
            (
                f"{RECIPE}: data.files.validation: the file holds only a header row (got '{WORK}/header.tsv'). "
                "Give a file with examples."
            ),
        ],
    ),
    Case(
        "eval-split-not-in-files",
        sets(data__eval_split="test"),
        [
            (
                f"{RECIPE}: data.eval_split: no such split in data.files (got 'test'; files give train, validation). "
                "Add data.files.test or set data.eval_split: null."
            )
        ],
    ),
    Case(
        "label-column-not-in-data",
        sets(data__files__train="nolabel.jsonl"),
        [
            (
                "data.columns.label: column 'label' is not in split 'train' (columns: text, y). "
                "Set data.columns.label to one of them."
            )
        ],
    ),
    Case(
        "text-column-not-in-data",
        sets(data__columns__text="sentence"),
        [
            (
                "data.columns.text: column 'sentence' is not in split 'train' (columns: text, label). "
                "Set data.columns.text to one of them."
            )
        ],
    ),
    Case(
        "data-file-not-json",
        sets(data__files__train="broken.jsonl"),
        [
            (
                f"data.files.train: cannot read ['{WORK}/broken.jsonl'] as jsonl (ArrowInvalid: JSON parse error: "
                "Missing a name for object member. in row 1). Check that it is valid jsonl."
            )
        ],
    ),
    # values out of range
    Case(
        "max_length-0",
        sets(data__max_length=0),
        [f"{RECIPE}: data.max_length: input should be greater than 0 (got 0)."],
    ),
    Case(
        "max_length-negative",
        sets(data__max_length=-8),
        [f"{RECIPE}: data.max_length: input should be greater than 0 (got -8)."],
    ),
    Case(
        "lr-negative",
        sets(optimizer__lr=-1e-3),
        [f"{RECIPE}: optimizer.lr: input should be greater than 0 (got -0.001)."],
    ),
    Case("epochs-0", sets(train__epochs=0), [f"{RECIPE}: train.epochs: input should be greater than 0 (got 0)."]),
    Case(
        "epochs-negative", sets(train__epochs=-2), [f"{RECIPE}: train.epochs: input should be greater than 0 (got -2)."]
    ),
    # incompatible options
    Case(
        "warmup-steps-and-ratio",
        sets(schedule={"warmup_steps": 5, "warmup_ratio": 0.1}),
        [f"{RECIPE}: schedule.warmup_steps: give warmup_steps or warmup_ratio, not both (got 5 and 0.1)."],
    ),
    Case(
        "gradient-checkpointing-with-prefix-tuning",
        sets(method={"name": "prefix_tuning"}, train__gradient_checkpointing=True),
        [
            (
                f"{RECIPE}: train.gradient_checkpointing: prefix_tuning cannot train with gradient checkpointing (got "
                "true). Set it to false."
            )
        ],
    ),
    Case(
        "best-metric-of-another-task",
        sets(train__best_metric="perplexity"),
        [
            (
                f"{RECIPE}: train.best_metric: not an eval metric of sequence_classification (got 'perplexity'). "
                "Metrics: loss, accuracy, f1."
            )
        ],
    ),
    # methods
    Case(
        "unknown-method",
        sets(method__name="loar"),
        [f"{RECIPE}: method.name: unknown method (got 'loar'). Did you mean 'lora'? Available: {REGISTRY}."],
    ),
    Case("rank-0", sets(method__rank=0), [f"{RECIPE}: method.rank: input should be greater than 0 (got 0)."]),
    Case(
        "unknown-method-keys",
        sets(method__rnak=4, method__foo=1),
        [
            (
                f"{RECIPE}: method.foo: unknown key. Valid keys here: name, rank, alpha, dropout, target_modules, "
                "use_rslora, use_dora, init, pissa_niter, modules_to_save."
            ),
            f"{RECIPE}: method.rnak: unknown key. Did you mean 'rank'?",
        ],
    ),
    Case(
        "method-not-a-mapping",
        sets(method="lora"),
        [f"{RECIPE}: method: expected a mapping with a `name:` key (got 'lora')."],
    ),
    # run names that would put the run directory outside runs/
    Case(
        "name-with-slash",
        sets(name="exp/one"),
        [f"{RECIPE}: name: a run name is one folder name under runs/ (got 'exp/one'). {NAME_HINT}"],
    ),
    Case(
        "name-with-dot-dot",
        sets(name="../../escape"),
        [f"{RECIPE}: name: a run name is one folder name under runs/ (got '../../escape'). {NAME_HINT}"],
    ),
    Case(
        "name-override-dot-dot",
        unchanged,
        [f"override 'name=..': name: a run name is one folder name under runs/ (got '..'). {NAME_HINT}"],
        ("name=..",),
    ),
    # every problem of a recipe at once
    Case(
        "four-problems-at-once",
        sets(name="a/b", optimizer__lr=-1, data__files__train="gone.jsonl", method__rnak=2),
        [
            f"{RECIPE}: optimizer.lr: input should be greater than 0 (got -1).",
            f"{RECIPE}: method.rnak: unknown key. Did you mean 'rank'?",
            f"{RECIPE}: name: a run name is one folder name under runs/ (got 'a/b'). {NAME_HINT}",
            f"{RECIPE}: data.files.train: file not found (got '{WORK}/gone.jsonl'). {NOT_FOUND_HINT}",
        ],
    ),
    # overrides
    Case(
        "override-without-equals",
        unchanged,
        ["override 'train.max_steps': expected key.path=value, e.g. train.max_steps=50"],
        ("train.max_steps",),
    ),
    Case(
        "override-unknown-key",
        unchanged,
        ["override 'train.max_stpes=3': train.max_stpes: unknown key. Did you mean 'max_steps'?"],
        ("train.max_stpes=3",),
    ),
    Case(
        "override-unknown-section",
        unchanged,
        ["override 'trian.max_steps=3': trian: unknown key. Did you mean 'train'?"],
        ("trian.max_steps=3",),
    ),
    Case(
        "override-wrong-type",
        unchanged,
        [f"override 'train.max_steps=many': train.max_steps: {INT_FROM_STRING} (got 'many')."],
        ("train.max_steps=many",),
    ),
    Case("override-yaml-bomb", unchanged, [f"override 'method.target_modules=...': {BOMB_REFUSED}"], (ALIAS_OVERRIDE,)),
    # files that are not a recipe
    Case("yaml-list", "- task\n- model\n", [NOT_A_MAPPING.format("list")]),
    Case("yaml-scalar", "just some text\n", [NOT_A_MAPPING.format("str")]),
    Case("empty-file", "", [EMPTY]),
    Case("comments-only", "# LoRA on something\n\n# peft train this.yaml\n", [EMPTY]),
    Case(
        "bad-indentation",
        "task: causal_lm\nmodel:\n  name: x\n data: {files: y}\n",
        [
            (
                f"{RECIPE}: line 4: invalid YAML (expected <block end>, but found '<block mapping start>'). "
                "Fix the syntax there."
            )
        ],
    ),
    Case(
        "unclosed-bracket",
        "task: causal_lm\nmethod: {name: lora\ndata: {}\n",
        [f"{RECIPE}: line 3: invalid YAML (expected ',' or '}}', but got ':'). Fix the syntax there."],
    ),
    Case(
        "duplicate-key",
        "task: causal_lm\nmodel: {name: x}\ntask: sequence_classification\n",
        [f"{RECIPE}: line 3: duplicate key 'task' (first on line 1). Keep one of them."],
    ),
    Case(
        "python-tag",
        "task: !!python/object/apply:os.system ['touch pwned']\n",
        [
            (
                f"{RECIPE}: line 1: invalid YAML (could not determine a constructor for the tag "
                "'tag:yaml.org,2002:python/object/apply:os.system'). Fix the syntax there."
            )
        ],
    ),
    Case(
        "undefined-alias",
        "task: *nope\n",
        [f"{RECIPE}: line 1: invalid YAML (found undefined alias 'nope'). Fix the syntax there."],
    ),
    Case("yaml-bomb", BOMB, [f"{RECIPE}: {BOMB_REFUSED}"]),
    Case(
        "recursive-alias",
        "task: causal_lm\nmethod: &m {name: lora, target_modules: [*m]}\n",
        [f"{RECIPE}: line 2: an alias refers to a value that contains it (a recursive structure). Remove the alias."],
    ),
    Case(
        "nested-too-deep",
        "task: causal_lm\nmethod: " + "[" * 5000 + "\n",
        [
            (
                f"{RECIPE}: line 2: values nested more than {MAX_YAML_DEPTH} levels deep. "
                "A recipe is a few levels deep; check the brackets."
            )
        ],
    ),
]


@pytest.fixture
def bad_data(work: Path) -> None:
    (work / "empty.jsonl").write_text("")
    (work / "blank.jsonl").write_text("\n  \n\n")
    (work / "header.csv").write_text("text,label\n")
    (work / "header.tsv").write_text("text\tlabel\n")
    write_jsonl(work / "nolabel.jsonl", [{"text": "good film", "y": "positive"}, {"text": "bad film", "y": "negative"}])
    (work / "broken.jsonl").write_text('{"text": "good", "label": "positive"}\n{oops\n')


@pytest.mark.parametrize("case", RECIPES, ids=[c.id for c in RECIPES])
def test_broken_recipe(case: Case, work: Path, bad_data: None, tiny_dirs, tiny_data) -> None:
    path = work / "recipe.yaml"
    if isinstance(case.edit, str):
        path.write_text(case.edit)
    else:
        recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS)
        case.edit(recipe)
        path.write_text(yaml.safe_dump(recipe))
    lines = [line.replace(RECIPE, str(path)).replace(WORK, str(work)) for line in case.lines]
    refused(work, "train", str(path), *case.overrides, lines=lines)


def test_recipe_file_not_found(work: Path) -> None:
    refused(
        work, "validate", "nope.yaml", lines=[f"nope.yaml: recipe file not found. Check the path (relative to {work})."]
    )


USAGE = [
    (
        ("generate", "runs/x", "hi", "--temperature", "abc"),
        (
            "peft generate: invalid value for '--temperature': Input should be a valid number, unable to parse "
            "string as a number (got 'abc')"
        ),
    ),
    (
        ("generate", "runs/x", "hi", "--top-k=1.5"),
        (
            "peft generate: invalid value for '--top-k': Input should be a valid integer, unable to parse string as an "
            "integer (got '1.5')"
        ),
    ),
    (("train",), "peft train: missing argument 'RECIPE'"),
    (("train", "r.yaml", "--bogus"), "peft train: no such option: --bogus"),
    (("merge", "runs/x"), "peft merge: missing option '--out'"),
    (("bogus",), "peft: no such command 'bogus'"),
]


@pytest.mark.parametrize(("args", "line"), USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line(args: tuple[str, ...], line: str, work: Path) -> None:
    command = line.split(":")[0]
    refused(work, *args, lines=[f"{line}. Run `{command} --help` for the options."])


def test_validate_reports_like_train(work: Path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS, name="../up")
    recipe["optimizer"]["lr"] = 0
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    refused(
        work,
        "validate",
        str(path),
        lines=[
            f"{path}: optimizer.lr: input should be greater than 0 (got 0).",
            (
                f"{path}: name: a run name is one folder name under runs/ (got '../up'). Use letters, digits, - and _; "
                "to write the run elsewhere, set output_dir."
            ),
        ],
    )


def test_yaml_bomb_is_refused_fast_and_small(work: Path) -> None:
    path = work / "bomb.yaml"
    path.write_text(BOMB)
    tracemalloc.start()
    started = time.perf_counter()
    refused(work, "validate", str(path), lines=[f"{path}: {BOMB_REFUSED}"])
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2 and peak < 20 * 2**20, (seconds, peak)


def test_fp16_on_a_cpu_only_machine(work: Path, tiny_dirs, tiny_data) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    path = work / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS, train={"mixed_precision": "fp16"}))
    )
    refused(
        work,
        "train",
        str(path),
        lines=[
            (
                "train.mixed_precision: fp16 needs a CUDA GPU and none is visible (got 'fp16'). "
                "Use auto, bf16 (CPUs with bf16 support) or no."
            )
        ],
    )


def test_train_onto_an_existing_run_directory(work: Path, tiny_dirs, tiny_data) -> None:
    run = work / "runs" / "tiny"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (run / "report.json").write_text('{"keep": true}\n')
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS)))
    refused(
        work,
        "train",
        str(path),
        lines=[
            (
                "runs/tiny: run directory already exists. Pass --overwrite to replace it, or give the run another name "
                "(name=NEW or output_dir=DIR)."
            )
        ],
    )


def test_in_process_matches_a_subprocess(work: Path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS, name="x/y")
    recipe["train"]["batch_size"] = "abc"
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    lines = [
        f"{path}: train.batch_size: input should be a valid integer, unable to parse string as an integer (got 'abc').",
        (
            f"{path}: name: a run name is one folder name under runs/ (got 'x/y'). Use letters, digits, - and _; "
            "to write the run elsewhere, set output_dir."
        ),
    ]
    refused(work, "train", str(path), lines=lines)
    before = snapshot(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's peftcli, whatever is installed
    result = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=300,
    )
    assert (result.returncode, result.stderr.splitlines()) == (2, [f"error: {line}" for line in lines])
    assert snapshot(work) == before


# -- broken artifacts -------------------------------------------------------------------------------


def save_lora(folder: Path, model: torch.nn.Module, base_model: Path, targets: list[str]) -> None:
    """A LoRA adapter with random weights and labels, in the layout `peft train` writes."""
    method, task = METHODS["lora"], TASKS[CLS]
    params = method.params(rank=4, alpha=8, target_modules=targets)
    adapted = method.apply(model, params, context_for(model, task.head_modules))
    randomize_trainable(model)
    config = adapter_config(method, params, adapted, task, str(base_model), None)
    save_adapter(folder, method_state(method, model, adapted), config, ["negative", "positive"], make_tokenizer())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_dirs, tiny_data) -> Path:
    """run/ (adapter/ and recipe.yaml, as `peft train` leaves them) and other-base/, an adapter for a
    BERT twice as wide that names the tiny BERT as its base."""
    root = tmp_path_factory.mktemp("artifacts")
    save_lora(root / "run" / "adapter", tiny_model("bert-cls"), tiny_dirs["bert-cls"], ["query", "value"])
    (root / "run" / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS)))
    torch.manual_seed(0)
    wide = BertForSequenceClassification(
        BertConfig(
            vocab_size=60,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=2,
        )
    )
    save_lora(root / "other-base", wide, tiny_dirs["bert-cls"], ["query", "value"])
    return root


@pytest.fixture
def run(artifacts: Path, work: Path) -> Path:
    """A copy of the run directory inside the working folder, to break."""
    shutil.copytree(artifacts / "run", work / "run")
    return work / "run"


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


class Unpickled:
    """Unpickling this creates a folder: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_intact_run_inspects(run: Path) -> None:
    """The cases below fail because of what they break, not because of the fixture."""
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 0, result.output + result.stderr


def test_truncated_weights(run: Path, work: Path) -> None:
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(
        work,
        "eval",
        str(run),
        lines=[
            (
                f"{weights}: cannot read the safetensors file (Error while deserializing header: "
                "incomplete metadata, file not fully covered). It is corrupt or truncated; re-save the adapter."
            )
        ],
    )


def test_weights_cut_inside_the_header(run: Path, work: Path) -> None:
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    refused(
        work,
        "merge",
        str(run),
        "--out",
        str(work / "merged"),
        lines=[
            (
                f"{weights}: cannot read the safetensors file (Error while deserializing header: "
                "invalid header length). It is corrupt or truncated; re-save the adapter."
            )
        ],
    )


def test_random_bytes_as_weights(run: Path, work: Path) -> None:
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(bytes(range(256)) * 20)
    refused(
        work,
        "inspect",
        str(run),
        lines=[
            (
                f"{weights}: cannot read the safetensors file (Error while deserializing header: header too large). "
                "It is corrupt or truncated; re-save the adapter."
            )
        ],
    )


def test_config_not_json(run: Path, work: Path) -> None:
    config = run / "adapter" / "adapter_config.json"
    config.write_text('{"peft_type": "LORA", r: 4}')
    refused(
        work,
        "eval",
        str(run),
        lines=[
            (
                f"{config}: not valid JSON (Expecting property name enclosed in double quotes: "
                "line 1 column 23 (char 22)). The file is corrupt; re-save the adapter."
            )
        ],
    )


def test_config_not_a_mapping(run: Path, work: Path) -> None:
    config = run / "adapter" / "adapter_config.json"
    config.write_text("[1, 2]")
    refused(work, "inspect", str(run), lines=[f"{config}: no `peft_type` key; it is not an adapter config."])


def test_unknown_peft_type(run: Path, work: Path) -> None:
    config = run / "adapter" / "adapter_config.json"
    edit_json(config, peft_type="VERA")
    refused(
        work,
        "merge",
        str(run),
        "--out",
        str(work / "merged"),
        lines=[f"{config}: peft_type 'VERA' is not supported (supported: {', '.join(sorted(BY_PEFT_TYPE))})."],
    )


def test_config_with_invalid_settings(run: Path, work: Path) -> None:
    config = run / "adapter" / "adapter_config.json"
    edit_json(config, r=0, lora_dropout=2)
    refused(
        work,
        "eval",
        str(run),
        lines=[
            f"{config}: invalid lora setting rank: input should be greater than 0 (got 0). Re-save the adapter.",
            f"{config}: invalid lora setting dropout: input should be less than 1 (got 2). Re-save the adapter.",
        ],
    )


def test_config_missing_a_key(run: Path, work: Path) -> None:
    config = run / "adapter" / "adapter_config.json"
    data = json.loads(config.read_text())
    del data["r"]
    config.write_text(json.dumps(data))
    refused(
        work,
        "inspect",
        str(run),
        lines=[f"{config}: no 'r' key, which a LORA adapter config needs. Re-save the adapter."],
    )


def test_config_of_another_architecture(run: Path, work: Path) -> None:
    config = run / "adapter" / "adapter_config.json"
    edit_json(config, target_modules=["q_proj", "v_proj"])
    refused(
        work,
        "merge",
        str(run),
        "--out",
        str(work / "merged"),
        lines=[
            (
                f"{config}: target_modules ['q_proj', 'v_proj'] matched no linear layer of "
                "BertForSequenceClassification (linear layers: classifier, dense, key, query, value). "
                "Was the adapter trained on another base model?"
            )
        ],
    )


@pytest.mark.parametrize("command", ["eval", "merge", "inspect"])
def test_shapes_of_another_base_model(command: str, artifacts: Path, run: Path, work: Path) -> None:
    shutil.rmtree(run / "adapter")
    shutil.copytree(artifacts / "other-base", run / "adapter")
    out = ["--out", str(work / "merged")] if command == "merge" else []
    refused(
        work,
        command,
        str(run),
        *out,
        lines=[
            (
                f"{run / 'adapter' / 'adapter_model.safetensors'}: "
                "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight has shape (4, 64) but the "
                "model expects (4, 32). Was the adapter trained on another base model?"
            )
        ],
    )


def test_bare_adapter_of_another_base_model(artifacts: Path, work: Path) -> None:
    adapter = work / "adapter"
    shutil.copytree(artifacts / "other-base", adapter)
    refused(
        work,
        "inspect",
        str(adapter),
        lines=[
            (
                f"{adapter / 'adapter_model.safetensors'}: "
                "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight has shape (4, 64) but the "
                "model expects (4, 32). Was the adapter trained on another base model?"
            )
        ],
    )


def test_bare_adapter_with_truncated_weights(artifacts: Path, work: Path) -> None:
    adapter = work / "adapter"
    shutil.copytree(artifacts / "run" / "adapter", adapter)
    (adapter / "labels.json").unlink()  # the label count then comes from the weights' head
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:7])
    refused(
        work,
        "inspect",
        str(adapter),
        lines=[
            (
                f"{weights}: cannot read the safetensors file (Error while deserializing header: header too small). "
                "It is corrupt or truncated; re-save the adapter."
            )
        ],
    )


def test_bare_adapter_with_unsupported_task(artifacts: Path, work: Path) -> None:
    adapter = work / "adapter"
    shutil.copytree(artifacts / "run" / "adapter", adapter)
    edit_json(adapter / "adapter_config.json", task_type="QUESTION_ANS")
    refused(
        work,
        "merge",
        str(adapter),
        "--out",
        str(work / "merged"),
        lines=[
            (
                f"{adapter / 'adapter_config.json'}: task_type 'QUESTION_ANS' is not supported (supported: "
                f"{', '.join(sorted(BY_PEFT_TASK_TYPE))})."
            )
        ],
    )


def test_corrupt_labels(run: Path, work: Path) -> None:
    labels = run / "adapter" / "labels.json"
    labels.write_text('["negative", "positive"]')
    refused(work, "eval", str(run), lines=[f'{labels}: expected {{"labels": [...]}}; the file is corrupt.'])


@pytest.mark.parametrize("command", ["eval", "merge", "inspect"])
def test_missing_weights(command: str, run: Path, work: Path) -> None:
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.unlink()
    out = ["--out", str(work / "merged")] if command == "merge" else []
    refused(
        work,
        command,
        str(run),
        *out,
        lines=[f"{weights}: adapter weights not found; the adapter folder is incomplete. Re-save the adapter."],
    )


@pytest.mark.parametrize("command", ["eval", "merge", "inspect"])
def test_pickle_weights_are_never_unpickled(command: str, run: Path, work: Path) -> None:
    (run / "adapter" / "adapter_model.safetensors").unlink()
    pickled = run / "adapter" / "adapter_model.bin"
    pickled.write_bytes(pickle.dumps(Unpickled(work / "UNPICKLED")))
    out = ["--out", str(work / "merged")] if command == "merge" else []
    refused(
        work,
        command,
        str(run),
        *out,
        lines=[
            (
                f"{pickled}: a pickle file, which peftcli never loads (unpickling can run any code). "
                "If you trust it, convert it to adapter_model.safetensors with HF peft's save_pretrained."
            )
        ],
    )
    assert not (work / "UNPICKLED").exists()


@pytest.mark.parametrize("command", ["eval", "merge", "inspect"])
def test_missing_adapter_folder(command: str, run: Path, work: Path) -> None:
    shutil.rmtree(run / "adapter")
    out = ["--out", str(work / "merged")] if command == "merge" else []
    refused(
        work,
        command,
        str(run),
        *out,
        lines=[
            (
                f"{run}: not a run directory (no adapter/adapter_config.json), an adapter folder (no "
                "adapter_config.json) or a recipe."
            )
        ],
    )


def test_missing_target(work: Path) -> None:
    refused(
        work,
        "inspect",
        "runs/nothing",
        lines=["runs/nothing: not found. Give a run directory, an adapter folder or a recipe file."],
    )


def test_merge_onto_an_existing_folder(run: Path, work: Path) -> None:
    (work / "merged").mkdir()
    (work / "merged" / "model.safetensors").write_bytes(b"mine")
    refused(
        work,
        "merge",
        str(run),
        "--out",
        "merged",
        lines=["merged: already exists. Pass --overwrite to replace it, or choose another --out."],
    )


def test_merge_onto_a_file(run: Path, work: Path) -> None:
    (work / "merged").write_text("a file")
    refused(
        work,
        "merge",
        str(run),
        "--out",
        "merged",
        "--overwrite",
        lines=[
            (
                "merged: a file, not a folder. Give --out a folder for the merged model (a new one, or an existing one "
                "with --overwrite)."
            )
        ],
    )


@pytest.mark.parametrize("out", ["run", "."])
def test_merge_onto_the_run_itself(out: str, run: Path, work: Path) -> None:
    refused(
        work,
        "merge",
        "run",
        "--out",
        out,
        "--overwrite",
        lines=[f"{out}: holds the adapter being merged (run), which --out would replace. Choose another --out."],
    )


def test_merge_overwrite_replaces_only_a_model_folder(run: Path, work: Path) -> None:
    (work / "docs" / "notes").mkdir(parents=True)
    (work / "docs" / "config.json").write_text("{}")
    (work / "docs" / "notes" / "thesis.tex").write_text("years of work")
    refused(
        work,
        "merge",
        str(run),
        "--out",
        "docs",
        "--overwrite",
        lines=[
            (
                "docs: not a model folder peft merge wrote (config.json and files only), so --overwrite will not "
                "delete it. Choose another --out, or empty the folder yourself."
            )
        ],
    )


def test_merge_overwrite_never_deletes_the_base_model(run: Path, work: Path, tiny_dirs) -> None:
    base = tiny_dirs["bert-cls"]
    before = snapshot(base)
    for out in (base, base.parent, Path(f"{base}/../{base.name}/")):
        refused(
            work,
            "merge",
            str(run),
            "--out",
            str(out),
            "--overwrite",
            lines=[
                f"{out}: --overwrite would delete the base model ({base}), which is inside it. Choose another --out."
            ],
        )
    assert snapshot(base) == before


def test_merge_overwrite_never_deletes_the_working_folder(run: Path, work: Path) -> None:
    (work / "sub").mkdir()
    (work / "sub" / "config.json").write_text("{}")
    os.chdir(work / "sub")
    refused(
        work,
        "merge",
        str(run),
        "--out",
        ".",
        "--overwrite",
        lines=[
            (
                f".: --overwrite would delete the folder you run from ({work / 'sub'}), which is inside it. "
                "Choose another --out."
            )
        ],
    )


def test_eval_report_onto_a_folder(run: Path, work: Path) -> None:
    (work / "reports").mkdir()
    refused(
        work,
        "eval",
        str(run),
        "--out",
        "reports",
        lines=["--out: a folder, not a file (got 'reports'). Give a file name, e.g. --out reports/eval.json."],
    )


def test_eval_of_a_split_the_run_lacks(run: Path, work: Path) -> None:
    refused(
        work,
        "eval",
        str(run),
        "--split",
        "test",
        lines=[
            (
                f"{run}: --split: no such split in data.files (got 'test'; files give train, validation). "
                "Choose one of them, or add data.files.test=FILE."
            )
        ],
    )
