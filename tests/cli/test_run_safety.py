"""Ways to lose a run, closed: one writer per run directory (an OS lock a killed run cannot leave
stuck), `--overwrite` that deletes only a peftcli run and keeps the old one until the new one has
saved, resume from an older checkpoint that abandons the newer ones, data that changed under a run,
a full disk while saving, and running out of memory. Each refusal is one line, exit code 2, and
leaves everything else as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import peftcli.adapter_io
from peftcli.cli import app
from peftcli.errors import CheckpointError, PeftcliError, TrainingDiverged
from peftcli.training.checkpoints import checkpoint_steps, find_checkpoint, read_loop_state
from peftcli.training.resume import resume_command
from peftcli.training.run import run_train
from peftcli.training.run_dir import lock_path
from tests.cli.test_bad_inputs import snapshot
from tests.cli.test_resume import recipe_file, start, wait_for_step

BUSY_FIX = "Wait for it to end, or give this run another name (name=NEW or output_dir=DIR)."


def invoke(*args: str) -> tuple[int, list[str]]:
    """`peft ARGS` in this process: the exit code and the `error:` lines, checked to hold no traceback."""
    result = CliRunner().invoke(app, list(args))
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stderr
    return result.exit_code, [line for line in result.stderr.splitlines() if line.startswith("error:")]


def hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    """Another process holding the run's lock as `peft train` does, until it is killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from peftcli.training.run_dir import RunLock
        lock = RunLock(Path({str(run_dir)!r}))
        lock.acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


# -- one writer per run directory ----------------------------------------------------------------


def test_a_second_run_on_a_live_run_directory_is_refused_and_deletes_nothing(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=400, save_every=None, eval_every=None)
    run_dir = tmp_path / "run"
    live = start(str(recipe))
    try:
        assert wait_for_step(run_dir, 1, live), live.communicate()[1]
        info = json.loads(lock_path(run_dir).read_text())
        assert info["pid"] == live.pid and info["command"].startswith("peft train")
        holder = f"pid {live.pid} on {info['host']}, since {info['started']}: {info['command']}"
        before = snapshot(run_dir)
        # Without --overwrite, with it, and --resume: each refused with the running one named.
        for extra in ([], ["--overwrite"], ["--resume", "latest"]):
            code, lines = invoke("train", str(recipe), *extra)
            assert (code, lines) == (
                2,
                [f"error: {run_dir}: another peft train is writing this run directory ({holder}). {BUSY_FIX}"],
            )
        # The live run's files are its own: only the log it appends to has grown.
        after = snapshot(run_dir)
        assert set(after) == set(before) and all(after[k] == before[k] for k in before if k != "metrics.jsonl")
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=120)
    assert live.returncode == 128 + signal.SIGTERM
    assert not lock_path(run_dir).exists()  # released when the run ended


