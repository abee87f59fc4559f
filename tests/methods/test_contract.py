"""The contract every registered method keeps, on every tiny architecture: see STYLE.md.

A new method in METHODS gets all of these tests without writing any."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftcli.methods
from peftcli.config.schema import TrainSpec
from peftcli.methods import METHODS, Kind
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, randomize_trainable, run_training, training_hooks

ARCHS = list(TINY)
# (method, arch) pairs where the method cannot apply by design, with the reason; each method's own test
# file asserts the exact error instead.
NOT_APPLICABLE = {
    ("bitfit", "llama-cls"): "Llama has no bias parameters",
    ("bitfit", "llama-lm"): "Llama has no bias parameters",
    ("bitfit", "t5-s2s"): "T5 has no bias parameters",
}
# Encoder-decoders take only the methods that support them (recipe validation refuses the others;
# tests/methods/test_seq2seq.py checks the message).
NOT_APPLICABLE |= {
    (m, a): "no encoder-decoder support"
    for m in METHODS
    for a in ARCHS
    if TASKS[TINY[a][1]].encoder_decoder and not METHODS[m].supports_encoder_decoder
}
CASES = [(m, a) for m in METHODS for a in ARCHS if (m, a) not in NOT_APPLICABLE]
# Prepended virtual tokens take the position a tiny random classifier pools (BERT's first token; a Llama
# classifier given inputs_embeds pools the last position, as in HF peft): its pooled output then hardly
# depends on the input, so 12 steps cannot lower the loss reliably. These pairs still check that exactly
# the trainable set changes; the causal-LM archs check that the loss falls, and the quickstart and SST-2
# runs on MiniLM (docs/methods.md) show these methods learning on a real encoder.
LOSS_NOT_CHECKED = {
    ("prompt_tuning", "bert-cls"): "virtual token at the pooled position",
    ("prompt_tuning", "llama-cls"): "virtual token at the pooled position",
    ("p_tuning", "bert-cls"): "virtual token at the pooled position",
    ("p_tuning", "llama-cls"): "virtual token at the pooled position",
}


def test_every_method_file_is_registered() -> None:
    folder = Path(peftcli.methods.__file__).parent
    # Files starting with _ hold machinery shared by several methods (e.g. virtual-token plumbing).
    files = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")} - {"__init__", "base"}
    registered = {m.__module__.rsplit(".", 1)[-1] for m in (METHODS[k].apply for k in METHODS)}
    assert files == registered


# Virtual tokens change the input by design; every other method starts as the identity.
@pytest.mark.parametrize("method_name,arch", [c for c in CASES if METHODS[c[0]].kind is not Kind.VIRTUAL_TOKENS])
def test_fresh_adapter_reproduces_base_model(method_name: str, arch: str, tokenizer) -> None:
    base = tiny_model(arch)
    batch = sample_batch(arch, tokenizer)
    expected = logits(base, batch)
    adapted = tiny_model(arch)
    adapt(adapted, METHODS[method_name], TINY[arch][1])
    assert torch.equal(logits(adapted, batch), expected)


@pytest.mark.parametrize("method_name,arch", CASES)
def test_training_changes_only_adapter_and_lowers_loss(method_name: str, arch: str, tokenizer, tiny_data) -> None:
    task = TINY[arch][1]
    model = tiny_model(arch)
    method = METHODS[method_name]
    params, adapted = adapt(model, method, task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = TrainSpec(batch_size=8, max_steps=12, log_every=1, seed=0)
    result = run_training(
        model, task, tokenizer, tiny_data, spec, method_hooks=training_hooks(model, method, params, adapted)
    )
    params_now = dict(model.named_parameters())
    changed = {n for n, p in params_now.items() if not torch.equal(p, before[n])}
    assert changed <= trainable
    # AdaLoRA's budget may prune every rank of a layer: its zero-initialized singular values end at zero.
    pruned = {n for n in trainable - changed if method.training_hooks is not None and not params_now[n].any()}
    assert changed | pruned == trainable
    if (method_name, arch) in LOSS_NOT_CHECKED:
        return
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.parametrize("method_name,arch", CASES)
def test_save_then_load_keeps_outputs(method_name: str, arch: str, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    method = METHODS[method_name]
    model = tiny_model(arch)
    params, adapted = adapt(model, method, task.name)
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    expected = logits(model, batch)
    save_adapter(
        tmp_path / "adapter",
        method_state(method, model, adapted),
        adapter_config(method, params, adapted, task, "tiny", None),
    )

    fresh = tiny_model(arch)
    load_adapter(tmp_path / "adapter", fresh, task)
    assert torch.equal(logits(fresh, batch), expected)


@pytest.mark.parametrize("method_name,arch", [c for c in CASES if METHODS[c[0]].merge is not None])
def test_merge_keeps_outputs(method_name: str, arch: str, tokenizer) -> None:
    method = METHODS[method_name]
    model = tiny_model(arch)
    adapt(model, method, TINY[arch][1])
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    expected = logits(model, batch)
    method.merge(model)
    reference = tiny_model(arch)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in reference.named_parameters()}
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
