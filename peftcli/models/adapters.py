"""A saved adapter applied to a model, and a trained one saved: HF peft's format (adapter_io) read
and written through the method registry, so each method's own settings and state go in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from peftcli.adapter_io import (
    CONFIG_NAME,
    PREFIX,
    atomic_dir,
    read_adapter_config,
    read_state,
    weights_file,
    write_adapter,
)
from peftcli.config.describe import describe
from peftcli.errors import CheckpointError, MethodError
from peftcli.methods import BY_PEFT_TYPE, Method, context_for
from peftcli.methods.base import Adapted, assign_state, trainable_parameters
from peftcli.tasks.registry import Task


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors under HF peft's key names: the adapter and any modules trained in full."""
    return {PREFIX + name: p.detach().cpu().contiguous().clone() for name, p in trainable_parameters(model).items()}


def method_state(method: Method, model: nn.Module, adapted: Adapted) -> dict[str, torch.Tensor]:
    """What goes into adapter_model.safetensors: the method's own export where it has one (folded
    prompt encoders, selected entries and their indices), else every trainable tensor."""
    if method.state is None:
        return adapter_state(model)
    return {k: v.detach().cpu().contiguous().clone() for k, v in method.state(model, adapted).items()}


def adapter_config(
    method: Method, params: Any, adapted: Adapted, task: Task, base_model: str, revision: str | None
) -> dict[str, Any]:
    config = method.peft_config(params, adapted)
    config.update({"task_type": task.peft_task_type, "base_model_name_or_path": base_model, "revision": revision})
    return config


def save_adapter(
    folder: Path,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    label_names: list[str] | None = None,
    tokenizer: Any = None,
) -> None:
    with atomic_dir(folder) as tmp:
        write_adapter(tmp, state, config, label_names, tokenizer)


def method_for(config: dict[str, Any], where: Path) -> Method:
    peft_type = config["peft_type"]
    if peft_type not in BY_PEFT_TYPE:
        raise CheckpointError(
            f"{where / CONFIG_NAME}: peft_type {peft_type!r} is not supported "
            f"(supported: {', '.join(sorted(BY_PEFT_TYPE))})."
        )
    return BY_PEFT_TYPE[peft_type]


def method_params(method: Method, config: dict[str, Any], where: Path) -> Any:
    """The method's settings from an adapter_config.json, which may be damaged or hand-edited."""
    path = where / CONFIG_NAME
    try:
        return method.from_peft_config(config)
    except ValidationError as exc:
        lines = [
            f"{path}: invalid {method.name} setting {'.'.join(map(str, e['loc']))}: "
            f"{describe(e, method.params)} Re-save the adapter."
            for e in exc.errors()
        ]
        raise CheckpointError(*lines) from None
    except KeyError as exc:
        raise CheckpointError(
            f"{path}: no {exc.args[0]!r} key, which a {config['peft_type']} adapter config needs. Re-save the adapter."
        ) from None


def load_adapter(folder: Path, model: nn.Module, task: Task) -> tuple[Method, Any, Adapted]:
    """Applies the adapter described in `folder` to `model` (in place) and loads its weights."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    method = method_for(config, folder)
    params = method_params(method, config, folder)
    path = weights_file(folder)
    if task.encoder_decoder and not method.supports_encoder_decoder:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: {method.name} adapters on encoder-decoder models are not supported by peftcli. "
            "Load this adapter with HF peft."
        )
    try:
        adapted = method.apply(model, params, context_for(model, task.head_modules, strict=False))
    except MethodError as exc:
        raise CheckpointError(*(f"{folder / CONFIG_NAME}: {line}" for line in exc.lines)) from None
    state = read_state(path)
    if method.load_state is not None:
        method.load_state(model, adapted, state, str(path))
    else:
        assign_state(model, state, str(path))
    return method, params, adapted
