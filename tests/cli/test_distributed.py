"""Several processes: real 2-process DDP training on CPUs (gloo) through `accelerate launch`, equal to
one process accumulating the same global batch; only the main process writes; resume with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftcli.data.batching import eval_loader
from peftcli.errors import CheckpointError
from peftcli.training.run import run_train
from tests.cli.test_cli import ROOT, peft
from tests.conftest import tiny_recipe, write_jsonl

# 33 eval examples in batches of 8: the two processes get 3 and 2 batches (17 and 16 examples), so
# a gather that padded the shorter share with repeated examples would count some twice.
TRAIN = {
    "batch_size": 4,
    "eval_batch_size": 8,
    "max_steps": 12,
    "eval_every": 6,
    "save_every": 6,
    "log_every": 1,
    "seed": 0,
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_dirs, tiny_data) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    data = dict(tiny_data) | {
        "sentiment_validation": write_jsonl(
            tmp / "val.jsonl",
            [json.loads(x) for x in tiny_data["sentiment_validation"].read_text().splitlines()]
            + [{"text": "good film good", "label": "positive"}],
        )
    }
    r = tiny_recipe(tiny_dirs["bert-cls"], data, "sequence_classification", train=TRAIN, output_dir=str(tmp / "unused"))
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "cpu-ddp.yaml"),
        "-m",
        "peftcli",
        "train",
        *args,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(recipe: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    # One process accumulating 2 micro-batches of 4 = two processes with one micro-batch of 4 each.
    run_train(recipe, [f"output_dir={one}", "train.grad_accum=2"])
    result = launch(str(recipe), f"output_dir={two}", "train.grad_accum=1")
    assert result.returncode == 0, result.stderr

    ours, theirs = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (two, one))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].numel() > 0
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r2["summary"]["num_processes"] == 2 and r1["summary"]["num_processes"] == 1
    assert (r2["summary"]["examples"], r2["summary"]["tokens"]) == (r1["summary"]["examples"], r1["summary"]["tokens"])
    assert r2["final_metrics"]["accuracy"] == r1["final_metrics"]["accuracy"]
    assert r2["final_metrics"]["loss"] == pytest.approx(r1["final_metrics"]["loss"], rel=1e-5)
    # Only the main process wrote: one log line per step and eval, no duplicates.
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in lines if "eval_loss" in r] == [6, 12]
    # Each process saved its own generators into the one checkpoint.
    assert {p.name for p in (two / "checkpoints" / "step-6").glob("rng-*")} == {
        "rng-0.json",
        "rng-0.safetensors",
        "rng-1.json",
        "rng-1.safetensors",
    }
    assert result.stderr.count("done in") == 1  # one process reports


# Three multi-process runs (25 s on 2 cores): `heavy`, so .ci/run runs it after the default run.
@pytest.mark.heavy
def test_resume_with_two_processes_gives_the_same_bytes_and_refuses_one(recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert peft("train", str(recipe), f"output_dir={run}", "--num-processes", "2").returncode == 0
    finished = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    # Back to the step-6 checkpoint (mid-run: the schedule and both processes' data order carry on).
    resumed = peft(
        "train",
        str(recipe),
        f"output_dir={run}",
        "--num-processes",
        "2",
        "--resume",
        str(run / "checkpoints" / "step-6"),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == finished

    with pytest.raises(CheckpointError) as exc:
        run_train(recipe, [f"output_dir={run}"], resume="latest")
    assert exc.value.lines == [
        (
            f"{run / 'checkpoints' / 'step-6'}: written by 2 processes, resumed with 1. "
            "Resume with 2 processes (the data order and generators are per process)."
        )
    ]


def test_eval_shares_hold_every_example_once(tokenizer) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * (i % 7 + 1) for i in range(33)], "labels": list(range(33))})
    seen = []
    for rank in range(3):
        for batch in eval_loader(ds, 0, 4, rank, 3):
            seen += batch["labels"].tolist()
    assert sorted(seen) == list(range(33))


def test_an_adapter_read_while_sharded_is_refused(tmp_path: Path) -> None:
    """What ZeRO-3 or FSDP hands out for a parameter outside a gather: an empty or flat tensor."""
    from peftcli.adapter_io import check_whole

    shapes = {"base_model.model.layer.lora_A.weight": (4, 8), "base_model.model.layer.lora_B.weight": (8, 4)}
    check_whole({"base_model.model.layer.lora_A.weight": torch.ones(4, 8)}, shapes)
    for sharded in (torch.zeros(0), torch.ones(16)):
        with pytest.raises(CheckpointError) as exc:
            check_whole({"base_model.model.layer.lora_A.weight": sharded}, shapes)
        assert exc.value.lines == [
            (
                f"adapter tensor base_model.model.layer.lora_A.weight has shape {tuple(sharded.shape)} instead of "
                "(4, 8), so nothing was saved. It was read while its parameter was sharded; "
                "this is a peftcli bug, please report it "
                "with your launch config."
            )
        ]


def test_fsdp2_sharded_adapter_is_saved_whole_inside_full_parameters(tmp_path: Path) -> None:
    """accelerate runs FSDP on GPUs only; torch's FSDP2 shards on CPUs too, so the gather that
    peftcli saves under is checked here with 2 real processes."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "cli" / "fsdp2_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(tmp_path / "inside" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "reference.safetensors")
    assert saved.keys() == reference.keys() and len(saved) > 0
    for key in reference:
        assert saved[key].shape == reference[key].shape and saved[key].numel() > 0
        torch.testing.assert_close(saved[key], reference[key], rtol=1e-5, atol=1e-6)
    # Read while sharded, the same tensors are slices: saving them is refused, nothing written.
    assert (tmp_path / "outside.txt").read_text() != "saved"
    assert not (tmp_path / "outside").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_engines_that_need_gpus_and_bf16_without_support_are_refused_on_cpu(monkeypatch) -> None:
    from peftcli.config.schema import TrainSpec
    from peftcli.errors import PeftcliError
    from peftcli.training.accelerator import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(PeftcliError) as exc:
        make_accelerator(TrainSpec())
    assert exc.value.lines == [
        (
            "accelerate launch: configs/fsdp.yaml shards the model across GPUs and none is visible (got "
            "ACCELERATE_USE_FSDP=true). On CPUs use configs/cpu-ddp.yaml or --num-processes N."
        )
    ]
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(PeftcliError) as exc:
        make_accelerator(TrainSpec(mixed_precision="bf16"))
    assert exc.value.lines == [
        (
            "train.mixed_precision: this CPU has no bfloat16 support and no CUDA GPU is visible (got 'bf16'). "
            "Use auto or no."
        )
    ]


def test_two_process_ddp_evaluates_when_one_process_has_no_eval_batch(recipe: Path, tmp_path: Path) -> None:
    """33 eval examples in one batch of 64: process 1 has none. DDP's forward broadcasts buffers, a
    collective the other process never joined: evals run on the unwrapped model, and the run ends."""
    run = tmp_path / "run"
    result = launch(
        str(recipe), f"output_dir={run}", "train.eval_batch_size=64", "train.max_steps=6", "train.save_every=null"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    run_train(
        recipe,
        [
            f"output_dir={one}",
            "train.eval_batch_size=64",
            "train.max_steps=6",
            "train.save_every=null",
            "train.grad_accum=2",
        ],
    )
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, run))
    assert r2["final_metrics"]["loss"] == pytest.approx(r1["final_metrics"]["loss"], rel=1e-5)
