"""`peft sweep` as a user runs it: a grid over a tiny model with a value that fails at run time, the
re-run that reads finished trials, best.yaml, the page; random and Optuna draws; the refusals."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.commands.sweep import run_sweep
from peftcli.config.load import load_recipe
from peftcli.errors import PeftcliError
from peftcli.training.checkpoints import checkpoint_steps
from peftcli.training.search import Search, random_trials, read_space
from tests.cli.test_cli import ROOT, files_under, peft, write_recipe
from tests.cli.test_resume import wait_for_step
from tests.conftest import tiny_recipe
from tests.unit.test_html_report import parse_html

RANKS = [2, 4]
TARGETS = ["all-linear", ["q_proj"]]  # q_proj matches nothing in BERT: passes the recipe check, fails in training
SWEEP_FILES = {"sweep.json", "sweep.md", "report.html", "best.yaml"}


def write_space(folder: Path, space: dict) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, tiny_dirs, tiny_data):
    root = tmp_path_factory.mktemp("sweep")
    recipe = write_recipe(root, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification"))
    space = write_space(root, {"strategy": "grid", "params": {"method.rank": RANKS, "method.target_modules": TARGETS}})
    out = root / "out"
    result = peft("sweep", str(recipe), "--space", str(space), "--out", str(out), "train.max_steps=4")
    shutil.copy(out / "sweep.json", root / "first-sweep.json")  # a later test sweeps into `out` again
    return recipe, space, out, result


def summary_of(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


def test_grid_runs_the_product_and_records_failures(swept) -> None:
    _, _, out, result = swept
    assert result.returncode == 1, result.stderr  # a trial failed: recorded, the sweep went on
    summary = summary_of(out)
    rows = summary["rows"]
    expected = [{"method.rank": r, "method.target_modules": t} for r, t in itertools.product(RANKS, TARGETS)]
    by_trial = sorted(rows, key=lambda r: r["run"])
    assert [r["params"] for r in by_trial] == expected
    assert [r["run"] for r in by_trial] == [f"trial-00{i}" for i in range(1, 5)]
    for row in rows:
        assert row["run_dir"] == str(out / row["run"])
        if row["params"]["method.target_modules"] == ["q_proj"]:
            assert row["status"] == "failed" and "matched no linear layer" in row["error"]
            assert f"failed: {row['run']}: method.target_modules ['q_proj'] matched no" in result.stderr
            continue
        assert row["status"] == "trained" and row["error"] is None
        saved = yaml.safe_load((out / row["run"] / "recipe.yaml").read_text())
        assert saved["method"]["rank"] == row["params"]["method.rank"]
        assert saved["method"]["target_modules"] == "all-linear" and saved["train"]["max_steps"] == 4
        report = json.loads((out / row["run"] / "report.json").read_text())
        assert row["metric_best"] == report["best_metrics"]["accuracy"]
        assert row["trainable_parameters"] == report["summary"]["trainable_parameters"]
    trained = [r for r in rows if r["status"] == "trained"]
    assert rows[: len(trained)] == trained  # failed trials last
    assert [r["metric_best"] for r in trained] == sorted((r["metric_best"] for r in trained), reverse=True)
    assert trained[0]["trainable_parameters"] != trained[1]["trainable_parameters"]  # the rank took effect
    assert summary["best"] == trained[0]["run"]
    assert summary["recipe_values"] == {"method.rank": 4, "method.target_modules": "all-linear"}
    assert SWEEP_FILES <= files_under(out)


def test_best_yaml_is_the_best_trials_recipe(swept) -> None:
    _, _, out, _ = swept
    best = summary_of(out)["best"]
    trial = yaml.safe_load((out / best / "recipe.yaml").read_text())
    assert yaml.safe_load((out / "best.yaml").read_text()) == trial | {"output_dir": None}
    recipe = load_recipe(out / "best.yaml")  # `peft train best.yaml` trains a new run, not into the trial
    assert recipe.run_dir() == Path("runs") / trial["name"]
    assert recipe.method.rank == summary_of(out)["rows"][0]["params"]["method.rank"]


def test_markdown_and_page(swept) -> None:
    _, _, out, result = swept
    summary = summary_of(out)
    markdown = (out / "sweep.md").read_text()
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| trial | method.rank | method.target_modules | accuracy best |")
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[1:]] == [r["run"] for r in summary["rows"]]
    assert f"Best: {summary['best']}," in markdown and f"Best: {summary['best']}," in result.stdout
    html = (out / "report.html").read_text()
    parsed = parse_html(html)
    assert parsed.tags["svg"] == 3 and parsed.tags["script"] == 0  # per trial, per key (2)
    texts = {t for svg in parsed.svg_texts for t in svg}
    assert {"accuracy (best) against method.rank", "all-linear", "best so far"} <= texts
    assert f'href="{summary["best"]}/report.html"' in html


def test_a_rerun_reads_finished_trials(swept, tmp_path: Path) -> None:
    recipe, space, out, _ = swept
    trained = [r["run"] for r in summary_of(out)["rows"] if r["status"] == "trained"]
    before = {p: p.stat().st_mtime_ns for t in trained for p in (out / t).rglob("*")}
    again = peft("sweep", str(recipe), "--space", str(space), "--out", str(out), "train.max_steps=4")
    assert again.returncode == 1, again.stderr  # the failed trials were tried again, and failed again
    assert {p: p.stat().st_mtime_ns for t in trained for p in (out / t).rglob("*")} == before
    rows = {r["run"]: r for r in summary_of(out)["rows"]}
    assert sorted(t for t, r in rows.items() if r["status"] == "read") == sorted(trained)
    # Another budget is another recipe: the finished trials are neither read nor replaced.
    assert run_sweep(recipe, write_space(tmp_path, {"params": {"method.rank": [2]}}), ["train.max_steps=3"], out) == 1
    assert [r["error"] for r in summary_of(out)["rows"]] == [
        (
            f"{out / 'trial-001'} holds a finished trial of other values (the recipe or the space changed). "
            "Pass --overwrite to train it again, or choose another --out."
        )
    ]
    assert {p: p.stat().st_mtime_ns for t in trained for p in (out / t).rglob("*")} == before


def test_random_draws_are_seeded_and_within_bounds(tmp_path: Path) -> None:
    params = {
        "method.rank": {"low": 2, "high": 64, "log": True},
        "method.alpha": {"low": 1, "high": 3},
        "optimizer.lr": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
        "method.dropout": [0.0, 0.1],
    }
    space = read_space(write_space(tmp_path, {"strategy": "random", "trials": 40, "seed": 7, "params": params}))
    draws = random_trials(space)
    assert len(draws) == 40 and draws == random_trials(space)
    other = read_space(write_space(tmp_path, {"strategy": "random", "trials": 40, "seed": 8, "params": params}))
    assert random_trials(other) != draws
    for d in draws:
        assert isinstance(d["method.rank"], int) and 2 <= d["method.rank"] <= 64
        assert isinstance(d["method.alpha"], int) and 1 <= d["method.alpha"] <= 3
        assert 1e-5 <= d["optimizer.lr"] <= 1e-2 and d["method.dropout"] in (0.0, 0.1)
    lrs = [math.log10(d["optimizer.lr"]) for d in draws]
    assert sum(lr < -3.5 for lr in lrs) > 10  # log-uniform: half the draws below the middle decade
    assert {d["method.alpha"] for d in draws} == {1, 2, 3}


def test_optuna_suggestions_are_seeded_and_within_bounds(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    params = {"method.rank": [4, 8, 16], "optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}
    space = read_space(write_space(tmp_path, {"strategy": "optuna", "trials": 14, "seed": 3, "params": params}))

    def run() -> list[dict]:
        search, asked = Search(space, higher_is_better=True), []
        while (trial := search.ask()) is not None:
            number, p = trial
            asked.append(p)
            # A made-up score: best near lr 1e-3 and rank 16; one failed trial.
            search.tell(
                number, None if number == 2 else -abs(math.log10(p["optimizer.lr"]) + 3) + p["method.rank"] / 100
            )
        return asked

    asked = run()
    assert len(asked) == 14 and asked == run()
    assert all(p["method.rank"] in (4, 8, 16) and 1e-4 <= p["optimizer.lr"] <= 1e-2 for p in asked)


def test_optuna_results_told_out_of_order_reach_their_own_trials(tmp_path: Path) -> None:
    """--parallel: trials end in any order, and each result must be told to the trial that earned it."""
    pytest.importorskip("optuna")
    params = {"method.rank": [4, 8, 16], "optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}
    space = read_space(write_space(tmp_path, {"strategy": "optuna", "trials": 3, "seed": 0, "params": params}))
    search = Search(space, higher_is_better=True)
    asked = [search.ask() for _ in range(3)]
    assert [number for number, _ in asked] == [1, 2, 3] and search.ask() is None
    search.tell(3, 0.3)
    search.tell(1, 0.1)
    search.tell(2, None)
    trials = search.study.trials  # in the order they were asked
    assert [t.params["optimizer.lr"] for t in trials] == pytest.approx([p["optimizer.lr"] for _, p in asked], rel=1e-3)
    assert [t.value for t in trials] == [0.1, None, 0.3]
    assert trials[1].state.name == "FAIL"


BAD_SPACE = {
    "strategy": "random",
    "colour": "blue",
    "params": {
        "method.rank": [],
        "optimizer.lr": {"low": 1.0e-2, "high": 1.0e-4},
        "method.alpha": {"low": 0, "high": 32, "log": True},
        "method.dropout": "0.1",
    },
}


def test_bad_space_files_are_refused_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_space(tmp_path, BAD_SPACE)
    with pytest.raises(PeftcliError) as exc:
        read_space(path)
    assert exc.value.lines == [
        (
            f"{path}: colour: unknown key (got 'blue'). The keys of a space file are strategy, trials, seed, metric, "
            "params."
        ),
        f"{path}: trials: missing; strategy random draws trials until it has this many. Add e.g. trials: 8.",
        f"{path}: params.method.rank: an empty list of values (got []). List at least one value, e.g. [4, 8].",
        f"{path}: params.optimizer.lr: low > high (got low=0.01, high=0.0001). Swap them.",
        f"{path}: params.method.alpha: a log range needs low > 0 (got low=0). Raise low, or write log: false.",
        (
            f"{path}: params.method.dropout: not a list of values nor a range (got '0.1'). "
            "Write a list, e.g. [4, 8, 16], or a range, e.g. {low: 1.0e-4, high: 1.0e-2, log: true}."
        ),
    ]
    grid = write_space(tmp_path, {"params": {"optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2}}})
    with pytest.raises(PeftcliError) as exc:
        read_space(grid)
    assert exc.value.lines == [
        (
            f"{grid}: params.optimizer.lr: a range (got {{'low': 0.0001, 'high': 0.01}}) has no grid points. "
            "List the values, e.g. [0.0001, 0.01], or use strategy: random."
        )
    ]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    optuna = write_space(tmp_path, {"strategy": "optuna", "trials": 4, "params": {"method.rank": [4, 8]}})
    with pytest.raises(PeftcliError) as exc:
        read_space(optuna)
    assert exc.value.lines == [
        (
            f"{optuna}: strategy: optuna is not installed (got 'optuna'). Install it: pip install optuna "
            "(or pip install 'peftcli[sweep]'), or use strategy: random."
        )
    ]


def test_unknown_recipe_keys_and_bad_values_exit_2_before_training(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification"))
    space = write_space(tmp_path, {"params": {"method.rnak": [4], "optimizer.lr": [1.0e-3, -1]}})
    out = tmp_path / "out"
    with pytest.raises(PeftcliError) as exc:
        run_sweep(recipe, space, [], out, parallel=4096)
    assert exc.value.lines == [
        (
            f"--parallel 4096: this machine has {cores()} CPU cores and no GPU, and a run needs a core at least. "
            f"Use --parallel {cores()} or less."
        ),
        f"{space}: params.method.rnak: unknown key. Did you mean 'rank'?",
        f"{space}: params.optimizer.lr: input should be greater than 0 (got -1).",
    ]
    result = CliRunner().invoke(app, ["sweep", str(recipe), "--space", str(space), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    assert result.stderr.splitlines() == [f"error: {line}" for line in exc.value.lines[1:]]
    assert not out.exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "recipes" / "sweeps").glob("*.yaml")), ids=str)
def test_shipped_spaces_are_valid(path: Path) -> None:
    space = read_space(path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert space.params and any(f"--space recipes/sweeps/{path.name}" in line for line in header)


# -- --parallel: trials at once ------------------------------------------------------------------


def cores() -> int:
    return len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def swept_in_parallel(tmp_path_factory: pytest.TempPathFactory, swept):
    recipe, space, _, _ = swept
    out = tmp_path_factory.mktemp("parallel") / "out"
    result = peft(
        "sweep", str(recipe), "--space", str(space), "--out", str(out), "train.max_steps=4", "--parallel", "2"
    )
    return out, result


def test_parallel_trials_equal_the_sequential_ones(swept, swept_in_parallel) -> None:
    _, _, sequential, _ = swept
    out, result = swept_in_parallel
    assert result.returncode == 1, result.stderr
    one = {r["run"]: r for r in json.loads((sequential.parent / "first-sweep.json").read_text())["rows"]}
    two = {r["run"]: r for r in summary_of(out)["rows"]}
    assert sorted(two) == sorted(one) == [f"trial-00{i}" for i in range(1, 5)]
    for label, row in two.items():
        assert (row["params"], row["status"], row["trainable_parameters"]) == (
            one[label]["params"],
            one[label]["status"],
            one[label]["trainable_parameters"],
        )
        if row["status"] == "failed":
            assert row["error"] == one[label]["error"]
            continue
        assert row["metric_best"] == pytest.approx(one[label]["metric_best"])
        # Another number of threads sums in another order: equal up to rounding.
        ours, theirs = (load_file(str(d / label / "adapter" / "adapter_model.safetensors")) for d in (out, sequential))
        assert ours.keys() == theirs.keys()
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)
        report = json.loads((out / label / "report.json").read_text())
        assert report["summary"]["cpu_threads"] == max(1, cores() // 2)
    assert summary_of(out)["best"] is not None and (out / "best.yaml").is_file()


def test_parallel_trials_overlap_and_write_their_output_to_logs(swept_in_parallel) -> None:
    out, result = swept_in_parallel
    stderr = result.stderr
    threads = max(1, cores() // 2)
    where = f"the CPU, {threads} CPU thread{'s' if threads != 1 else ''}"
    for i in range(1, 5):
        label = f"trial-00{i}"
        assert f"  training on {where}; its output: {out / 'logs' / f'{label}.log'}" in stderr
        log = (out / "logs" / f"{label}.log").read_text()
        assert log.startswith("tiny: lora on ")  # peft train's first line
        assert ("done in " in log) == (i % 2 == 1)  # trials 2 and 4 (q_proj) fail before training
    assert "tiny: lora on " not in stderr  # the trials' own output went to their logs
    # Two slots: trial 2 starts before trial 1 ends.
    assert stderr.index("sweep 2/4") < stderr.index("done: trial-001: accuracy")
    assert "failed: trial-002: method.target_modules ['q_proj'] matched no" in stderr


def test_sigterm_stops_every_parallel_trial_at_a_step_and_writes_no_table(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification"))
    space = write_space(tmp_path, {"params": {"method.rank": [2, 4, 8]}})
    out = tmp_path / "out"
    args = ["train.max_steps=100000", "train.log_every=1", "train.eval_every=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftcli", "sweep", str(recipe), "--space", str(space), "--out", str(out), *args]
        + ["--parallel", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert all(wait_for_step(out / f"trial-00{i}", 2, proc) for i in (1, 2)), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = stderr.splitlines()
    assert lines[-1] == "stopped: peft sweep stopped at trial-001, trial-002; the sweep's table was not written."
    for i in (1, 2):  # both stopped at a step boundary, saved it, and say how to resume
        run_dir = out / f"trial-00{i}"
        step = max(int(p.name.split("-")[1]) for p in checkpoint_steps(run_dir))
        said = (
            f"stopped: SIGTERM at step {step}: saved {run_dir / 'checkpoints' / f'step-{step}'}. "
            "Resume with: peft train "
        )
        assert any(line.startswith(said) and line.endswith(" --resume") for line in lines[-3:-1]), stderr
    assert not (out / "trial-003").exists()  # no trial starts after a stop
    assert not (out / "sweep.json").exists()


# Two parallel trainings and a rerun (25 s on 2 cores): `heavy`, so .ci/run runs it after the default run.
@pytest.mark.heavy
def test_optuna_in_parallel_trains_every_trial_and_a_rerun_reads_them(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    pytest.importorskip("optuna")
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification"))
    params = {"method.rank": [2, 4], "optimizer.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}
    space = write_space(tmp_path, {"strategy": "optuna", "trials": 3, "seed": 1, "params": params})
    out = tmp_path / "out"
    args = ["sweep", str(recipe), "--space", str(space), "--out", str(out), "train.max_steps=2", "--parallel", "2"]
    first = peft(*args)
    assert first.returncode == 0, first.stderr
    rows = summary_of(out)["rows"]
    assert sorted(r["run"] for r in rows) == ["trial-001", "trial-002", "trial-003"]
    assert all(r["status"] == "trained" and isinstance(r["metric_best"], float) for r in rows)
    # Within Optuna's random start-up trials the suggestions do not depend on which results were in,
    # so the same sweep again asks for the same values and reads every trial.
    again = peft(*args)
    assert again.returncode == 0, again.stderr
    assert [(r["run"], r["params"], r["status"]) for r in summary_of(out)["rows"]] == [
        (r["run"], r["params"], "read") for r in rows
    ]
    assert "training on" not in again.stderr
