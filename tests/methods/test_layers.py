"""The facts about a base layer that methods share, each worked out once (methods/_layers.py), and the
one table of the targets `auto` picks per model type (methods/_targets.py)."""

from __future__ import annotations

import pytest
import torch
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.config.schema import ModelSpec
from peftcli.methods._layers import WrappedLayer, any_fan_in_fan_out, dense_weight, fan_in_fan_out, is_linear, out_in
from peftcli.methods._targets import DEFAULT_TARGETS, known_types, lookup
from peftcli.methods.base import linear_layer_names, name_matches, replace_module
from tests.conftest import tiny_model


def linear_and_conv1d(out: int = 3, inp: int = 5) -> tuple[nn.Linear, Conv1D]:
    """The same layer twice: nn.Linear stores its weight (out, in), GPT-2's Conv1D (in, out)."""
    torch.manual_seed(0)
    linear = nn.Linear(inp, out)
    conv = Conv1D(out, inp)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    return linear, conv


def test_out_in_and_orientation_of_linear_and_conv1d() -> None:
    linear, conv = linear_and_conv1d()
    assert out_in(linear) == out_in(conv) == (3, 5)
    assert not fan_in_fan_out(linear) and fan_in_fan_out(conv)
    assert is_linear(linear) and is_linear(conv) and not is_linear(nn.Embedding(3, 5))
    assert dense_weight(linear) is None and dense_weight(conv) is None  # float weights: nothing to dequantize


def test_a_wrapped_layer_has_the_facts_of_its_base_layer() -> None:
    linear, conv = linear_and_conv1d()
    x = torch.randn(2, 5)
    for layer in (linear, conv):
        wrapped = WrappedLayer(layer)
        assert (wrapped.out_features, wrapped.in_features) == out_in(layer)
        assert wrapped.fan_in_fan_out == fan_in_fan_out(layer)
        assert torch.equal(wrapped.float_weight(), linear.weight)  # (out, in) whatever the layout
        assert torch.equal(wrapped.oriented(wrapped.float_weight()), layer.weight)  # back to the stored layout
        torch.testing.assert_close(wrapped.times_weight(x) + layer.bias, layer(x))
        assert wrapped.weight is layer.weight and wrapped.bias is layer.bias


def test_fan_in_fan_out_of_a_model_sees_through_wrappers() -> None:
    gpt2, llama = tiny_model("gpt2-lm"), tiny_model("llama-lm")
    for model, expected in ((gpt2, True), (llama, False)):
        names = [n for n in linear_layer_names(model) if "lm_head" not in n]
        assert any_fan_in_fan_out(model, names) is expected
        for name in names:
            replace_module(model, name, WrappedLayer(model.get_submodule(name)))
        assert any_fan_in_fan_out(model, names) is expected


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_layer_keeps_the_shape_and_values_of_the_float_one(bits: int) -> None:
    """bitsandbytes packs a 4-bit weight into another shape; the layer's own features still say (out, in),
    and its dequantized weight is the one it computes with: the float one (Conv1D's too) up to the
    quantization error."""
    pytest.importorskip("bitsandbytes")
    from peftcli.models.quantization import quantize_loaded

    linear, conv = linear_and_conv1d(out=32, inp=64)  # 4-bit blocks take 64 inputs
    model = nn.Sequential(linear, conv)
    quantization = {"bits": bits} | ({"compute_dtype": "float32"} if bits == 4 else {})
    quantize_loaded(model, ModelSpec(name="x", quantization=quantization).quantization, ())
    reference = linear.weight.detach()
    x = torch.randn(4, 64)
    for layer in model:
        assert type(layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
        assert out_in(layer) == (32, 64) and not fan_in_fan_out(layer)
        weight = WrappedLayer(layer).float_weight()
        assert weight.shape == (32, 64) and weight.dtype == torch.float32
        torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, rtol=1e-4, atol=1e-5)
        assert (weight - reference).abs().mean() <= 0.2 * reference.abs().mean()


def test_the_ia3_defaults_are_hf_peft_s() -> None:
    """`auto` picks what HF peft's own tables pick, so an adapter trained with it loads the same way there."""
    assert known_types("ia3")
    for model_type in known_types("ia3"):
        targets, feedforward = DEFAULT_TARGETS[model_type].ia3
        assert targets == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        assert feedforward == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]


@pytest.mark.parametrize("arch", ["bert-cls", "gpt2-lm", "llama-lm", "t5-s2s", "bart-s2s"])
def test_every_default_target_names_linear_layers_of_its_model_type(arch: str) -> None:
    model = tiny_model(arch)
    linear = linear_layer_names(model)
    for kind in ("ia3", "block_outputs"):
        entry = lookup(model, kind)
        assert entry is not None, (arch, kind)
        for patterns in entry:
            assert any(name_matches(n, patterns) for n in linear), (arch, kind, patterns)


def test_a_model_without_a_known_type_has_no_defaults() -> None:
    assert lookup(nn.Linear(2, 2), "ia3") is None
    assert "None" not in DEFAULT_TARGETS
