"""The GPU-readiness checks of the accelerator paths, on a CUDA GPU only (CI has none; `bash
benchmarks/device/run.sh tests` runs them on a GPU machine): fp16 autocast over fp16 base weights on a
classifier, FSDP2 through accelerate with evals and bf16 (and AdaLoRA refused there), `peft compare`
starting CUDA in its runs' processes, TF32 on and off, and the host syncs a training step costs. The
CPU stand-ins of the same paths are in tests/cli/test_gpu_paths.py. Numbers worth keeping go to
$OUT/gpu-readiness.json when OUT is set (the device tool brings that folder back)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.test_cli import ROOT, peft, write_recipe
from tests.conftest import tiny_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CLS = "sequence_classification"


def record(key: str, value: Any) -> None:
    """Keeps a measured number beside the test log (device runs bring $OUT back)."""
    if "OUT" not in os.environ:
        return
    path = Path(os.environ["OUT"]) / "gpu-readiness.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | {key: value}, indent=1))


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def train(tmp_path: Path, recipe: dict[str, Any], *launch: str) -> subprocess.CompletedProcess[str]:
    path = write_recipe(tmp_path, recipe)
    if not launch:
        return peft("train", str(path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "peftcli", "train", str(path)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("method", ["lora", "bitfit", "full"])
def test_fp16_base_weights_with_fp16_autocast_train_a_classifier(method, tmp_path, tiny_dirs, tiny_data) -> None:
    """The head, BitFit's biases and full FT's weights are fp16 as loaded; the run keeps fp32 masters,
    the grad scaler unscales fp32 gradients, and the saved adapter is fp32."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_dirs["bert-cls"], tiny_data, CLS, output_dir=str(run_dir), model={"dtype": "float16"},
        train={"mixed_precision": "fp16", "max_steps": 24, "log_every": 1, "eval_every": 12},
    )  # fmt: skip
    recipe["method"] = {"name": method}
    result = train(tmp_path, recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    found = losses(run_dir)
    assert statistics.mean(found[-6:]) < statistics.mean(found[:6])
    state = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert state and all(t.dtype == torch.float32 for t in state.values())


def test_fsdp2_on_one_gpu_with_evals_and_bf16_and_adalora_refused(tmp_path, tiny_dirs, tiny_data) -> None:
    launch = ("--config_file", str(ROOT / "configs" / "fsdp.yaml"), "--num_processes", "1")
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_dirs["llama-lm"], tiny_data, "causal_lm", output_dir=str(run_dir),
        train={"mixed_precision": "bf16", "max_steps": 12, "eval_every": 4, "save_every": 6, "log_every": 1},
    )  # fmt: skip
    result = train(tmp_path, recipe, *launch)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["summary"]["mixed_precision"] == "bf16" and report["summary"]["device"].startswith("cuda")
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [4, 8, 12]
    for folder in (run_dir / "adapter", run_dir / "checkpoints" / "step-6"):
        state = load_file(folder / "adapter_model.safetensors")
        assert state and all(t.dtype == torch.float32 and t.numel() > 0 for t in state.values())

    recipe["method"] = {"name": "adalora", "init_r": 4, "target_r": 2}
    recipe["output_dir"] = str(tmp_path / "adalora")
    refused = train(tmp_path, recipe, *launch)
    assert refused.returncode == 2
    assert "error: method.name: adalora cannot train under FSDP:" in refused.stderr


def test_compare_starts_cuda_in_each_runs_process(tmp_path, tiny_dirs, tiny_data) -> None:
    paths = []
    for name in ("one", "two"):
        recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS, name=name, train={"max_steps": 6})
        folder = tmp_path / name
        folder.mkdir()
        paths.append(str(write_recipe(folder, recipe)))
    result = peft("compare", *paths, "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["trained", "trained"]
    for name in ("one", "two"):
        summary = json.loads((tmp_path / "cmp" / name / "report.json").read_text())["summary"]
        assert summary["device"].startswith("cuda")


def test_tf32_on_and_off(tmp_path, tiny_dirs, tiny_data) -> None:
    measured = {}
    for tf32 in (True, False):
        run_dir = tmp_path / f"tf32-{tf32}"
        recipe = tiny_recipe(
            tiny_dirs["llama-lm"], tiny_data, "causal_lm", output_dir=str(run_dir),
            train={"mixed_precision": "no", "tf32": tf32, "max_steps": 20, "log_every": 1, "eval_every": 20},
        )  # fmt: skip
        result = train(tmp_path, recipe)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((run_dir / "report.json").read_text())
        assert report["summary"]["tf32"] is tf32
        measured[tf32] = (report["summary"]["tokens_per_s"], report["final_metrics"]["loss"])
    record("tf32", {"on": measured[True], "off": measured[False]})
    assert measured[True][1] == pytest.approx(measured[False][1], rel=2e-2)


def test_a_training_step_syncs_the_host_a_fixed_number_of_times(tiny_dirs, tiny_data, tokenizer) -> None:
    """torch's sync debug mode warns at each synchronizing CUDA call: a step must not sync once per
    micro-batch (counts, boolean masks, .item()), so 4 micro-batches cost what 1 does."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
    from peftcli.data.batching import train_loader
    from peftcli.methods import METHODS
    from peftcli.tasks.registry import TASKS
    from peftcli.training.loop import train as train_loop
    from tests.helpers import adapt, data_spec

    counts = {}
    for accum in (1, 4):
        AcceleratorState._reset_state()
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-lm"])
        adapt(model, METHODS["lora"], "causal_lm")
        from peftcli.data.prepare import prepare_data

        prepared = prepare_data(data_spec("causal_lm", tiny_data), "causal_lm", tokenizer)
        spec = TrainSpec(batch_size=2, grad_accum=accum, max_steps=6, log_every=100, seed=0, mixed_precision="no")
        loader = train_loader(prepared.train, tokenizer.pad_token_id, 2, accum, True, 0)
        optim, schedule = OptimizerSpec(lr=1e-3), ScheduleSpec(name="constant", warmup_steps=0)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_loop(
                    model=model,
                    task=TASKS["causal_lm"],
                    train_data=loader,
                    eval_data=None,
                    spec=spec,
                    optim=optim,
                    schedule=schedule,
                    accelerator=Accelerator(),
                )
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts[accum] = sum("synchronizing" in str(w.message) for w in caught) / 6
    record("host_syncs_per_step", {"grad_accum_1": counts[1], "grad_accum_4": counts[4]})
    assert counts[4] <= counts[1] + 1  # no sync per micro-batch
