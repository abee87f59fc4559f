"""Experiment trackers (`train.report_to`): TensorBoard, MLflow, W&B and Trackio, through accelerate's
tracker API (`Accelerator(log_with=...)`, `init_trackers`, `log`), each writing inside the run directory
(`<run>/trackers/<name>`) unless the user's own settings for it say where (docs/trackers.md).

A tracker gets the resolved recipe as flat hyperparameters (`train.batch_size: 16`), every record of
metrics.jsonl as a step with the same number and values, and report.json's figures as its summary
(`report/summary.tokens_per_s`, `report/final_metrics.accuracy`). Only the main process logs.

Each class below is accelerate's own tracker with peftcli's folders and two capabilities accelerate
has no API for: `log_summary` and `finish(failed=...)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

from peftcli.adapter_io import finite
from peftcli.config.checks import TRACKERS
from peftcli.errors import PeftcliError, first_line
from peftcli.reporting.flat import flatten

PROJECT = "peftcli"  # W&B's project, MLflow's experiment and Trackio's project unless the user names one
SUMMARY = "report/"  # the prefix of the report's figures, apart from the training curves


def folder(run_dir: Path, name: str) -> Path:
    """Where tracker `name` writes: absolute, since a tracker may resolve it after a chdir of its own."""
    return (run_dir / "trackers" / name).resolve()


class TensorBoard(TensorBoardTracker):
    """Event files in <run>/trackers/tensorboard. Scalars are written in double precision: TensorBoard's
    default float32 would not equal metrics.jsonl's values."""

    def __init__(self, run_dir: Path, name: str) -> None:
        # accelerate writes to logging_dir/run_name: an empty run name keeps the files in the folder itself.
        super().__init__("", folder(run_dir, "tensorboard"))

    def start(self) -> None:
        """As metrics.jsonl is rewritten from the checkpoint's log when a run resumes, so is the event
        file: the earlier attempt's files go (their steps after the checkpoint were never kept), and
        `start` logs the whole history again. (A SummaryWriter's purge_step=0 left both attempts'
        events in what TensorBoard's EventAccumulator reads.)"""
        for old in Path(self.logging_dir_param).glob("events.out.tfevents.*"):
            old.unlink()
        super().start()

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """The hyperparameters in this run's own event file. accelerate's add_hparams writes them as a
        second run in a folder named by the time, beside a hparams.yml in a third."""
        from torch.utils.tensorboard.summary import hparams

        _, session_start, _ = hparams(values, {})
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        super().log(values, step, new_style=True, double_precision=True, **kwargs)

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def finish(self, failed: bool = False) -> None:
        super().finish()


class MLflow(MLflowTracker):
    """A SQLite store in <run>/trackers/mlflow (mlflow.db, and artifacts/), unless MLFLOW_TRACKING_URI
    names another; the experiment is MLFLOW_EXPERIMENT_NAME's, else peftcli."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.store = None if os.environ.get("MLFLOW_TRACKING_URI") else folder(run_dir, "mlflow")
        artifacts = str(self.store / "artifacts") if self.store is not None else None
        super().__init__(experiment_name=PROJECT, logging_dir=artifacts, run_name=name)

    def start(self) -> None:
        import mlflow

        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{self.store / 'mlflow.db'}")
        # The store's schema migrations log a line each at INFO.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        super().start()

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def finish(self, failed: bool = False) -> None:
        import mlflow

        mlflow.end_run("FAILED" if failed else "FINISHED")


class WandB(WandBTracker):
    """An offline run in <run>/trackers/wandb (`wandb sync` uploads it later), unless WANDB_MODE or
    WANDB_DIR say otherwise; the project is WANDB_PROJECT's, else peftcli. The summary is the run's."""

    def __init__(self, run_dir: Path, name: str) -> None:
        # quiet: W&B's closing tables of the history and summary repeat what peft train prints.
        settings: dict[str, Any] = {"name": name, "settings": {"quiet": True}}
        if not os.environ.get("WANDB_DIR"):
            settings["dir"] = str(folder(run_dir, "wandb").parent)  # wandb adds the wandb/ folder itself
        if not os.environ.get("WANDB_MODE"):
            settings["mode"] = "offline"
        super().__init__(os.environ.get("WANDB_PROJECT") or PROJECT, **settings)

    def start(self) -> None:
        if "dir" in self.init_kwargs:
            Path(self.init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        super().start()

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio(TrackioTracker):
    """A local Trackio store in <run>/trackers/trackio (one SQLite file per project), unless TRACKIO_DIR
    names another. trackio reads TRACKIO_DIR once, when first imported: a second run in the same Python
    process writes where the first did (each `peft train` is a process of its own)."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.store = None if os.environ.get("TRACKIO_DIR") else folder(run_dir, "trackio")
        super().__init__(PROJECT, name=name)

    def start(self) -> None:
        if self.store is not None:
            os.environ["TRACKIO_DIR"] = str(self.store)
        with contextlib.redirect_stdout(sys.stderr):  # trackio prints where it logs; peft's stdout stays clean
            super().start()

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        # accelerate calls trackio.config.update(values, allow_val_change=True): trackio's config is a
        # plain dict, which would store allow_val_change as one more hyperparameter.
        self.run.config.update(values)

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.log(values, step)

    def finish(self, failed: bool = False) -> None:
        import trackio

        # trackio.finish() rather than accelerate's run.finish(): it also forgets the run, which trackio
        # would otherwise finish a second time at exit.
        with contextlib.redirect_stdout(sys.stderr):
            trackio.finish()


