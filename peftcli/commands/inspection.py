"""`peft inspect TARGET`: what a recipe, run or adapter trains: adapted modules, trainable and total
parameters, adapter size, and the memory for weights, gradients and optimizer state. `--modules`
lists the model's linear layers, to help write `target_modules`."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from safetensors import safe_open

from peftcli.adapter_io import WEIGHTS_NAME, read_adapter_config
from peftcli.methods._layers import is_linear, out_in
from peftcli.methods.base import count_parameters, name_matches
from peftcli.models.target import build, resolve_target
from peftcli.reporting.model_card import target_base
from peftcli.reporting.serving import vllm_verdict
from peftcli.training.optim import MIN_8BIT_SIZE

console = Console(soft_wrap=True, emoji=False)


def optimizer_state_bytes(model: Any, optimizer: Any) -> int:
    """Bytes of optimizer state for the trainable tensors: AdamW's two fp32 moments (8 a value); the 8-bit
    AdamWs' two 8-bit ones (2 a value; their per-block scales add under 1%), for tensors of MIN_8BIT_SIZE
    values or more, fp32 ones below; SGD's momentum if any (4), else none. No recipe: AdamW."""
    name = optimizer.name if optimizer is not None else "adamw"
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    if name.endswith("8bit"):
        return sum(2 * n if n >= MIN_8BIT_SIZE else 8 * n for n in sizes)
    per_value = 8 if name == "adamw" else 4 if optimizer.momentum else 0
    return per_value * sum(sizes)


def run_inspect(target_path: Path, overrides: list[str], modules: bool = False) -> dict[str, Any]:
    target = resolve_target(target_path, overrides)
    built = build(target, with_adapter=not modules)
    if modules:
        rows = linear_layers(built.model)
        print_layers(rows, type(built.model).__name__)
        return {"linear_layers": rows}
    assert built.method is not None and built.adapted is not None
    trainable, total = count_parameters(built.model)
    weights = sum(p.numel() * p.element_size() for p in built.model.parameters())
    optimizer = target.recipe.optimizer if target.recipe is not None else None
    adapter_file = target.adapter_dir / WEIGHTS_NAME if target.adapter_dir is not None else None
    config = read_adapter_config(target.adapter_dir) if target.adapter_dir is not None else None
    base = target_base(config, target.model, target.recipe is not None)
    info = {
        "method": built.method.name,
        "model": target.model.name,
        "base": {
            "name": base.name,
            "hub_id": base.hub_id,
            "loaded_from": base.loaded_from,
            "description": base.describe(),
        },
        "task": target.task.name,
        "adapted_modules": len(built.adapted.adapted_modules),
        "modules_to_save": [
            {"name": n, "trainable_parameters": saved_parameters(built.model, n)} for n in built.adapted.modules_to_save
        ],
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        # Trainable tensors are kept in float32 whatever the base dtype.
        "adapter_bytes": adapter_file.stat().st_size if adapter_file is not None else trainable * 4,
        "adapter_bytes_measured": adapter_file is not None,
        "memory_bytes": {
            "weights": weights,
            "gradients": trainable * 4,
            "optimizer_state": optimizer_state_bytes(built.model, optimizer),
        },
        "module_groups": module_groups(built.model, built.adapted.adapted_modules),
        # Whether vLLM would serve the saved adapter (a recipe has none yet).
        "vllm": None
        if config is None or adapter_file is None
        else vllm_verdict(
            config, tensor_names(adapter_file), type(built.model).__name__, mergeable=built.method.merge is not None
        ).as_dict(),
    }
    print_info(info)
    return info


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file, from its header (resolve_target checked it reads)."""
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def saved_parameters(model: torch.nn.Module, name: str) -> int:
    """Parameters of the modules `name` matches: a full name, or a suffix such as a decoder's
    `crossattention` in every layer (as modules_to_save is matched)."""
    matched = [m for n, m in model.named_modules() if name_matches(n, [name])]
    return sum(p.numel() for p in {id(p): p for m in matched for p in m.parameters()}.values())


def pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def module_groups(model: torch.nn.Module, names: list[str]) -> list[dict[str, Any]]:
    """Adapted modules grouped by name pattern (layer numbers as *), with their trainable parameters."""
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "trainable_parameters": 0})
    for name in names:
        g = groups[pattern(name)]
        g["count"] += 1
        g["trainable_parameters"] += sum(p.numel() for p in model.get_submodule(name).parameters() if p.requires_grad)
    return [{"pattern": k} | v for k, v in groups.items()]


def linear_layers(model: torch.nn.Module) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int, int], int] = defaultdict(int)
    for name, module in model.named_modules():
        if is_linear(module):
            out_f, in_f = out_in(module)
            groups[(pattern(name), type(module).__name__, in_f, out_f)] += 1
    return [
        {"pattern": p, "suffix": p.rsplit(".", 1)[-1], "type": t, "in_features": i, "out_features": o, "count": c}
        for (p, t, i, o), c in groups.items()
    ]


def print_layers(rows: list[dict[str, Any]], model_name: str) -> None:
    title = f"linear layers of {model_name} (use the last part, or a dotted suffix, in target_modules)"
    table = Table(title=escape(title))
    for col in ("name pattern", "type", "in -> out", "count"):
        table.add_column(col)
    for r in rows:  # module and class names come from the model's code: text, not markup
        shape = f"{r['in_features']} -> {r['out_features']}"
        table.add_row(escape(r["pattern"]), escape(r["type"]), shape, str(r["count"]))
    console.print(table)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def print_info(info: dict[str, Any]) -> None:
    table = Table(title=escape(f"{info['method']} on {info['model']} ({info['task']})"))  # model: a path or hub id
    table.add_column("adapted modules")
    table.add_column("count", justify="right")
    table.add_column("trainable parameters", justify="right")
    for g in info["module_groups"]:
        table.add_row(escape(g["pattern"]), str(g["count"]), f"{g['trainable_parameters']:,}")
    for m in info["modules_to_save"]:
        table.add_row(escape(f"{m['name']} (trained in full)"), "1", f"{m['trainable_parameters']:,}")
    console.print(table)
    m = info["memory_bytes"]
    size = _mb(info["adapter_bytes"]) + ("" if info["adapter_bytes_measured"] else " (estimated, float32)")
    console.print(
        f"base: {escape(info['base']['description'])}\n"
        f"trainable parameters: {info['trainable_parameters']:,} of {info['total_parameters']:,} "
        f"({info['trainable_percent']:.3f}%)\nadapter size: {size}\n"
        f"memory: weights {_mb(m['weights'])}, gradients {_mb(m['gradients'])}, optimizer state "
        f"{_mb(m['optimizer_state'])} (activations come on top and grow with batch size and sequence length)"
    )
    if info["vllm"] is not None:
        console.print(info["vllm"]["line"], markup=False, highlight=False)