def test_the_lock_is_checked_again_after_loading(tmp_path, tiny_dirs, tiny_data, monkeypatch) -> None:
    """A run that passed the early check takes the lock before it writes: one that another run took
    meanwhile stops it with the same line, and nothing is written."""
    import peftcli.training.run

    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=2)
    holders: list[subprocess.Popen[str]] = []
    # Another run takes the lock just after this one's early check.
    monkeypatch.setattr(peftcli.training.run, "check_run_dir", lambda run_dir, *a: holders.append(hold_lock(run_dir)))
    try:
        with pytest.raises(PeftcliError) as exc:
            run_train(recipe, [])
        (line,) = exc.value.lines
        assert line.startswith(
            f"{tmp_path / 'run'}: another peft train is writing this run directory (pid {holders[0].pid} "
        )
    finally:
        for h in holders:
            h.kill()
            h.wait()
    assert not (tmp_path / "run").exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=2, save_every=None)
    holder = hold_lock(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock_path(tmp_path / "run").is_file()  # the file stays, the kernel dropped the lock
    run_train(recipe, [])
    assert (tmp_path / "run" / "report.json").is_file()
    assert not lock_path(tmp_path / "run").exists()


# -- --overwrite ---------------------------------------------------------------------------------


def finished_run(tmp_path: Path, tiny_dirs, tiny_data, **train) -> Path:
    recipe = recipe_file(
        tmp_path, tiny_dirs, tiny_data, "run", **({"max_steps": 4, "save_every": 2, "eval_every": 2} | train)
    )
    run_train(recipe, [])
    return recipe


def test_overwrite_keeps_the_old_run_until_the_new_one_saved(tmp_path, tiny_dirs, tiny_data, monkeypatch) -> None:
    import peftcli.training.loop

    recipe = finished_run(tmp_path, tiny_dirs, tiny_data)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    real = peftcli.training.loop.train_step

    def diverges(**kwargs):
        _loss, tokens, examples = real(**kwargs)
        return float("nan"), tokens, examples

    # The new run diverges at step 1, before it saved anything: the old run is back, byte for byte.
    with monkeypatch.context() as m:
        m.setattr(peftcli.training.loop, "train_step", diverges)
        with pytest.raises(TrainingDiverged):
            run_train(recipe, [], overwrite=True)
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml"]

    # A new run that saves replaces it, and leaves nothing aside.
    run_train(recipe, ["train.max_steps=2", "train.save_every=null"], overwrite=True)
    assert json.loads((run_dir / "report.json").read_text())["summary"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml"]


def test_a_replacement_killed_before_it_saved_gives_the_old_run_back(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = finished_run(tmp_path, tiny_dirs, tiny_data)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    # What `kill -9` of an --overwrite run leaves before its first save: the old run aside, the new
    # one's first file in its place.
    os.replace(run_dir, tmp_path / ".run.replaced")
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("# Resolved from x\n")
    code, lines = invoke("train", str(recipe))  # the next run settles it: the old run is back...
    assert (code, lines) == (
        2,
        [
            (
                f"error: {run_dir}: run directory already exists. Pass --overwrite to replace it, "
                "or give the run another name (name=NEW or output_dir=DIR)."
            )
        ],
    )  # ...and refuses to replace it without --overwrite
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml"]

    # Killed after the new run's first checkpoint: the new run stays, the old one goes.
    os.replace(run_dir, tmp_path / ".run.replaced")
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("# Resolved from x\n")
    new = snapshot(run_dir)
    assert invoke("train", str(recipe))[0] == 2
    assert snapshot(run_dir) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml"]


def test_overwrite_deletes_only_a_peftcli_run(tmp_path, tiny_dirs, tiny_data, monkeypatch) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=2)
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.tex").write_text("years of work")
    (mine / "recipe.yaml").write_text("task: causal_lm\n")  # a recipe of one's own is not a run
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, lines = invoke("train", str(recipe), f"output_dir={mine}", "--overwrite")
    assert (code, lines) == (
        2,
        [
            (
                f"error: {mine}: not a peftcli run directory (no recipe.yaml written by peft train), so --overwrite "
                "will not delete it. Choose another output_dir, or empty the folder yourself."
            )
        ],
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spelling", ["plain", "dot-dot", "trailing-slash", "symlink-parent"])
@pytest.mark.parametrize("holds", ["data", "model", "recipe", "cwd"])
def test_overwrite_never_deletes_a_folder_holding_inputs(holds, spelling, tmp_path, tiny_dirs, tiny_data) -> None:
    """A folder holding the data, the model, the recipe or the current folder, however its path is
    spelled, is refused before anything loads, even where it looks like a run."""
    work = tmp_path / "work"
    shutil.copytree(tiny_dirs["bert-cls"], work / "model")
    (work / "data").mkdir()
    data = dict(tiny_data)
    for key in ("sentiment_train", "sentiment_validation"):
        data[key] = Path(shutil.copy(tiny_data[key], work / "data" / tiny_data[key].name))
    (work / "recipes").mkdir()
    recipe = recipe_file(work / "recipes", {"bert-cls": work / "model"}, data, "run", max_steps=2)
    (work / "cwd").mkdir()
    inner = work / {"recipe": "recipes"}.get(holds, holds)
    (inner / "recipe.yaml").write_text("# Resolved from elsewhere\n")  # each looks like a run
    what = {
        "data": f"a data file ({data['sentiment_train']})",
        "model": f"the base model ({work / 'model'})",
        "recipe": f"the recipe ({recipe})",
        "cwd": f"the folder you run from ({inner})",
    }[holds]
    (tmp_path / "link").symlink_to(work)
    given = {
        "plain": str(inner),
        "dot-dot": str(inner / ".." / inner.name),
        "trailing-slash": str(inner) + "/",
        "symlink-parent": str(tmp_path / "link" / inner.name),
    }[spelling]
    cwd = os.getcwd()
    os.chdir(inner if holds == "cwd" else tmp_path)
    try:
        before = snapshot(tmp_path)
        code, lines = invoke("train", str(recipe), f"output_dir={given}", "--overwrite")
    finally:
        os.chdir(cwd)
    assert (code, lines) == (
        2,
        [f"error: {Path(given)}: --overwrite would delete {what}, which is inside it. Choose another output_dir."],
    )
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_symbolic_link_as_the_run_directory(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = finished_run(tmp_path, tiny_dirs, tiny_data)
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    before = snapshot(tmp_path)
    code, lines = invoke("train", str(recipe), f"output_dir={tmp_path / 'alias'}", "--overwrite")
    assert (code, lines) == (
        2,
        [
            (
                f"error: {tmp_path / 'alias'}: a symbolic link ({tmp_path / 'run'}); "
                "--overwrite replaces only a run directory itself. Give output_dir the real folder, or another name."
            )
        ],
    )
    assert snapshot(tmp_path) == before


# -- resume --------------------------------------------------------------------------------------


def test_resuming_from_an_older_checkpoint_abandons_the_newer_ones(tmp_path, tiny_dirs, tiny_data, monkeypatch) -> None:
    import peftcli.training.loop

    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=12, save_every=2, save_total_limit=3)
    run_dir = tmp_path / "run"
    run_train(recipe, [])
    finished = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in checkpoint_steps(run_dir)] == ["step-6", "step-8", "step-10"]

    # Back to step 6 with one checkpoint kept; the run is stopped (as by SIGTERM) after step 7.
    taken = {"steps": 6}
    real_step = peftcli.training.loop.train_step

    def counting(*args, **kwargs):
        taken["steps"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(peftcli.training.loop, "train_step", counting)
    monkeypatch.setattr(
        peftcli.training.loop, "stop_requested", lambda stop, acc: signal.SIGTERM if taken["steps"] == 7 else None
    )
    with pytest.raises(PeftcliError) as exc:
        run_train(recipe, ["train.save_total_limit=1"], resume=str(run_dir / "checkpoints" / "step-6"))
    # The newer checkpoints went aside at the start and were deleted at the first save (the one at the
    # stop), which kept itself, not a stale newer one.
    assert [p.name for p in checkpoint_steps(run_dir)] == ["step-7"]
    assert not list((run_dir / "checkpoints").glob(".*"))
    assert find_checkpoint(run_dir, "latest") == run_dir / "checkpoints" / "step-7"
    assert read_loop_state(run_dir / "checkpoints" / "step-7", 0, 1).step == 7
    assert exc.value.lines == [
        (
            f"SIGTERM at step 7: saved {run_dir / 'checkpoints' / 'step-7'}. Resume with: "
            f"peft train {recipe} train.save_total_limit=1 --resume"
        )
    ]
    monkeypatch.undo()
    # The resume line it printed finishes the run as if it had never stopped.
    run_train(recipe, ["train.save_total_limit=1"], resume="latest")
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == finished


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = finished_run(tmp_path, tiny_dirs, tiny_data)
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "run", other)
    given = other / "checkpoints" / "step-2"
    with pytest.raises(CheckpointError) as exc:
        run_train(recipe, [], resume=str(given))
    assert exc.value.lines == [
        (
            f"--resume {given}: not a step checkpoint of this run ({tmp_path / 'run' / 'checkpoints'}: step-2). "
            "Give one of its checkpoints/step-N folders, or --resume alone for the latest."
        )
    ]


def test_resume_refuses_changed_data(tmp_path, tiny_dirs, tiny_data) -> None:
    work = tmp_path / "data"
    work.mkdir()
    data = dict(tiny_data)
    for key in ("sentiment_train", "sentiment_validation"):
        data[key] = Path(shutil.copy(tiny_data[key], work / tiny_data[key].name))
    recipe = recipe_file(tmp_path, tiny_dirs, data, "run", max_steps=4, save_every=2)
    run_train(recipe, [])
    rows = data["sentiment_train"].read_text().splitlines()
    data["sentiment_train"].write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same rows, reordered
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError) as exc:
        run_train(recipe, [], resume="latest")
    (line,) = exc.value.lines
    assert line.startswith(
        f"--resume: the training data differs from the data {tmp_path / 'run' / 'checkpoints' / 'step-2'} was "
        "trained on (fingerprint "
    )
    assert line.endswith(
        "a data file changed since the run started. Resume with the original data, or start a new run."
    )
    assert snapshot(tmp_path / "run") == before
    data["sentiment_train"].write_text("\n".join(rows) + "\n")  # put back: it resumes
    run_train(recipe, [], resume="latest")


def test_the_resume_line_carries_the_process_count() -> None:
    class TwoProcesses:
        num_processes = 2

    assert resume_command(Path("r.yaml"), ["a=1"], TwoProcesses()) == "peft train r.yaml a=1 --resume --num-processes 2"
    assert resume_command(Path("my recipe.yaml"), []) == "peft train 'my recipe.yaml' --resume"


# -- faults --------------------------------------------------------------------------------------


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_dirs, tiny_data, monkeypatch) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=6, save_every=2)
    run_dir = tmp_path / "run"
    real = peftcli.adapter_io.save_file

    def fills_up(state, filename, *args, **kwargs):
        if ".step-4.tmp" in filename:  # the disk is full by the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, filename, *args, **kwargs)

    monkeypatch.setattr(peftcli.adapter_io, "save_file", fills_up)
    code, lines = invoke("train", str(recipe))
    assert (code, lines) == (
        2,
        [
            (
                f"error: {run_dir / 'checkpoints' / 'step-4'}: could not save the checkpoint (No space left on "
                f"device); the checkpoint before it, {run_dir / 'checkpoints' / 'step-2'}, is kept. "
                "Free disk space, then resume with: "
                f"peft train {recipe} --resume"
            )
        ],
    )
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]  # no half-written folder
    monkeypatch.undo()
    run_train(recipe, [], resume="latest")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_out_of_memory_names_the_batch_and_what_to_lower(tmp_path, tiny_dirs, tiny_data, monkeypatch) -> None:
    from transformers import BertForSequenceClassification

    recipe = recipe_file(
        tmp_path, tiny_dirs, tiny_data, "run", max_steps=4, save_every=None, batch_size=4, grad_accum=2
    )

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(BertForSequenceClassification, "forward", no_memory)
    code, lines = invoke("train", str(recipe))
    assert code == 2
    (line,) = lines
    assert line.startswith("error: train: out of memory at step 1, on a batch of 4 examples ")
    assert line.endswith(
        "tokens long (CUDA out of memory. Tried to allocate 20.00 GiB). "
        "Lower train.batch_size (raise train.grad_accum to keep the step's batch), lower data.max_length, or set "
        "train.gradient_checkpointing: true."
    )
    assert not lock_path(tmp_path / "run").exists()


