"""Where a recipe's names point: Hub ids, `package:<pkg>/<folder>` models, and local paths resolved
against the recipe's folder (or, for command-line overrides, the current directory)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from peftcli.config.overrides import override_origin
from peftcli.config.schema import DataSpec, ModelSpec

PACKAGE_PREFIX = "package:"
# A Hub model id: [org/]name, letters, digits, '-', '_', '.' (as huggingface_hub validates repo ids).
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(name: str) -> bool:
    """`name` reads as a Hub id (org/name) and is no file or folder here."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name).exists()


def _resolver(root: Path, override_keys: dict[tuple[str, ...], str]) -> Any:
    def resolve(p: str, key: tuple[str, ...]) -> str:
        base = Path.cwd() if override_origin(key, override_keys) else root
        candidate = Path(p).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    return resolve


def resolve_model_path(model: ModelSpec, root: Path, override_keys: dict[tuple[str, ...], str]) -> ModelSpec:
    resolve = _resolver(root, override_keys)
    if looks_like_path(model.name):
        model = model.model_copy(update={"name": resolve(model.name, ("model", "name"))})
    if model.decoder is not None and looks_like_path(model.decoder):
        model = model.model_copy(update={"decoder": resolve(model.decoder, ("model", "decoder"))})
    return model


def resolve_data_paths(data: DataSpec, root: Path, override_keys: dict[tuple[str, ...], str]) -> DataSpec:
    resolve = _resolver(root, override_keys)
    if data.files:
        files = {split: [resolve(f, ("data", "files", split)) for f in fs] for split, fs in data.files.items()}
        data = data.model_copy(update={"files": files})
    if data.dataset and looks_like_path(data.dataset):
        data = data.model_copy(update={"dataset": resolve(data.dataset, ("data", "dataset"))})
    return data


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).exists()


def package_folder(name: str) -> Path | None:
    """`package:<pkg>/<sub/folder>` -> the folder inside the installed package, found without
    importing it (importing may pull dependencies that are not installed)."""
    package, _, sub = name[len(PACKAGE_PREFIX) :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / sub
