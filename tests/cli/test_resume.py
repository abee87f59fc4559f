"""Resume and faults: a run stopped anywhere (a crash mid-window, Ctrl-C, SIGTERM, kill -9) and resumed
ends with exactly the bytes of an uninterrupted run, and a kill never leaves a broken checkpoint.

The crash tests run `run_train` in this process and make the forward pass raise at a chosen
micro-batch (what a dying process looks like to the files: nothing after that point is written). The
signal and kill tests run `peft train` in a subprocess and signal it for real.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import peftcli.training.loop
from peftcli.adapter_io import read_state
from peftcli.errors import CheckpointError, TrainingDiverged
from peftcli.methods import METHODS
from peftcli.methods.base import TrainingHooks
from peftcli.training.checkpoints import checkpoint_steps, read_loop_state
from peftcli.training.run import run_train
from tests.cli.test_cli import ROOT, peft
from tests.conftest import tiny_recipe

# 96 training rows, 4 x 2 per step: 12 steps an epoch; 30 steps run through two and a half epochs.
# LoRA dropout makes every step draw random numbers, so a resume that restored the generators wrongly
# would give other bytes.
TRAIN = {
    "batch_size": 4,
    "grad_accum": 2,
    "max_steps": 30,
    "save_every": 5,
    "save_total_limit": 3,
    "eval_every": 4,
    "log_every": 1,
    "seed": 3,
}
METHOD = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}


def recipe_file(
    tmp_path: Path, tiny_dirs, tiny_data, name: str, task: str = "sequence_classification", **train: Any
) -> Path:
    model = tiny_dirs["bert-cls" if task == "sequence_classification" else "llama-lm"]
    recipe = tiny_recipe(model, tiny_data, task, method=METHOD, train=TRAIN | train, output_dir=str(tmp_path / name))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def outcome(run_dir: Path) -> dict[str, Any]:
    """What must not depend on interruptions: the adapter's bytes, the evals and the losses logged."""
    report = json.loads((run_dir / "report.json").read_text())
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = {"tokens_per_s", "examples_per_s"}
    return {
        "adapter": (run_dir / "adapter" / "adapter_model.safetensors").read_bytes(),
        "config": json.loads((run_dir / "adapter" / "adapter_config.json").read_text()),
        "best": (report["best_step"], report["best_metrics"]),
        "final": report["final_metrics"],
        "steps": report["summary"]["steps"],
        "log": [{k: v for k, v in r.items() if k not in timing} for r in log],
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dirs, tiny_data) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_train(recipe_file(tmp, tiny_dirs, tiny_data, "run"), [])
    return outcome(tmp / "run")


def crash_at(monkeypatch, micro_batch: int) -> None:
    """The forward pass of training micro-batch number `micro_batch` (counting from 1) raises."""
    calls = {"n": 0}
    real = peftcli.training.loop.train_step

    def counting_step(*, window, **rest):
        for i in range(len(window)):
            calls["n"] += 1
            if calls["n"] == micro_batch:
                window = window[:i]  # the micro-batches before the crash ran...
                raise RuntimeError("simulated crash")  # ...and the process died in this one
        return real(window=window, **rest)

    monkeypatch.setattr(peftcli.training.loop, "train_step", counting_step)


def test_crash_mid_window_and_mid_epoch_then_resume_gives_the_same_bytes(
    tmp_path, tiny_dirs, tiny_data, monkeypatch, uninterrupted
) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run")
    # Step 14 is the second step of epoch two; micro-batch 28 is the second half of its window.
    with monkeypatch.context() as m:
        crash_at(m, 28)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(recipe, [])
    assert [p.name for p in checkpoint_steps(tmp_path / "run")] == ["step-5", "step-10"]
    assert not (tmp_path / "run" / "adapter").exists()
    # Resumed from step 10 (mid-epoch), it crashes again in step 27, mid-window, in epoch three.
    with monkeypatch.context() as m:
        crash_at(m, 2 * (27 - 10))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(recipe, [], resume="latest")
    assert [p.name for p in checkpoint_steps(tmp_path / "run")] == ["step-15", "step-20", "step-25"]
    run_train(recipe, [], resume="latest")
    assert outcome(tmp_path / "run") == uninterrupted


def test_resume_from_a_named_checkpoint(tmp_path, tiny_dirs, tiny_data, uninterrupted) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", save_total_limit=10)
    run_train(recipe, [])
    # Going back to step 15 of a finished run repeats steps 16-30 identically.
    run_train(recipe, [], resume=str(tmp_path / "run" / "checkpoints" / "step-15"))
    assert outcome(tmp_path / "run") == uninterrupted


