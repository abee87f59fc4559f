"""What every method provides, and the helpers methods share (freezing, matching modules by name).

A method is a plain record of functions (`Method`), not a class to inherit from: core code asks what a
method can do (`method.merge is not None`, `method.kind`), never which method it is.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from peftcli.adapter_io import PREFIX
from peftcli.errors import CheckpointError, MethodError
from peftcli.methods._layers import is_linear


class Kind(enum.Enum):
    """How a method changes the model; decides what can be merged and what inspection shows."""

    WEIGHT_DELTA = "adds a learned update to existing weights"
    ACTIVATION_SCALE = "rescales activations"
    VIRTUAL_TOKENS = "adds trainable virtual tokens"
    NEW_MODULES = "inserts new modules"
    SELECT = "trains a subset of the existing weights"


@dataclass(frozen=True)
class ApplyContext:
    """What a method needs to know about the model and task, supplied by the core.

    head_modules: names of the task head (e.g. `classifier`), trained in full for classification.
    excluded_modules: modules never adapted by `all-linear` (the head and the output embedding).
    """

    head_modules: tuple[str, ...] = ()
    excluded_modules: tuple[str, ...] = ()
    # A recipe naming a module that does not exist is an error; an adapter_config.json written by
    # HF peft lists both `classifier` and `score` for any classifier, so loading tolerates that.
    strict: bool = True


@dataclass
class Adapted:
    """What `apply` did: the modules it adapted and the modules trained in full (`modules_to_save`)."""

    adapted_modules: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    target_modules: list[str] | str = field(default_factory=list)
    # Method-specific adapter_config.json values that depend on the model (e.g. LoRA's fan_in_fan_out).
    config_extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingHooks:
    """What a method asks of the training loop beyond training its parameters (AdaLoRA's rank budget).

    start(total_steps) runs once before the first step; regularizer() is added to the loss of every
    optimizer step (once per step, whatever the accumulation); after_optimizer_step(step) runs after
    optimizer.step() while the gradients are still there. A method whose hooks keep state across steps
    gives it as tensors and JSON-able extras in state(), and takes it back in load_state(), so that a
    resumed run continues exactly.
    """

    start: Callable[[int], None] = lambda total_steps: None
    regularizer: Callable[[], torch.Tensor] | None = None
    after_optimizer_step: Callable[[int], None] = lambda step: None
    state: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
    load_state: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None


@dataclass
class Calibration:
    """Training batches (labels included) and the task's mean loss on one, for methods that look at
    gradients before training (gradient-based selection). Take as many batches as the method needs."""

    batches: Iterator[dict[str, torch.Tensor]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    kind: Kind
    params: type[BaseModel]
    apply: Callable[[nn.Module, Any, ApplyContext], Adapted]
    # Returns the adapter_config.json dict in HF peft's format (our own peft_type where HF peft lacks
    # the method). Called at save time: training may change what it says (AdaLoRA's rank_pattern).
    peft_config: Callable[[Any, Adapted], dict[str, Any]]
    # Parses an adapter_config.json written by us or by HF peft back into our params.
    from_peft_config: Callable[[dict[str, Any]], Any]
    # Folds the adapter into the base weights in place; None where the method cannot be merged.
    merge: Callable[[nn.Module], None] | None
    peft_type: str
    paper: str = ""
    # The tensors written to adapter_model.safetensors, under their file keys. None: every trainable
    # parameter as `base_model.model.<name>` (checkpoint.adapter_state).
    state: Callable[[nn.Module, Adapted], dict[str, torch.Tensor]] | None = None
    # Loads such tensors into a model that `apply` prepared (raising CheckpointError on a mismatch).
    # None: checkpoint.assign_state matches them to the trainable parameters by name.
    load_state: Callable[[nn.Module, Adapted, dict[str, torch.Tensor], str], None] | None = None
    # Runs after apply and before training with a few training batches; None for most methods.
    calibrate: Callable[[nn.Module, Any, Adapted, Calibration], None] | None = None
    # Builds the hooks the training loop calls; None for most methods.
    training_hooks: Callable[[nn.Module, Any, Adapted], TrainingHooks] | None = None
    # Whether the adapted model still trains correctly with gradient checkpointing.
    supports_gradient_checkpointing: bool = True
    # Whether HF peft knows this peft_type (so its PeftModel.from_pretrained loads our adapters).
    in_hf_peft: bool = True
    # Whether it applies to encoder-decoder models (task seq2seq_lm); recipe validation and adapter
    # loading refuse the others. Every method does now.
    supports_encoder_decoder: bool = True
    # Why the method cannot train where FSDP or DeepSpeed hold parameters, gradients and optimizer state
    # in pieces across processes (it reads whole tensors or gradients between steps); None: it can.
    unsharded_only: str | None = None
    # What of the base model's own weights the method trains ("its biases"), which a quantized base
    # holds frozen in 4 or 8 bits: refused there. None: it trains only what it adds.
    trains_base_weights: str | None = None


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as HF peft's get_nb_trainable_parameters reports them: a
    4-bit weight packs two values in each byte of its tensor, so it counts twice its elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return trainable, total


def name_matches(name: str, targets: list[str] | str) -> bool:
    """HF peft's rule: a list matches a module name exactly or as a dotted suffix; a string is a
    regular expression that must match the whole name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_linear(m)]


