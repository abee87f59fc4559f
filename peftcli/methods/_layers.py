"""What a base layer is, whatever its class: facts several methods and the model loader need, each
worked out here once, and the base class of every method's layer that wraps one."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(layer: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer that stores its weight as (in, out). transformers is imported
    here, where a model exists (so it is loaded already), not when `peft validate` reads a recipe."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


def fan_in_fan_out(layer: nn.Module) -> bool:
    """Whether the layer stores its weight as (in, out), as GPT-2's Conv1D does: HF peft's
    `fan_in_fan_out`, which adapter_config.json records."""
    return is_conv1d(layer)


def any_fan_in_fan_out(model: nn.Module, names: list[str]) -> bool:
    """adapter_config.json's `fan_in_fan_out` for the layers `names` of `model` (plain or wrapped):
    true where any of them stores its weight as (in, out)."""
    layers = (model.get_submodule(n) for n in names)
    return any(fan_in_fan_out(getattr(layer, "base_layer", layer)) for layer in layers)


def out_in(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer. nn.Linear says so itself, which also covers a
    quantized base (bitsandbytes' Linear4bit packs its weight into another shape); GPT-2's Conv1D
    stores its weight as (in, out)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    w = layer.weight
    return (w.shape[1], w.shape[0]) if fan_in_fan_out(layer) else (w.shape[0], w.shape[1])


def dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """A bitsandbytes layer's weight as the float32 (out, in) matrix it computes with; None for any
    other layer (its weight is already a float tensor)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype.is_floating_point:
        return None  # bitsandbytes is an optional extra: not imported for a float model
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    if isinstance(layer, bnb.nn.Linear4bit):
        weight = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        # Row scales: on the weight until the first product moves them to the layer's state.
        scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
        weight = layer.weight.data.float() * scb.float().unsqueeze(1) / 127
    else:
        return None
    return weight.reshape(layer.out_features, layer.in_features)


class WrappedLayer(nn.Module):
    """A frozen linear layer (nn.Linear, GPT-2's Conv1D, which stores its weight transposed, or a
    bitsandbytes 4- or 8-bit one) that a method wraps. It stays `base_layer`, so parameter names match
    HF peft's, and `weight` / `bias` stay the base layer's: model code sometimes reads
    `layer.weight.dtype`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Read on every forward of some methods: worked out once, the base layer never changes.
        self.fan_in_fan_out = fan_in_fan_out(base_layer)

    @property
    def out_features(self) -> int:
        return out_in(self.base_layer)[0]

    @property
    def in_features(self) -> int:
        return out_in(self.base_layer)[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def oriented(self, matrix: torch.Tensor) -> torch.Tensor:
        """An (out, in) matrix as the base layer stores its weight: transposed for Conv1D."""
        return matrix.T if self.fan_in_fan_out else matrix

    def float_weight(self) -> torch.Tensor:
        """The base weight as an (out, in) matrix in float32 (a new tensor), a quantized one dequantized."""
        quantized = dense_weight(self.base_layer)
        if quantized is not None:
            return quantized
        return self.oriented(self.base_layer.weight.detach().float()).clone()

    def times_weight(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T without the bias: the frozen weight where it is a float tensor; a quantized one
        dequantized, as HF peft does (bitsandbytes' 8-bit product would also quantize x)."""
        quantized = dense_weight(self.base_layer)
        if quantized is not None:
            return x.to(quantized.dtype) @ quantized.T
        w = self.base_layer.weight
        return x.to(w.dtype) @ (w if self.fan_in_fan_out else w.T)