def test_resume_refuses_a_changed_recipe_and_a_run_without_checkpoints(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=3, save_every=None)
    run_train(recipe, [])
    with pytest.raises(CheckpointError) as exc:
        run_train(recipe, [], resume="latest")
    assert exc.value.lines == [
        (
            f"--resume: {tmp_path / 'run'} has no step checkpoint to resume from (none in "
            f"{tmp_path / 'run' / 'checkpoints'}). Set train.save_every, or stop a run with Ctrl-C: "
            "it saves one on the way out."
        )
    ]
    with pytest.raises(CheckpointError) as exc:
        run_train(recipe, ["optimizer.lr=0.5", "method.rank=2"], resume="latest")
    assert exc.value.lines == [
        (
            f"--resume: the recipe differs from the one {tmp_path / 'run'} was started with, in method.rank, "
            "optimizer.lr. Resume with the same recipe and overrides (the run's own copy is "
            f"{tmp_path / 'run' / 'recipe.yaml'})."
        )
    ]


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, tiny_dirs, tiny_data, monkeypatch) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run")
    real = peftcli.training.loop.train_step

    def nan_at_steps_7_and_12(**kwargs):
        loss, tokens, examples = real(**kwargs)
        return (float("nan") if kwargs["step"] in (7, 12) else loss), tokens, examples

    monkeypatch.setattr(peftcli.training.loop, "train_step", nan_at_steps_7_and_12)
    with pytest.raises(TrainingDiverged) as exc:
        run_train(recipe, [])
    assert exc.value.exit_code == 1
    assert exc.value.lines == [
        (
            "train: the loss or its gradient became nan at step 7; the last good checkpoint is "
            f"{tmp_path / 'run' / 'checkpoints' / 'step-5'}. Lower optimizer.lr, set train.max_grad_norm, or let a "
            "few bad steps pass with train.skip_nonfinite_steps."
        )
    ]
    assert [p.name for p in checkpoint_steps(tmp_path / "run")] == ["step-5"]
    # With two bad steps allowed, the run skips both and finishes.
    run_train(recipe, ["train.skip_nonfinite_steps=2"], overwrite=True)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["summary"]["steps"] == 30


