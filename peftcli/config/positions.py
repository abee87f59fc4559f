"""Whether `data.max_length` (and `data.max_target_length`) fit the positions the model's config.json
gives it, read without loading the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftcli.config.describe import Problems
from peftcli.config.paths import PACKAGE_PREFIX, package_folder
from peftcli.config.schema import DataSpec, ModelSpec
from peftcli.tasks.registry import TASKS


def position_limit(name: str, revision: str | None) -> tuple[int, str] | None:
    """How many positions the model's config gives it, and the key that says so (max_position_embeddings,
    GPT-2's n_positions), read from a local folder or the hub cache only: no download, no weights. None
    when the config cannot be read here, or the model has no such limit (T5's relative positions).
    config.json is read as JSON: transformers' AutoConfig would import transformers, half a second of a
    `peft validate` that loads no model."""
    config = cached_config(name, revision)
    if config is None or config.get("position_biased_input", True) is False:  # DeBERTa-v2/v3: relative only
        return None
    key = "max_position_embeddings" if "max_position_embeddings" in config else "n_positions"
    limit = config.get(key)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    pad = config.get("pad_token_id")
    if config.get("model_type") in PADDING_OFFSET_POSITIONS and isinstance(pad, int) and not isinstance(pad, bool):
        # Positions counted from pad_token_id + 1 (RoBERTa's scheme): the first pad_token_id + 1 rows
        # of the table are never a text position.
        return limit - pad - 1, f"{key} minus pad_token_id + 1"
    return limit, key


def cached_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """A model's config.json from its folder, or from the hub cache for a hub id; None when neither has it."""
    location = package_folder(name) if name.startswith(PACKAGE_PREFIX) else Path(name)
    if location is None:  # a package that is not installed: model.name's own check says so
        return None
    path: Any = location / "config.json"
    if not location.is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(name, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a hub id either: loading the model reports why
            return None
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


# Models that number positions from pad_token_id + 1 (transformers' create_position_ids_from_input_ids).
PADDING_OFFSET_POSITIONS = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "longformer",
    "data2vec-text",
    "roberta-prelayernorm",
    "xmod",
    "mpnet",
}


def position_problems(model: ModelSpec, data: DataSpec, method_params: Any, task: str) -> Problems:
    """data.max_length (and a seq2seq target's max_target_length) within the model's positions: past
    them, learned position embeddings are indexed out of range mid-training (an IndexError on a CPU, a
    device-side assert on a GPU). Virtual tokens (prompt, p- and prefix tuning) take positions too."""
    if model.gguf_file:
        return []
    problems: Problems = []
    virtual = getattr(method_params, "num_virtual_tokens", 0) or 0
    found = position_limit(model.name, model.revision)
    if found is not None and data.max_length + virtual > found[0]:
        limit, key = found
        if virtual >= limit:
            problems.append(
                (
                    ("method", "num_virtual_tokens"),
                    (
                        f"as many as the {limit} positions of {model.name} ({key} in its config), leaving none for the "
                        f"text (got {virtual}). Use fewer virtual tokens."
                    ),
                )
            )
        else:
            plus, fewer = (
                (f"with {virtual} virtual tokens (method.num_virtual_tokens), ", ", or use fewer virtual tokens")
                if virtual
                else ("", "")
            )
            problems.append(
                (
                    ("data", "max_length"),
                    (
                        f"{plus}more than the {limit} positions of {model.name} ({key} in its config) (got "
                        f"{data.max_length}). Set data.max_length to {limit - virtual} or less{fewer}."
                    ),
                )
            )
    if TASKS[task].encoder_decoder:
        decoder = model.decoder or model.name
        found = position_limit(decoder, model.revision if model.decoder is None else None)
        if found is not None and data.max_target_length > found[0]:
            limit, key = found
            problems.append(
                (
                    ("data", "max_target_length"),
                    (
                        f"more than the {limit} positions of the decoder {decoder} ({key} in its config) (got "
                        f"{data.max_target_length}). Set data.max_target_length to {limit} or less."
                    ),
                )
            )
    return problems
