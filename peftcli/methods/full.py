"""Full fine-tuning, the baseline every parameter-efficient method is measured against: every weight
trains, W <- W - lr * update(dL/dW).

With `train_last_layers: N` only the top of the network trains (the last N transformer blocks, the
final norm, a pooler and the head; the embeddings and earlier blocks stay frozen), like LLaMA-Factory's
`freeze` fine-tuning and the layer-freezing baselines of Lee et al. 2019, https://arxiv.org/abs/1911.03090.
Nothing is added, so merging is a no-op.

HF peft has no full fine-tuning; the adapter folder has HF peft's layout with our own peft_type "FULL"
and every trained tensor as `base_model.model.<parameter name>` (the size of the model, or of its top).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Kind,
    Method,
    default_modules_to_save,
    top_parameter_names,
    train_in_place,
)


class FullParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["full"] = "full"
    train_last_layers: int | None = Field(
        None,
        gt=0,
        description="train only the last N transformer blocks and what follows them (final norm, pooler, "
        "head); embeddings and earlier blocks stay frozen. null: every parameter",
    )


def apply(model: nn.Module, params: FullParams, ctx: ApplyContext) -> Adapted:
    if params.train_last_layers is None:
        selected = {n for n, _ in model.named_parameters()}
    else:
        selected = top_parameter_names(model, params.train_last_layers, "method.train_last_layers")
    heads = default_modules_to_save(None, ctx, model)
    # The modules holding trained weights, for `peft inspect`, sorted by name.
    return Adapted(adapted_modules=sorted(train_in_place(model, selected, heads)), modules_to_save=heads)


def merge(model: nn.Module) -> None:
    """Nothing to fold: the trained weights are the model's own."""


def peft_config(params: FullParams, adapted: Adapted) -> dict[str, Any]:
    return {
        "peft_type": "FULL",
        "train_last_layers": params.train_last_layers,
        "modules_to_save": adapted.modules_to_save or None,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> FullParams:
    return FullParams(train_last_layers=config.get("train_last_layers"))


METHOD = Method(
    name="full",
    summary="trains every parameter (or the last N blocks): the baseline",
    kind=Kind.SELECT,
    params=FullParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=merge,
    peft_type="FULL",
    in_hf_peft=False,
    paper="https://arxiv.org/abs/1911.03090",
    trains_base_weights="every weight of the base model",
)
