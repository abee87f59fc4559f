"""The search of `peft sweep`: the space file read and checked (every problem at once, before
anything trains), and the trials it yields: the grid's product, seeded random draws, or Optuna's
TPE suggestions when Optuna is installed.

A space file:
    strategy: grid            # grid | random | optuna
    trials: 8                 # random and optuna: how many trials
    seed: 0                   # random and optuna: the same seed draws the same trials
    metric: accuracy          # optional: the metric to rank by (default: the recipe's best_metric)
    params:
      method.rank: [4, 8, 16]                       # a list: grid points, or choices to draw from
      optimizer.lr: {low: 1.0e-4, high: 3.0e-3, log: true}   # a range (int when both bounds are)
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftcli.config.safe_yaml import MAX_RECIPE_BYTES, Refused, safe_yaml
from peftcli.errors import PeftcliError

STRATEGIES = ("grid", "random", "optuna")
SPACE_KEYS = ("strategy", "trials", "seed", "metric", "params")
RANGE_KEYS = ("low", "high", "log")
MAX_TRIALS = 10_000


@dataclass(frozen=True)
class Param:
    """One swept recipe key: a list of values, or a range [low, high] (log-uniform with `log`)."""

    key: str
    values: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def examples(self) -> list[Any]:
        """The values a recipe is checked with before anything trains: every listed value, or both bounds."""
        return list(self.values) if self.values is not None else [self.low, self.high]

    def log_scale(self) -> bool:
        """Plotted on a log axis: a log range, or listed positive numbers spanning 10x or more."""
        if self.values is None:
            return self.log
        numbers = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return len(numbers) == len(self.values) and min(numbers) > 0 and max(numbers) >= 10 * min(numbers)


@dataclass(frozen=True)
class Space:
    path: Path
    strategy: str
    trials: int | None
    seed: int
    metric: str | None
    params: tuple[Param, ...]


def read_space(path: Path) -> Space:
    """The space file, checked whole: every problem one line, naming the key, the value and the fix."""
    where = f"{path}"
    raw = read_space_yaml(path)
    problems = [
        f"{where}: {key}: unknown key (got {raw[key]!r}). The keys of a space file are {', '.join(SPACE_KEYS)}."
        for key in raw
        if key not in SPACE_KEYS
    ]
    strategy = raw.get("strategy", "grid")
    if strategy not in STRATEGIES:
        problems.append(f"{where}: strategy: unknown strategy (got {strategy!r}). Use one of {', '.join(STRATEGIES)}.")
    trials = raw.get("trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or not 0 < trials <= MAX_TRIALS):
        problems.append(
            f"{where}: trials: not a whole number from 1 to {MAX_TRIALS} (got {trials!r}). Write e.g. trials: 8."
        )
        trials = None
    elif trials is None and strategy in ("random", "optuna"):
        problems.append(
            f"{where}: trials: missing; strategy {strategy} draws trials until it has this many. Add e.g. trials: 8."
        )
    elif trials is not None and strategy == "grid":
        problems.append(
            f"{where}: trials: {trials} given with strategy grid, which runs every point of the product. "
            "Remove trials, or use strategy: random."
        )
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"{where}: seed: not a whole number (got {seed!r}). Write e.g. seed: 0.")
        seed = 0
    metric = raw.get("metric")
    if metric is not None and not isinstance(metric, str):
        problems.append(
            f"{where}: metric: not a metric name (got {metric!r}). Write e.g. metric: accuracy, or leave it out."
        )
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        problems.append(
            f"{where}: params: no recipe key to sweep (got {params!r}). "
            "Map recipe keys to values, e.g. params: {{method.rank: [4, 8, 16]}}."
        )
        params = {}
    parsed = [param for key, spec in params.items() if (param := read_param(where, str(key), spec, strategy, problems))]
    if strategy == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append(
            f"{where}: strategy: optuna is not installed (got 'optuna'). Install it: pip install optuna "
            "(or pip install 'peftcli[sweep]'), or use strategy: random."
        )
    if problems:
        raise PeftcliError(*problems)
    return Space(path, strategy, trials, seed, metric, tuple(parsed))


def read_space_yaml(path: Path) -> dict[str, Any]:
    """The file as a mapping, through the recipe reader's guards (duplicate keys, nesting, aliases)."""
    if not path.is_file():
        raise PeftcliError(f"--space {path}: space file not found. Check the path (relative to {Path.cwd()}).")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise PeftcliError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; a space file is a short YAML file.")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8", errors="replace"))
    except Refused as exc:
        raise PeftcliError(f"{path}: {exc.message}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PeftcliError(f"{path}: invalid YAML ({problem}). Fix the syntax there.") from None
    if not isinstance(data, dict):
        raise PeftcliError(
            f"{path}: a space file is a YAML mapping (got {type(data).__name__}). "
            "Write strategy: and params: at least, e.g. params: {method.rank: [4, 8, 16]}."
        )
    return data


def read_param(where: str, key: str, spec: Any, strategy: str, problems: list[str]) -> Param | None:
    at = f"{where}: params.{key}"
    if key in ("output_dir", "name"):
        problems.append(f"{at}: peft sweep names each trial's run itself (got {spec!r}). Sweep another key.")
        return None
    if isinstance(spec, list):
        if not spec:
            problems.append(f"{at}: an empty list of values (got []). List at least one value, e.g. [4, 8].")
            return None
        return Param(key, values=tuple(spec))
    if not isinstance(spec, dict) or set(spec) - set(RANGE_KEYS) or not {"low", "high"} <= set(spec):
        problems.append(
            f"{at}: not a list of values nor a range (got {spec!r}). "
            "Write a list, e.g. [4, 8, 16], or a range, e.g. {low: 1.0e-4, high: 1.0e-2, log: true}."
        )
        return None
    if strategy == "grid":
        problems.append(
            f"{at}: a range (got {spec!r}) has no grid points. List the values, e.g. [{spec['low']}, {spec['high']}], "
            "or use strategy: random."
        )
        return None
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not numbers:
        problems.append(
            f"{at}: low and high must be numbers (got low={low!r}, high={high!r}). Write e.g. {{low: 4, high: 32}}."
        )
    elif low > high:
        problems.append(f"{at}: low > high (got low={low!r}, high={high!r}). Swap them.")
    elif not isinstance(log, bool):
        problems.append(f"{at}.log: true or false (got {log!r}).")
    elif log and low <= 0:
        problems.append(f"{at}: a log range needs low > 0 (got low={low!r}). Raise low, or write log: false.")
    else:
        return Param(key, low=low, high=high, log=log)
    return None


def grid_trials(space: Space) -> list[dict[str, Any]]:
    """Every combination, the first key's values changing slowest."""
    keys = [p.key for p in space.params]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(p.values or () for p in space.params))]


