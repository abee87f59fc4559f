"""Full fine-tuning: every parameter trains and is saved; train_last_layers trains the top blocks, the
final norm and the head only, found from the model's list of blocks on every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftcli.adapter_io import PREFIX
from peftcli.config.schema import TrainSpec
from peftcli.errors import MethodError
from peftcli.methods import METHODS, context_for
from peftcli.methods.base import find_blocks
from peftcli.methods.full import FullParams
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, randomize_trainable, run_training

FULL = METHODS["full"]
BLOCKS = {
    "bert-cls": "bert.encoder.layer",
    "llama-cls": "model.layers",
    "gpt2-lm": "transformer.h",
    "llama-lm": "model.layers",
}
# What trains above the blocks with train_last_layers: final norm, pooler, head. GPT-2's output layer is
# tied to the input embeddings, so it stays frozen with them.
TOP = {
    "bert-cls": {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"},
    "llama-cls": {"model.norm.weight", "score.weight"},
    "gpt2-lm": {"transformer.ln_f.weight", "transformer.ln_f.bias"},
    "llama-lm": {"model.norm.weight", "lm_head.weight"},
}


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", list(TINY))
def test_every_parameter_trains_and_is_saved(arch: str, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    params, adapted = adapt(model, FULL, task.name)
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    save_adapter(
        tmp_path, method_state(FULL, model, adapted), adapter_config(FULL, params, adapted, task, "tiny", None)
    )
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert set(state) == {PREFIX + n for n, _ in model.named_parameters()}
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(BLOCKS))
def test_blocks_are_found_from_the_module_list(arch: str) -> None:
    blocks = find_blocks(tiny_model(arch))
    assert blocks is not None and (blocks.path, blocks.count) == (BLOCKS[arch], 2)
    assert blocks.index(f"{BLOCKS[arch]}.1.mlp.weight") == 1 and blocks.index("lm_head.weight") is None


@pytest.mark.parametrize("arch", list(BLOCKS))  # encoder-decoders have no single top: test_seq2seq.py
def test_train_last_layers_trains_the_top_only(arch: str, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    params, adapted = adapt(model, FULL, task.name, train_last_layers=1)
    last_block = {n for n, _ in model.named_parameters() if n.startswith(BLOCKS[arch] + ".1.")}
    assert trainable(model) == last_block | TOP[arch]
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    out = logits(model, batch)
    save_adapter(
        tmp_path, method_state(FULL, model, adapted), adapter_config(FULL, params, adapted, task, "tiny", None)
    )
    fresh = tiny_model(arch)
    load_adapter(tmp_path, fresh, task)
    assert trainable(fresh) == last_block | TOP[arch]
    assert torch.equal(logits(fresh, batch), out)


def test_training_the_last_layer_leaves_the_rest_unchanged(tokenizer, tiny_data) -> None:
    model = tiny_model("llama-cls")
    adapt(model, FULL, "sequence_classification", train_last_layers=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_training(
        model,
        "sequence_classification",
        tokenizer,
        tiny_data,
        TrainSpec(batch_size=8, max_steps=4, log_every=1, seed=0),
    )
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable(model)
    assert "model.embed_tokens.weight" not in trainable(model)


def test_train_last_layers_must_fit_the_model() -> None:
    model = tiny_model("llama-lm")
    with pytest.raises(MethodError) as err:
        FULL.apply(model, FullParams(train_last_layers=5), context_for(model, ()))
    assert str(err.value) == (
        "method.train_last_layers: LlamaForCausalLM has 2 transformer blocks (got 5). "
        "Give at most 2, or null to train every layer."
    )


def test_train_last_layers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        FullParams(train_last_layers=0)


def test_a_model_without_a_block_list_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(
        MethodError, match=r"found no list of transformer blocks in Sequential \(got 1\)\. Set it to null"
    ):
        FULL.apply(model, FullParams(train_last_layers=1), context_for(model, ()))


def test_config_round_trips() -> None:
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, FULL, "sequence_classification", train_last_layers=2)
    config = FULL.peft_config(params, adapted)
    assert config == {
        "peft_type": "FULL",
        "train_last_layers": 2,
        "modules_to_save": ["classifier"],
        "inference_mode": True,
    }
    assert FULL.from_peft_config(config) == params
