"""A seq2seq_lm run on a tiny T5, as a user drives it: train, eval (ROUGE-L, exact match), generate, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from peftcli.commands.evaluate import run_eval
from peftcli.commands.generate import run_generate
from peftcli.commands.merge import run_merge
from peftcli.tasks.generation import Decoding
from peftcli.tasks.text_metrics import exact_match, rouge_l
from tests.cli.test_cli import peft, write_recipe
from tests.conftest import make_tokenizer, tiny_recipe


@pytest.fixture(scope="module")
def s2s_run(tmp_path_factory, tiny_dirs, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("s2s")
    recipe = tiny_recipe(tiny_dirs["t5-s2s"], tiny_data, "seq2seq_lm", output_dir=str(root / "run"))
    recipe["train"]["max_steps"] = 12
    result = peft("train", str(write_recipe(root, recipe)))
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_eval_scores_greedy_answers_with_rouge_l_and_exact_match(s2s_run: Path, tiny_data) -> None:
    report = run_eval(s2s_run, [], generate=24)
    metrics = report["metrics"]
    assert set(metrics) == {"loss", "perplexity", "rouge_l", "exact_match"}
    samples = [json.loads(line) for line in Path(report["generations"]).read_text().splitlines()]
    answers = sorted(json.loads(line)["answer"] for line in tiny_data["qa_validation"].read_text().splitlines())
    assert sorted(s["reference"] for s in samples) == answers  # every eval example, references as written
    assert metrics["exact_match"] == pytest.approx(
        sum(exact_match(s["generated"], s["reference"]) for s in samples) / 24
    )
    assert metrics["rouge_l"] == pytest.approx(sum(rouge_l(s["generated"], s["reference"]) for s in samples) / 24)
    base = run_eval(s2s_run, [], base=True)["metrics"]
    assert metrics["loss"] < base["loss"]

    # `peft generate` answers a source as the eval did.
    first = samples[0]
    assert run_generate(s2s_run, first["prompt"], None, Decoding(max_new_tokens=64), None, []) == [first["generated"]]


def test_merge_writes_a_plain_seq2seq_model_with_the_adapted_outputs(s2s_run: Path, tmp_path: Path) -> None:
    result = run_merge(s2s_run, tmp_path / "merged")
    assert result["difference"] < 1e-4
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    ids = make_tokenizer()(["question : what is one plus two answer :"], return_tensors="pt")
    reference = run_generate(
        s2s_run, "question : what is one plus two answer :", None, Decoding(max_new_tokens=8), None, []
    )
    with torch.no_grad():
        out = merged.generate(**ids, max_new_tokens=8, do_sample=False)
    assert make_tokenizer().decode(out[0], skip_special_tokens=True) == reference[0]


def test_dry_run_counts_source_and_target_tokens_apart(s2s_run: Path, tiny_data) -> None:
    from peftcli.commands.dry_run import run_dry_run

    counts = run_dry_run(s2s_run / "recipe.yaml", [])
    tokenizer = make_tokenizer()
    answers = [json.loads(line)["answer"] for line in tiny_data["qa_train"].read_text().splitlines()]
    assert counts["train"]["target_tokens"] == sum(
        len(tokenizer(a)["input_ids"]) + 1 for a in answers
    )  # + the end token
