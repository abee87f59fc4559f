"""Selective fine-tuning: train only the entries of the base weights whose gradients matter most.

W' = W + scatter(I, d): a fixed set I of entries of the chosen linear layers' weights is trained, all
others stay frozen. I is chosen once, before training, by scoring every eligible entry on a few
calibration batches and keeping the top k across all eligible tensors, k = `count` or
round(`fraction` x eligible entries), at least 1 (ties at the threshold fall as torch.topk breaks them):
  fisher:    s_i = sum_b g_i(b)^2, the empirical Fisher diagonal of the FISH mask (Sung et al. 2021,
             "Training Neural Networks with Fixed Sparse Masks", https://arxiv.org/abs/2111.09839).
             Sung et al. square per-example gradients; squaring mini-batch gradients (one backward per
             batch) is the cheaper estimate used here;
  magnitude: s_i = sum_b |g_i(b)|, the gradient-magnitude criterion of sparse fine-tuning methods such
             as SIFT (Song et al. 2023, https://arxiv.org/abs/2312.11875) and GPS (Zhang et al. 2024,
             https://arxiv.org/abs/2312.10136).
The trained model is W + a sparse difference, as in diff pruning (Guo et al. 2021,
https://arxiv.org/abs/2012.07463), which learns its mask where this method fixes it up front.
The base weights are never modified: each adapted layer keeps its flat indices as a buffer and a
trainable delta d (zero at first, so training starts from the base model exactly), and its forward
uses W + scatter(I, d). Merging writes W + scatter(I, d) into the weight and removes the wrapper.

HF peft has no such method; the adapter folder has HF peft's layout with peft_type "SELECTIVE".
adapter_model.safetensors holds, for each tensor with selected entries (names of the plain model):
  base_model.model.<module>.weight.selected_indices   int32 flat indices into the weight, increasing
                                                      (int64 for a tensor of 2^31 entries or more)
  base_model.model.<module>.weight.selected_delta     float32 learned change at those entries
(and `.bias.` keys with include_biases), plus the modules trained in full (the head) as
`base_model.model.<parameter name>`. Its size grows with the number of selected entries only.

`apply` cannot see gradients, so it reserves the budget: it spreads the selected count over the
eligible tensors in proportion to their size, at evenly spaced entries (an uninformed mask, like the
random-mask baseline of Sung et al.), so `peft inspect` on a recipe counts the trainable parameters
exactly (the split over layers is decided by calibration).
`calibrate` (called by `peft train` after apply) replaces that mask by the scored one; `load_state`
replaces it by the indices in the file. With several processes, each scores its own batches and all
train the main process's selection.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from peftcli.adapter_io import PREFIX
from peftcli.errors import CheckpointError, MethodError
from peftcli.methods._gradient_scores import score_entries, top_entries
from peftcli.methods._layers import WrappedLayer
from peftcli.methods._sparse_delta import SparseDeltaLinear, with_delta
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Calibration,
    Kind,
    Method,
    assign_state,
    expand_all_linear,
    find_targets,
    freeze,
    merge_layers,
    replace_module,
    train_modules_to_save,
)

DEFAULT_FRACTION = 0.005
INDICES, DELTA = "selected_indices", "selected_delta"


class SelectiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["selective"] = "selective"
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description=f"share of the eligible entries to train, chosen globally (default {DEFAULT_FRACTION} "
        "when count is not given); the count is round(fraction x eligible entries), at least 1",
    )
    count: int | None = Field(None, gt=0, description="number of entries to train instead of a fraction")
    score: Literal["fisher", "magnitude"] = Field(
        "fisher",
        description="how entries are ranked: fisher sums squared gradients (FISH mask), "
        "magnitude sums absolute gradients",
    )
    calibration_batches: int = Field(8, gt=0, description="training batches whose gradients score the entries")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="linear layers whose weights are eligible: names matched as dotted suffixes, a regular "
        "expression over full names, or 'all-linear' (every linear layer but the head and output layer)",
    )
    include_biases: bool = Field(False, description="also make the biases of those layers eligible")
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @field_validator("count")
    @classmethod
    def _not_both(cls, count: int | None, info: ValidationInfo) -> int | None:
        if count is not None and info.data.get("fraction") is not None:
            raise PydanticCustomError(
                "fraction_and_count", "method.fraction and method.count are both set; keep only one of them"
            )
        return count

    @model_validator(mode="after")
    def _default_fraction(self) -> SelectiveParams:
        if self.fraction is None and self.count is None:
            self.fraction = DEFAULT_FRACTION
        return self


class SelectiveLinear(WrappedLayer):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) whose selected weight (and bias) entries train."""

    def __init__(
        self, base_layer: nn.Module, weight_indices: torch.Tensor, bias_indices: torch.Tensor | None = None
    ) -> None:
        super().__init__(base_layer)
        for part, indices in (("weight", weight_indices), ("bias", bias_indices)):
            tensor = getattr(base_layer, part)
            selected = indices is not None and indices.numel() > 0 and tensor is not None
            # An absent part has no parameter at all: an empty trainable tensor would never change.
            delta = (
                nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=tensor.device))
                if selected
                else None
            )
            self.register_buffer(
                f"{part}_indices", indices.to(tensor.device, torch.long) if selected else None, persistent=False
            )
            self.register_parameter(f"{part}_delta", delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SparseDeltaLinear.apply(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.weight_indices,
            self.weight_delta,
            self.bias_indices,
            self.bias_delta,
            self.fan_in_fan_out,
        )

    def merged(self) -> nn.Module:
        with torch.no_grad():
            self.base_layer.weight.copy_(with_delta(self.base_layer.weight, self.weight_indices, self.weight_delta))
            if self.bias_delta is not None:
                self.base_layer.bias.copy_(with_delta(self.base_layer.bias, self.bias_indices, self.bias_delta))
        return self.base_layer


# -- apply: eligible tensors and the reserved budget ----------------------------------------------


def eligible_tensors(model: nn.Module, layers: list[str], include_biases: bool) -> dict[str, torch.Tensor]:
    """`<layer>.weight` (and `<layer>.bias`) of every eligible layer, unwrapped, in a fixed order."""
    out = {}
    for name in layers:
        layer = model.get_submodule(name)
        out[f"{name}.weight"] = layer.weight
        if include_biases and layer.bias is not None:
            out[f"{name}.bias"] = layer.bias
    return out


def selected_count(params: SelectiveParams, eligible: int) -> int:
    if params.count is not None:
        if params.count > eligible:
            raise MethodError(
                f"method.count: more than the {eligible:,} entries the eligible tensors hold (got {params.count:,}). "
                "Lower it, or use method.fraction."
            )
        return params.count
    assert params.fraction is not None
    return max(1, round(params.fraction * eligible))


def spread_evenly(sizes: dict[str, int], k: int) -> dict[str, torch.Tensor]:
    """k entries split over the tensors in proportion to their sizes (largest remainders get the
    rounding), evenly spaced inside each: the mask a recipe trains if it is never calibrated."""
    total = sum(sizes.values())
    exact = {n: k * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    for n in sorted(exact, key=lambda n: counts[n] - exact[n])[: k - sum(counts.values())]:
        counts[n] += 1
    return {n: torch.arange(c) * sizes[n] // c for n, c in counts.items() if c > 0}


def apply(model: nn.Module, params: SelectiveParams, ctx: ApplyContext) -> Adapted:
    freeze(model)
    targets = expand_all_linear(model, params.target_modules, ctx)
    names = find_targets(model, targets, ctx, "method.target_modules")
    tensors = eligible_tensors(model, names, params.include_biases)
    k = selected_count(params, sum(t.numel() for t in tensors.values()))
    wrap(model, names, spread_evenly({n: t.numel() for n, t in tensors.items()}, k))
    to_save = train_modules_to_save(model, params.modules_to_save, ctx)
    clashing = [n for n in names if any(p.requires_grad for p in model.get_submodule(n).base_layer.parameters())]
    if clashing:
        raise MethodError(
            f"method.modules_to_save: {to_save} contains layers that are also selectively trained "
            f"(got {clashing[:3]}). Train a module in full or select in it, not both: narrow target_modules."
        )
    # The eligible layers are kept: calibration may leave some of them without any selected entry.
    return Adapted(
        adapted_modules=names, modules_to_save=to_save, target_modules=targets, config_extras={"eligible": list(names)}
    )


def wrap(model: nn.Module, layers: list[str], indices: dict[str, torch.Tensor]) -> list[str]:
    """Wraps each layer with selected entries (in `indices`, keyed `<layer>.weight` / `.bias`); returns them."""
    wrapped = []
    empty = torch.empty(0, dtype=torch.long)
    for name in layers:
        w, b = indices.get(f"{name}.weight", empty), indices.get(f"{name}.bias", empty)
        if w.numel() + b.numel() > 0:
            replace_module(model, name, SelectiveLinear(model.get_submodule(name), w, b))
            wrapped.append(name)
    return wrapped


def unwrap(model: nn.Module) -> None:
    """Puts the plain layers back, dropping the selection and its deltas."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SelectiveLinear):
            replace_module(model, name, module.base_layer)


# -- calibrate: score, select, wrap ----------------------------------------------------------------


def calibrate(model: nn.Module, params: SelectiveParams, adapted: Adapted, calibration: Calibration) -> None:
    """Scores the eligible entries on `calibration_batches` batches and trains the top ones."""
    unwrap(model)
    layers = adapted.config_extras["eligible"]
    tensors = eligible_tensors(model, layers, params.include_biases)
    scores = score_entries(model, tensors, calibration, params.calibration_batches, params.score)
    k = selected_count(params, sum(t.numel() for t in tensors.values()))
    selection = top_entries(scores, k)
    del scores
    adapted.adapted_modules[:] = wrap(model, layers, selection)


# -- save, load, merge --------------------------------------------------------------------------------


def state(model: nn.Module, adapted: Adapted) -> dict[str, torch.Tensor]:
    """Selected indices and deltas under the plain model's tensor names, plus the modules trained in full."""

    out: dict[str, torch.Tensor] = {}
    deltas = set()
    for name, module in model.named_modules():
        if not isinstance(module, SelectiveLinear):
            continue
        for part in ("weight", "bias"):
            delta = getattr(module, f"{part}_delta")
            if delta is not None:
                indices = getattr(module, f"{part}_indices")
                # int32 halves the file where it can hold every index (8 bytes an entry, not 12).
                small = getattr(module.base_layer, part).numel() <= torch.iinfo(torch.int32).max
                out[f"{PREFIX}{name}.{part}.{INDICES}"] = indices.to(torch.int32) if small else indices
                out[f"{PREFIX}{name}.{part}.{DELTA}"] = delta
                deltas.add(f"{name}.{part}_delta")
    for n, p in model.named_parameters():
        if p.requires_grad and n not in deltas:
            out[PREFIX + n] = p
    return out


def load_state(model: nn.Module, adapted: Adapted, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Rebuilds the wrappers from the saved indices, then loads the deltas and the head."""
    unwrap(model)
    layers = adapted.config_extras["eligible"]
    eligible = {n: t.numel() for n, t in eligible_tensors(model, layers, include_biases=True).items()}
    selection: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith("." + INDICES):
            tensor = name.removesuffix("." + INDICES)
            selection[tensor] = checked_indices(key, value, eligible.get(tensor), path)
        elif not name.endswith("." + DELTA):
            rest[key] = value
    deltas = {}
    for tensor, indices in selection.items():
        key = f"{PREFIX}{tensor}.{DELTA}"
        delta = tensors.get(key)
        if delta is None or delta.shape != indices.shape or not delta.is_floating_point():
            got = "nothing" if delta is None else f"{delta.dtype} {tuple(delta.shape)}"
            raise CheckpointError(
                f"{path}: {key} must be a float vector of {indices.numel()} values, one per index (got {got}). "
                "The file is corrupt."
            )
        layer, _, part = tensor.rpartition(".")
        deltas[f"{PREFIX}{layer}.{part}_delta"] = delta
    orphans = [
        k
        for k in tensors
        if k.endswith("." + DELTA) and k.removeprefix(PREFIX).removesuffix("." + DELTA) not in selection
    ]
    if orphans:
        raise CheckpointError(f"{path}: {orphans[0]} has no matching .{INDICES} tensor. The file is corrupt.")
    adapted.adapted_modules[:] = wrap(model, layers, selection)
    assign_state(model, deltas | rest, path)


def checked_indices(key: str, indices: torch.Tensor, size: int | None, path: str) -> torch.Tensor:
    if size is None:
        raise CheckpointError(
            f"{path}: {key} selects entries of a tensor this model has no eligible layer for. "
            "Was the adapter trained on another base model, or with other target_modules?"
        )
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise CheckpointError(
            f"{path}: {key} must be a vector of integer indices (got {indices.dtype} {tuple(indices.shape)})."
        )
    indices = indices.long()
    if indices.numel() and (indices.min() < 0 or indices.max() >= size):
        raise CheckpointError(
            f"{path}: {key} holds indices outside the tensor's {size:,} entries "
            f"(got {indices.min().item()}..{indices.max().item()}). Was the adapter trained on another base model?"
        )
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise CheckpointError(f"{path}: {key} must hold increasing indices without repeats. The file is corrupt.")
    return indices


def merge(model: nn.Module) -> None:
    merge_layers(model, SelectiveLinear)


def peft_config(params: SelectiveParams, adapted: Adapted) -> dict[str, Any]:
    return {
        "peft_type": "SELECTIVE",
        "target_modules": adapted.target_modules,
        "fraction": params.fraction,
        "count": params.count,
        "score": params.score,
        "calibration_batches": params.calibration_batches,
        "include_biases": params.include_biases,
        "modules_to_save": adapted.modules_to_save or None,
        "inference_mode": True,
    }


def from_peft_config(config: dict[str, Any]) -> SelectiveParams:
    count = config.get("count")
    return SelectiveParams(
        fraction=None if count is not None else config.get("fraction"),
        count=count,
        score=config.get("score", "fisher"),
        calibration_batches=config.get("calibration_batches", 8),
        target_modules=config["target_modules"],
        include_biases=config.get("include_biases", False),
        modules_to_save=config.get("modules_to_save") or [],
    )


METHOD = Method(
    name="selective",
    summary="trains the base-weight entries with the largest calibration gradients (FISH mask)",
    kind=Kind.SELECT,
    params=SelectiveParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=merge,
    peft_type="SELECTIVE",
    in_hf_peft=False,
    paper="https://arxiv.org/abs/2111.09839",
    state=state,
    load_state=load_state,
    calibrate=calibrate,
    trains_base_weights="entries of the base model's weights",
)
