"""BitFit: only biases (and the head) train, the file holds exactly them, Llama is refused clearly,
and train_last_layers keeps the lower blocks frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftcli.adapter_io import PREFIX
from peftcli.config.schema import TrainSpec
from peftcli.errors import MethodError
from peftcli.methods import METHODS, context_for
from peftcli.methods.bitfit import BitfitParams
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, randomize_trainable, run_training

BITFIT = METHODS["bitfit"]


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["bert-cls", "gpt2-lm"])
def test_only_biases_and_the_head_train(arch: str) -> None:
    model = tiny_model(arch)
    _, adapted = adapt(model, BITFIT, TINY[arch][1])
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert trainable(model) == biases | head
    assert adapted.modules_to_save == (["classifier"] if head else [])
    # Layer-norm biases are bias terms too (the paper trains every one).
    assert any("LayerNorm.bias" in n or "ln_1.bias" in n for n in trainable(model))
    assert "classifier" not in adapted.adapted_modules


@pytest.mark.parametrize(
    "arch,model_class", [("llama-cls", "LlamaForSequenceClassification"), ("llama-lm", "LlamaForCausalLM")]
)
def test_a_model_without_biases_is_refused(arch: str, model_class: str) -> None:
    model = tiny_model(arch)
    with pytest.raises(MethodError) as err:
        BITFIT.apply(model, BitfitParams(), context_for(model, TASKS[TINY[arch][1]].head_modules))
    assert str(err.value) == f"method bitfit: {model_class} has no bias parameters to train. Use lora or ia3."


def test_saved_file_holds_the_biases_and_the_head(tmp_path: Path) -> None:
    task = TASKS["sequence_classification"]
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, BITFIT, task.name)
    save_adapter(
        tmp_path, method_state(BITFIT, model, adapted), adapter_config(BITFIT, params, adapted, task, "tiny", None)
    )
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert set(state) == {PREFIX + n for n in trainable(model)}
    assert PREFIX + "bert.encoder.layer.0.attention.self.query.bias" in state
    assert PREFIX + "classifier.weight" in state
    config = BITFIT.peft_config(params, adapted)
    assert config["peft_type"] == "BITFIT" and config["modules_to_save"] == ["classifier"]


def test_train_last_layers_trains_the_top_biases_only(tokenizer, tmp_path: Path) -> None:
    task = TASKS["sequence_classification"]
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, BITFIT, task.name, train_last_layers=1)
    expected = {
        n
        for n, _ in model.named_parameters()
        if (n.startswith("bert.encoder.layer.1.") and n.endswith(".bias"))
        or n == "bert.pooler.dense.bias"
        or n.startswith("classifier.")
    }
    assert trainable(model) == expected
    randomize_trainable(model)
    batch = sample_batch("bert-cls", tokenizer)
    out = logits(model, batch)
    save_adapter(
        tmp_path, method_state(BITFIT, model, adapted), adapter_config(BITFIT, params, adapted, task, "tiny", None)
    )
    fresh = tiny_model("bert-cls")
    load_adapter(tmp_path, fresh, task)
    assert trainable(fresh) == expected
    assert torch.equal(logits(fresh, batch), out)


def test_training_with_train_last_layers_changes_only_the_top_biases(tokenizer, tiny_data) -> None:
    model = tiny_model("gpt2-lm")
    adapt(model, BITFIT, "causal_lm", train_last_layers=1)
    selected = trainable(model)
    assert selected == {n for n, _ in model.named_parameters() if n.endswith(".bias") and (".h.1." in n or "ln_f" in n)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_training(model, "causal_lm", tokenizer, tiny_data, TrainSpec(batch_size=8, max_steps=4, log_every=1, seed=0))
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == selected


def test_too_many_layers_is_an_error() -> None:
    model = tiny_model("bert-cls")
    with pytest.raises(MethodError) as err:
        BITFIT.apply(model, BitfitParams(train_last_layers=3), context_for(model, ("classifier", "score")))
    assert str(err.value) == (
        "method.train_last_layers: BertForSequenceClassification has 2 transformer blocks (got 3). "
        "Give at most 2, or null to train every layer."
    )


def test_merge_is_a_no_op() -> None:
    model = tiny_model("bert-cls")
    adapt(model, BITFIT, "sequence_classification")
    randomize_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    BITFIT.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