def test_nonfinite_gradient_step_changes_nothing(tmp_path, tiny_dirs, tiny_data) -> None:
    """A skipped step leaves the weights and the optimizer as they were."""
    import torch

    from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
    from peftcli.tasks.registry import TASKS
    from peftcli.training.accelerator import make_accelerator
    from peftcli.training.loop import train_step
    from peftcli.training.optim import make_optimizer, make_scheduler
    from tests.conftest import make_tokenizer, tiny_model
    from tests.helpers import adapt

    model = tiny_model("bert-cls")
    adapt(model, METHODS["lora"], "sequence_classification")
    spec = TrainSpec(batch_size=2, mixed_precision="no")
    accelerator = make_accelerator(spec)
    optimizer = make_optimizer(model, OptimizerSpec(lr=0.1))
    scheduler = make_scheduler(optimizer, ScheduleSpec(name="constant", warmup_steps=0), 10)
    batch = dict(make_tokenizer()(["good film", "bad film"], return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([0, 1])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.register_hook(lambda g: g * float("inf"))
    loss, _, _ = train_step(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        window=[batch],
        task=TASKS["sequence_classification"],
        accelerator=accelerator,
        spec=spec,
        method_hooks=TrainingHooks(),
        step=1,
    )
    assert not math.isfinite(loss)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert optimizer.state_dict()["state"] == {}


# -- real signals, in a subprocess ---------------------------------------------------------------


def start(recipe: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "peftcli", "train", str(recipe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def resume(recipe: Path) -> subprocess.CompletedProcess[str]:
    return peft("train", str(recipe), "--resume")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str]) -> bool:
    """True once the run has logged `step`; False if it ended first."""
    log = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        complete = log.read_text().split("\n")[:-1] if log.is_file() else []  # a line being written has no newline yet
        if any(json.loads(line)["step"] >= step for line in complete if line.strip()):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_finishes_identically(
    sig, tmp_path, tiny_dirs, tiny_data, uninterrupted
) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run")
    proc = start(recipe)
    assert wait_for_step(tmp_path / "run", 7, proc), proc.communicate()[1]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    step = max(int(p.name.split("-")[1]) for p in checkpoint_steps(tmp_path / "run"))
    assert step < 30  # it stopped early, at a step boundary, and saved that step
    assert stderr.splitlines()[-1] == (
        f"stopped: {sig.name} at step {step}: saved {tmp_path / 'run' / 'checkpoints' / f'step-{step}'}. "
        f"Resume with: peft train {recipe} --resume"
    )
    resumed = resume(recipe)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / f'step-{step}'} (step {step})" in resumed.stderr
    assert outcome(tmp_path / "run") == uninterrupted


def test_kill_9_at_random_moments_never_breaks_a_checkpoint(tmp_path, tiny_dirs, tiny_data, uninterrupted) -> None:
    """Saving every step; every other kill lands the moment a checkpoint's temporary folder appears
    (inside a save), the others at random moments. After each kill every step-N folder is complete
    and loadable, and the run finally resumes to the uninterrupted bytes."""
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", save_every=1, save_total_limit=2)
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    kills = mid_save = 0

    def carry_on() -> list[str]:  # a kill inside the very first save leaves nothing to resume from
        return ["--resume"] if checkpoint_steps(run_dir) else ["--overwrite"]

    for attempt in range(4):
        latest = max((int(p.name.split("-")[1]) for p in checkpoint_steps(run_dir)), default=0)
        proc = start(recipe, *carry_on())
        if not wait_for_step(run_dir, latest + 1, proc):
            break  # it finished first
        if attempt % 2:  # at a random moment
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # the moment a checkpoint's temporary folder appears: inside a save
            while proc.poll() is None and not any((run_dir / "checkpoints").glob(".step-*.tmp")):
                pass
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += any((run_dir / "checkpoints").glob(".step-*.tmp"))  # killed while writing one
        for folder in checkpoint_steps(run_dir):
            state = read_loop_state(folder, 0, 1)
            assert f"step-{state.step}" == folder.name
            assert read_state(folder / "adapter_model.safetensors")
    assert kills >= 2
    print(f"{kills} kills, {mid_save} of them while a checkpoint was being written")
    finish = start(recipe, *carry_on())
    _, stderr = finish.communicate(timeout=300)
    assert finish.returncode == 0, stderr
    assert outcome(run_dir) == uninterrupted


def test_overwrite_never_deletes_the_recipe_or_the_working_folder(tmp_path, tiny_dirs, tiny_data) -> None:
    from peftcli.errors import PeftcliError

    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PeftcliError) as exc:
        run_train(recipe, [f"output_dir={tmp_path}"], overwrite=True)
    assert exc.value.lines == [
        f"{tmp_path}: --overwrite would delete the recipe ({recipe}), which is inside it. Choose another output_dir."
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# Method settings that make a 12-step run exercise the method's own training state: AdaLoRA's budget
# falls from 8 ranks a layer to 1 between steps 1 and 11, so the resume at step 5 needs its importance
# averages and rank pattern (without restoring them this test fails).
METHOD_SETTINGS = {"adalora": {"init_r": 8, "target_r": 1, "tinit": 1, "tfinal": 1, "delta_t": 2}}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_resumes_to_the_same_bytes(method: str, tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(tmp_path / "run"))
    recipe["method"] = {"name": method} | METHOD_SETTINGS.get(method, {})
    recipe["train"] = {
        "batch_size": 8,
        "max_steps": 12,
        "save_every": 5,
        "eval_every": 4,
        "log_every": 1,
        "seed": 0,
        "mixed_precision": "no",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_train(path, [])
    finished = outcome(tmp_path / "run")
    run_train(path, [], resume=str(tmp_path / "run" / "checkpoints" / "step-5"))
    assert outcome(tmp_path / "run") == finished


def test_broken_checkpoints_are_refused_with_one_line(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=6, eval_every=None, save_every=3)
    run_train(recipe, [])
    step = tmp_path / "run" / "checkpoints" / "step-3"

    def refused(resume: str) -> list[str]:
        with pytest.raises(CheckpointError) as exc:
            run_train(recipe, [], resume=resume)
        return exc.value.lines

    assert refused(str(tmp_path / "nope")) == [
        (
            f"--resume {tmp_path / 'nope'}: no such checkpoint folder. Give a run's checkpoints/step-N folder, or "
            "--resume alone for the latest."
        )
    ]
    (step / "rng-0.json").unlink()
    assert refused(str(step)) == [f"{step}: no rng-0.json; the checkpoint is incomplete. Resume from an earlier one."]
    (step / "training_state.json").write_text("{not json")
    assert refused(str(step)) == [
        (
            f"{step / 'training_state.json'}: not valid JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)). The checkpoint is corrupt; resume from an earlier one."
        )
    ]
    (step / "training_state.json").write_text('{"format": 99}')
    assert refused(str(step)) == [
        (
            f"{step / 'training_state.json'}: not a peftcli training state of format 1; "
            "resume from a checkpoint this version wrote."
        )
    ]
    (step / "training_state.json").unlink()
    assert refused(str(step)) == [
        (
            f"{step}: no training_state.json; this checkpoint holds an adapter but not the training state, so the run "
            "cannot resume from it."
        )
    ]
    tensors = tmp_path / "run" / "checkpoints" / "step-6"
    assert not tensors.exists()  # the final step is the adapter, not a checkpoint
    (tmp_path / "run" / "recipe.yaml").unlink()
    assert refused("latest") == [
        (
            f"--resume: {tmp_path / 'run' / 'recipe.yaml'} not found; {tmp_path / 'run'} is not a run directory to "
            "resume. Check name= or output_dir=."
        )
    ]


def test_a_new_classification_head_is_seeded_so_a_run_repeats(tmp_path, tiny_data) -> None:
    """A base model without a classification head (all-MiniLM-L6-v2 is one) gets a new random head as
    it loads; the recipe's seed must fix it, or no two runs (and no resumed run) agree."""
    from transformers import BertConfig, BertModel

    from tests.conftest import VOCAB, make_tokenizer

    base = tmp_path / "encoder"
    BertModel(
        BertConfig(
            vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    ).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    outcomes = []
    for name in ("a", "b"):
        recipe = tiny_recipe(
            base,
            tiny_data,
            "sequence_classification",
            output_dir=str(tmp_path / name),
            train={"max_steps": 2, "eval_every": None},
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        run_train(path, [])
        outcomes.append((tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes())
    assert outcomes[0] == outcomes[1]
