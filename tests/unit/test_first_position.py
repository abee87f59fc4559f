"""Sequence classification's last layer at the first position only: the same logits and gradients
for every method where the model reads that position, and untouched models where it does not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peftcli.config.schema import OptimizerSpec, TrainSpec
from peftcli.methods import METHODS
from peftcli.tasks.registry import TASKS
from peftcli.training.speedups.first_position import first_position_only, last_layer, residual_output
from tests.conftest import tiny_model
from tests.helpers import adapt, random_batches, randomize_trainable, run_training

TASK = "sequence_classification"


def adapted(arch: str, method: str) -> nn.Module:
    model = tiny_model(arch)
    adapt(model, METHODS[method], TASK)
    randomize_trainable(model)  # a zero-initialized adapter would hide a narrowing that skips it
    return model


def inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in random_batches(model, TASK)[0].items() if k != "labels"}


def pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", list(METHODS))
def test_bert_logits_are_the_same_at_the_first_position_only(method: str) -> None:
    model = adapted("bert-cls", method)
    batch = inputs(model)
    with torch.no_grad():
        full = model(**batch).logits
        with first_position_only(model, model, enabled=True) as narrowed:
            hooks = pre_hooks(model)
            narrow = model(**batch).logits
    assert narrowed
    assert hooks == pre_hooks(model) + 1  # the hook was there, and is gone
    torch.testing.assert_close(narrow, full, rtol=1e-5, atol=1e-6)


def test_the_narrowing_starts_at_the_last_layers_attention_output() -> None:
    model = tiny_model("bert-cls")
    assert residual_output(last_layer(model)) is model.bert.encoder.layer[-1].attention.output


def test_the_narrowed_layer_computes_one_position() -> None:
    model = tiny_model("bert-cls")
    batch = inputs(model)
    seen = []
    model.bert.encoder.layer[-1].intermediate.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad(), first_position_only(model, model, enabled=True):
        seen.clear()  # the probe's forwards
        model(**batch)
    assert seen == [torch.Size([batch["input_ids"].shape[0], 1, model.config.intermediate_size])]


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prompt_tuning", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_are_the_same_at_the_first_position_only(method: str, checkpointing: bool) -> None:
    """Train mode (the tiny model has no dropout): every trainable parameter gets the same gradient,
    also when gradient checkpointing runs the last layer again during the backward pass."""
    grads = []
    for narrowing in (False, True):
        model = adapted("bert-cls", method)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = random_batches(model, TASK)[0]
        with first_position_only(model, model, enabled=narrowing) as narrowed:
            assert narrowed == narrowing
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            # Inside the block, as in the trainer: checkpointing runs the last layer again here.
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    full, narrow = grads
    assert full.keys() == narrow.keys()
    for name in full:
        torch.testing.assert_close(narrow[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_that_reads_another_position_is_left_alone() -> None:
    """Llama's classifier reads the last token: it has no BERT-style residual output, so nothing is
    hooked and the logits are the model's own."""
    model = adapted("llama-cls", "lora")
    batch = inputs(model)
    with torch.no_grad():
        full = model(**batch).logits
        with first_position_only(model, model, enabled=True) as narrowed:
            assert pre_hooks(model) == 0
            narrow = model(**batch).logits
    assert not narrowed
    torch.testing.assert_close(narrow, full, rtol=0, atol=0)


def test_the_probe_refuses_a_head_that_reads_the_last_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BERT whose classifier reads the last position instead: the probe's logits differ, so the
    model runs unchanged."""
    model = adapted("bert-cls", "lora")
    pooler = model.bert.pooler
    pooler.forward = lambda hidden_states: pooler.activation(pooler.dense(hidden_states[:, -1]))
    batch = inputs(model)
    with torch.no_grad():
        full = model(**batch).logits
        with first_position_only(model, model, enabled=True) as narrowed:
            narrow = model(**batch).logits
    assert not narrowed
    torch.testing.assert_close(narrow, full, rtol=0, atol=0)


def test_tasks_that_read_every_position_are_not_narrowed() -> None:
    model = tiny_model("bert-cls")
    with first_position_only(model, model, enabled=TASKS["token_classification"].reads_one_position) as narrowed:
        assert pre_hooks(model) == 0
    assert not narrowed


def test_an_eval_inside_a_narrowed_training_loop_hooks_once() -> None:
    model = tiny_model("bert-cls")
    with first_position_only(model, model, enabled=True), first_position_only(model, model, enabled=True) as inner:
        assert inner
        assert pre_hooks(model) == 1
    assert pre_hooks(model) == 0


def test_training_with_and_without_the_narrowing_gives_the_same_adapter(monkeypatch, tokenizer, tiny_data) -> None:
    """The trainer's loop and its evals: the same LoRA weights and eval metrics after 3 steps, and the
    narrowed run's last feed-forward saw one position per example."""
    runs = []
    for reads_one_position in (False, True):
        monkeypatch.setitem(TASKS, TASK, dataclasses.replace(TASKS[TASK], reads_one_position=reads_one_position))
        model = adapted("bert-cls", "lora")
        lengths = []
        model.bert.encoder.layer[-1].intermediate.register_forward_hook(
            lambda m, args, out, seen=lengths: seen.append(out.shape[1])
        )
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # SGD, not AdamW: Adam's first step is about lr * sign(gradient), so a gradient entry near zero
        # turns a rounding difference in the last bit into a whole step of lr
        result = run_training(
            model,
            TASK,
            tokenizer,
            tiny_data,
            TrainSpec(batch_size=8, max_steps=3, seed=0),
            OptimizerSpec(name="sgd", lr=0.5),
        )
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((trained, result.final_metrics, lengths))
    (full, full_metrics, full_lengths), (narrow, narrow_metrics, narrow_lengths) = runs
    assert min(full_lengths) > 1 and max(narrow_lengths[2:]) == 1  # after the probe's two forwards
    assert [n for n in narrow if torch.equal(narrow[n], start[n])] == []  # every trainable tensor moved
    for name in full:
        torch.testing.assert_close(narrow[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    assert narrow_metrics == pytest.approx(full_metrics, rel=1e-5)