def is_excluded(name: str, excluded: tuple[str, ...]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in excluded)


def resolve_all_linear(model: nn.Module, ctx: ApplyContext) -> list[str]:
    """`all-linear` as HF peft expands it: the last name part of every linear layer but the output
    layer and the task head, so the saved config lists plain names that HF peft matches the same way."""
    names = [n for n in linear_layer_names(model) if not is_excluded(n, ctx.excluded_modules)]
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def expand_all_linear(model: nn.Module, targets: list[str] | str, ctx: ApplyContext) -> list[str] | str:
    """`method.target_modules` as it is saved: `all-linear` expanded (resolve_all_linear), else as given."""
    return resolve_all_linear(model, ctx) if targets == "all-linear" else targets


def find_targets(model: nn.Module, targets: list[str] | str, ctx: ApplyContext, key: str) -> list[str]:
    """Names of the linear layers the method adapts; a clear error when nothing matches."""
    names = [
        n for n in linear_layer_names(model) if name_matches(n, targets) and not is_excluded(n, ctx.excluded_modules)
    ]
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear_layer_names(model)})
        # Not strict: the targets come from a saved adapter's config, not from the user's recipe.
        hint = (
            "`peft inspect --modules RECIPE` lists them with their full names."
            if ctx.strict
            else "Was the adapter trained on another base model?"
        )
        raise MethodError(
            f"{key if ctx.strict else key.removeprefix('method.')} {targets!r} matched no linear layer of "
            f"{type(model).__name__} (linear layers: {', '.join(available)}). {hint}"
        )
    return names


def default_modules_to_save(requested: list[str] | None, ctx: ApplyContext, model: nn.Module) -> list[str]:
    """The task head trains in full unless the recipe says otherwise (HF peft does the same for SEQ_CLS)."""
    names = requested if requested is not None else list(ctx.head_modules)
    present = dict(model.named_modules())
    missing = [n for n in names if n not in present and not any(k.endswith("." + n) for k in present)]
    if requested is not None and missing and ctx.strict:
        raise MethodError(
            f"method.modules_to_save: {missing} not found in {type(model).__name__}. "
            "Name whole modules, e.g. 'classifier' or 'score'."
        )
    return [n for n in names if n not in missing]


def train_modules_to_save(model: nn.Module, requested: list[str] | None, ctx: ApplyContext) -> list[str]:
    """Unfreezes the modules trained in full beside the adapter (default_modules_to_save); returns them."""
    to_save = default_modules_to_save(requested, ctx, model)
    unfreeze_modules(model, to_save)
    return to_save


def refuse_unsupported(config: dict[str, Any], allowed: dict[str, tuple[Any, ...]], method: str) -> None:
    """A CheckpointError for the first adapter_config.json option (present, and not one of its allowed
    values) that peftcli's `method` cannot load yet."""
    for key, values in allowed.items():
        if key in config and config[key] not in values:
            raise CheckpointError(
                f"adapter_config.json: {key}={config[key]!r} is not supported by peftcli's {method} yet. "
                "Load this adapter with HF peft, or retrain without that option."
            )


