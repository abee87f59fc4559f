"""Bad data, and values the schema used to let through that failed later: each is refused in one line
with exit code 2, no traceback and nothing written (`refused` from test_bad_inputs.py). Labels are data,
checked like data; no metric is computed from nothing; NaN is never the best eval nor written to JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.config.schema import DataSpec
from peftcli.data.prepare import prepare_data
from peftcli.reporting.report import MetricsLog, write_report
from peftcli.tasks.registry import TASKS
from peftcli.training.state import TrainResult
from tests.cli import test_bad_inputs as bad_inputs
from tests.cli.test_bad_inputs import refused
from tests.conftest import VOCAB, qa_rows, tiny_model, tiny_recipe, write_jsonl

CLS, LM, S2S, TOK = "sequence_classification", "causal_lm", "seq2seq_lm", "token_classification"
MISSING_LABEL = "Give every row a label, or remove the rows without one."
ONE_LABEL = "Map the values to class names or ids; regression and multi-label classification are not supported."
UTF8 = "Save the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)."
NO_TEXT = "Fill it in, or remove the row."


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder of every case, as in test_bad_inputs.py: runs/<name> would land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_recipe(work: Path, recipe: dict[str, Any]) -> Path:
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cls_recipe(tiny_dirs, tiny_data, **files: str) -> dict[str, Any]:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS)
    recipe["data"]["files"] |= {split: [f] for split, f in files.items()}
    return recipe


def ner_recipe(tiny_ner: dict[str, Path], **files: str) -> dict[str, Any]:
    return {
        "name": "ner",
        "task": TOK,
        "model": {"name": str(tiny_ner["model"])},
        "method": {"name": "lora", "rank": 4, "alpha": 8},
        "data": {
            "files": {"train": str(tiny_ner["train"]), "validation": str(tiny_ner["validation"])} | files,
            "columns": {"tokens": "tokens", "tags": "tags"},
            "max_length": 32,
        },
        "train": {"batch_size": 16, "max_steps": 2, "seed": 0},
    }


# -- labels are data ------------------------------------------------------------------------------
# Each case: the file's name and text (in the working folder), the split it replaces, the error line.

GOOD = '{"text": "good film", "label": "positive"}\n'
LABELS = [
    (
        "jsonl-null",
        "t.jsonl",
        GOOD + '{"text": "bad film", "label": null}\n',
        "train",
        f"data.columns.label: {{f}}: row 2: the label is missing (got null). {MISSING_LABEL}",
    ),
    (
        "jsonl-key-absent",
        "t.jsonl",
        GOOD + '{"text": "bad film"}\n',
        "train",
        f"data.columns.label: {{f}}: row 2: the label is missing (got null). {MISSING_LABEL}",
    ),
    (
        "jsonl-nan",
        "t.jsonl",
        '{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n',
        "train",
        f"data.columns.label: {{f}}: row 2: the label is missing (got NaN). {MISSING_LABEL}",
    ),
    (
        "jsonl-blank-string",
        "t.jsonl",
        GOOD + '{"text": "bad film", "label": " "}\n',
        "train",
        f"data.columns.label: {{f}}: row 2: the label is missing (got ' '). {MISSING_LABEL}",
    ),
    (
        "csv-blank-cell",
        "t.csv",
        "text,label\ngood film,1\nbad film,\nok film,0\n",
        "train",
        f"data.columns.label: {{f}}: row 2: the label is missing (got null). {MISSING_LABEL}",
    ),
    (
        "tsv-blank-cell",
        "t.tsv",
        "text\tlabel\ngood film\t\nbad film\t0\n",
        "train",
        f"data.columns.label: {{f}}: row 1: the label is missing (got null). {MISSING_LABEL}",
    ),
    (
        "fractional",
        "t.jsonl",
        '{"text": "good", "label": 0.5}\n{"text": "bad", "label": 0}\n',
        "train",
        f"data.columns.label: {{f}}: row 1: a label is one string or one integer 0..N-1 per row (got 0.5). {ONE_LABEL}",
    ),
    (
        "a-list",
        "t.jsonl",
        '{"text": "good", "label": [1]}\n{"text": "bad", "label": [0]}\n',
        "train",
        f"data.columns.label: {{f}}: row 1: a label is one string or one integer 0..N-1 per row (got [1]). {ONE_LABEL}",
    ),
    (
        "a-dict",
        "t.jsonl",
        '{"text": "good", "label": {"y": 1}}\n{"text": "bad", "label": {"y": 0}}\n',
        "train",
        (
            "data.columns.label: {f}: row 1: a label is one string or one integer 0..N-1 per row "
            f"(got {{{{'y': 1}}}}). {ONE_LABEL}"
        ),
    ),
    (
        "bools-and-strings",
        "t.jsonl",
        '{"text": "good", "label": true}\n{"text": "bad", "label": "negative"}\n',
        "train",
        (
            "data.columns.label: {f}: labels mix numbers and strings (got True at row 1, 'negative' at row 2). "
            "Write every label as a string, or every label as an integer 0..N-1."
        ),
    ),
    (
        "eval-split-null",
        "v.jsonl",
        GOOD + '{"text": "bad film", "label": null}\n',
        "validation",
        f"data.columns.label: {{f}}: row 2: the label is missing (got null). {MISSING_LABEL}",
    ),
    (
        "null-text",
        "t.jsonl",
        GOOD + '{"text": null, "label": "negative"}\n',
        "train",
        f"data.columns.text: {{f}}: row 2: expected text in column 'text' (got null). {NO_TEXT}",
    ),
    (
        "csv-blank-text",
        "t.csv",
        "text,label\ngood film,positive\n,negative\n",
        "train",
        f"data.columns.text: {{f}}: row 2: expected text in column 'text' (got null). {NO_TEXT}",
    ),
    (
        "list-as-text",
        "v.jsonl",
        GOOD + '{"text": ["bad", "film"], "label": "negative"}\n',
        "validation",
        f"data.columns.text: {{f}}: row 2: expected text in column 'text' (got ['bad', 'film']). {NO_TEXT}",
    ),
    (
        "latin1-csv",
        "t.csv",
        b"text,label\ncaf\xe9 film,positive\nbad,negative\n",
        "train",
        f"data.files.train: {{f}}: line 2: not UTF-8 text (got byte 0xe9 at byte offset 14). {UTF8}",
    ),
    (
        "latin1-jsonl",
        "v.jsonl",
        GOOD.encode() + b'{"text": "caf\xe9", "label": "negative"}\n',
        "validation",
        f"data.files.validation: {{f}}: line 2: not UTF-8 text (got byte 0xe9 at byte offset 56). {UTF8}",
    ),
]


@pytest.mark.parametrize(("name", "text", "split", "line"), [c[1:] for c in LABELS], ids=[c[0] for c in LABELS])
def test_bad_labels_and_text(
    name: str, text: str | bytes, split: str, line: str, work: Path, tiny_dirs, tiny_data
) -> None:
    f = work / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    path = write_recipe(work, cls_recipe(tiny_dirs, tiny_data, **{split: str(f)}))
    refused(work, "train", str(path), lines=[line.format(f=f)])


def test_non_utf8_file_in_a_dataset_folder(work: Path, tiny_dirs, tiny_data) -> None:
    folder = work / "sst"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(b'{"text": "good", "label": 1}\n{"text": "na\xefve", "label": 0}\n')
    recipe = cls_recipe(tiny_dirs, tiny_data)
    recipe["data"] = {"dataset": str(folder), "eval_split": None, "columns": {"text": "text", "label": "label"}}
    path = write_recipe(work, recipe)
    refused(
        work,
        "train",
        str(path),
        lines=[
            f"data.dataset: {folder / 'train.jsonl'}: line 2: not UTF-8 text (got byte 0xef at byte offset 41). {UTF8}"
        ],
    )


def test_whole_float_labels_are_ints(tmp_path: Path, tokenizer) -> None:
    """A CSV label column read as floats (1.0) has the classes of its ints, in the eval split too."""
    train, ev = tmp_path / "train.csv", tmp_path / "validation.csv"
    train.write_text("text,label\ngood film,1.0\nbad film,0.0\nok film,2.0\n")
    ev.write_text("text,label\nbad,0\ngood,1\n")
    spec = DataSpec(files={"train": [str(train)], "validation": [str(ev)]}, columns={"text": "text", "label": "label"})
    data = prepare_data(spec, CLS, tokenizer)
    assert data.label_names == ["0", "1", "2"]
    assert data.train["labels"] == [1, 0, 2] and data.eval["labels"] == [0, 1]


# -- tags and words -----------------------------------------------------------------------------

TAGS = [
    (
        "null-tag",
        '{"tokens": ["john", "lives"], "tags": ["B-PER", null]}\n',
        "train",
        (
            "data.columns.tags: {f}: row 1, word 2: the tag is missing (got null). "
            "Give every word a tag, or remove the rows without one."
        ),
    ),
    (
        "null-tag-in-eval",
        '{"tokens": ["john", "lives"], "tags": [null, "O"]}\n',
        "validation",
        (
            "data.columns.tags: {f}: row 1, word 1: the tag is missing (got null). "
            "Give every word a tag, or remove the rows without one."
        ),
    ),
    (
        "nested-tag",
        '{"tokens": ["john", "lives"], "tags": [["B-PER"], "O"]}\n',
        "train",
        (
            "data.columns.tags: {f}: row 1, word 1: a tag is one string or one integer 0..N-1 per word (got "
            "['B-PER']). Map the values to class names or ids; nested tags are not supported."
        ),
    ),
    (
        "ints-and-strings",
        '{"tokens": ["john", "lives"], "tags": [1, "O"]}\n',
        "train",
        (
            "data.columns.tags: {f}: tags mix numbers and strings (got 1 at row 1, 'O' at row 1). "
            "Write every tag as a string, or every tag as an integer 0..N-1."
        ),
    ),
    (
        "null-word",
        '{"tokens": ["john", null], "tags": ["B-PER", "O"]}\n',
        "train",
        f"data.columns.tokens: {{f}}: row 1, word 2: expected text in column 'tokens' (got null). {NO_TEXT}",
    ),
    (
        "eval-without-words",
        '{"tokens": [], "tags": []}\n{"tokens": [], "tags": []}\n',
        "validation",
        (
            "data.columns.tokens: split 'validation' has no word within data.max_length 32, nothing to evaluate (got 2 "
            "rows). Give rows with words, or raise data.max_length."
        ),
    ),
]


@pytest.mark.parametrize(("text", "split", "line"), [c[1:] for c in TAGS], ids=[c[0] for c in TAGS])
def test_bad_tags_and_words(text: str, split: str, line: str, work: Path, tiny_ner: dict[str, Path]) -> None:
    f = work / "rows.jsonl"
    rows = text if split == "validation" else text + '{"tokens": ["mary", "works"], "tags": ["B-PER", "O"]}\n'
    f.write_text(rows)
    path = write_recipe(work, ner_recipe(tiny_ner, **{split: str(f)}))
    refused(work, "train", str(path), lines=[line.format(f=f)])


# -- causal LM and seq2seq text, and eval splits with nothing left ------------------------------


def lm_recipe(tiny_dirs, tiny_data, model: str = "gpt2-lm", task: str = LM, **files: str) -> dict[str, Any]:
    recipe = tiny_recipe(tiny_dirs[model], tiny_data, task)
    recipe["data"]["files"] |= {split: [f] for split, f in files.items()}
    return recipe


@pytest.mark.parametrize(
    ("model", "task", "row", "line"),
    [
        (
            "gpt2-lm",
            LM,
            {"question": "what is one", "answer": None},
            f"data.columns.response: {{f}}: row 2: expected text in column 'answer' (got null). {NO_TEXT}",
        ),
        (
            "gpt2-lm",
            LM,
            {"question": None, "answer": "two"},
            (
                "data.columns.prompt_template: {f}: row 2: column 'question' has no value (got null). "
                "Fill it in, or remove the row."
            ),
        ),
        (
            "t5-s2s",
            S2S,
            {"question": "what is one", "answer": None},
            f"data.columns.response: {{f}}: row 2: expected text in column 'answer' (got null). {NO_TEXT}",
        ),
    ],
    ids=["lm-null-response", "lm-null-template-field", "s2s-null-target"],
)
def test_null_text_of_generative_tasks(
    model: str,
    task: str,
    row: dict[str, Any],
    line: str,
    work: Path,
    tiny_dirs,
    tiny_data,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # refused() drops `peft train`'s banner line, which it knows for the other tasks only.
    banner = re.compile(bad_inputs.TRAIN_BANNER.pattern + r"|\S+: \S+ on .+ \(seq2seq_lm\)")
    monkeypatch.setattr(bad_inputs, "TRAIN_BANNER", banner)
    f = write_jsonl(work / "t.jsonl", [{"question": "what is two", "answer": "four"}, row])
    path = write_recipe(work, lm_recipe(tiny_dirs, tiny_data, model, task, train=str(f)))
    refused(work, "train", str(path), lines=[line.format(f=f)])


def long_prompts(work: Path) -> Path:
    """Eval rows whose prompt alone fills data.max_length (32): each is dropped, none is left."""
    return write_jsonl(work / "long.jsonl", [{"question": "what is " + "one plus " * 20 + "one", "answer": "two"}] * 3)


def test_eval_split_with_no_target_left(work: Path, tiny_dirs, tiny_data) -> None:
    path = write_recipe(work, lm_recipe(tiny_dirs, tiny_data, validation=str(long_prompts(work))))
    refused(
        work,
        "train",
        str(path),
        lines=[
            (
                "data.max_length: every prompt of split 'validation' fills all 32 tokens, leaving no response to "
                "evaluate (got 3 examples). Raise data.max_length."
            )
        ],
    )


def test_peft_eval_with_no_target_left(work: Path, tiny_dirs, tiny_data) -> None:
    long = long_prompts(work)
    rows = [{"question": "what is one", "answer": "two"}] * 2 + [
        {"question": "what is " + "one plus " * 20 + "one", "answer": "two"}
    ] * 2
    trimmed = write_jsonl(work / "trimmed.jsonl", list(reversed(rows)))
    path = write_recipe(work, lm_recipe(tiny_dirs, tiny_data))
    refused(
        work,
        "eval",
        str(path),
        f"data.files.validation={long}",
        lines=[
            (
                "data.max_length: every prompt of split 'validation' fills all 32 tokens, leaving no response to "
                "evaluate (got 3 examples). Raise data.max_length."
            )
        ],
    )
    refused(
        work,
        "eval",
        str(path),
        f"data.files.validation={trimmed}",
        "--max-examples",
        "2",
        lines=[
            "data.max_length: every prompt of split 'validation' fills all 32 tokens, leaving no response to "
            "evaluate (got 2 examples). " + "Raise data.max_length, or data.max_eval_examples (it keeps the first 2)."
        ],
    )


def test_training_split_of_one_token_texts(work: Path, tiny_dirs, tiny_data) -> None:
    f = write_jsonl(work / "t.jsonl", [{"text": ""}, {"text": ""}])
    recipe = lm_recipe(tiny_dirs, tiny_data, train=str(f))
    recipe["data"] |= {"columns": {"text": "text"}, "eval_split": None}
    refused(
        work,
        "train",
        str(write_recipe(work, recipe)),
        lines=[
            (
                "data.columns.text: split 'train' has no example of two tokens or more within data.max_length 32, "
                "nothing to train on (got 2 examples). Give examples with text, or raise data.max_length."
            )
        ],
    )


# -- values the schema accepted that failed later -----------------------------------------------

RECIPE = "<recipe>"
FINITE = "input should be a finite number"
VALUES = [
    (
        "beta-1",
        {"optimizer": {"betas": [1.0, 0.999]}},
        (),
        [f"{RECIPE}: optimizer.betas.0: input should be less than 1 (got 1.0)."],
    ),
    (
        "beta-negative",
        {"optimizer": {"betas": [0.9, -0.1]}},
        (),
        [f"{RECIPE}: optimizer.betas.1: input should be greater than or equal to 0 (got -0.1)."],
    ),
    ("lr-inf", {"optimizer": {"lr": math.inf}}, (), [f"{RECIPE}: optimizer.lr: {FINITE} (got inf)."]),
    (
        "weight-decay-inf",
        {"optimizer": {"weight_decay": math.inf}},
        (),
        [f"{RECIPE}: optimizer.weight_decay: {FINITE} (got inf)."],
    ),
    ("eps-inf", {"optimizer": {"eps": math.inf}}, (), [f"{RECIPE}: optimizer.eps: {FINITE} (got inf)."]),
    (
        "grad-norm-inf",
        {"train": {"max_grad_norm": math.inf}},
        (),
        [f"{RECIPE}: train.max_grad_norm: {FINITE} (got inf)."],
    ),
    ("dropout-nan", {"model": {"dropout": math.nan}}, (), [f"{RECIPE}: model.dropout: {FINITE} (got nan)."]),
    (
        "warmup-ratio-nan",
        {"schedule": {"warmup_steps": None, "warmup_ratio": math.nan}},
        (),
        [f"{RECIPE}: schedule.warmup_ratio: {FINITE} (got nan)."],
    ),
    (
        "epochs-inf-override",
        {},
        ("train.max_steps=null", "train.epochs=.inf"),
        [f"override 'train.epochs=.inf': train.epochs: {FINITE} (got inf)."],
    ),
    ("method-alpha-inf", {"method": {"alpha": math.inf}}, (), [f"{RECIPE}: method.alpha: {FINITE} (got inf)."]),
    (
        "method-alpha-override",
        {},
        ("method.alpha=inf",),
        [f"override 'method.alpha=inf': method.alpha: {FINITE} (got inf)."],
    ),
    (
        "epochs-overflow",
        {"train": {"max_steps": None, "epochs": 1e308}},
        (),
        [f"{RECIPE}: train.epochs: input should be less than or equal to 1000000 (got 1e+308)."],
    ),
    (
        "max-length-2-31",
        {"data": {"max_length": 2**31}},
        (),
        [f"{RECIPE}: data.max_length: input should be less than or equal to 2147483647 (got 2147483648)."],
    ),
    (
        "max-target-length-2-70",
        {"data": {"max_target_length": 2**70}},
        (),
        [
            (
                f"{RECIPE}: data.max_target_length: input should be less than or equal to 2147483647 (got "
                "1180591620717411303424)."
            )
        ],
    ),
    (
        "seed-negative",
        {"train": {"seed": -1}},
        (),
        [f"{RECIPE}: train.seed: input should be greater than or equal to 0 (got -1)."],
    ),
    (
        "seed-2-32",
        {"train": {"seed": 2**32}},
        (),
        [f"{RECIPE}: train.seed: input should be less than or equal to 4294967295 (got 4294967296)."],
    ),
]


@pytest.mark.parametrize(("sections", "overrides", "lines"), [c[1:] for c in VALUES], ids=[c[0] for c in VALUES])
def test_values_refused_before_training(
    sections: dict[str, Any], overrides: tuple[str, ...], lines: list[str], work: Path, tiny_dirs, tiny_data
) -> None:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS)
    for key, value in sections.items():
        recipe[key] |= value
    path = write_recipe(work, recipe)
    refused(work, "train", str(path), *overrides, lines=[line.replace(RECIPE, str(path)) for line in lines])


POSITIONS = [
    (
        "bert",
        "bert-cls",
        CLS,
        {"data": {"max_length": 129}},
        (
            "data.max_length: more than the 128 positions of {model} (max_position_embeddings in its config) (got "
            "129). Set data.max_length to 128 or less."
        ),
    ),
    (
        "gpt2",
        "gpt2-lm",
        LM,
        {"data": {"max_length": 200}},
        (
            "data.max_length: more than the 128 positions of {model} (n_positions in its config) (got 200). "
            "Set data.max_length to 128 or less."
        ),
    ),
    (
        "virtual-tokens",
        "bert-cls",
        CLS,
        {"data": {"max_length": 64}, "method": {"name": "prompt_tuning", "num_virtual_tokens": 100}},
        (
            "data.max_length: with 100 virtual tokens (method.num_virtual_tokens), more than the 128 positions of "
            "{model} (max_position_embeddings in its config) (got 64). "
            "Set data.max_length to 28 or less, or use fewer virtual tokens."
        ),
    ),
    (
        "virtual-tokens-only",
        "gpt2-lm",
        LM,
        {"method": {"name": "prefix_tuning", "num_virtual_tokens": 128}},
        (
            "method.num_virtual_tokens: as many as the 128 positions of {model} (n_positions in its config), leaving "
            "none for the text (got 128). Use fewer virtual tokens."
        ),
    ),
    (
        "bart-target",
        "bart-s2s",
        S2S,
        {"data": {"max_target_length": 129}},
        (
            "data.max_target_length: more than the 128 positions of the decoder {model} (max_position_embeddings in "
            "its config) (got 129). Set data.max_target_length to 128 or less."
        ),
    ),
]


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize(
    ("model", "task", "sections", "line"), [c[1:] for c in POSITIONS], ids=[c[0] for c in POSITIONS]
)
def test_max_length_within_the_model_positions(
    command: str, model: str, task: str, sections: dict[str, Any], line: str, work: Path, tiny_dirs, tiny_data
) -> None:
    recipe = tiny_recipe(tiny_dirs[model], tiny_data, task)
    for key, value in sections.items():
        recipe[key] = value if key == "method" else recipe[key] | value
    path = write_recipe(work, recipe)
    refused(work, command, str(path), lines=[f"{path}: {line.format(model=tiny_dirs[model])}"])


def test_relative_positions_have_no_limit(work: Path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(tiny_dirs["t5-s2s"], tiny_data, S2S)
    recipe["data"] |= {"max_length": 1024, "max_target_length": 512}
    result = CliRunner().invoke(app, ["validate", str(write_recipe(work, recipe))])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            b"task: causal_lm\n# caf\xe9 au lait\nname: x\n",
            "line 2: not UTF-8 text (got byte 0xe9 at byte offset 21). Save the recipe as UTF-8.",
        ),
        (
            "task: causal_lm\n".encode("utf-16"),
            "line 1: not UTF-8 text (got byte 0xff at byte offset 0). Save the recipe as UTF-8.",
        ),
    ],
    ids=["latin1", "utf16"],
)
def test_recipe_not_utf8(data: bytes, line: str, work: Path) -> None:
    path = work / "recipe.yaml"
    path.write_bytes(data)
    refused(work, "validate", str(path), lines=[f"{path}: {line}"])


def test_tokenizer_without_pad_or_eos(work: Path, tiny_data) -> None:
    folder = work / "model"
    tiny_model("bert-cls").save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    path = write_recipe(work, tiny_recipe(folder, tiny_data, CLS))
    refused(
        work,
        "train",
        str(path),
        lines=[
            f"model.name: the tokenizer of '{folder}' has neither a pad token nor an end-of-sequence token, and "
            "batches are padded "
            + "(got pad_token null, eos_token null). Set pad_token (or eos_token) in its tokenizer_config.json."
        ],
    )


# -- no NaN as the best eval, none in JSON -------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "values", "improved", "best"),
    [
        ("accuracy", [math.nan, 0.5, 0.7], [False, True, True], 3),  # a NaN first eval does not stay best
        ("accuracy", [0.5, math.nan, 0.4], [True, False, False], 1),
        ("loss", [math.inf, 2.0, math.nan], [False, True, False], 2),
        ("loss", [math.nan, math.nan], [False, False], None),
    ],
)
def test_a_non_finite_eval_is_never_best(
    metric: str, values: list[float], improved: list[bool], best: int | None
) -> None:
    result = TrainResult(steps=0, train_seconds=0.0, tokens=0, examples=0)
    assert [result.track_eval(step, {metric: v}, metric) for step, v in enumerate(values, 1)] == improved
    assert result.best_step == best


def test_a_finite_eval_replaces_a_non_finite_best() -> None:
    """A resumed run may carry a NaN best from before."""
    result = TrainResult(steps=0, train_seconds=0.0, tokens=0, examples=0, best_metrics={"loss": math.nan}, best_step=3)
    assert result.track_eval(6, {"loss": 5.0}, "loss") and result.best_step == 6


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_reports_write_null_for_nan(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", [{"step": 1, "loss": math.nan}])
    log({"step": 2, "eval_loss": math.inf, "eval_accuracy": [math.nan]})
    lines = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": None}, {"step": 2, "eval_loss": None, "eval_accuracy": [None]}]
    report = {
        "name": "x",
        "method": "lora",
        "model": "m",
        "task": CLS,
        "versions": {},
        "summary": {"loss": math.nan},
        "final_metrics": {"loss": math.nan},
    }
    write_report(tmp_path, report)
    assert strict_json((tmp_path / "report.json").read_text())["final_metrics"] == {"loss": None}


def test_nan_first_eval_in_a_run(work: Path, tiny_dirs, tiny_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first eval's metrics are NaN: the saved adapter is the later finite eval's, and every JSON file parses."""
    task = TASKS[CLS]
    calls: list[int] = []

    def metrics(*args: Any) -> dict[str, float]:
        calls.append(1)
        real = task.metrics(*args)
        return {k: math.nan for k in real} if len(calls) == 1 else real

    monkeypatch.setitem(TASKS, CLS, dataclasses.replace(task, metrics=metrics))
    path = write_recipe(work, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output + result.stderr
    run = work / "runs" / "tiny"
    report = strict_json((run / "report.json").read_text())
    assert report["best_step"] == 6 and len(calls) == 2
    evals = [r for r in map(strict_json, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["eval_loss"] is None for r in evals] == [True, False]


def test_qa_rows_still_train(work: Path, tiny_dirs, tiny_data) -> None:
    """The checks above leave good generative data alone (the fixture's rows, and numbers as text)."""
    rows = qa_rows(16, 9) + [{"question": 7, "answer": 8}]
    f = write_jsonl(work / "t.jsonl", rows)
    recipe = lm_recipe(tiny_dirs, tiny_data, train=str(f))
    recipe["train"] |= {"max_steps": 2, "eval_every": None}
    result = CliRunner().invoke(app, ["train", str(write_recipe(work, recipe))])
    assert result.exit_code == 0, result.output + result.stderr
