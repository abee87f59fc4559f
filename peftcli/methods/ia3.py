"""(IA)^3: learned vectors that rescale keys, values and feed-forward activations.

Liu et al. 2022, https://arxiv.org/abs/2205.05638. For a targeted linear layer y = W x + b, an attention
projection becomes y' = l ⊙ (W x + b) (a vector l over the output features) and a feed-forward layer
y' = W (l ⊙ x) + b (l over the input features, i.e. the activations inside the MLP). Every l starts at
ones, so training starts from the base model exactly; both forms fold into W (and b) when merged.

Parameter names follow HF peft's saved layout (`<module>.ia3_l`, shape (out, 1), or (1, in) for a
feed-forward module, also for GPT-2's transposed Conv1D), so the trainable state dict is the adapter
file with a `base_model.model.` prefix.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from peftcli.errors import MethodError
from peftcli.methods._layers import WrappedLayer, any_fan_in_fan_out
from peftcli.methods._targets import known_types, lookup, model_type
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Kind,
    Method,
    expand_all_linear,
    find_targets,
    freeze,
    merge_layers,
    refuse_unsupported,
    replace_module,
    train_modules_to_save,
)


class IA3Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | str = Field(
        "auto",
        description="'auto' (keys, values and the MLP output of the model type, as HF peft picks them), "
        "module names matched as dotted suffixes (e.g. [key, value, output.dense]), "
        "a regular expression over full names, or 'all-linear'",
    )
    feedforward_modules: list[str] | str = Field(
        "auto",
        description="the targets scaled on their input (the MLP's activations) rather than their output: "
        "'auto' (the model type's MLP output projection, when targeted), names matched as suffixes, or a regular "
        "expression",
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> IA3Params:
        # HF peft refuses such a config on load, so an adapter saved with it could not be shared.
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            outside = [m for m in self.feedforward_modules if m not in self.target_modules]
            if outside:
                raise ValueError(
                    f"feedforward_modules {outside} are not in target_modules {self.target_modules}; "
                    "list every feed-forward module among the targets too"
                )
        return self


class IA3Linear(WrappedLayer):
    """A frozen linear layer (nn.Linear, or GPT-2's transposed Conv1D) whose output, or input for a
    feed-forward layer, is multiplied by a trainable vector `ia3_l`."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    def merged(self) -> nn.Module:
        """The base layer with the vector folded in: columns of W (its inputs) for a feed-forward layer,
        rows of W and the bias (its outputs) otherwise. Conv1D stores W transposed."""
        w, b = self.base_layer.weight, self.base_layer.bias
        scale = self.ia3_l.detach()
        with torch.no_grad():
            w.mul_(self.oriented(scale).to(w.dtype))
            if not self.is_feedforward and b is not None:
                b.mul_(scale.flatten().to(b.dtype))
        return self.base_layer


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    targets = lookup(model, "ia3")
    if targets is None:
        raise MethodError(
            f"method.target_modules: 'auto' knows no (IA)^3 targets for model type {model_type(model)!r} "
            f"(known: {', '.join(known_types('ia3'))}). Name them: target_modules (the attention's key "
            "and value projections and the MLP's output projection) and feedforward_modules (that MLP projection)."
        )
    return targets


def resolve_targets(model: nn.Module, params: IA3Params, ctx: ApplyContext) -> tuple[list[str] | str, list[str] | str]:
    """(target_modules, feedforward_modules) as they are saved: explicit lists or regular expressions."""
    targets: list[str] | str = params.target_modules
    targets = default_targets(model)[0] if targets == "auto" else expand_all_linear(model, targets, ctx)
    feedforward: list[str] | str = params.feedforward_modules
    if feedforward == "auto":
        table = default_targets(model)[1]
        # Only the table's entries that are targets: HF peft requires feedforward ⊆ targets.
        feedforward = table if isinstance(targets, str) else [m for m in table if m in targets]
    return targets, feedforward


def is_feedforward(name: str, feedforward: list[str] | str) -> bool:
    """HF peft's rule, kept exactly (a plain suffix, no dot boundary) so both pick the same modules."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(m) for m in feedforward)


def apply(model: nn.Module, params: IA3Params, ctx: ApplyContext) -> Adapted:
    freeze(model)
    targets, feedforward = resolve_targets(model, params, ctx)
    names = find_targets(model, targets, ctx, "method.target_modules")
    for name in names:
        replace_module(model, name, IA3Linear(model.get_submodule(name), is_feedforward(name, feedforward)))
    return Adapted(
        adapted_modules=names,
        modules_to_save=train_modules_to_save(model, params.modules_to_save, ctx),
        target_modules=targets,
        config_extras={"feedforward_modules": feedforward, "fan_in_fan_out": any_fan_in_fan_out(model, names)},
    )


def merge(model: nn.Module) -> None:
    merge_layers(model, IA3Linear)


def peft_config(params: IA3Params, adapted: Adapted) -> dict[str, Any]:
    return {
        "peft_type": "IA3",
        "target_modules": adapted.target_modules,
        "feedforward_modules": adapted.config_extras["feedforward_modules"],
        "exclude_modules": None,
        "fan_in_fan_out": adapted.config_extras.get("fan_in_fan_out", False),
        "modules_to_save": adapted.modules_to_save or None,
        "init_ia3_weights": True,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> IA3Params:
    # Any value but an empty one (JSON's falsy values) names modules to leave out.
    refuse_unsupported(config, {"exclude_modules": (None, False, "", [], {})}, "(IA)^3")
    return IA3Params(
        target_modules=config.get("target_modules") or "auto",
        feedforward_modules=config.get("feedforward_modules")
        if config.get("feedforward_modules") is not None
        else "auto",
        modules_to_save=config.get("modules_to_save") or [],
    )


METHOD = Method(
    name="ia3",
    summary="learned vectors rescaling keys, values and feed-forward activations",
    kind=Kind.ACTIVATION_SCALE,
    params=IA3Params,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=merge,
    peft_type="IA3",
    paper="https://arxiv.org/abs/2205.05638",
)
