"""Bottleneck adapters: a small residual MLP h + W_up f(W_down h) on the output of chosen projections.

Houlsby et al. 2019, https://arxiv.org/abs/1902.00751: an adapter after the attention block's output
projection and one after the feed-forward block's, in every layer. Pfeiffer et al. 2020 (AdapterFusion),
https://arxiv.org/abs/2005.00247: after the feed-forward block only, half the parameters for about the
same quality, hence the default (as in AdapterHub). W_down (d -> m) starts small and random and W_up
(m -> d) at zero, so training starts from the base model exactly; m = d / reduction_factor, or
bottleneck_size. With layer_norm the adapter normalizes its input first (Bapna & Firat 2019,
https://arxiv.org/abs/1909.08478): h + W_up f(W_down LN(h)).

Each adapter wraps the output projection it follows (`<projection>.base_layer` keeps the frozen layer,
`adapter_down` and `adapter_up` are new), so it sees the projection's output before the block's dropout,
residual sum and LayerNorm. The non-linearity makes it impossible to fold into the weights: no merge.
HF peft has no such method; the folder has HF peft's layout with our own peft_type, BOTTLENECK.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from peftcli.errors import MethodError
from peftcli.methods._layers import WrappedLayer, out_in
from peftcli.methods._targets import known_types, lookup, model_type
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Kind,
    Method,
    find_targets,
    freeze,
    linear_layer_names,
    replace_module,
    train_modules_to_save,
)

DEFAULT_REDUCTION_FACTOR = 16
INIT_STD = 1e-2  # Houlsby's near-identity initialization of W_down

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

MODULES_HELP = "a list of dotted suffixes, a regular expression over full names, or 'auto' (a table by model type)"


class BottleneckParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["bottleneck"] = "bottleneck"
    config: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer",
        description="placement: pfeiffer = after the feed-forward output projection only (1 adapter per "
        "layer; AdapterHub's default); houlsby = after the attention and the feed-forward output projections (2)",
    )
    reduction_factor: float | None = Field(
        None,
        gt=0,
        description=f"bottleneck width m = hidden size / reduction_factor ({DEFAULT_REDUCTION_FACTOR} "
        "when neither this nor bottleneck_size is set)",
    )
    bottleneck_size: int | None = Field(None, gt=0, description="bottleneck width m, instead of reduction_factor")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="the non-linearity between the down- and the up-projection"
    )
    layer_norm: bool = Field(
        False,
        description="normalize the adapter's input with its own LayerNorm (Bapna & Firat 2019): "
        "the update no longer depends on the scale of the projection's output",
    )
    attention_modules: list[str] | str = Field(
        "auto", description=f"attention output projections to follow (houlsby only): {MODULES_HELP}"
    )
    feedforward_modules: list[str] | str = Field(
        "auto", description=f"feed-forward output projections to follow: {MODULES_HELP}"
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @field_validator("bottleneck_size")
    @classmethod
    def _one_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        factor = info.data.get("reduction_factor")
        if value is not None and factor is not None:
            raise PydanticCustomError(
                "two_sizes",
                "conflicts with reduction_factor={factor}; set only one of the two, "
                "e.g. method.reduction_factor=null on the command line",
                {"factor": factor},
            )
        return value

    @field_validator("attention_modules")
    @classmethod
    def _attention_needs_houlsby(cls, value: list[str] | str, info: ValidationInfo) -> list[str] | str:
        if value != "auto" and info.data.get("config") == "pfeiffer":
            raise PydanticCustomError(
                "unused_attention_modules",
                "unused with config pfeiffer, which adds adapters after the feed-forward block only; "
                "remove it, or set config: houlsby",
            )
        return value


class BottleneckAdapter(WrappedLayer):
    """A frozen output projection (nn.Linear, or GPT-2's transposed Conv1D) followed by a residual
    bottleneck: y = h + up(act(down(h))) with h = base_layer(x)."""

    def __init__(self, base_layer: nn.Module, size: int, activation: str, layer_norm: bool) -> None:
        super().__init__(base_layer)
        hidden = self.out_features
        device, dtype = base_layer.weight.device, torch.float32
        self.adapter_norm = nn.LayerNorm(hidden, device=device, dtype=dtype) if layer_norm else nn.Identity()
        self.adapter_down = nn.Linear(hidden, size, device=device, dtype=dtype)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(size, hidden, device=device, dtype=dtype)
        nn.init.normal_(self.adapter_down.weight, std=INIT_STD)
        nn.init.zeros_(self.adapter_down.bias)
        # W_up = 0 and b_up = 0: the adapter adds exactly zero until it has trained.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        z = self.adapter_norm(h.to(self.adapter_down.weight.dtype))
        return h + self.adapter_up(self.adapter_act(self.adapter_down(z))).to(h.dtype)


def bottleneck_width(params: BottleneckParams, hidden: int) -> int:
    if params.bottleneck_size is not None:
        return params.bottleneck_size
    factor = params.reduction_factor if params.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
    return max(1, round(hidden / factor))


def placement(model: nn.Module, params: BottleneckParams) -> tuple[list[str] | str | None, list[str] | str]:
    """(attention targets, or None for pfeiffer; feed-forward targets), 'auto' looked up by model type."""
    known = lookup(model, "block_outputs")
    houlsby = params.config == "houlsby"
    needed = ("attention_modules", "feedforward_modules") if houlsby else ("feedforward_modules",)
    auto = [k for k in needed if getattr(params, k) == "auto"]
    if auto and known is None:
        keys = " and ".join(f"method.{k}" for k in auto)
        raise MethodError(
            f"{keys}: 'auto' does not know model type {model_type(model)!r} ({type(model).__name__}). "
            f"Set {keys} to the output projections of the attention and feed-forward blocks "
            "(for Llama: [self_attn.o_proj] and [mlp.down_proj]); `peft inspect --modules RECIPE` lists "
            f"the linear layers. 'auto' knows: {', '.join(known_types('block_outputs'))}."
        )
    auto_attention, auto_feedforward = known or (None, None)
    attention = None
    if houlsby:
        attention = auto_attention if params.attention_modules == "auto" else params.attention_modules
    feedforward = auto_feedforward if params.feedforward_modules == "auto" else params.feedforward_modules
    assert feedforward is not None
    return attention, feedforward


def apply(model: nn.Module, params: BottleneckParams, ctx: ApplyContext) -> Adapted:
    freeze(model)
    attention, feedforward = placement(model, params)
    after_ff = find_targets(model, feedforward, ctx, "method.feedforward_modules")
    after_attn = find_targets(model, attention, ctx, "method.attention_modules") if attention is not None else []
    both = sorted(set(after_ff) & set(after_attn))
    if both:
        raise MethodError(
            f"method.attention_modules and method.feedforward_modules both match {both[:3]} "
            f"({len(both)} in all). Make them disjoint, e.g. with a regular expression "
            r"('.*\.layer\.\d+\.output\.dense' for BERT's feed-forward output)."
        )
    chosen = set(after_ff) | set(after_attn)
    names = [n for n in linear_layer_names(model) if n in chosen]
    for name in names:
        layer = model.get_submodule(name)
        width = bottleneck_width(params, out_in(layer)[0])
        replace_module(model, name, BottleneckAdapter(layer, width, params.activation, params.layer_norm))
    return Adapted(
        adapted_modules=names,
        modules_to_save=train_modules_to_save(model, params.modules_to_save, ctx),
        target_modules=names,
        config_extras={"attention_modules": attention, "feedforward_modules": feedforward},
    )


def peft_config(params: BottleneckParams, adapted: Adapted) -> dict[str, Any]:
    # The resolved module patterns, not 'auto': the folder loads the same way if the table changes.
    return {
        "peft_type": "BOTTLENECK",
        "config": params.config,
        "reduction_factor": params.reduction_factor,
        "bottleneck_size": params.bottleneck_size,
        "activation": params.activation,
        "layer_norm": params.layer_norm,
        "attention_modules": adapted.config_extras.get("attention_modules"),
        "feedforward_modules": adapted.config_extras.get("feedforward_modules", params.feedforward_modules),
        "modules_to_save": adapted.modules_to_save or None,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> BottleneckParams:
    return BottleneckParams(
        config=config.get("config", "houlsby"),
        reduction_factor=config.get("reduction_factor"),
        bottleneck_size=config.get("bottleneck_size"),
        activation=config.get("activation", "relu"),
        layer_norm=config.get("layer_norm", False),
        attention_modules=config.get("attention_modules") or "auto",
        feedforward_modules=config.get("feedforward_modules") or "auto",
        modules_to_save=config.get("modules_to_save") or [],
    )


METHOD = Method(
    name="bottleneck",
    summary="small residual MLPs after the attention and feed-forward outputs (Houlsby, Pfeiffer adapters)",
    kind=Kind.NEW_MODULES,
    params=BottleneckParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=None,
    peft_type="BOTTLENECK",
    in_hf_peft=False,
    paper="https://arxiv.org/abs/1902.00751",
)