def random_trials(space: Space) -> list[dict[str, Any]]:
    """`trials` draws, the same for the same seed: a choice uniformly from a list, a number uniformly
    (or log-uniformly) from a range; floats kept to 4 significant digits so the table reads."""
    rng = random.Random(space.seed)
    return [{p.key: draw(p, rng) for p in space.params} for _ in range(space.trials or 0)]


def draw(p: Param, rng: random.Random) -> Any:
    if p.values is not None:
        return p.values[rng.randrange(len(p.values))]
    assert p.low is not None and p.high is not None
    if p.is_int and not p.log:
        return rng.randint(int(p.low), int(p.high))
    if p.log:
        value = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
    else:
        value = rng.uniform(p.low, p.high)
    if p.is_int:
        return min(int(p.high), max(int(p.low), round(value)))
    return min(p.high, max(p.low, float(f"{value:.4g}")))


class Search:
    """The trials in order: `ask()` the next one's number and values (None when done), `tell()` a
    trial's result by its number (None when it failed), in any order: trials may run at once. Grid
    and random know their trials up front; Optuna suggests each from the results told so far."""

    def __init__(self, space: Space, higher_is_better: bool) -> None:
        self.space = space
        self.planned: list[dict[str, Any]] | None = None
        self.asked = 0
        if space.strategy == "grid":
            self.planned = grid_trials(space)
        elif space.strategy == "random":
            self.planned = random_trials(space)
        else:
            self.study, self.pending = optuna_study(space, higher_is_better), {}

    def total(self) -> int:
        return len(self.planned) if self.planned is not None else self.space.trials or 0

    def ask(self) -> tuple[int, dict[str, Any]] | None:
        if self.asked >= self.total():
            return None
        self.asked += 1
        if self.planned is not None:
            return self.asked, self.planned[self.asked - 1]
        trial = self.study.ask(optuna_distributions(self.space))
        self.pending[self.asked] = trial
        return self.asked, {p.key: from_optuna(p, trial.params[p.key]) for p in self.space.params}

    def tell(self, number: int, value: float | None) -> None:
        if self.planned is not None:
            return
        import optuna

        trial = self.pending.pop(number)
        if value is None or not math.isfinite(value):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, value)


def optuna_study(space: Space, higher_is_better: bool) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=space.seed)
    return optuna.create_study(direction="maximize" if higher_is_better else "minimize", sampler=sampler)


def optuna_distributions(space: Space) -> dict[str, Any]:
    """A list becomes a choice of its positions (Optuna's choices must be plain scalars, and a list
    value such as target_modules is not); a range an int or float distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in space.params:
        if p.values is not None:
            out[p.key] = CategoricalDistribution(list(range(len(p.values))))
        elif p.is_int:
            out[p.key] = IntDistribution(int(p.low or 0), int(p.high or 0), log=p.log)
        else:
            out[p.key] = FloatDistribution(float(p.low or 0), float(p.high or 0), log=p.log)
    return out


def from_optuna(p: Param, value: Any) -> Any:
    if p.values is not None:
        return p.values[value]
    return value if p.is_int else min(p.high or 0.0, max(p.low or 0.0, float(f"{value:.4g}")))