def train_in_place(model: nn.Module, names: set[str], to_save: list[str]) -> list[str]:
    """Trains exactly the parameters `names` and the modules `to_save`, in place, with no adapter
    layer (BitFit, full fine-tuning). Returns the modules owning those parameters, outside `to_save`
    (listed apart as modules_to_save), in the model's order."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    unfreeze_modules(model, to_save)
    owners = dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters() if n in names)
    return [m for m in owners if not is_excluded(m, tuple(to_save))]


def unfreeze_modules(model: nn.Module, names: list[str]) -> None:
    for module_name, module in model.named_modules():
        if name_matches(module_name, names):
            for p in module.parameters():
                p.requires_grad_(True)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge_layers(model: nn.Module, layer_type: type[nn.Module]) -> None:
    """Replaces every `layer_type` wrapper by the plain layer its `merged()` returns (the update
    folded into the base weights), so the model's parameter names are the unadapted model's."""
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_type):
            replace_module(model, name, module.merged())


def assign_tensors(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: str, target: str = "this model"
) -> None:
    """Copies `tensors` into `expected` (both keyed by their file keys), which they must match exactly
    in keys and shapes; a CheckpointError names the first mismatch otherwise."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(
            f"{path}: the tensors do not fit {target} ({detail}, {len(missing)} missing and "
            f"{len(unexpected)} unexpected in all). Was the adapter trained on another base model?"
        )
    for key, param in expected.items():
        tensor = tensors[key]
        if tensor.shape != param.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(param.shape)}. Was the adapter trained on another base model?"
            )
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))


# -- transformer blocks, for layer freezing (full, bitfit) ------------------------------------


@dataclass(frozen=True)
class Blocks:
    """The model's stack of transformer blocks: the ModuleList holding them (`bert.encoder.layer`,
    `model.layers`, `transformer.h`, ...) and how many there are."""

    path: str
    count: int

    def index(self, name: str) -> int | None:
        """The block a parameter or module name belongs to; None outside the blocks."""
        if not name.startswith(self.path + "."):
            return None
        return int(name[len(self.path) + 1 :].split(".", 1)[0])


def find_blocks(model: nn.Module) -> Blocks | None:
    """The ModuleList of same-type modules holding the most parameters: the transformer blocks of every
    encoder and decoder in transformers, found without a name pattern per architecture (a list of
    experts inside a block holds fewer parameters than the list of blocks)."""
    candidates = [
        (sum(p.numel() for p in m.parameters()), name, len(m))
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not candidates:
        return None
    _, path, count = max(candidates)
    return Blocks(path, count)


def top_parameter_names(model: nn.Module, last: int, key: str) -> set[str]:
    """The parameters of the last `last` transformer blocks and of what comes after them (the final
    norm, a pooler, the head): the top of the network, which layer freezing trains. Embeddings and the
    earlier blocks are left out, and so is an output layer tied to the input embeddings (it is them).

    "After" is registration order, which transformers models keep in forward order (embeddings,
    blocks, final norm, head)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise MethodError(
            f"{key}: {type(model).__name__} is an encoder-decoder, with two stacks of blocks and no single top (got "
            f"{last}). Set it to null to train every layer."
        )
    blocks = find_blocks(model)
    if blocks is None:
        raise MethodError(
            f"{key}: found no list of transformer blocks in {type(model).__name__} (got {last}). "
            "Set it to null to train every layer."
        )
    if last > blocks.count:
        raise MethodError(
            f"{key}: {type(model).__name__} has {blocks.count} transformer blocks (got {last}). "
            f"Give at most {blocks.count}, or null to train every layer."
        )
    first = blocks.count - last
    names: set[str] = set()
    seen_blocks = False
    for name, _ in model.named_parameters():
        index = blocks.index(name)
        seen_blocks = seen_blocks or index is not None
        if (index is not None and index >= first) or (index is None and seen_blocks):
            names.add(name)
    return names


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Copies `state` (keys `base_model.model.<name>`) into the trainable parameters, which it must
    match exactly in names and shapes."""
    assign_tensors({PREFIX + name: p for name, p in trainable_parameters(model).items()}, state, path)
