"""The GPU paths, on a CUDA GPU only (CI has none; `benchmarks/device/run.sh` runs them on a GPU
machine): `peft train` with bf16 and fp16 autocast, `peft eval` and `peft merge` of a run trained on
the GPU, that run's adapter in HF peft, torch's fused dropout kept on CUDA, and the benchmark's GPU columns."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftcli.training.speedups.dropout_masks import CheaperDropout
from tests.cli.test_cli import ROOT, peft, write_recipe
from tests.conftest import make_tokenizer, tiny_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_with_autocast_on_the_gpu(precision: str, tmp_path: Path, tiny_dirs, tiny_data) -> None:
    run_dir = tmp_path / "run"
    train = {"mixed_precision": precision, "max_steps": 24, "log_every": 1, "eval_every": 24}
    recipe = tiny_recipe(tiny_dirs["llama-lm"], tiny_data, "causal_lm", output_dir=str(run_dir), train=train)
    result = peft("train", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "report.json").read_text())["summary"]
    assert summary["device"].startswith("cuda") and summary["mixed_precision"] == precision
    assert summary["peak_memory_mb"] > 0
    losses = train_losses(run_dir)
    assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
    assert statistics.mean(losses[-6:]) < 0.8 * statistics.mean(losses[:6])
    state = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert state and all(t.dtype == torch.float32 for t in state.values())


def test_a_gpu_run_evals_merges_and_loads_in_hf_peft(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_dirs["llama-lm"], tiny_data, "causal_lm", output_dir=str(run_dir))
    assert peft("train", str(write_recipe(tmp_path, recipe))).returncode == 0
    trained = json.loads((run_dir / "report.json").read_text())["final_metrics"]["loss"]

    result = peft("eval", str(run_dir), "--out", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["merged"] is True and evaluated["metrics"]["loss"] == pytest.approx(trained, rel=1e-5)

    result = peft("merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    batch = make_tokenizer()(
        ["question : what is two and two answer :", "question : why"], padding=True, return_tensors="pt"
    )
    batch = {k: v.cuda() for k, v in batch.items()}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").cuda().eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-lm"]).cuda()
    theirs = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)


def test_dropout_on_the_gpu_stays_torchs_fused_kernel() -> None:
    x = torch.randn(64, 512, device="cuda")
    dropout = CheaperDropout(0.3).train()
    torch.manual_seed(5)
    ours = dropout(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours, F.dropout(x, 0.3, training=True), rtol=0, atol=0)


def test_benchmark_reports_gpu_memory_and_the_gpu(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "train_vs_hf.py"), "--workload", "tiny", "--steps", "6",
        "--warmup", "2", "--tools", "hf-defaults-bf16,hf-grouped-bf16", "--variant", "bf16:train.mixed_precision=bf16",
        "--markdown", str(tmp_path / "b.md"),
    ]  # fmt: skip
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    header, *rows = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert header["machine"].startswith(torch.cuda.get_device_name())
    assert [r["tool"] for r in rows] == ["hf-defaults-bf16", "hf-grouped-bf16", "peftcli bf16"]
    assert all(r["peak_gpu_mb"] > 0 and r["real_tokens_per_s"] > 0 for r in rows)
    assert "| peak GPU MB |" in (tmp_path / "b.md").read_text()
