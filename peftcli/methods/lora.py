"""LoRA: learn a low-rank update W + s * B @ A for chosen linear layers, s = alpha / r.

Hu et al. 2021, https://arxiv.org/abs/2106.09685. A (r x in) starts random and B (out x r) at zero, so
training starts from the base model exactly. rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)
scales by alpha / sqrt(r) instead, which keeps updates stable as the rank grows.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353, `use_dora`): the adapted weight is
m * (W + s*B@A) / ||W + s*B@A||, the norm taken per output row and held constant in the backward pass
(the paper's section 4.3), m a trainable vector that starts at the row norms. As in HF peft, on top of
the base output: y = (W x + s*B@A x) * m / ||.|| + bias. The norm is not formed from the (out x in)
matrix W + s*B@A at every step, as HF peft forms it: with the frozen base's row norms ||W||^2 computed
once (a buffer, not saved), ||W + s*B@A||^2 = ||W||^2 + 2s <W A^T, B> + s^2 <B (A A^T), B> per row,
whose one product with W (W A^T, r x out) is the product x W^T of r inputs.

PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948) and OLoRA (Büyükakyüz 2024,
https://arxiv.org/abs/2406.01775) start B@A at the principal part of W (its top-r singular triplets;
the first r columns of its QR factors) and train on the residual W - s*B0@A0, which replaces the base
weight in memory. The saved adapter is for the original base all the same: HF peft's conversion
(`path_initial_model_for_weight_conversion`), B@A - B0@A0 = [B, -B0] @ [A; A0], rank 2r and alpha 2 x alpha.

Parameter names follow HF peft's saved layout (`<module>.lora_A.weight`, `<module>.lora_B.weight`,
`<module>.lora_magnitude_vector`), so the trainable state dict is the adapter file with a
`base_model.model.` prefix.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from peftcli.adapter_io import PREFIX
from peftcli.errors import CheckpointError, MethodError
from peftcli.methods._layers import any_fan_in_fan_out, out_in
from peftcli.methods._low_rank import LowRankLayer
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
    trainable_parameters,
)

# Initialisations that start B@A away from zero and so rewrite the base weight to W - s*B0@A0.
RESIDUAL_INITS = ("pissa", "olora")


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
    use_dora: bool = Field(
        False,
        description="DoRA: a trained magnitude per output row times the direction W + s*B@A, normalised per row",
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="A and B at the start. default: A like nn.Linear's weight, B zero; gaussian: A normal "
        "with std 1/r, B zero; pissa: the top-r singular triplets of W; olora: W's QR factors. pissa and olora "
        "train on the residual W - s*B0@A0 and save the adapter for the original base, at rank 2r",
    )
    pissa_niter: int | None = Field(
        None,
        gt=0,
        description="init pissa: a fast randomized SVD with this many subspace iterations (HF peft's "
        "pissa_niter_N; 4 is common); default: the exact SVD",
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @field_validator("pissa_niter")
    @classmethod
    def _pissa_only(cls, v: int | None, info: ValidationInfo) -> int | None:
        init = info.data.get("init")
        if v is not None and init is not None and init != "pissa":
            raise PydanticCustomError(
                "pissa_only", "applies to init: pissa only, not {init}; remove it or set init: pissa", {"init": init}
            )
        return v


class LoraLinear(LowRankLayer):
    """A frozen linear layer (nn.Linear, GPT-2's transposed Conv1D, or a bitsandbytes 4- or 8-bit one)
    plus a trainable low-rank update, with DoRA's magnitude vector where asked."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        init: str = "default",
        use_dora: bool = False,
        pissa_niter: int | None = None,
    ) -> None:
        super().__init__(base_layer)
        device, dtype = base_layer.weight.device, torch.float32
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        # With no dropout, skip the module entirely: its random numbers cost time every step (docs/benchmarks.md).
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        # PiSSA/OLoRA's starting A and B, kept to convert the saved adapter to the original base's.
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        self.register_parameter("lora_magnitude_vector", None)
        self.register_buffer("base_row_norm_sq", None, persistent=False)
        self.initialize(init, pissa_niter)
        if use_dora:
            self.start_dora()

    # -- initialisation ----------------------------------------------------------------------

    def initialize(self, init: str, pissa_niter: int | None) -> None:
        if init in RESIDUAL_INITS:
            self.principal_init(init, pissa_niter)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:  # HF peft's default: A like nn.Linear's own, B zero.
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def principal_init(self, init: str, pissa_niter: int | None) -> None:
        """PiSSA or OLoRA as HF peft computes them, and the base weight replaced by W - s*B0@A0 (for
        GPT-2's Conv1D in its transposed layout, which HF peft's OLoRA leaves out)."""
        w = self.float_weight()
        r, s = self.lora_A.out_features, self.scaling
        if init == "olora":
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r], q[:, :r]
        else:
            if pissa_niter is None:
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                u, sv, vh = u[:, :r], sv[:r], vh[:r]
            else:
                u, sv, v = torch.svd_lowrank(w, r, niter=pissa_niter)
                vh = v.T
            root = torch.diag(torch.sqrt(sv / s))
            a, b = root @ vh, u @ root
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            residual = w - s * self.lora_B.weight @ self.lora_A.weight
            base = self.base_layer.weight
            base.data = self.oriented(residual).to(base.dtype).contiguous()
        self.lora_A0 = self.lora_A.weight.detach().clone()
        self.lora_B0 = self.lora_B.weight.detach().clone()

    def start_dora(self) -> None:
        """The frozen base's row norms, once; the magnitude starts at ||W + s*B@A|| (||W|| after the
        default initialisations, which start B at zero)."""
        w = self.float_weight()
        self.base_row_norm_sq = (w * w).sum(dim=1)
        del w
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dropped = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(dropped)) * self.scaling
        if self.lora_magnitude_vector is None:
            return result + update.to(result.dtype)
        scale = self.lora_magnitude_vector / self.weight_norm()
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # HF peft's formula with dropout: the base product again, on the dropped-out input.
            direction = (scale - 1) * self.times_weight(dropped) + scale * update
            return result + direction.to(result.dtype)
        bias = self.base_layer.bias
        base = result if bias is None else result - bias
        out = ((base + update) * scale).to(result.dtype)
        return out if bias is None else out + bias

    def weight_norm(self) -> torch.Tensor:
        """||W + s*B@A|| per output row, without gradient: ||W||^2 is cached, and the cross term takes
        one product of the weight with A's r rows, not the (out x in) sum."""
        a, b, s = self.lora_A.weight, self.lora_B.weight, self.scaling
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            w_at = self.times_weight(a).float().T  # (out, r)
            cross = (b * w_at).sum(dim=1)
            update_sq = ((b @ (a @ a.T)) * b).sum(dim=1)
            squared = self.base_row_norm_sq + 2 * s * cross + s * s * update_sq
            return squared.clamp_min(0).sqrt()

    # -- merge -------------------------------------------------------------------------------

    def update(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def plain_lora_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B for the original base: after PiSSA/OLoRA, [A; A0] and [B, -B0] (rank 2r), whose
        product is the update learnt, B@A - B0@A0."""
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if self.lora_A0 is None:
            return a, b
        return torch.cat([a, self.lora_A0], dim=0), torch.cat([b, -self.lora_B0], dim=1)


def apply(model: nn.Module, params: LoraParams, ctx: ApplyContext) -> Adapted:
    freeze(model)
    targets = expand_all_linear(model, params.target_modules, ctx)
    names = find_targets(model, targets, ctx, "method.target_modules")
    if params.init in RESIDUAL_INITS:
        check_residual_init(model, names, params)
    fan_in_fan_out = any_fan_in_fan_out(model, names)
    for name in names:
        layer = LoraLinear(
            model.get_submodule(name), params.rank, params.alpha, params.dropout, params.use_rslora,
            init=params.init, use_dora=params.use_dora, pissa_niter=params.pissa_niter,
        )  # fmt: skip
        replace_module(model, name, layer)
    return Adapted(
        adapted_modules=names,
        modules_to_save=train_modules_to_save(model, params.modules_to_save, ctx),
        target_modules=targets,
        config_extras={"fan_in_fan_out": fan_in_fan_out},
    )


def check_residual_init(model: nn.Module, names: list[str], params: LoraParams) -> None:
    """PiSSA and OLoRA rewrite the base weight as W - s*B0@A0, which a quantized base cannot hold
    exactly (HF peft refuses PiSSA there, and warns that a converted adapter then misses the gap), and
    take r singular vectors or QR columns, at most min(out, in) of them."""
    for name in names:
        layer = model.get_submodule(name)
        if not layer.weight.dtype.is_floating_point:
            raise MethodError(
                f"method.init: {params.init} rewrites the base weights as W - s*B0@A0, which model.quantization "
                f"holds quantized (got {params.init} with a quantized {name}). Use init: default or gaussian, "
                "or remove model.quantization."
            )
        smaller = min(out_in(layer))
        if params.rank > smaller:
            raise MethodError(
                f"method.rank: init {params.init} takes r of the weight's {smaller} singular directions in {name} "
                f"(got rank {params.rank}). Use a rank of at most {smaller}."
            )


def merge(model: nn.Module) -> None:
    merge_layers(model, LoraLinear)


def state(model: nn.Module, adapted: Adapted) -> dict[str, torch.Tensor]:
    """Every trainable tensor under its file key, with PiSSA/OLoRA's A and B converted to a plain LoRA
    of rank 2r for the original base (HF peft's `path_initial_model_for_weight_conversion`)."""
    tensors = {PREFIX + n: p.detach() for n, p in trainable_parameters(model).items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear):
            continue
        a, b = layer.plain_lora_state()
        out_features, in_features = layer.out_features, layer.in_features
        magnitude = layer.lora_magnitude_vector
        # A tensor read while FSDP or ZeRO-3 shards it is empty or a flat slice (checkpoint.check_whole,
        # which cannot know the rank-2r shapes).
        if (
            a.shape[1] != in_features
            or b.shape[0] != out_features
            or (magnitude is not None and magnitude.shape != (out_features,))
        ):
            raise CheckpointError(
                f"adapter tensors of {name} have shapes {tuple(a.shape)} and {tuple(b.shape)} for a layer of "
                f"{in_features} inputs and {out_features} outputs, so nothing was saved. They were read while "
                "sharded; this is a peftcli bug, please report it with your launch config."
            )
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
    return tensors


def peft_config(params: LoraParams, adapted: Adapted) -> dict[str, Any]:
    # The saved PiSSA/OLoRA adapter is a plain LoRA of rank 2r with the same scale s (see `state`).
    converted = params.init in RESIDUAL_INITS
    rank = params.rank * (2 if converted else 1)
    alpha = params.alpha * ((math.sqrt(2) if params.use_rslora else 2) if converted else 1)
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": params.dropout,
        "target_modules": adapted.target_modules,
        "use_rslora": params.use_rslora,
        "modules_to_save": adapted.modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": adapted.config_extras.get("fan_in_fan_out", False),
        "init_lora_weights": "gaussian" if params.init == "gaussian" else True,
        "use_dora": params.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


UNSUPPORTED_PEFT_OPTIONS = {
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "bias": ("none",),
    "lora_bias": (False, None),
}


def init_from_peft(value: Any) -> tuple[str, int | None]:
    """HF peft's init_lora_weights as (init, pissa_niter). An adapter saved with PiSSA or OLoRA
    unconverted is for the residual base: applying the same init to the original base rebuilds it
    (exactly with the exact SVD or QR), as HF peft's own loading does."""
    if value is True or value is False or value is None:  # False: left random, the file holds the weights
        return "default", None
    text = str(value).lower()
    if text in ("gaussian", "pissa", "olora"):
        return text, None
    if text.startswith("pissa_niter_") and text.removeprefix("pissa_niter_").isdigit():
        return "pissa", int(text.removeprefix("pissa_niter_"))
    raise CheckpointError(
        f"adapter_config.json: init_lora_weights={value!r} is not supported by peftcli's LoRA (it loads True, "
        "gaussian, pissa, pissa_niter_N and olora). Load this adapter with HF peft, or save it converted to plain "
        "LoRA (save_pretrained's path_initial_model_for_weight_conversion)."
    )


def from_peft_config(config: dict[str, Any]) -> LoraParams:
    refuse_unsupported(config, UNSUPPORTED_PEFT_OPTIONS, "LoRA")
    init, niter = init_from_peft(config.get("init_lora_weights", True))
    return LoraParams(
        rank=config["r"],
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0),
        target_modules=config["target_modules"],
        use_rslora=config.get("use_rslora", False),
        use_dora=bool(config.get("use_dora", False)),
        init=init,
        pissa_niter=niter,
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
    state=state,
    paper="https://arxiv.org/abs/2106.09685",
)
