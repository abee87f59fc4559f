"""`peft eval`, `peft merge` and `peft inspect` on tiny runs, on HF peft's adapters, and on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from peftcli.commands.merge import run_merge
from peftcli.errors import PeftcliError
from peftcli.methods import BY_PEFT_TYPE
from tests.cli.test_cli import ROOT, files_under, peft, write_recipe
from tests.conftest import make_tokenizer, tiny_recipe
from tests.helpers import randomize_trainable

BATCH_TEXTS = ["good film good", "bad book bad", "the story was quite fun"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tiny_dirs, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("cls")
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(root / "run"))
    recipe["train"]["eval_every"] = None  # one eval, at the end: the saved adapter is the final one
    result = peft("train", str(write_recipe(root, recipe)))
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_dirs, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("lm")
    result = peft(
        "train",
        str(
            write_recipe(root, tiny_recipe(tiny_dirs["gpt2-lm"], tiny_data, "causal_lm", output_dir=str(root / "run")))
        ),
    )
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_eval_reproduces_the_training_eval(cls_run: Path) -> None:
    result = peft("eval", str(cls_run))
    assert result.returncode == 0, result.stderr
    report = json.loads((cls_run / "eval.json").read_text())
    trained = json.loads((cls_run / "report.json").read_text())["final_metrics"]
    assert report["merged"] is True  # LoRA on float32 weights: evaluated folded in, as the training eval did not
    assert report["metrics"] == pytest.approx(trained, rel=1e-6)
    classes = report["classes"]
    assert classes["labels"] == ["negative", "positive"]
    assert sum(map(sum, classes["confusion_matrix"])) == report["examples"] == 32
    correct = sum(classes["confusion_matrix"][i][i] for i in range(2))
    assert correct / 32 == pytest.approx(report["metrics"]["accuracy"])


def test_eval_keeps_the_adapter_apart_from_16_bit_weights(cls_run: Path, tmp_path: Path) -> None:
    """Folding a small update into bfloat16 weights would round most of it away."""
    out = tmp_path / "bf16.json"
    result = peft("eval", str(cls_run), "model.dtype=bfloat16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    trained = json.loads((cls_run / "report.json").read_text())["final_metrics"]
    assert report["merged"] is False
    assert report["metrics"]["loss"] == pytest.approx(trained["loss"], rel=2e-2)


def test_eval_benchmark_gives_the_same_metrics_merged_and_apart(cls_run: Path) -> None:
    script = ROOT / "benchmarks" / "eval_merged.py"
    result = subprocess.run(
        [sys.executable, str(script), str(cls_run), "--repeat", "1"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    apart, merged, summary = (json.loads(line) for line in result.stdout.splitlines())
    assert (apart["adapter"], merged["adapter"]) == ("apart", "merged")
    assert merged["metrics"] == pytest.approx(apart["metrics"], rel=1e-6)
    assert summary["merged_vs_apart"] > 0


def test_eval_base_model_and_other_split(cls_run: Path, tiny_data, tmp_path: Path) -> None:
    out = tmp_path / "base.json"
    result = peft("eval", str(cls_run), "--base", "--out", str(out), "--max-examples", "10")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["adapter"] is None and report["examples"] == 10 and report["merged"] is False
    other = peft(
        "eval",
        str(cls_run),
        "--split",
        "extra",
        f"data.files.extra={tiny_data['sentiment_train']}",
        "--out",
        str(tmp_path / "train.json"),
    )
    assert other.returncode == 0, other.stderr
    assert json.loads((tmp_path / "train.json").read_text())["examples"] == 96


def test_eval_causal_lm_with_generations(lm_run: Path) -> None:
    result = peft("eval", str(lm_run), "--generate", "2", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads((lm_run / "eval.json").read_text())
    assert set(report["metrics"]) == {"loss", "perplexity"}
    assert report["metrics"]["loss"] == pytest.approx(
        json.loads((lm_run / "report.json").read_text())["final_metrics"]["loss"], rel=1e-6
    )
    lines = [json.loads(line) for line in (lm_run / "eval-generations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["prompt"].startswith("question :") for line in lines)


def test_merge_writes_a_standalone_model_with_equal_logits(cls_run: Path, tiny_dirs, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = peft("merge", str(cls_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "largest logit difference" in result.stderr
    assert files_under(out) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    }
    batch = dict(make_tokenizer()(BATCH_TEXTS, padding=True, return_tensors="pt"))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers
    adapted = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert-cls"], num_labels=2), cls_run / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-5, atol=1e-5)
    assert merged.config.id2label == {0: "negative", 1: "positive"}


def test_merge_to_bfloat16_and_causal_lm(lm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = peft("merge", str(lm_run), "--out", str(out), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "after casting to bfloat16" in result.stderr
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert "generation_config.json" in files_under(out)
    AutoModelForCausalLM.from_pretrained(out)


def test_hf_peft_adapter_evals_and_merges_like_hf_peft(tiny_dirs, tiny_data, tmp_path: Path) -> None:
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert-cls"], num_labels=2)
    theirs = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    randomize_trainable(theirs, seed=5)
    theirs.save_pretrained(tmp_path / "hf-adapter")  # base_model_name_or_path = the tiny folder
    result = peft("merge", str(tmp_path / "hf-adapter"), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    batch = dict(make_tokenizer()(BATCH_TEXTS, padding=True, return_tensors="pt"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, theirs.eval()(**batch).logits, rtol=1e-5, atol=1e-5)

    ev = peft(
        "eval",
        str(tmp_path / "hf-adapter"),
        "--out",
        str(tmp_path / "eval.json"),
        f"data.files.validation={tiny_data['sentiment_validation']}",
        "data.columns.text=text",
        "data.columns.label=label",
        "--labels",
        "negative,positive",
    )
    assert ev.returncode == 0, ev.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    rows = [json.loads(line) for line in tiny_data["sentiment_validation"].read_text().splitlines()]
    with torch.no_grad():
        enc = dict(make_tokenizer()([r["text"] for r in rows], padding=True, return_tensors="pt"))
        predicted = theirs(**enc).logits.argmax(-1).tolist()
    expected = sum(p == ["negative", "positive"].index(r["label"]) for p, r in zip(predicted, rows)) / len(rows)
    assert report["metrics"]["accuracy"] == pytest.approx(expected)

    # Without --labels the string labels cannot be mapped onto the head's ids.
    bad = peft(
        "eval",
        str(tmp_path / "hf-adapter"),
        f"data.files.validation={tiny_data['sentiment_validation']}",
        "data.columns.text=text",
        "data.columns.label=label",
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: data.columns.label: label 'positive' in split 'validation' is not one of the adapter's labels "
        "(adapter/labels.json, or --labels) (0, 1). Fix the data or the label column."
    )


def test_inspect_counts_equal_hf_peft(tiny_dirs, tiny_data, tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tiny_dirs["llama-lm"],
        tiny_data,
        "causal_lm",
        method={"name": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    )
    from peftcli.commands.inspection import run_inspect

    info = run_inspect(write_recipe(tmp_path, recipe), [])
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-lm"]),
        LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    assert (info["trainable_parameters"], info["total_parameters"]) == model.get_nb_trainable_parameters()
    assert info["adapted_modules"] == 6


def test_inspect_run_and_modules(cls_run: Path) -> None:
    result = peft("inspect", str(cls_run))
    assert result.returncode == 0, result.stderr
    assert "trainable parameters:" in result.stdout and "adapter size:" in result.stdout
    modules = peft("inspect", str(cls_run), "--modules")
    assert modules.returncode == 0 and "attention.self.query" in modules.stdout


# -- bad input: one line, exit code 2, nothing written --------------------------------------------


@pytest.mark.parametrize("command", ["eval", "merge", "inspect"])
def test_missing_target(command: str, tmp_path: Path) -> None:
    args = [command, str(tmp_path / "nothere")] + (["--out", str(tmp_path / "out")] if command == "merge" else [])
    result = peft(*args)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'nothere'}: not found. Give a run directory, an adapter folder or a recipe file."
    )
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_model(cls_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    cfg = BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertForSequenceClassification(cfg).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    result = peft("merge", str(cls_run), "--out", str(tmp_path / "out"), f"model.name={other}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {cls_run / 'adapter' / 'adapter_model.safetensors'}: ")
    assert "Was the adapter trained on another base model?" in line
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors(cls_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "run"
    shutil.copytree(cls_run, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (broken / "eval.json").unlink(missing_ok=True)
    result = peft("eval", str(broken))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {weights}: cannot read the safetensors file (")
    assert line.endswith("It is corrupt or truncated; re-save the adapter.")
    assert not (broken / "eval.json").exists()


def test_unknown_peft_type(cls_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "run"
    shutil.copytree(cls_run, broken)
    config = broken / "adapter" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"peft_type": "VERA"}))
    result = peft("inspect", str(broken))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {config}: peft_type 'VERA' is not supported (supported: {', '.join(sorted(BY_PEFT_TYPE))})."
    )


def test_non_mergeable_method_is_refused(cls_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from peftcli.methods import lora

    unmergeable = replace(lora.METHOD, merge=None, name="prompt_like")
    monkeypatch.setitem(BY_PEFT_TYPE, "LORA", unmergeable)
    with pytest.raises(PeftcliError) as info:
        run_merge(cls_run, tmp_path / "out")
    assert str(info.value) == (
        f"{cls_run / 'adapter'}: prompt_like adds a learned update to existing weights and cannot be merged into the "
        "weights. Use the adapter as it is: `peft eval`, or HF peft's PeftModel.from_pretrained."
    )
    assert not (tmp_path / "out").exists()


def test_merge_refuses_existing_output(cls_run: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    result = peft("merge", str(cls_run), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'out'}: already exists. Pass --overwrite to replace it, or choose another --out."
    )


def test_merge_rejects_unknown_dtype(cls_run: Path, tmp_path: Path) -> None:
    result = peft("merge", str(cls_run), "--out", str(tmp_path / "out"), "--dtype", "fp8")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --dtype: unknown dtype (got 'fp8'). Use float32, bfloat16 or float16."
