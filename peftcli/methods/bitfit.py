"""BitFit: train only the model's bias terms (and the task head), freeze every weight.

Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199. Each layer y = W x + b keeps W and learns b
(every bias: linear layers and layer norms), about 0.1% of a BERT's parameters. Nothing is added, so
training starts from the base model exactly and merging is a no-op: the biases are the model's own.

HF peft has no BitFit; the adapter folder has HF peft's layout with our own peft_type "BITFIT" and the
trained tensors as `base_model.model.<parameter name>`. Models without biases (Llama and its
descendants) cannot use it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peftcli.errors import MethodError
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Kind,
    Method,
    default_modules_to_save,
    top_parameter_names,
    train_in_place,
)


class BitfitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["bitfit"] = "bitfit"
    train_last_layers: int | None = Field(
        None,
        gt=0,
        description="train only the biases of the last N transformer blocks and those after them "
        "(final norm, pooler); null: every bias",
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )


def bias_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]


def apply(model: nn.Module, params: BitfitParams, ctx: ApplyContext) -> Adapted:
    names = set(bias_names(model))
    if not names:
        raise MethodError(f"method bitfit: {type(model).__name__} has no bias parameters to train. Use lora or ia3.")
    if params.train_last_layers is not None:
        names &= top_parameter_names(model, params.train_last_layers, "method.train_last_layers")
    to_save = default_modules_to_save(params.modules_to_save, ctx, model)
    return Adapted(adapted_modules=train_in_place(model, names, to_save), modules_to_save=to_save)


def merge(model: nn.Module) -> None:
    """Nothing to fold: BitFit trains the model's own biases in place."""


def peft_config(params: BitfitParams, adapted: Adapted) -> dict[str, Any]:
    return {
        "peft_type": "BITFIT",
        "train_last_layers": params.train_last_layers,
        "modules_to_save": adapted.modules_to_save or None,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> BitfitParams:
    return BitfitParams(
        train_last_layers=config.get("train_last_layers"),
        modules_to_save=config.get("modules_to_save") or [],
    )


METHOD = Method(
    name="bitfit",
    summary="trains only the bias terms (and the head)",
    kind=Kind.SELECT,
    params=BitfitParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=merge,
    peft_type="BITFIT",
    in_hf_peft=False,
    paper="https://arxiv.org/abs/2106.10199",
    trains_base_weights="the base model's biases",
)