def test_a_resumed_run_that_fails_before_saving_leaves_the_newer_checkpoints_aside(
    tmp_path, tiny_dirs, tiny_data, monkeypatch
) -> None:
    import peftcli.training.loop

    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=8, save_every=2, save_total_limit=3)
    run_dir = tmp_path / "run"
    run_train(recipe, [])
    assert [p.name for p in checkpoint_steps(run_dir)] == ["step-2", "step-4", "step-6"]

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(peftcli.training.loop, "train_step", crash)
    with pytest.raises(RuntimeError):
        run_train(recipe, [], resume=str(run_dir / "checkpoints" / "step-2"))
    # `latest` no longer sees step-4 and step-6, and they are not lost either.
    assert [p.name for p in checkpoint_steps(run_dir)] == ["step-2"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob(".abandoned-*")) == [
        ".abandoned-step-4",
        ".abandoned-step-6",
    ]
    assert find_checkpoint(run_dir, "latest") == run_dir / "checkpoints" / "step-2"


def test_a_replacement_killed_inside_its_first_save_gives_the_old_run_back(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = finished_run(tmp_path, tiny_dirs, tiny_data)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    os.replace(run_dir, tmp_path / ".run.replaced")
    (run_dir / "checkpoints" / ".step-2.tmp").mkdir(parents=True)  # killed while writing its first checkpoint
    (run_dir / "recipe.yaml").write_text("# Resolved from x\n")
    assert invoke("train", str(recipe))[0] == 2  # settled (old run back), then refused: it exists
    assert snapshot(run_dir) == before


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, tiny_dirs, tiny_data) -> None:
    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=2)
    (tmp_path / "a-file").write_text("not a folder")
    before = snapshot(tmp_path)
    code, lines = invoke("train", str(recipe), f"output_dir={tmp_path / 'a-file' / 'run'}")
    assert code == 2
    assert lines == [
        (
            f"error: {tmp_path / 'a-file'}: cannot write (File exists). Check that the folder is writable and the disk "
            "has space."
        )
    ]
    assert snapshot(tmp_path) == before


