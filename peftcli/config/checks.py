"""Cross-checks of the run's name and the optimizer, schedule, train and method sections, each against
what the task, the method and the installed packages allow."""

from __future__ import annotations

import importlib.util
from typing import Any

from peftcli.config.describe import Problems, did_you_mean
from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.methods import METHODS
from peftcli.tasks.registry import TASKS


def name_problems(name: Any) -> Problems:
    # The run directory is runs/<name>: a name with a separator or `..` would put it elsewhere.
    if isinstance(name, str) and (name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0")):
        return [
            (
                ("name",),
                (
                    f"a run name is one folder name under runs/ (got {name!r}). Use letters, digits, - and _; "
                    "to write the run elsewhere, set output_dir."
                ),
            )
        ]
    return []


def method_train_problems(method: Any, train: TrainSpec) -> Problems:
    if train.gradient_checkpointing and not method.supports_gradient_checkpointing:
        return [
            (
                ("train", "gradient_checkpointing"),
                f"{method.name} cannot train with gradient checkpointing (got true). Set it to false.",
            )
        ]
    return []


def method_task_problems(method: Any, task: str) -> Problems:
    if TASKS[task].encoder_decoder and not method.supports_encoder_decoder:
        usable = ", ".join(m.name for m in METHODS.values() if m.supports_encoder_decoder)
        return [
            (
                ("method", "name"),
                f"{method.name} does not support encoder-decoder models (got task {task}). Use one of: {usable}.",
            )
        ]
    return []


def optimizer_problems(o: OptimizerSpec) -> Problems:
    if o.name.endswith("8bit") and importlib.util.find_spec("bitsandbytes") is None:
        return [
            (
                ("optimizer", "name"),
                (
                    f"needs bitsandbytes, which is not installed (got {o.name!r}). Install it: "
                    "pip install 'peftcli[quant]', or use adamw."
                ),
            )
        ]
    return []


def schedule_problems(s: ScheduleSpec) -> Problems:
    if s.warmup_steps is not None and s.warmup_ratio is not None:
        return [
            (
                ("schedule", "warmup_steps"),
                f"give warmup_steps or warmup_ratio, not both (got {s.warmup_steps} and {s.warmup_ratio}).",
            )
        ]
    return []


# train.report_to: each tracker and the modules it needs; its extra is peftcli[<name>] (pyproject.toml).
# mlflow's local store is SQLite, which mlflow-skinny reaches through sqlalchemy and alembic.
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
}


def tracker_problems(names: list[str]) -> Problems:
    """Unknown tracker names, and trackers whose packages are not installed (found without importing them)."""
    key = ("train", "report_to")
    for name in names:
        if name not in TRACKERS:
            hint = did_you_mean(name, list(TRACKERS))
            return [(key, f"unknown tracker (got {name!r}).{hint} Known trackers: {', '.join(TRACKERS)}.")]
    problems = []
    for name in dict.fromkeys(names):
        missing = [m for m in TRACKERS[name] if importlib.util.find_spec(m) is None]
        if missing:
            which = f"{' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed"
            problems.append((key, f"{name} needs {which} (got {name!r}). Install it: pip install 'peftcli[{name}]'."))
    return problems


def train_problems(t: TrainSpec, task: str) -> Problems:
    names = TASKS[task].metric_names
    if t.best_metric is not None and t.best_metric not in names:
        hint = did_you_mean(t.best_metric, list(names))
        return [
            (
                ("train", "best_metric"),
                f"not an eval metric of {task} (got {t.best_metric!r}).{hint} Metrics: {', '.join(names)}.",
            )
        ]
    return []
