"""The speed tricks are entered in one place: `speedups.applied` enters the named ones that apply, and
benchmarks/speedups.py turns off/on pairs into its table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from peftcli.tasks.registry import TASKS
from peftcli.training.speedups.applied import (
    ALL,
    CHEAPER_DROPOUT,
    FIRST_POSITION,
    MATH_ATTENTION,
    NO_SPEEDUPS,
    applied,
)
from peftcli.training.speedups.dropout_masks import CheaperDropout
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def cheaper(model: nn.Module) -> int:
    return sum(type(m) is CheaperDropout for m in model.modules())


def test_applied_enters_the_named_tricks_and_leaves_nothing_behind() -> None:
    model = tiny_model("bert-cls")
    accelerator = Accelerator(cpu=True)
    task = TASKS["sequence_classification"]
    with applied(model, accelerator, task, True, frozenset()) as per_batch:
        assert pre_hooks(model) == 0 and cheaper(model) == 0 and per_batch == NO_SPEEDUPS
    with applied(model, accelerator, task, True, ALL) as per_batch:
        assert pre_hooks(model) == 1 and cheaper(model) > 0  # the first position, and the dropouts
        # what it reports entering: the tiny model's dropouts drop nothing (p 0), a classifier has no
        # output head to cut, and fp32 keeps torch's attention
        assert per_batch.entered == {FIRST_POSITION}
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    for m in dropouts:
        m.p = 0.1
    with applied(model, accelerator, task, True, ALL) as per_batch:
        assert per_batch.entered == {FIRST_POSITION, CHEAPER_DROPOUT}
    with applied(model, accelerator, task, False, ALL) as per_batch:
        assert pre_hooks(model) == 1 and cheaper(model) == 0  # an eval keeps torch's dropout
        assert per_batch.entered == {FIRST_POSITION}
    with applied(model, accelerator, task, True, ALL - {CHEAPER_DROPOUT}) as per_batch:
        assert cheaper(model) == 0 and per_batch.entered == {FIRST_POSITION}
    with applied(model.to(torch.bfloat16), accelerator, task, True, ALL) as per_batch:
        assert per_batch.entered == {CHEAPER_DROPOUT, MATH_ATTENTION}  # in 16 bits on the CPU
    model.float()
    for m in dropouts:
        m.p = 0.0
    assert pre_hooks(model) == 0 and cheaper(model) == 0


def test_the_first_position_narrowing_is_left_off_in_16_bits() -> None:
    """It pays in fp32 only (docs/benchmarks.md, "Speed tricks re-measured"): bf16 weights, or an
    accelerator that autocasts to bf16, and it is not entered, in training or in evals."""
    task = TASKS["sequence_classification"]
    model = tiny_model("bert-cls")
    with applied(model, Accelerator(cpu=True), task, False, ALL):
        assert pre_hooks(model) == 1
    with applied(model.to(torch.bfloat16), Accelerator(cpu=True), task, False, ALL):
        assert pre_hooks(model) == 0
    fp32 = tiny_model("bert-cls")
    with applied(fp32, Autocasting(), task, False, ALL):  # fp32 weights under bf16 autocast
        assert pre_hooks(fp32) == 0


class Autocasting:
    """What an eval's `applied` reads of an accelerator that autocasts to bf16 (accelerate's state is one
    per process, so the tests do not make a second Accelerator with another precision)."""

    mixed_precision = "bf16"

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model


def test_the_causal_lm_head_runs_at_the_targets_only_where_named() -> None:
    model = tiny_model("llama-lm")
    accelerator = Accelerator(cpu=True)
    task = TASKS["causal_lm"]
    with applied(model, accelerator, task, True, ALL) as per_batch:
        assert per_batch.head is model.get_output_embeddings()
    with applied(model, accelerator, task, True, ALL - {"head_at_targets"}) as per_batch:
        assert per_batch.head is None


def load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("speedups_benchmark", ROOT / "benchmarks" / "speedups.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_the_benchmark_keeps_a_trick_whose_median_pair_pays_5_percent() -> None:
    bench = load_benchmark()
    pairs = [({"step_s": 1.2, "eval_s": 2.0}, {"step_s": 1.0, "eval_s": 2.0}) for _ in range(2)]
    pairs.append(({"step_s": 0.9, "eval_s": 2.0}, {"step_s": 1.0, "eval_s": 2.0}))
    step, evals = bench.rows("minilm", "first_position", pairs)
    assert (step["phase"], evals["phase"]) == ("train step", "eval pass")
    assert step["speedup"] == 1.2 and step["keep"] and step["off_s"] == 1.2 and step["on_s"] == 1.0
    assert evals["speedup"] == 1.0 and not evals["keep"]
    table = bench.markdown([{"rows": [step, evals]}], "python benchmarks/speedups.py")
    assert "| minilm | first_position | train step | 1.200 | 1.000 | 1.200x | 1.200, 1.200, 0.900 | keep |" in table