def test_one_lock_per_folder_however_it_is_spelled(tmp_path) -> None:
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "runs")
    assert (
        lock_path(tmp_path / "alias" / "a")
        == lock_path(tmp_path / "runs" / "x" / ".." / "a")
        == tmp_path / "runs" / ".a.lock"
    )


def test_a_run_started_before_a_default_changed_resumes_with_its_own_value(tmp_path, tiny_dirs, tiny_data) -> None:
    """Runs started before `train.mixed_precision` defaulted to auto (and before train.tf32 existed)
    saved `mixed_precision: 'no'` and no tf32: they resume as they ran."""
    import yaml

    recipe = recipe_file(tmp_path, tiny_dirs, tiny_data, "run", max_steps=6, save_every=2)
    data = yaml.safe_load(recipe.read_text())
    del data["train"]["mixed_precision"]  # the recipe leaves it to the default
    recipe.write_text(yaml.safe_dump(data))
    run_train(recipe, ["train.mixed_precision=no"])
    saved = run_dir_recipe = tmp_path / "run" / "recipe.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["train"]["tf32"]
    saved.write_text("# Resolved from an older peftcli\n" + yaml.safe_dump(old))
    result = CliRunner().invoke(
        app, ["train", str(recipe), "--resume", str(tmp_path / "run" / "checkpoints" / "step-2")]
    )
    assert result.exit_code == 0, result.stderr
    assert "resuming with train.mixed_precision: no, as the run started (a default changed since)" in result.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["summary"]["mixed_precision"] == "no"
    assert run_dir_recipe.is_file()
