"""(IA)^3 against HF peft (the reference, test-only): the same vectors give the same outputs in both
directions, the saved file has HF peft's keys and shapes, merging folds the vectors as HF peft does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import load_file

from peftcli.errors import MethodError
from peftcli.methods import METHODS, context_for
from peftcli.methods.ia3 import IA3Linear, IA3Params
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, randomize_trainable

IA3 = METHODS["ia3"]
# Vectors around 1 (as trained ones are), so products stay in a sensible range.
SETTINGS = {
    "auto": {},
    "regex": {
        "target_modules": r".*\.(value|v_proj|c_attn|c_fc|up_proj|intermediate\.dense|v|wi)",
        "feedforward_modules": r".*\.(c_fc|up_proj|intermediate\.dense|wi)",
    },
}


def hf_config(settings: dict, task_type: str) -> IA3Config:
    return IA3Config(
        task_type=task_type,
        target_modules=settings.get("target_modules"),
        feedforward_modules=settings.get("feedforward_modules"),
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    randomize_trainable(model, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.add_(1.0)


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_our_ia3_loads_in_hf_peft_with_equal_outputs(arch: str, setting: str, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    params, adapted = adapt(model, IA3, task.name, **SETTINGS[setting])
    randomize(model, seed=1)
    batch = sample_batch(arch, tokenizer)
    ours = logits(model, batch)
    save_adapter(tmp_path, method_state(IA3, model, adapted), adapter_config(IA3, params, adapted, task, "tiny", None))

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_hf_peft_ia3_loads_in_ours_with_equal_outputs(arch: str, setting: str, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    theirs = get_peft_model(tiny_model(arch), hf_config(SETTINGS[setting], task.peft_task_type))
    randomize(theirs, seed=3)
    batch = sample_batch(arch, tokenizer)
    expected = logits(theirs, batch)
    theirs.save_pretrained(tmp_path)

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, task)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-6, atol=1e-6)
    n_trainable, _ = theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == n_trainable


@pytest.mark.parametrize("arch", list(TINY))
def test_saved_keys_and_shapes_equal_hf_peft(arch: str, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    params, adapted = adapt(model, IA3, task.name)
    save_adapter(
        tmp_path / "ours", method_state(IA3, model, adapted), adapter_config(IA3, params, adapted, task, "tiny", None)
    )
    get_peft_model(tiny_model(arch), hf_config({}, task.peft_task_type)).save_pretrained(tmp_path / "theirs")

    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # ones (and the same seeded head)


@pytest.mark.parametrize("arch", list(TINY))
def test_merge_folds_weights_and_biases_as_hf_peft(arch: str, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    ours = tiny_model(arch)
    params, adapted = adapt(ours, IA3, task.name)
    randomize(ours, seed=5)
    save_adapter(tmp_path, method_state(IA3, ours, adapted), adapter_config(IA3, params, adapted, task, "tiny", None))
    expected = PeftModel.from_pretrained(tiny_model(arch), tmp_path).merge_and_unload().state_dict()
    IA3.merge(ours)
    merged = ours.state_dict()
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_vectors_scale_outputs_of_attention_and_inputs_of_feedforward_layers() -> None:
    model = tiny_model("gpt2-lm")  # Conv1D: weights stored (in, out)
    adapt(model, IA3, "causal_lm")
    c_attn, c_proj = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
    assert isinstance(c_attn, IA3Linear) and not c_attn.is_feedforward and c_attn.ia3_l.shape == (96, 1)
    assert isinstance(c_proj, IA3Linear) and c_proj.is_feedforward and c_proj.ia3_l.shape == (1, 128)
    assert not isinstance(model.transformer.h[0].attn.c_proj, IA3Linear)  # attention output: not a target


def test_auto_targets_of_bert_follow_hf_peft() -> None:
    model = tiny_model("bert-cls")
    _, adapted = adapt(model, IA3, "sequence_classification")
    layer = "bert.encoder.layer.0."
    assert [n.removeprefix(layer) for n in adapted.adapted_modules if n.startswith(layer)] == [
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "output.dense",
    ]
    # HF peft's suffix rule makes attention.output.dense feed-forward too ("output.dense").
    assert all(model.get_submodule(layer + n).is_feedforward for n in ["attention.output.dense", "output.dense"])
    assert adapted.modules_to_save == ["classifier"]


def test_auto_on_an_unknown_model_type_says_what_to_set() -> None:
    model = tiny_model("bert-cls")
    model.config.model_type = "mystery"
    with pytest.raises(MethodError) as err:
        IA3.apply(model, IA3Params(), context_for(model, ("classifier",)))
    assert str(err.value) == (
        "method.target_modules: 'auto' knows no (IA)^3 targets for model type 'mystery' (known: "
        "bart, bert, deberta-v2, gemma, gemma2, gpt2, gpt_neox, llama, mistral, opt, phi, qwen2, qwen3, roberta, "
        "t5). Name them: "
        "target_modules (the attention's key and value projections and the MLP's output projection) and "
        "feedforward_modules (that MLP projection)."
    )


def test_feedforward_modules_must_be_targets() -> None:
    with pytest.raises(
        ValueError, match=r"feedforward_modules \['down_proj'\] are not in target_modules \['k_proj', 'v_proj'\]"
    ):
        IA3Params(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])


def test_explicit_targets_keep_only_the_feedforward_defaults_they_name() -> None:
    model = tiny_model("llama-lm")
    params, adapted = adapt(model, IA3, "causal_lm", target_modules=["v_proj", "down_proj"])
    config = IA3.peft_config(params, adapted)
    assert config["target_modules"] == ["v_proj", "down_proj"] and config["feedforward_modules"] == ["down_proj"]
    _, adapted = adapt(tiny_model("llama-lm"), IA3, "causal_lm", target_modules=["k_proj", "v_proj"])
    assert adapted.config_extras["feedforward_modules"] == []