CLASSES: dict[str, Callable[[Path, str], GeneralTracker]] = {
    "tensorboard": TensorBoard,
    "mlflow": MLflow,
    "wandb": WandB,
    "trackio": Trackio,
}
assert CLASSES.keys() == TRACKERS.keys(), "peftcli.config.recipe.TRACKERS and trackers.CLASSES name the same trackers"


def trackers_for(names: list[str], run_dir: Path, run_name: str) -> list[GeneralTracker]:
    """The trackers `train.report_to` names, for `Accelerator(log_with=...)`: made, not started."""
    return [CLASSES[name](run_dir, run_name) for name in dict.fromkeys(names)]


def start(accelerator: Accelerator, recipe: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Starts the run of every tracker with the recipe as hyperparameters (main process only), then
    logs `history`: a resumed run's trackers start a new run that holds the whole log, as metrics.jsonl does.

    Raises:
        PeftcliError: a tracker could not start (a server it cannot reach, a store it cannot write).
    """
    try:
        accelerator.init_trackers(PROJECT, config=hyperparameters(recipe))
    except Exception as exc:  # noqa: BLE001 - any tracker's failure, said in one line
        names = ", ".join(t.name for t in accelerator.trackers) or "a tracker"
        raise PeftcliError(
            f"train.report_to: {names} could not start ({first_line(exc, 200)}). Check the tracker's settings "
            "(docs/trackers.md), or remove it from train.report_to."
        ) from None
    for record in history:
        log(accelerator, record)


def log(accelerator: Accelerator, record: dict[str, Any]) -> None:
    """One metrics.jsonl record as a step of every tracker. A value metrics.jsonl writes as null (a NaN
    or infinite loss) is left out. A tracker that fails is said once and dropped: training goes on."""
    values = {k: v for k, v in finite(record).items() if k != "step" and v is not None}
    for tracker in list(accelerator.trackers):
        try:
            tracker.log(values, step=record["step"])
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not stop the training
            accelerator.trackers.remove(tracker)
            print(
                f"train.report_to: {tracker.name} stopped logging ({first_line(exc, 200)}); training goes on.",
                file=sys.stderr,
            )


def logging_to(accelerator: Accelerator, write: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """`write` (metrics.jsonl's) followed by the trackers: the one place every record goes through."""

    def on_log(record: dict[str, Any]) -> None:
        write(record)
        log(accelerator, record)

    return on_log


def log_summary(accelerator: Accelerator, report: dict[str, Any]) -> None:
    """report.json's figures, as each tracker keeps a summary (W&B's run summary; the others: the
    final step's values under report/)."""
    values = summary(report)
    for tracker in accelerator.trackers:
        tracker.log_summary(values, report["summary"]["steps"])


def close(accelerator: Accelerator, failed: bool = False) -> None:
    """Ends every tracker's run while this process still holds the run directory (accelerate's
    end_training runs later, after the lock is released); a failed run is marked so where the
    tracker has a status (MLflow, W&B). Closing never raises over the run's own outcome."""
    trackers, accelerator.trackers = list(accelerator.trackers), []
    for tracker in trackers:
        try:
            tracker.finish(failed=failed)
        except Exception as exc:  # noqa: BLE001
            if not failed:
                raise PeftcliError(
                    f"train.report_to: {tracker.name} could not finish its run ({first_line(exc, 200)})."
                ) from None


def hyperparameters(recipe: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The resolved recipe, flat: `optimizer.lr: 0.001`; a list or null as its JSON text
    (`method.target_modules: ["query", "key"]`), which every tracker stores."""
    return {
        k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
        for k, v in flatten(recipe, keep_empty=True).items()
    }


def summary(report: dict[str, Any]) -> dict[str, float]:
    """report.json's numbers, flat and prefixed: `report/summary.steps`, `report/best_metrics.accuracy`."""
    return {
        SUMMARY + k: v
        for k, v in flatten(finite(report), keep_empty=True).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
