"""Model cards (README.md, Hugging Face style) for an adapter folder and a merged model folder: which
base the weights belong to and where it was loaded from here, how to load them in HF peft,
transformers and peftcli, and the run's metrics and training (card_sections.py). Here, not in the
commands that write them, so the card can grow without touching those."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftcli.adapter_io import atomic_write_text
from peftcli.config.paths import PACKAGE_PREFIX, is_hub_id
from peftcli.config.schema import ModelSpec, Recipe
from peftcli.methods import Method
from peftcli.models.loading import model_location
from peftcli.reporting.card_sections import PIPELINE_TAGS, TASK_WORDS, metrics_section, model_index, training_section
from peftcli.tasks.registry import Task

CARD_NAME = "README.md"

PEFT_AUTO_CLASSES = {
    "sequence_classification": "AutoPeftModelForSequenceClassification",
    "token_classification": "AutoPeftModelForTokenClassification",
    "causal_lm": "AutoPeftModelForCausalLM",
    "seq2seq_lm": "AutoPeftModelForSeq2SeqLM",
}


@dataclass(frozen=True)
class Base:
    """The base model as an adapter names it (`name`: adapter_config.json's base_model_name_or_path)
    and where this machine loads its weights from."""

    name: str
    hub_id: bool  # `name` is a Hub id, which any machine can load
    why: str  # where `name` comes from
    loaded_from: str | None  # the local folder (or file) the weights load from here, when not `name` itself

    def describe(self) -> str:
        """e.g. `sentence-transformers/all-MiniLM-L6-v2 (hub id from model.hub_id; loaded here from /x/model)`."""
        here = f"; loaded here from {self.loaded_from}" if self.loaded_from and self.loaded_from != self.name else ""
        return f"{self.name} ({self.why}{here})"


def spec_base(spec: ModelSpec, named: str | None = None) -> Base:
    """The base of a recipe's model. `named`: what an existing adapter names, when it differs (an
    adapter saved before model.hub_id was set names the folder)."""
    location = model_location(spec) + (f" (gguf_file {spec.gguf_file})" if spec.gguf_file else "")
    if named is not None and named != (spec.hub_id or model_location(spec)):
        return Base(named, is_hub_id(named), "as adapter_config.json names it", location)
    if spec.hub_id:
        return Base(spec.hub_id, True, "hub id from model.hub_id", location)
    if not spec.name.startswith(PACKAGE_PREFIX) and is_hub_id(spec.name):
        return Base(spec.name, True, "hub id from model.name", location if spec.gguf_file else None)
    return Base(
        model_location(spec),
        False,
        "a local folder, from model.name: set model.hub_id to name a base other machines can load",
        location if spec.gguf_file else None,
    )


def adapter_base(config: dict[str, Any], spec: ModelSpec) -> Base:
    """The base of an adapter folder without a run recipe: as adapter_config.json names it, loaded
    here from `spec` (the same, or what model.name=... gives)."""
    named = str(config.get("base_model_name_or_path") or "")
    location = model_location(spec) + (f" (gguf_file {spec.gguf_file})" if spec.gguf_file else "")
    return Base(named, is_hub_id(named), "as adapter_config.json names it", location)


def target_base(config: dict[str, Any] | None, spec: ModelSpec, from_recipe: bool) -> Base:
    """The base of what `peft inspect` or `peft merge` acts on: a recipe or a run (`from_recipe`: the
    recipe's model, checked against what the adapter's `config` names), or a bare adapter folder."""
    if from_recipe or config is None:
        return spec_base(spec, (config or {}).get("base_model_name_or_path"))
    return adapter_base(config, spec)


def write_card(folder: Path, text: str) -> bool:
    """Writes README.md into `folder` unless one is there (a user's card is never replaced)."""
    path = Path(folder) / CARD_NAME
    if path.exists():
        return False
    atomic_write_text(path, text)
    return True


def front_matter(fields: dict[str, Any]) -> str:
    return (
        "---\n"
        + yaml.safe_dump({k: v for k, v in fields.items() if v is not None}, sort_keys=False, allow_unicode=True)
        + "---\n"
    )


def label_kwargs(label_names: list[str] | None) -> str:
    """`id2label=..., label2id=...` as Python source: HF peft and transformers take label names from
    the base's config.json, never from an adapter folder, so they are passed when loading."""
    if label_names is None:
        return ""
    id2label = {i: name for i, name in enumerate(label_names)}
    label2id = {name: i for i, name in enumerate(label_names)}
    return f"id2label={id2label!r}, label2id={label2id!r}"


def hf_snippet(base: Base, task: Task, adapter: str, label_names: list[str] | None, gguf_file: str | None) -> str:
    """Python that loads the adapter with HF peft over the base (a fenced block)."""
    auto = task.auto_model.__name__
    args = [repr(base.name)]
    if gguf_file and not base.hub_id:
        args.append(f"gguf_file={gguf_file!r}")
    if label_names is not None:
        args.append(label_kwargs(label_names))
    return (
        "```python\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto}\n\n"
        f"base = {auto}.from_pretrained({', '.join(args)})\n"
        f"model = PeftModel.from_pretrained(base, {adapter!r})\n"
        "```\n"
    )


def adapter_card(
    *,
    title: str,
    method: str,
    in_hf_peft: bool,
    task: Task,
    base: Base,
    spec: ModelSpec,
    adapter: str,
    label_names: list[str] | None,
    report: dict[str, Any] | None = None,
    eval_args: str = "",
    recipe: Recipe | None = None,
) -> str:
    """README.md for an adapter folder. `adapter`: the folder as the snippets load it; `eval_args`:
    the data.* overrides `peft eval` needs for a bare copy of the folder; `recipe` and `report`: the
    run's, for its data, metrics (also as the Hub's model-index), compute and the recipe itself."""
    lines = [
        adapter_front_matter(title, method, in_hf_peft, task, base, recipe, report),
        f"# {title}\n",
        f"A peftcli `{method}` adapter for {TASK_WORDS.get(task.name, task.name)}.\n",
        "## Base model\n",
        f"`{base.name}` ({base.why})"
        + (f"; loaded here from `{base.loaded_from}`." if base.loaded_from and base.loaded_from != base.name else ".")
        + "\n",
    ]
    if spec.gguf_file and base.hub_id:
        lines.append(
            f"The weights trained over were those of the GGUF file `{spec.gguf_file}` (dequantized); "
            "the hub id's original weights differ from them by the GGUF quantization.\n"
        )
    if spec.decoder is not None:
        lines.append(
            f"The model is an encoder-decoder built from `{base.name}` and `{spec.decoder}` (model.decoder).\n"
        )
    if label_names is not None:
        lines += [
            "## Labels\n",
            ", ".join(f"{i}: {name}" for i, name in enumerate(label_names)) + " (also in labels.json)\n",
        ]
    lines.append("## Load it\n")
    if not in_hf_peft:
        lines.append(f"HF peft has no {method} adapters: load this folder with peftcli.\n")
    elif spec.decoder is not None:
        lines.append("HF peft cannot rebuild this encoder-decoder from one base name: load this folder with peftcli.\n")
    else:
        lines.append("With HF peft (give a local copy of the base instead of its name to load offline):\n")
        lines.append(hf_snippet(base, task, adapter, label_names, spec.gguf_file))
        if label_names is not None:
            lines.append(
                "transformers and HF peft read label names from the base's config.json only, never from an adapter "
                "folder: pass `id2label` and `label2id` as above, also to "
                f"`{PEFT_AUTO_CLASSES[task.name]}.from_pretrained(ADAPTER, id2label=..., label2id=...)`, to "
                f"transformers' `{task.auto_model.__name__}.from_pretrained(ADAPTER, id2label=..., "
                "label2id=...)` (with peft installed) or to `pipeline(model=ADAPTER, model_kwargs={...})`.\n"
            )
    lines.append("With peftcli:\n")
    commands = [f"peft eval {adapter}    # here, the run's recipe.yaml beside it names the base and the data"]
    if task.generates and not task.encoder_decoder:
        commands.append(f'peft generate {adapter} "PROMPT"')
    copy = "model.name=<folder>" if not base.hub_id else "[model.name=<local copy of the base>]"
    commands.append(f"peft eval path/to/a/copy {copy} data.files.validation=FILE{eval_args}")
    lines.append("```bash\n" + "\n".join(commands) + "\n```\n")
    if report is not None:
        lines += metrics_section(report)
    if recipe is not None and report is not None:
        lines += training_section(recipe, report)
    return "\n".join(lines)


def adapter_front_matter(
    title: str,
    method: str,
    in_hf_peft: bool,
    task: Task,
    base: Base,
    recipe: Recipe | None,
    report: dict[str, Any] | None,
) -> str:
    """The card's metadata: what HF peft's own card has (PeftModel.create_or_update_model_card: library_name
    peft, base_model, pipeline_tag, tags transformers / lora / base_model:adapter:<id>), plus the Hub dataset
    trained on and the metrics as model-index."""
    tags = (
        ["peftcli", method]
        + (["transformers"] if in_hf_peft else [])
        + ([f"base_model:adapter:{base.name}"] if base.hub_id else [])
    )
    datasets = (
        [recipe.data.dataset] if recipe is not None and recipe.data.dataset and is_hub_id(recipe.data.dataset) else None
    )
    return front_matter(
        {
            "base_model": base.name,
            "library_name": "peft",
            "pipeline_tag": PIPELINE_TAGS.get(task.name),
            "tags": tags,
            "datasets": datasets,
            "model-index": model_index(title, task, recipe, report),
        }
    )


def run_card(
    recipe: Recipe, method: Method, task: Task, label_names: list[str] | None, report: dict[str, Any], adapter_dir: Path
) -> str:
    """The card of a run's adapter/ folder (`peft train`), from its resolved recipe and report."""
    columns = recipe.data.columns.model_dump(exclude_none=True)
    eval_args = "".join(
        " " + shell_word(f"data.columns.{k}={v if isinstance(v, str) else json.dumps(v)}") for k, v in columns.items()
    )
    return adapter_card(
        title=recipe.name or adapter_dir.parent.name,
        method=method.name,
        in_hf_peft=method.in_hf_peft,
        task=task,
        base=spec_base(recipe.model),
        spec=recipe.model,
        adapter=str(adapter_dir),
        label_names=label_names,
        report=report,
        eval_args=eval_args,
        recipe=recipe,
    )


def shell_word(text: str) -> str:
    """`text` quoted for bash on one line: $'...' where it holds a newline (a prompt template)."""
    if "\n" not in text:
        return shlex.quote(text)
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def merged_card(
    *,
    method: str,
    task: Task,
    base: Base,
    adapter: str,
    model_class: str,
    out: str,
    dtype: str,
    label_names: list[str] | None = None,
) -> str:
    """README.md for a `peft merge` folder: the base it came from and the adapter folded in."""
    lines = [
        front_matter(
            {
                "base_model": base.name,
                "library_name": "transformers",
                "pipeline_tag": PIPELINE_TAGS.get(task.name),
                "tags": ["peftcli", method, "merged"],
            }
        ),
        f"# {Path(out).name or out}\n",
        f"`{base.name}` ({base.why}) with the {method} adapter `{adapter}` folded into its weights by `peft merge`, "
        f"in {dtype}."
        + (
            f" The base was loaded here from `{base.loaded_from}`."
            if base.loaded_from and base.loaded_from != base.name
            else ""
        )
        + "\n",
        *(
            [
                "## Labels\n",
                ", ".join(f"{i}: {name}" for i, name in enumerate(label_names))
                + " (config.json's id2label and label2id)\n",
            ]
            if label_names
            else []
        ),
        "## Load it\n",
        f"```python\nfrom transformers import {model_class}\n\nmodel = {model_class}.from_pretrained({out!r})\n```\n",
    ]
    return "\n".join(lines)
