"""LoRA: learn a low-rank update W + s * B @ A for chosen linear layers, s = alpha / r.

Hu et al. 2021, https://arxiv.org/abs/2106.09685. A (r x in) starts random and B (out x r) at zero, so
training starts from the base model exactly. rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)
scales by alpha / sqrt(r) instead, which keeps updates stable as the rank grows.

Parameter names follow HF peft's saved layout (`<module>.lora_A.weight`, `<module>.lora_B.weight`), so
the trainable state dict is the adapter file with a `base_model.model.` prefix.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import CheckpointError
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Kind,
    Method,
    WrappedLayer,
    default_modules_to_save,
    find_targets,
    freeze,
    merge_layers,
    replace_module,
    resolve_all_linear,
    unfreeze_modules,
)


class LoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0, description="r: the rank of A (r x in) and B (out x r)")
    alpha: float = Field(16, gt=0, description="scale alpha/r (alpha/sqrt(r) with use_rslora); 2 x rank is common")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input; 0 skips it (faster)")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="module names matched as dotted suffixes (e.g. [query, value]), "
        "a regular expression over full names, or 'all-linear' (every linear layer but the head)",
    )
    use_rslora: bool = Field(False, description="scale by alpha/sqrt(r) (rank-stabilized LoRA)")
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )


class LoraLinear(WrappedLayer):
    """A frozen linear layer (nn.Linear, or GPT-2's transposed Conv1D) plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        super().__init__(base_layer)
        out_features, in_features = self.features()
        device, dtype = base_layer.weight.device, torch.float32
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        # HF peft's default initialization: A like nn.Linear's own, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # With no dropout, skip the module entirely: dropout's random numbers cost ~18% of a MiniLM step.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.transposed else delta

    def merged(self) -> nn.Module:
        w = self.base_layer.weight
        w.data += self.delta_weight().to(w.dtype)
        return self.base_layer


def apply(model: nn.Module, params: LoraParams, ctx: ApplyContext) -> Adapted:
    freeze(model)
    if params.target_modules == "all-linear":
        targets: list[str] | str = resolve_all_linear(model, ctx)
    else:
        targets = params.target_modules
    names = find_targets(model, targets, ctx, "method.target_modules")
    # GPT-2's Conv1D stores weights transposed; HF peft records that as fan_in_fan_out.
    transposed = any(isinstance(model.get_submodule(n), Conv1D) for n in names)
    for name in names:
        layer = LoraLinear(model.get_submodule(name), params.rank, params.alpha, params.dropout, params.use_rslora)
        replace_module(model, name, layer)
    to_save = default_modules_to_save(params.modules_to_save, ctx, model)
    unfreeze_modules(model, to_save)
    return Adapted(
        adapted_modules=names,
        modules_to_save=to_save,
        target_modules=targets,
        config_extras={"fan_in_fan_out": transposed},
    )


def merge(model: nn.Module) -> None:
    merge_layers(model, LoraLinear)


def peft_config(params: LoraParams, adapted: Adapted) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": params.rank,
        "lora_alpha": params.alpha,
        "lora_dropout": params.dropout,
        "target_modules": adapted.target_modules,
        "use_rslora": params.use_rslora,
        "modules_to_save": adapted.modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": adapted.config_extras.get("fan_in_fan_out", False),
        "init_lora_weights": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "bias": ("none",),
}


def from_peft_config(config: dict[str, Any]) -> LoraParams:
    for key, allowed in UNSUPPORTED_PEFT_OPTIONS.items():
        if key in config and config[key] not in allowed:
            raise CheckpointError(
                f"adapter_config.json: {key}={config[key]!r} is not supported by peftcli's LoRA yet. "
                "Load this adapter with HF peft, or retrain without that option."
            )
    return LoraParams(
        rank=config["r"],
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0),
        target_modules=config["target_modules"],
        use_rslora=config.get("use_rslora", False),
        modules_to_save=config.get("modules_to_save") or [],
    )


METHOD = Method(
    name="lora",
    summary="low-rank updates to linear layers",
    kind=Kind.WEIGHT_DELTA,
    params=LoraParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=merge,
    peft_type="LORA",
    paper="https://arxiv.org/abs/2106.09685",
)
