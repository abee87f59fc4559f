"""AdaLoRA: an SVD-form low-rank update W + s * P diag(E) Q whose rank budget is reallocated during
training, from init_r per layer down to an average of target_r, to the layers that matter most.

Zhang et al. 2023, https://arxiv.org/abs/2303.10512. Q (`lora_A`, r x in) and P (`lora_B`, out x r) start
small and random and E (`lora_E`, r x 1) at zero, so training starts from the base model exactly;
s = alpha / init_r. A regularizer ||Q Q^T - I|| + ||P^T P - I|| keeps P and Q near orthogonal, so E holds
the singular values. Every triplet (a row of Q, an entry of E, a column of P) gets an importance score:
|w * grad| per entry, smoothed by an EMA (beta1) and multiplied by an EMA of its deviation, the
uncertainty (beta2). Between steps tinit and total - tfinal the total budget falls on a cubic schedule
and every delta_t steps the least important triplets are masked (their E set to zero); after that the
final pattern stays fixed. The kept triplets, per layer, are the rank pattern that adapter_config.json
records, and the saved tensors hold only those (as HF peft writes them).

Parameter names follow HF peft's saved layout (`<module>.lora_A`, `.lora_E`, `.lora_B`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from peftcli.adapter_io import PREFIX
from peftcli.errors import MethodError
from peftcli.methods._layers import any_fan_in_fan_out
from peftcli.methods._low_rank import LowRankLayer
from peftcli.methods.base import (
    Adapted,
    ApplyContext,
    Kind,
    Method,
    TrainingHooks,
    expand_all_linear,
    find_targets,
    freeze,
    merge_layers,
    refuse_unsupported,
    replace_module,
    train_modules_to_save,
    trainable_parameters,
)

PARTS = ("lora_A", "lora_E", "lora_B")  # Q, E and P: a row, an entry and a column of each per triplet


class AdaLoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, description="rank every adapted layer starts with")
    target_r: int = Field(8, gt=0, description="average rank per layer left when the budget has fallen")
    alpha: float = Field(
        64, gt=0, description="scale alpha/init_r of P diag(E) Q; E starts at zero, so larger than LoRA's alpha/r"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input; 0 skips it (faster)")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="module names matched as dotted suffixes (e.g. [query, value]), "
        "a regular expression over full names, or 'all-linear' (every linear layer but the head)",
    )
    tinit: int | float = Field(
        0.1,
        ge=0,
        description="warm-up steps before the budget falls: a step count, or a fraction (< 1) of the total steps",
    )
    tfinal: int | float = Field(
        0.3,
        ge=0,
        description="final steps with the rank pattern fixed: a step count, or a fraction (< 1) of the total steps",
    )
    delta_t: int = Field(10, gt=0, description="steps between two reallocations of the budget (HF peft: deltaT)")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor smoothing the sensitivity |w * grad|")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty (the sensitivity's deviation)")
    orth_reg_weight: float = Field(
        0.5, ge=0, description="weight of the orthogonality regularizer on P and Q; 0 turns it off"
    )
    total_step: int | None = Field(
        None, gt=0, description="steps the budget schedule spans; default: the training run's total steps"
    )
    rank_pattern: dict[str, list[bool]] | None = Field(
        None, description="the triplets each layer kept, written by training into adapter_config.json; not for recipes"
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved; default: the classification head"
    )

    @field_validator("tinit", "tfinal")
    @classmethod
    def _steps_or_fraction(cls, v: float) -> float:
        if isinstance(v, float) and v >= 1 and not v.is_integer():
            raise PydanticCustomError("steps_or_fraction", "give a whole number of steps or a fraction below 1")
        return v

    @field_validator("target_r")
    @classmethod
    def _budget_falls(cls, v: int, info: ValidationInfo) -> int:
        init_r = info.data.get("init_r")
        if init_r is not None and v > init_r:
            raise PydanticCustomError(
                "budget_falls", "the budget only falls: target_r must be at most init_r ({init_r})", {"init_r": init_r}
            )
        return v


class SVDLinear(LowRankLayer):
    """A frozen linear layer (nn.Linear, or GPT-2's transposed Conv1D) plus a trainable update
    s * B diag(E) A. `ranknum` is init_r even after the layer keeps fewer triplets, as in HF peft."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float, ranknum: int) -> None:
        super().__init__(base_layer)
        kw = {"device": base_layer.weight.device, "dtype": torch.float32}
        # HF peft's initialization: A and B small and random, E zero.
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, rank, **kw) * 0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.alpha = alpha
        self.ranknum = float(ranknum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        # The same operations in the same order as HF peft's SVDLinear, so outputs agree to the last bits.
        update = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.alpha / (self.ranknum + 1e-5)
        return result + update.to(result.dtype)

    def update(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.alpha / (self.ranknum + 1e-5)


def apply(model: nn.Module, params: AdaLoraParams, ctx: ApplyContext) -> Adapted:
    freeze(model)
    targets = expand_all_linear(model, params.target_modules, ctx)
    names = find_targets(model, targets, ctx, "method.target_modules")
    # A trained adapter's layers keep only their pattern's triplets (HF peft's resize_modules_by_rank_pattern).
    pattern = params.rank_pattern or {}
    for name in names:
        kept = pattern.get(f"{name}.lora_E")
        rank = sum(kept) if kept is not None else params.init_r
        replace_module(
            model, name, SVDLinear(model.get_submodule(name), rank, params.alpha, params.dropout, params.init_r)
        )
    return Adapted(
        adapted_modules=names,
        modules_to_save=train_modules_to_save(model, params.modules_to_save, ctx),
        target_modules=targets,
        config_extras={"fan_in_fan_out": any_fan_in_fan_out(model, names), "rank_pattern": params.rank_pattern},
    )


def merge(model: nn.Module) -> None:
    merge_layers(model, SVDLinear)


def svd_layers(model: nn.Module, adapted: Adapted) -> dict[str, SVDLinear]:
    return {name: model.get_submodule(name) for name in adapted.adapted_modules}


# -- the rank budget (HF peft's RankAllocator and AdaLoraModel.update_and_allocate) ------------------


def steps(value: float, total: int) -> int:
    """A step count, or a fraction (< 1) of the total steps."""
    return int(value * total) if isinstance(value, float) and value < 1 else int(value)


def schedule(params: AdaLoraParams, adapted: Adapted) -> tuple[int, int, int]:
    """(total_step, tinit, tfinal) in steps. Before training has said how long it runs, the smallest
    schedule HF peft accepts stands in (the saved config needs one; inference ignores it)."""
    total = adapted.config_extras.get("total_step") or params.total_step
    if total is None:
        tinit, tfinal = steps(params.tinit, 0), steps(params.tfinal, 0)
        return tinit + tfinal + 1, tinit, tfinal
    return total, steps(params.tinit, total), steps(params.tfinal, total)


class RankBudget:
    """Scores every triplet and masks the least important ones as the budget falls."""

    def __init__(self, model: nn.Module, params: AdaLoraParams, adapted: Adapted) -> None:
        if params.rank_pattern is not None:
            raise MethodError(
                "method.rank_pattern is written by training to record the ranks an adapter kept (got a pattern "
                f"for {len(params.rank_pattern)} modules). Remove it from the recipe to train AdaLoRA from scratch."
            )
        self.params, self.adapted = params, adapted
        self.layers = svd_layers(model, adapted)
        self.init_budget = sum(layer.lora_E.shape[0] for layer in self.layers.values())
        self.target_budget = params.target_r * len(self.layers)
        self.total = self.tinit = self.tfinal = 0
        self.reset_scores()

    def reset_scores(self) -> None:
        self.sensitivity: dict[nn.Parameter, torch.Tensor] = {}
        self.uncertainty: dict[nn.Parameter, torch.Tensor] = {}

    def start(self, total_steps: int) -> None:
        self.adapted.config_extras["total_step"] = self.params.total_step or total_steps
        self.total, self.tinit, self.tfinal = schedule(self.params, self.adapted)
        if self.tinit >= self.total - self.tfinal:
            raise MethodError(
                f"method.tinit and method.tfinal leave no steps for the budget to fall (got tinit {self.tinit} and "
                f"tfinal {self.tfinal} steps of {self.total}). Lower them or train longer."
            )

    def regularizer(self) -> torch.Tensor:
        """orth_reg_weight x the mean of ||A A^T - I||_F and ||B^T B - I||_F over all A and B."""
        terms = []
        for layer in self.layers.values():
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
                terms.append(torch.norm(cov - eye, p="fro"))
        return self.params.orth_reg_weight * torch.stack(terms).mean()

    def after_optimizer_step(self, step: int) -> None:
        final = self.total - self.tfinal
        if step < final:
            self.update_scores()
            budget, mask_now = self.budget(step)
            if mask_now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.target_budget)
            self.reset_scores()
        else:
            self.mask_to_pattern()

    def budget(self, step: int) -> tuple[int, bool]:
        """The cubic schedule: init budget until tinit, then falling to the target at total - tfinal."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total - self.tfinal:
            return self.target_budget, True
        left = 1 - (step - self.tinit) / (self.total - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % self.params.delta_t == 0

    @torch.no_grad()
    def update_scores(self) -> None:
        b1, b2 = self.params.beta1, self.params.beta2
        for _, p in self.scored_parameters():
            ipt = (p * p.grad).abs()
            avg = self.sensitivity.get(p, torch.zeros_like(p))
            unc = self.uncertainty.get(p, torch.zeros_like(p))
            self.sensitivity[p] = b1 * avg + (1 - b1) * ipt
            self.uncertainty[p] = b2 * unc + (1 - b2) * (ipt - self.sensitivity[p]).abs()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The importance averages and the rank pattern, for a resumed run."""
        tensors = {}
        for key, p in self.scored_parameters():
            if p in self.sensitivity:
                tensors[f"sensitivity.{key}"] = self.sensitivity[p].detach().cpu().clone()
                tensors[f"uncertainty.{key}"] = self.uncertainty[p].detach().cpu().clone()
        return tensors, {"rank_pattern": self.adapted.config_extras.get("rank_pattern")}

    def load_state(self, tensors: dict[str, torch.Tensor], extras: dict[str, Any]) -> None:
        self.reset_scores()
        for key, p in self.scored_parameters():
            if f"sensitivity.{key}" in tensors:
                self.sensitivity[p] = tensors[f"sensitivity.{key}"].to(p.device)
                self.uncertainty[p] = tensors[f"uncertainty.{key}"].to(p.device)
        self.adapted.config_extras["rank_pattern"] = extras["rank_pattern"]

    def scored_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(`<layer>.<part>`, parameter) for A, E and B of every layer: the keys of the saved scores."""
        return [(f"{n}.{part}", getattr(layer, part)) for n, layer in self.layers.items() for part in PARTS]

    def score(self, p: nn.Parameter) -> torch.Tensor:
        return self.sensitivity[p] * self.uncertainty[p]

    def triplet_scores(self, layer: SVDLinear) -> torch.Tensor:
        """Per triplet: E's score plus the mean scores of its row of A and its column of B."""
        vectors = self.score(layer.lora_A).mean(dim=1) + self.score(layer.lora_B).mean(dim=0)
        return self.score(layer.lora_E).view(-1) + vectors

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        if budget >= self.init_budget:  # nothing to cut (kthvalue needs k >= 1)
            return
        scores = {name: self.triplet_scores(layer) for name, layer in self.layers.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget)[0].item()
        pattern = {}
        for name, layer in self.layers.items():
            keep = scores[name] > threshold
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = keep.tolist()
        self.adapted.config_extras["rank_pattern"] = pattern

    @torch.no_grad()
    def mask_to_pattern(self) -> None:
        pattern = self.adapted.config_extras["rank_pattern"]
        if pattern is None:  # target_r == init_r: nothing was ever cut
            return
        for name, layer in self.layers.items():
            keep = torch.tensor(pattern[f"{name}.lora_E"], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


def training_hooks(model: nn.Module, params: AdaLoraParams, adapted: Adapted) -> TrainingHooks:
    budget = RankBudget(model, params, adapted)
    return TrainingHooks(
        start=budget.start,
        regularizer=budget.regularizer if params.orth_reg_weight > 0 else None,
        after_optimizer_step=budget.after_optimizer_step,
        state=budget.state,
        load_state=budget.load_state,
    )


# -- save and load ---------------------------------------------------------------------------


def state(model: nn.Module, adapted: Adapted) -> dict[str, torch.Tensor]:
    """The trainable tensors, each layer cut to the triplets its rank pattern keeps (HF peft's
    resize_state_dict_by_rank_pattern: masked triplets are dropped, not stored as zeros)."""

    tensors = {PREFIX + n: p for n, p in trainable_parameters(model).items()}
    for key, kept in (adapted.config_extras.get("rank_pattern") or {}).items():
        module = PREFIX + key.removesuffix(".lora_E")
        a, e, b = (tensors[f"{module}.{part}"] for part in PARTS)
        keep = torch.tensor(kept, device=e.device)
        # A layer already cut (an adapter loaded with its pattern) is saved as it is.
        if int(keep.sum()) != e.shape[0]:
            tensors |= {f"{module}.lora_A": a[keep], f"{module}.lora_E": e[keep], f"{module}.lora_B": b[:, keep]}
    return tensors


def peft_config(params: AdaLoraParams, adapted: Adapted) -> dict[str, Any]:
    total, tinit, tfinal = schedule(params, adapted)
    return {
        "peft_type": "ADALORA",
        "init_r": params.init_r,
        "target_r": params.target_r,
        "lora_alpha": params.alpha,
        "lora_dropout": params.dropout,
        "target_modules": adapted.target_modules,
        "modules_to_save": adapted.modules_to_save or None,
        "tinit": tinit,
        "tfinal": tfinal,
        "deltaT": params.delta_t,
        "beta1": params.beta1,
        "beta2": params.beta2,
        "orth_reg_weight": params.orth_reg_weight,
        "total_step": total,
        "rank_pattern": adapted.config_extras.get("rank_pattern"),
        "bias": "none",
        "fan_in_fan_out": adapted.config_extras.get("fan_in_fan_out", False),
        "init_lora_weights": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


UNSUPPORTED_PEFT_OPTIONS = {"layers_to_transform": (None,), "bias": ("none",), "use_dora": (False, None)}


def from_peft_config(config: dict[str, Any]) -> AdaLoraParams:
    refuse_unsupported(config, UNSUPPORTED_PEFT_OPTIONS, "AdaLoRA")
    pattern = config.get("rank_pattern")
    return AdaLoraParams(
        init_r=config.get("init_r", 12),
        target_r=min(config.get("target_r", 8), config.get("init_r", 12)),
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0),
        target_modules=config["target_modules"],
        tinit=config.get("tinit", 0),
        tfinal=config.get("tfinal", 0),
        delta_t=config.get("deltaT", 1),
        beta1=config.get("beta1", 0.85),
        beta2=config.get("beta2", 0.85),
        orth_reg_weight=config.get("orth_reg_weight", 0.5),
        total_step=config.get("total_step"),
        # HF peft names the adapter in pattern keys until it saves them (`...lora_E.default`).
        rank_pattern={k.removesuffix(".default"): v for k, v in pattern.items()} if pattern else None,
        modules_to_save=config.get("modules_to_save") or [],
    )


METHOD = Method(
    name="adalora",
    summary="low-rank SVD-form updates whose rank budget moves to the layers that matter",
    kind=Kind.WEIGHT_DELTA,
    params=AdaLoraParams,
    apply=apply,
    peft_config=peft_config,
    from_peft_config=from_peft_config,
    merge=merge,
    peft_type="ADALORA",
    paper="https://arxiv.org/abs/2303.10512",
    state=state,
    training_hooks=training_hooks,
    unsharded_only="it reallocates ranks between steps from whole lora_A/lora_B matrices and their gradients",
)
