"""Bottleneck adapters: where Houlsby and Pfeiffer put them, how wide they are, the residual formula,
the saved folder (our own peft_type, which HF peft refuses), and `peft merge` refusing them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file

from peftcli.adapter_io import PREFIX
from peftcli.config.load import validate_recipe
from peftcli.errors import MethodError, RecipeError
from peftcli.methods import METHODS
from peftcli.methods.bottleneck import BottleneckAdapter
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.cli.test_cli import files_under, peft, write_recipe
from tests.conftest import TINY, sample_batch, tiny_model, tiny_recipe
from tests.helpers import adapt, logits, randomize_trainable

BOTTLENECK = METHODS["bottleneck"]
HIDDEN = 32  # every tiny model's hidden size
LAYERS = 2

# The output projections each placement follows, as suffixes of the full module names.
PLACES = {
    "bert-cls": {
        "houlsby": ["attention.output.dense", "layer.{i}.output.dense"],
        "pfeiffer": ["layer.{i}.output.dense"],
    },
    "llama-lm": {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"]},
    "llama-cls": {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"]},
    "gpt2-lm": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"]},
}


def adapters(model: torch.nn.Module) -> dict[str, BottleneckAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


@pytest.mark.parametrize("arch", ["bert-cls", "llama-lm", "gpt2-lm"])
@pytest.mark.parametrize("config,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_houlsby_places_two_adapters_per_layer_and_pfeiffer_one(arch: str, config: str, per_layer: int) -> None:
    model = tiny_model(arch)
    _, adapted = adapt(model, BOTTLENECK, TINY[arch][1], config=config)
    found = adapters(model)
    assert len(found) == per_layer * LAYERS == len(adapted.adapted_modules)
    assert list(found) == adapted.adapted_modules
    for i in range(LAYERS):
        in_layer = sorted(n for n in found if f".{i}." in n)
        suffixes = [s.format(i=i) for s in PLACES[arch][config]]
        assert len(in_layer) == per_layer
        assert all(any(n.endswith(s) for n in in_layer) for s in suffixes), (in_layer, suffixes)


def test_bert_placement_is_the_self_output_and_the_output_dense() -> None:
    model = tiny_model("bert-cls")
    adapt(model, BOTTLENECK, "sequence_classification", config="houlsby")
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.attention.output.dense, BottleneckAdapter)  # BertSelfOutput.dense
    assert isinstance(layer.output.dense, BottleneckAdapter)  # BertOutput.dense
    assert not isinstance(layer.intermediate.dense, BottleneckAdapter)
    assert not isinstance(model.bert.pooler.dense, BottleneckAdapter)


def test_base_layer_keeps_its_weights_under_a_stable_name() -> None:
    reference = dict(tiny_model("llama-lm").named_parameters())
    model = tiny_model("llama-lm")
    adapt(model, BOTTLENECK, "causal_lm")
    params = dict(model.named_parameters())
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(params[f"{name}.base_layer.weight"], reference[f"{name}.weight"])
    assert not params[f"{name}.base_layer.weight"].requires_grad
    assert {
        f"{name}.adapter_down.weight",
        f"{name}.adapter_down.bias",
        f"{name}.adapter_up.weight",
        f"{name}.adapter_up.bias",
    } <= set(params)


@pytest.mark.parametrize(
    "settings,width",
    [
        ({}, HIDDEN // 16),
        ({"reduction_factor": 4}, HIDDEN // 4),
        ({"bottleneck_size": 5}, 5),
        ({"reduction_factor": 64}, 1),
    ],
    ids=["default-16", "factor-4", "size-5", "factor-64-at-least-1"],
)
def test_width_from_reduction_factor_or_bottleneck_size(settings: dict, width: int) -> None:
    model = tiny_model("llama-cls")
    _, adapted = adapt(model, BOTTLENECK, "sequence_classification", config="houlsby", **settings)
    for adapter in adapters(model).values():
        assert adapter.adapter_down.weight.shape == (width, HIDDEN)
        assert adapter.adapter_up.weight.shape == (HIDDEN, width)
    # 2 x 2 adapters of (d*m + m) + (m*d + d), plus the classification head (score) trained in full.
    head = model.score.weight.numel()
    expected = 2 * LAYERS * (2 * HIDDEN * width + width + HIDDEN) + head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert adapted.modules_to_save == ["score"]


def test_gpt2_conv1d_width_is_the_output_size() -> None:
    model = tiny_model("gpt2-lm")
    adapt(model, BOTTLENECK, "causal_lm", bottleneck_size=3)
    adapter = model.transformer.h[0].mlp.c_proj  # Conv1D(4*32 -> 32): weight is (in, out)
    assert adapter.adapter_down.weight.shape == (3, HIDDEN)


def recipe_problems(method: dict) -> list[str]:
    raw = {
        "task": "sequence_classification",
        "model": {"name": "x"},
        "method": method,
        "data": {"files": {"train": ["t.jsonl"]}},
    }
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, source="r.yaml")
    return [line for line in info.value.lines if ": method" in line]


def test_both_sizes_is_an_error() -> None:
    assert recipe_problems({"name": "bottleneck", "reduction_factor": 8, "bottleneck_size": 4}) == [
        (
            "r.yaml: method.bottleneck_size: conflicts with reduction_factor=8.0; set only one of the two, "
            "e.g. method.reduction_factor=null on the command line (got 4)."
        )
    ]


def test_attention_modules_with_pfeiffer_is_an_error() -> None:
    assert recipe_problems({"name": "bottleneck", "config": "pfeiffer", "attention_modules": ["o_proj"]}) == [
        (
            "r.yaml: method.attention_modules: unused with config pfeiffer, which adds adapters after the "
            "feed-forward block only; remove it, or set config: houlsby (got ['o_proj'])."
        )
    ]


def test_bad_activation_and_sizes_are_errors() -> None:
    assert recipe_problems({"name": "bottleneck", "activation": "sigmoid", "bottleneck_size": 0}) == [
        "r.yaml: method.bottleneck_size: input should be greater than 0 (got 0).",
        "r.yaml: method.activation: input should be 'relu', 'gelu', 'silu' or 'tanh' (got 'sigmoid').",
    ]


@pytest.mark.parametrize(
    "config,keys",
    [
        ("houlsby", "method.attention_modules and method.feedforward_modules"),
        ("pfeiffer", "method.feedforward_modules"),
    ],
)
def test_auto_on_an_unknown_model_type_names_the_keys_to_set(config: str, keys: str) -> None:
    model = tiny_model("llama-lm")
    model.config.model_type = "mystery"
    with pytest.raises(MethodError) as info:
        adapt(model, BOTTLENECK, "causal_lm", config=config)
    assert str(info.value) == (
        f"{keys}: 'auto' does not know model type 'mystery' (LlamaForCausalLM). Set {keys} to the output "
        "projections of the attention and feed-forward blocks (for Llama: [self_attn.o_proj] and [mlp.down_proj]); "
        "`peft inspect --modules RECIPE` lists the linear layers. 'auto' knows: bart, bert, bloom, camembert, deberta, "
        "deberta-v2, distilbert, electra, falcon, gemma, gemma2, gpt2, gpt_neox, gptj, llama, mistral, olmo, olmo2, "
        "opt, phi, phi3, qwen2, qwen3, roberta, t5, xlm-roberta."
    )


def test_explicit_lists_and_regex_override_auto() -> None:
    model = tiny_model("llama-lm")
    model.config.model_type = "mystery"  # explicit keys need no table entry
    _, adapted = adapt(
        model,
        BOTTLENECK,
        "causal_lm",
        config="houlsby",
        attention_modules=["o_proj"],
        feedforward_modules=r".*\.1\.mlp\.down_proj",
    )
    assert adapted.adapted_modules == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_overlapping_module_lists_are_an_error() -> None:
    # On BERT the suffix `output.dense` matches BertSelfOutput.dense too.
    with pytest.raises(MethodError) as info:
        adapt(
            tiny_model("bert-cls"),
            BOTTLENECK,
            "sequence_classification",
            config="houlsby",
            feedforward_modules=["output.dense"],
        )
    assert str(info.value) == (
        "method.attention_modules and method.feedforward_modules both match "
        "['bert.encoder.layer.0.attention.output.dense', 'bert.encoder.layer.1.attention.output.dense'] (2 in all). "
        r"Make them disjoint, e.g. with a regular expression ('.*\.layer\.\d+\.output\.dense' for BERT's "
        r"feed-forward output)."
    )


def test_modules_matching_nothing_is_an_error() -> None:
    with pytest.raises(
        MethodError, match=r"^method\.feedforward_modules \['fc9'\] matched no linear layer of LlamaForCausalLM"
    ):
        adapt(tiny_model("llama-lm"), BOTTLENECK, "causal_lm", config="pfeiffer", feedforward_modules=["fc9"])


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize(
    "settings", [{}, {"layer_norm": True, "activation": "gelu", "bottleneck_size": 8}], ids=["default", "layer-norm"]
)
def test_zero_up_projection_is_the_identity_whatever_the_down_projection(arch: str, settings: dict, tokenizer) -> None:
    batch = sample_batch(arch, tokenizer)
    expected = logits(tiny_model(arch), batch)
    model = tiny_model(arch)
    adapt(model, BOTTLENECK, TINY[arch][1], modules_to_save=[], **settings)
    found = adapters(model)
    assert all(not a.adapter_up.weight.any() and not a.adapter_up.bias.any() for a in found.values())
    assert all(a.adapter_down.weight.abs().max() > 0 for a in found.values())  # small random, not zero
    randomize_trainable(model)
    with torch.no_grad():
        for a in found.values():
            a.adapter_up.weight.zero_()
            a.adapter_up.bias.zero_()
    assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize(
    "activation,fn",
    [
        ("relu", torch.relu),
        ("gelu", torch.nn.functional.gelu),
        ("silu", torch.nn.functional.silu),
        ("tanh", torch.tanh),
    ],
)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_adapter_output_is_h_plus_up_act_down_h(activation: str, fn, layer_norm: bool) -> None:
    model = tiny_model("bert-cls")
    adapt(model, BOTTLENECK, "sequence_classification", activation=activation, layer_norm=layer_norm)
    randomize_trainable(model)
    adapter = model.bert.encoder.layer[0].output.dense
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        h = adapter.base_layer(x)
        z = (
            torch.nn.functional.layer_norm(h, (HIDDEN,), adapter.adapter_norm.weight, adapter.adapter_norm.bias)
            if layer_norm
            else h
        )
        down, up = adapter.adapter_down, adapter.adapter_up
        expected = h + fn(z @ down.weight.T + down.bias) @ up.weight.T + up.bias
        torch.testing.assert_close(adapter(x), expected, rtol=1e-6, atol=1e-6)


def save(model: torch.nn.Module, params, adapted, task_name: str, folder: Path) -> None:
    task = TASKS[task_name]
    save_adapter(
        folder,
        method_state(BOTTLENECK, model, adapted),
        adapter_config(BOTTLENECK, params, adapted, task, "tiny-base", None),
    )


def test_saved_folder_layout(tmp_path: Path) -> None:
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, BOTTLENECK, "sequence_classification", config="houlsby", reduction_factor=8)
    save(model, params, adapted, "sequence_classification", tmp_path)
    assert files_under(tmp_path) == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK"
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == "tiny-base"
    assert (config["config"], config["reduction_factor"], config["bottleneck_size"], config["activation"]) == (
        "houlsby",
        8,
        None,
        "relu",
    )
    # The resolved placement, not 'auto', so the folder loads the same way if the table changes.
    assert config["attention_modules"] == r".*\.attention\.output\.dense"
    assert config["feedforward_modules"] == r".*\.layer\.\d+\.output\.dense"
    assert config["modules_to_save"] == ["classifier"]
    state = load_file(tmp_path / "adapter_model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == {PREFIX + n for n in trainable}
    assert PREFIX + "bert.encoder.layer.0.attention.output.dense.adapter_down.weight" in state
    assert PREFIX + "classifier.weight" in state


@pytest.mark.parametrize("arch", ["llama-lm", "bert-cls"])
def test_pfeiffer_layer_norm_variant_saves_and_loads(arch: str, tokenizer, tmp_path: Path) -> None:
    task = TINY[arch][1]
    model = tiny_model(arch)
    params, adapted = adapt(
        model, BOTTLENECK, task, config="pfeiffer", layer_norm=True, activation="silu", bottleneck_size=3
    )
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    expected = logits(model, batch)
    save(model, params, adapted, task, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["attention_modules"] is None

    fresh = tiny_model(arch)
    _, loaded, loaded_adapted = load_adapter(tmp_path, fresh, TASKS[task])
    assert (loaded.config, loaded.layer_norm, loaded.activation, loaded.bottleneck_size) == (
        "pfeiffer",
        True,
        "silu",
        3,
    )
    assert loaded_adapted.adapted_modules == adapted.adapted_modules
    assert torch.equal(logits(fresh, batch), expected)


def test_hf_peft_refuses_our_folder_naming_bottleneck(tmp_path: Path) -> None:
    model = tiny_model("llama-lm")
    params, adapted = adapt(model, BOTTLENECK, "causal_lm")
    save(model, params, adapted, "causal_lm", tmp_path)
    with pytest.raises(KeyError, match="BOTTLENECK"):
        PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(KeyError, match="BOTTLENECK"):
        PeftModel.from_pretrained(tiny_model("llama-lm"), str(tmp_path))


def test_peft_merge_refuses_in_one_line(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    recipe = tiny_recipe(
        tiny_dirs["bert-cls"],
        tiny_data,
        "sequence_classification",
        output_dir=str(tmp_path / "run"),
        method={"name": "bottleneck"},
    )
    recipe["method"] = {"name": "bottleneck"}  # tiny_recipe merges sections: drop LoRA's keys
    trained = peft("train", str(write_recipe(tmp_path, recipe)))
    assert trained.returncode == 0, trained.stderr

    result = peft("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: {tmp_path / 'run' / 'adapter'}: bottleneck inserts new modules and cannot be merged into the weights."
    )
    assert "`peft eval`" in line
    assert not (tmp_path / "merged").exists()

    ev = peft("eval", str(tmp_path / "run"))
    assert ev.returncode == 0, ev.stderr
    trained_metrics = json.loads((tmp_path / "run" / "report.json").read_text())["final_metrics"]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"] == pytest.approx(
        trained_metrics, rel=1e-6
    )
