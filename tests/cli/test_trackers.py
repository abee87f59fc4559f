"""train.report_to (issue 22): one tiny `peft train` logs to TensorBoard, MLflow, W&B and Trackio at
once, offline, and each is read back with the library's own reader: the same steps and values as
metrics.jsonl, the resolved recipe as hyperparameters, report.json's figures as the summary. Then
the refusals, word for word, and `peft validate` importing none of the trackers."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from peftcli.config.load import load_recipe
from peftcli.errors import RecipeError
from tests.cli.test_cli import ROOT, write_recipe
from tests.conftest import tiny_recipe

TRACKERS = ["tensorboard", "mlflow", "wandb", "trackio"]
# The user's own settings would send the files elsewhere (docs/trackers.md): this run takes the defaults.
SETTINGS = ("WANDB_", "MLFLOW_", "TRACKIO_")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dirs, tiny_data) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tracked")
    recipe = tiny_recipe(
        tiny_dirs["bert-cls"],
        tiny_data,
        "sequence_classification",
        output_dir=str(root / "run"),
        train={"report_to": TRACKERS},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS)}
    done = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(write_recipe(root, recipe))],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    folder = root / "run"
    return SimpleNamespace(
        dir=folder,
        stdout=done.stdout,
        history=[json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()],
        report=json.loads((folder / "report.json").read_text()),
        recipe=yaml.safe_load((folder / "recipe.yaml").read_text()),
    )


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def steps(run: SimpleNamespace) -> dict[tuple[int, str], float]:
    """metrics.jsonl as (step, key) -> value: a step that logged a training record and an eval holds both."""
    return {(r["step"], k): v for r in run.history for k, v in r.items() if k != "step" and v is not None}


def hyperparameters(run: SimpleNamespace) -> dict[str, Any]:
    """recipe.yaml flat, a list or null as its JSON text."""
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in flat(run.recipe).items()}


def summary(run: SimpleNamespace) -> dict[str, float]:
    numbers = {k: v for k, v in flat(run.report).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {f"report/{k}": v for k, v in numbers.items()}


def split(logged: dict[tuple[int, str], Any]) -> tuple[dict[tuple[int, str], Any], dict[str, Any], set[int]]:
    """A tracker's steps apart from the report's figures (report/...), and the steps those were logged at."""
    curves = {key: v for key, v in logged.items() if not key[1].startswith("report/")}
    report = {key[1]: v for key, v in logged.items() if key[1].startswith("report/")}
    return curves, report, {key[0] for key in logged if key[1].startswith("report/")}


def test_the_run_writes_each_tracker_inside_it_and_nothing_on_stdout(run: SimpleNamespace) -> None:
    assert run.stdout == ""  # trackio's own lines go to stderr with the run's
    assert sorted(p.name for p in (run.dir / "trackers").iterdir()) == sorted(TRACKERS)
    # One event file, with the hyperparameters in it: no second run in a folder named by the time.
    assert [p.name.startswith("events.out.tfevents.") for p in (run.dir / "trackers" / "tensorboard").iterdir()] == [
        True
    ]
    assert (run.dir / "trackers" / "mlflow" / "mlflow.db").is_file()
    assert (run.dir / "trackers" / "trackio" / "peftcli.db").is_file()
    assert len(list((run.dir / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_tensorboard(run: SimpleNamespace) -> None:
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run.dir / "trackers" / "tensorboard"), size_guidance={TENSORS: 0}).Reload()
    logged = {
        (e.step, tag): tensor_util.make_ndarray(e.tensor_proto).item()
        for tag in events.Tags()["tensors"]
        for e in events.Tensors(tag)
    }
    curves, report, at = split(logged)
    assert curves == steps(run)  # exactly: written as doubles
    assert report == summary(run) and at == {run.report["summary"]["steps"]}
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    # TensorBoard keeps numbers (booleans too) as doubles and text as text.
    expected = {k: float(v) if isinstance(v, (int, float)) else v for k, v in hyperparameters(run).items()}
    assert {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()} == expected


def test_mlflow(run: SimpleNamespace) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run.dir / 'trackers' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("peftcli")
    (found,) = client.search_runs([experiment.experiment_id])
    assert (found.info.run_name, found.info.status) == ("tiny", "FINISHED")
    assert found.data.params == {k: str(v) for k, v in hyperparameters(run).items()}  # MLflow keeps parameters as text
    logged = {
        (m.step, key): m.value for key in found.data.metrics for m in client.get_metric_history(found.info.run_id, key)
    }
    curves, report, at = split(logged)
    assert curves == steps(run)
    assert report == summary(run) and at == {run.report["summary"]["steps"]}


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file, decoded with wandb's own protobuf schema. wandb 0.31 reads these
    files in its Go core only (the Python reader, wandb/sdk/internal/datastore.py, is gone), so the
    framing is read here as that reader did: a 7-byte header (":W&B", 0xBEE1, version 0), then
    LevelDB's log format, 32 KiB blocks of records each with a 7-byte header (CRC, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    records, pos, parts, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            records.append(wandb_internal_pb2.Record.FromString(parts))
            parts = b""
    return records


def values(items: Any) -> dict[str, Any]:
    """W&B's key/value items: a key is `key`, or `nested_key` (one part for a flat key)."""
    return {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_wandb_offline(run: SimpleNamespace) -> None:
    (path,) = (run.dir / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    (header,) = [r.run for r in records if r.HasField("run")]
    assert (header.project, header.display_name) == ("peftcli", "tiny")
    config = values(i for r in records if r.HasField("config") for i in r.config.update) | values(header.config.update)
    assert {k: v for k, v in config.items() if not k.startswith("_")} == hyperparameters(run)
    rows = [values(r.history.item) for r in records if r.HasField("history")]
    logged = {(row["_step"], k): v for row in rows for k, v in row.items() if not k.startswith("_")}
    assert logged == steps(run)
    final = values(i for r in records if r.HasField("summary") for i in r.summary.update)
    assert {k: v for k, v in final.items() if k.startswith("report/")} == summary(run)
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


def test_trackio(run: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    store = run.dir / "trackers" / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))  # trackio reads it once, as it is first imported
    assert "trackio" not in sys.modules
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_project_db_path("peftcli") == store / "peftcli.db"
    assert SQLiteStorage.get_runs("peftcli") == ["tiny"]
    config = SQLiteStorage.get_run_config("peftcli", "tiny")
    assert {k: v for k, v in config.items() if not k.startswith("_")} == hyperparameters(run)
    logs = SQLiteStorage.get_logs("peftcli", "tiny")
    logged = {(row["step"], k): v for row in logs for k, v in row.items() if k not in ("step", "timestamp")}
    curves, report, at = split(logged)
    assert curves == steps(run)
    assert report == summary(run) and at == {run.report["summary"]["steps"]}


@pytest.fixture()
def recipe_file(tmp_path: Path, tiny_dirs, tiny_data) -> Path:
    return write_recipe(tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification"))


def test_an_unknown_tracker_is_refused_with_the_known_ones(recipe_file: Path) -> None:
    # In this process: the CLI prints a RecipeError's lines after `error: ` and exits with 2, as
    # tests/cli/test_bad_inputs.py shows for every recipe error; a subprocess would cost this file 3 s.
    with pytest.raises(RecipeError) as refused:
        load_recipe(recipe_file, ["train.report_to=[tensorboard,tensorbord]"])
    assert refused.value.exit_code == 2
    assert str(refused.value) == (
        "override 'train.report_to=[tensorboard,tensorbord]': train.report_to: unknown tracker (got 'tensorbord'). "
        "Did you mean 'tensorboard'? Known trackers: tensorboard, mlflow, wandb, trackio."
    )


def test_a_tracker_without_its_package_names_the_extra(recipe_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absent = {"wandb", "sqlalchemy", "alembic"}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else find_spec(name, *a))
    with pytest.raises(RecipeError) as refused:
        load_recipe(recipe_file, ["train.report_to=[tensorboard,mlflow,wandb]"])
    where = "override 'train.report_to=[tensorboard,mlflow,wandb]': train.report_to:"
    assert str(refused.value).splitlines() == [
        (
            f"{where} mlflow needs sqlalchemy and alembic, which are not installed (got 'mlflow'). Install it: "
            "pip install 'peftcli[mlflow]'."
        ),
        f"{where} wandb needs wandb, which is not installed (got 'wandb'). Install it: pip install 'peftcli[wandb]'.",
    ]


def test_validate_imports_no_tracker(recipe_file: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "peftcli", "validate", str(recipe_file),
         f"train.report_to=[{','.join(TRACKERS)}]"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert imported & {*TRACKERS, "accelerate", "sqlalchemy", "torch.utils.tensorboard"} == set()
