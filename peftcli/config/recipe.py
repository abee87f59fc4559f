"""The recipe schema and `load_recipe`: YAML + `key.path=value` overrides -> a validated Recipe.

The schema is the single source of defaults and help. Every problem is collected and reported at once,
each as `<file>: <key.path>: <what is wrong> (got <value>). <what to do>`. Relative input paths in a
recipe file are resolved against the recipe's folder (so it runs from anywhere); paths given as
command-line overrides against the current directory.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftcli.errors import RecipeError
from peftcli.methods import METHODS
from peftcli.tasks.registry import TASKS

PACKAGE_PREFIX = "package:"
# A Hub model id: [org/]name, letters, digits, '-', '_', '.' (as huggingface_hub validates repo ids).
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
MAX_RECIPE_BYTES = 1_000_000
# Guards against hostile YAML: a recipe is a few levels deep and, even with anchors, a few hundred
# values. A "billion laughs" file is a few lines of aliases that expand to billions of values.
MAX_YAML_DEPTH = 20
MAX_ALIAS_VALUES = 10_000
# The tokenizers library truncates to a 64-bit length and raises past it; no model reads 2**31 tokens.
MAX_TOKENS = 2**31 - 1


def is_hub_id(name: str) -> bool:
    """`name` reads as a Hub id (org/name) and is no file or folder here."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name).exists()


class Strict(BaseModel):
    # inf and nan parse as floats (YAML .inf, an override lr=inf) and pass gt/ge bounds or fail them
    # with a misleading message; no setting of a recipe means either.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class QuantizationSpec(Strict):
    bits: Literal[4, 8] = Field(description="4: NF4/FP4 weights (QLoRA); 8: LLM.int8")
    quant_type: Literal["nf4", "fp4"] | None = Field(None, description="bits 4 only: nf4 (QLoRA's, default) or fp4")
    double_quant: bool | None = Field(
        None,
        description="bits 4 only: quantize the quantization constants too (about 0.4 bits a weight less); default true",
    )
    compute_dtype: Literal["bfloat16", "float32"] | None = Field(
        None,
        description="bits 4 only: the dtype the 4-bit weights are dequantized to for each product; default bfloat16",
    )


class ModelSpec(Strict):
    name: str = Field(
        description="hub id (org/name), a local model folder, or package:<python package>/<folder> "
        "for a model shipped inside an installed package"
    )
    hub_id: str | None = Field(
        None,
        description="the Hugging Face Hub id of the same weights when `name` is a folder or package (e.g. "
        "sentence-transformers/all-MiniLM-L6-v2): the adapter names it as its base (base_model_name_or_path, "
        "the model card), so it loads on other machines. Default: the adapter names `name` (a folder by its path here, "
        "which other machines may not have)",
    )
    gguf_file: str | None = Field(None, description="a .gguf file inside `name` (dequantized to float)")
    revision: str | None = Field(
        None, description="hub revision (branch, tag or commit) of `name`; report.json records the commit loaded"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the frozen base weights are loaded in"
    )
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="every dropout probability of the base model (hidden, attention, head); 0 turns them off: "
        "faster, less regularization. Default: the model's own",
    )
    decoder: str | None = Field(
        None,
        description="seq2seq_lm only: a second pretrained model (hub id, folder or package:...) whose weights start "
        "the decoder of an encoder-decoder built with `name` as the encoder (bert2bert). The decoder gets new "
        "cross-attention layers, which train in full with the adapter. Default: `name` is an encoder-decoder (T5, BART)",
    )
    quantization: QuantizationSpec | None = Field(
        None,
        description="load the frozen base's linear layers quantized with bitsandbytes (pip install 'peftcli[quant]'): "
        "{bits: 4, quant_type: nf4} is QLoRA; norms, embeddings and the head stay in `dtype`",
    )


class Columns(Strict):
    text: str | None = Field(None, description="text column (classification, or plain causal LM text)")
    text_pair: str | None = Field(None, description="second text column for sentence-pair classification")
    label: str | None = Field(None, description="label column: ints or strings (strings are mapped to ids)")
    prompt: str | None = Field(
        None, description="prompt column (causal LM: its tokens get no loss; seq2seq: the source)"
    )
    response: str | None = Field(
        None, description="response column (causal LM, seq2seq: the target); trained, EOS appended"
    )
    response_names: list[str] | None = Field(
        None,
        description="seq2seq_lm: the target text for each integer value 0..N-1 of the response column, "
        "e.g. [negative, positive] to train a classification set as text-to-text",
    )
    prompt_template: str | None = Field(
        None, description="prompt built from columns, e.g. 'Question: {question}\\nAnswer: '"
    )
    messages: str | None = Field(
        None,
        description="chat column (causal LM): a list of {role, content} messages, or ShareGPT's {from, value}; "
        "rendered with the tokenizer's chat template, only the assistant's turns are trained",
    )
    tokens: str | None = Field(
        None, description="token classification: a column of word lists, e.g. ['John', 'lives', 'in', 'Paris']"
    )
    tags: str | None = Field(
        None,
        description="token classification: a column of tag lists, one tag per word (strings in BIO form such as "
        "B-PER, I-PER, O, or ints with a ClassLabel feature); each word's first sub-token is trained",
    )


class DataSpec(Strict):
    dataset: str | None = Field(
        None, description="hub dataset id (e.g. stanfordnlp/sst2) or a local folder whose files are named by split"
    )
    subset: str | None = Field(None, description="hub dataset configuration name")
    revision: str | None = Field(
        None, description="hub dataset revision (branch, tag or commit); report.json records the commit loaded"
    )
    files: dict[str, list[str]] | None = Field(
        None, description="split -> local file(s): csv, tsv, json, jsonl or parquet"
    )
    train_split: str = "train"
    eval_split: str | None = Field("validation", description="split evaluated during training; null for none")
    columns: Columns = Field(default_factory=Columns)
    max_length: int = Field(
        128,
        gt=0,
        le=MAX_TOKENS,
        description="longer examples are truncated (seq2seq: the source; token classification: words past it are not trained or scored)",
    )
    max_target_length: int = Field(
        64,
        gt=0,
        le=MAX_TOKENS,
        description="seq2seq_lm: targets are cut to this many tokens, EOS included; also the generation limit in eval",
    )
    max_train_examples: int | None = Field(None, gt=0, description="use only the first N training examples")
    max_eval_examples: int | None = Field(None, gt=0, description="use only the first N eval examples")
    group_by_length: bool = Field(
        True, description="batch examples of similar length (random across groups): far less padding"
    )

    @field_validator("files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: [f] if isinstance(f, str) else f for k, f in v.items()}
        return v


Beta = Annotated[float, Field(ge=0, lt=1)]  # torch's AdamW raises on anything else, after the model loads


class OptimizerSpec(Strict):
    name: Literal["adamw", "sgd", "adamw8bit", "paged_adamw8bit"] = Field(
        "adamw",
        description="adamw8bit / paged_adamw8bit: bitsandbytes' AdamW with 8-bit moments (a quarter of AdamW's "
        "optimizer memory; paged: moments that may spill to host memory), pip install 'peftcli[quant]'",
    )
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW only")
    eps: float = Field(1e-8, gt=0, description="AdamW only")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD only")
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: LoRA's B matrices (and the 1-D tensors, as in HF peft) train at lr x this ratio; "
        "16 is the paper's choice",
    )


class ScheduleSpec(Strict):
    name: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warm-up")
    warmup_steps: int | None = Field(None, ge=0, description="give this or warmup_ratio, not both")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of all steps spent warming up")


class TrainSpec(Strict):
    batch_size: int = Field(32, gt=0, description="examples per micro-batch per process")
    eval_batch_size: int | None = Field(None, gt=0, description="default: 2 x batch_size")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    epochs: float = Field(1.0, gt=0, le=1_000_000)  # epochs x steps per epoch must stay a finite step count
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null for none")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="auto: bf16 on GPUs that run it, else fp16 with a grad scaler; on CPUs bf16 where the "
        "hardware runs it natively (AMX or AVX512-BF16), else no (fp32). fp16 needs CUDA",
    )
    tf32: bool = Field(True, description="CUDA: fp32 matrix products in TF32 (Ampere and newer); false for full fp32")
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy's seed range; set_seed seeds numpy too
    log_every: int = Field(10, gt=0, description="optimizer steps between log lines")
    eval_every: int | None = Field(None, gt=0, description="optimizer steps between evals (always at the end)")
    save_every: int | None = Field(
        None, gt=0, description="optimizer steps between step checkpoints (adapter and training state, for --resume)"
    )
    save_total_limit: int = Field(2, gt=0, description="step checkpoints kept (the newest)")
    best_metric: str | None = Field(
        None, description="eval metric that picks the saved adapter (accuracy, f1, loss...); default per task"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, about 30% slower"
    )
    return_freed_memory: bool = Field(
        False,
        description="CPU runs on Linux: freed tensor memory goes back to the OS at once (glibc mmap threshold): "
        "a lower peak, slower steps (docs/benchmarks.md, Host memory)",
    )
    skip_nonfinite_steps: int = Field(
        0, ge=0, description="steps with a NaN/inf loss skipped (no update) before the run stops; 0 stops at the first"
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="experiment trackers that get the recipe, every metrics.jsonl record and the report: "
        "tensorboard, mlflow, wandb, trackio (pip install 'peftcli[<name>]'); files in <run>/trackers/. docs/trackers.md",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # report_to: tensorboard, or report_to=tensorboard


class Recipe(Strict):
    name: str | None = Field(None, description="run name, the folder under runs/; default: the recipe file's name")
    task: Literal["sequence_classification", "causal_lm", "seq2seq_lm", "token_classification"] = Field(
        description="sequence_classification, causal_lm, seq2seq_lm or token_classification"
    )
    model: ModelSpec = Field(
        description="the base model, e.g. `model: {name: <hub id, local folder or package:<pkg>/<folder>>}`"
    )
    method: Any = Field(description="`name:` of a registered method plus that method's own keys")
    data: DataSpec = Field(description="`files:` (split -> local files) or `dataset:` (a hub id), and `columns:`")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    output_dir: str | None = Field(None, description="run directory; default: runs/<name>")

    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / (self.name or "run")

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    raw = read_yaml(path)
    where: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_path(raw, key, value)
        where[key] = f"override {item!r}"
    raw.setdefault("name", path.stem)
    return validate_recipe(raw, source=str(path), base_dir=path.parent, override_keys=where)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found. Check the path (relative to {Path.cwd()}).")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: recipe is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a short YAML file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: line {line}: not UTF-8 text (got byte 0x{raw[exc.start]:02x} at byte offset {exc.start}). Save the recipe as UTF-8."
        ) from None
    try:
        data = safe_yaml(text)
    except Refused as exc:
        raise RecipeError(f"{path}:{_line_of(exc)} {exc.message}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{_line_of(exc)} invalid YAML ({problem}). Fix the syntax there.") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty. Write its keys: task, model, method and data at least.")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping of keys (got {type(data).__name__}). Write `key: value` lines: task, model, method, data, ..."
        )
    return data


def _line_of(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" line {mark.line + 1}:" if mark else ""


class Refused(yaml.YAMLError):
    """YAML that parses but that a recipe must not be: duplicate keys, deep nesting, alias bombs."""

    def __init__(self, message: str, mark: Any = None) -> None:
        super().__init__(message)
        self.message, self.problem_mark = message, mark


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader with guards: a repeated key is an error (PyYAML keeps the last one
    silently), nesting is capped, and aliases may not expand past MAX_ALIAS_VALUES values. Aliases
    are shared objects to PyYAML, so a bomb loads instantly; it explodes later, in whatever walks it
    (validation, printing), which is why the expansion is counted before anything is built."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise Refused(
                    f"values nested more than {MAX_YAML_DEPTH} levels deep. A recipe is a few levels deep; check the brackets.",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                first = seen.setdefault((key.tag, key.value), key.start_mark)
                if first is not key.start_mark:
                    raise Refused(
                        f"duplicate key {key.value!r} (first on line {first.line + 1}). Keep one of them.",
                        key.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str) -> Any:
    """yaml.safe_load through RecipeLoader, refusing alias expansions past MAX_ALIAS_VALUES."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_alias_values(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_alias_values(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}  # node id -> values in it, aliases expanded
    building: set[int] = set()
    repeated = 0

    def size(node: yaml.Node) -> int:
        nonlocal repeated
        if id(node) in sizes:  # reached again: an alias repeats the whole node
            repeated += sizes[id(node)]
            if repeated > MAX_ALIAS_VALUES:
                raise Refused(
                    f"aliases (*name) expand to more than {MAX_ALIAS_VALUES:,} values, refused as a possible YAML bomb. Write the values out instead."
                )
            return sizes[id(node)]
        if id(node) in building:
            raise Refused(
                "an alias refers to a value that contains it (a recursive structure). Remove the alias.",
                node.start_mark,
            )
        building.add(id(node))
        children = (
            [c for pair in node.value for c in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        sizes[id(node)] = 1 + sum(size(child) for child in children)
        building.discard(id(node))
        return sizes[id(node)]

    size(root)


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r}: expected key.path=value, e.g. train.max_steps=50")
    try:
        parsed = safe_yaml(value) if value else ""
    except Refused as exc:
        raise RecipeError(f"override '{key}=...': {exc.message}") from None
    except yaml.YAMLError:
        parsed = value
    # Only an explicit [..] or {..} makes a list or mapping: "Q: {question}" stays a string.
    if isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("[", "{")):
        parsed = value
    return tuple(key.split(".")), parsed


def set_path(data: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    node = data
    for part in key[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key[-1]] = value


def validate_recipe(
    raw: dict[str, Any],
    source: str = "recipe",
    base_dir: Path | None = None,
    override_keys: dict[tuple[str, ...], str] | None = None,
) -> Recipe:
    """Checks everything and raises one RecipeError listing every problem."""
    override_keys = override_keys or {}
    problems: list[tuple[tuple[str, ...], str]] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [(tuple(str(p) for p in e["loc"]), describe(e, Recipe)) for e in exc.errors()]

    method_params = None
    method_raw = raw.get("method")
    if isinstance(method_raw, dict):
        method_params, method_problems = validate_method(method_raw)
        problems += method_problems
    elif "method" in raw:
        problems.append((("method",), f"expected a mapping with a `name:` key (got {method_raw!r})."))

    # Cross-field and file checks run on every section that is valid on its own, so a typo in one
    # section does not hide a missing file in another.
    root = base_dir or Path.cwd()
    task = raw.get("task") if isinstance(raw.get("task"), str) and raw.get("task") in TASKS else None
    problems += _name_problems(raw.get("name"))
    model, data, schedule = (
        _valid(schema, raw.get(key))
        for key, schema in (("model", ModelSpec), ("data", DataSpec), ("schedule", ScheduleSpec))
    )
    if model is not None:
        model = resolve_model_path(model, root, override_keys)
        problems += _model_problems(model)
    if data is not None:
        data = resolve_data_paths(data, root, override_keys)
        problems += data_problems(data, task)
    if schedule is not None:
        problems += _schedule_problems(schedule)
    optimizer = _valid(OptimizerSpec, raw.get("optimizer"))
    if optimizer is not None:
        problems += _optimizer_problems(optimizer)
    train = _valid(TrainSpec, raw.get("train"))
    if train is not None:
        problems += tracker_problems(train.report_to)
    if train is not None and task is not None:
        problems += _train_problems(train, task)
    if train is not None and method_params is not None:
        problems += _method_train_problems(METHODS[method_params.name], train)
    if task is not None and method_params is not None:
        problems += method_task_problems(METHODS[method_params.name], task)
    if model is not None and task is not None:
        problems += _model_task_problems(model, task)
    if model is not None and method_params is not None:
        problems += method_quantization_problems(METHODS[method_params.name], model)
    if model is not None and data is not None and task is not None:
        problems += position_problems(model, data, method_params, task)

    if problems:
        lines = []
        for loc, message in problems:
            origin = override_keys.get(loc) or _override_origin(loc, override_keys) or source
            lines.append(f"{origin}: {'.'.join(loc) or '(top level)'}: {message}")
        raise RecipeError(*lines)
    assert recipe is not None
    return recipe.model_copy(update={"method": method_params, "model": model, "data": data})


def _valid(schema: type[BaseModel], raw: Any) -> Any:
    """The section if it is given and valid on its own, else None (its problems are reported already)."""
    if raw is None:
        return None
    try:
        return schema.model_validate(raw)
    except ValidationError:
        return None


def _name_problems(name: Any) -> list[tuple[tuple[str, ...], str]]:
    # The run directory is runs/<name>: a name with a separator or `..` would put it elsewhere.
    if isinstance(name, str) and (name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0")):
        return [
            (
                ("name",),
                f"a run name is one folder name under runs/ (got {name!r}). Use letters, digits, - and _; to write the run elsewhere, set output_dir.",
            )
        ]
    return []


def _override_origin(loc: tuple[str, ...], override_keys: dict[tuple[str, ...], str]) -> str | None:
    for key, origin in override_keys.items():
        if loc[: len(key)] == key or key[: len(loc)] == loc:
            return origin
    return None


def _method_train_problems(method: Any, train: TrainSpec) -> list[tuple[tuple[str, ...], str]]:
    if train.gradient_checkpointing and not method.supports_gradient_checkpointing:
        return [
            (
                ("train", "gradient_checkpointing"),
                f"{method.name} cannot train with gradient checkpointing (got true). Set it to false.",
            )
        ]
    return []


def method_task_problems(method: Any, task: str) -> list[tuple[tuple[str, ...], str]]:
    if TASKS[task].encoder_decoder and not method.supports_encoder_decoder:
        usable = ", ".join(m.name for m in METHODS.values() if m.supports_encoder_decoder)
        return [
            (
                ("method", "name"),
                f"{method.name} does not support encoder-decoder models (got task {task}). Use one of: {usable}.",
            )
        ]
    return []


def _model_task_problems(model: ModelSpec, task: str) -> list[tuple[tuple[str, ...], str]]:
    if model.decoder is not None and not TASKS[task].encoder_decoder:
        return [
            (
                ("model", "decoder"),
                f"builds an encoder-decoder, which task {task} does not use (got {model.decoder!r}). Remove it, or set task: seq2seq_lm.",
            )
        ]
    return []


def validate_method(raw: dict[str, Any]) -> tuple[Any, list[tuple[tuple[str, ...], str]]]:
    name = raw.get("name")
    if not isinstance(name, str) or name not in METHODS:
        choices = sorted(METHODS)
        hint = _did_you_mean(str(name), choices)
        return None, [(("method", "name"), f"unknown method (got {name!r}).{hint} Available: {', '.join(choices)}.")]
    schema = METHODS[name].params
    try:
        params = schema.model_validate(raw)
    except ValidationError as exc:
        return None, [(("method",) + tuple(str(p) for p in e["loc"]), describe(e, schema)) for e in exc.errors()]
    # As Strict's allow_inf_nan=False does for the other sections: a method's schema is its own.
    infinite = [
        (("method", k), f"input should be a finite number (got {v}).")
        for k, v in params
        if isinstance(v, float) and not math.isfinite(v)
    ]
    return (None, infinite) if infinite else (params, [])


def describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    """One pydantic error as `<what is wrong> (got <value>). <what to do>`."""
    loc = [str(p) for p in error["loc"]]
    kind = error["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(schema, loc[:-1])
        hint = _did_you_mean(loc[-1], fields)
        return f"unknown key.{hint}" if hint else f"unknown key. Valid keys here: {', '.join(fields)}."
    if kind == "missing":
        desc = _description(schema, loc)
        return "required key is missing." + (f" Set it: {desc}." if desc else "")
    message = error["msg"][0].lower() + error["msg"][1:]
    got = f" (got {_shown(error.get('input'))})"
    hint = ""
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        hint = _did_you_mean(str(error.get("input")), choices) or ""
    return f"{message}{got}.{hint}"


def _shown(value: Any, limit: int = 200) -> str:
    """repr of a user's value, cut short: a wrong value may be a megabyte list."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _walk(schema: type[BaseModel], loc: list[str]) -> Any:
    node: Any = schema
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        annotation = node.model_fields[part].annotation
        node = annotation
    return node


def _fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    node = _walk(schema, loc) if loc else schema
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _description(schema: type[BaseModel], loc: list[str]) -> str | None:
    if not loc:
        return None
    parent = _walk(schema, loc[:-1]) if len(loc) > 1 else schema
    if isinstance(parent, type) and issubclass(parent, BaseModel) and loc[-1] in parent.model_fields:
        return parent.model_fields[loc[-1]].description
    return None


# ----------------------------------------------------------------------------------------------
# Paths and cross-field checks


def _resolver(root: Path, override_keys: dict[tuple[str, ...], str]) -> Any:
    def resolve(p: str, key: tuple[str, ...]) -> str:
        base = Path.cwd() if _override_origin(key, override_keys) else root
        candidate = Path(p).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    return resolve


def resolve_model_path(model: ModelSpec, root: Path, override_keys: dict[tuple[str, ...], str]) -> ModelSpec:
    resolve = _resolver(root, override_keys)
    if _looks_like_path(model.name):
        model = model.model_copy(update={"name": resolve(model.name, ("model", "name"))})
    if model.decoder is not None and _looks_like_path(model.decoder):
        model = model.model_copy(update={"decoder": resolve(model.decoder, ("model", "decoder"))})
    return model


def resolve_data_paths(data: DataSpec, root: Path, override_keys: dict[tuple[str, ...], str]) -> DataSpec:
    resolve = _resolver(root, override_keys)
    if data.files:
        files = {split: [resolve(f, ("data", "files", split)) for f in fs] for split, fs in data.files.items()}
        data = data.model_copy(update={"files": files})
    if data.dataset and _looks_like_path(data.dataset):
        data = data.model_copy(update={"dataset": resolve(data.dataset, ("data", "dataset"))})
    return data


def _looks_like_path(name: str) -> bool:
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


def _optimizer_problems(o: OptimizerSpec) -> list[tuple[tuple[str, ...], str]]:
    if o.name.endswith("8bit") and importlib.util.find_spec("bitsandbytes") is None:
        return [
            (
                ("optimizer", "name"),
                f"needs bitsandbytes, which is not installed (got {o.name!r}). Install it: pip install 'peftcli[quant]', or use adamw.",
            )
        ]
    return []


def _schedule_problems(s: ScheduleSpec) -> list[tuple[tuple[str, ...], str]]:
    if s.warmup_steps is not None and s.warmup_ratio is not None:
        return [
            (
                ("schedule", "warmup_steps"),
                f"give warmup_steps or warmup_ratio, not both (got {s.warmup_steps} and {s.warmup_ratio}).",
            )
        ]
    return []


# train.report_to: each tracker and the modules it needs; its extra is peftcli[<name>] (pyproject.toml).
# mlflow's local store is SQLite, which mlflow-skinny reaches through sqlalchemy and alembic.
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
}


def tracker_problems(names: list[str]) -> list[tuple[tuple[str, ...], str]]:
    """Unknown tracker names, and trackers whose packages are not installed (found without importing them)."""
    key = ("train", "report_to")
    for name in names:
        if name not in TRACKERS:
            hint = _did_you_mean(name, list(TRACKERS))
            return [(key, f"unknown tracker (got {name!r}).{hint} Known trackers: {', '.join(TRACKERS)}.")]
    problems = []
    for name in dict.fromkeys(names):
        missing = [m for m in TRACKERS[name] if importlib.util.find_spec(m) is None]
        if missing:
            which = f"{' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed"
            problems.append((key, f"{name} needs {which} (got {name!r}). Install it: pip install 'peftcli[{name}]'."))
    return problems


def _train_problems(t: TrainSpec, task: str) -> list[tuple[tuple[str, ...], str]]:
    names = TASKS[task].metric_names
    if t.best_metric is not None and t.best_metric not in names:
        hint = _did_you_mean(t.best_metric, list(names))
        return [
            (
                ("train", "best_metric"),
                f"not an eval metric of {task} (got {t.best_metric!r}).{hint} Metrics: {', '.join(names)}.",
            )
        ]
    return []


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


def position_problems(
    model: ModelSpec, data: DataSpec, method_params: Any, task: str
) -> list[tuple[tuple[str, ...], str]]:
    """data.max_length (and a seq2seq target's max_target_length) within the model's positions: past
    them, learned position embeddings are indexed out of range mid-training (an IndexError on a CPU, a
    device-side assert on a GPU). Virtual tokens (prompt, p- and prefix tuning) take positions too."""
    if model.gguf_file:
        return []
    problems: list[tuple[tuple[str, ...], str]] = []
    virtual = getattr(method_params, "num_virtual_tokens", 0) or 0
    found = position_limit(model.name, model.revision)
    if found is not None and data.max_length + virtual > found[0]:
        limit, key = found
        if virtual >= limit:
            problems.append(
                (
                    ("method", "num_virtual_tokens"),
                    f"as many as the {limit} positions of {model.name} ({key} in its config), leaving none for the text (got {virtual}). Use fewer virtual tokens.",
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
                    f"{plus}more than the {limit} positions of {model.name} ({key} in its config) (got {data.max_length}). Set data.max_length to {limit - virtual} or less{fewer}.",
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
                    f"more than the {limit} positions of the decoder {decoder} ({key} in its config) (got {data.max_target_length}). Set data.max_target_length to {limit} or less.",
                )
            )
    return problems


def _model_problems(model: ModelSpec) -> list[tuple[tuple[str, ...], str]]:
    problems = _location_problems(model.name, ("model", "name"))
    if model.hub_id is not None and not HUB_ID.fullmatch(model.hub_id):
        problems.append(
            (
                ("model", "hub_id"),
                f"not a Hub model id (got {_shown(model.hub_id)}). Give org/name as on huggingface.co, e.g. sentence-transformers/all-MiniLM-L6-v2, or remove the key.",
            )
        )
    if model.decoder is not None:
        problems += _location_problems(model.decoder, ("model", "decoder"))
    if model.quantization is not None:
        problems += quantization_problems(model)
    return problems


def method_quantization_problems(method: Any, model: ModelSpec) -> list[tuple[tuple[str, ...], str]]:
    if model.quantization is None or method.trains_base_weights is None:
        return []
    usable = ", ".join(m.name for m in METHODS.values() if m.trains_base_weights is None)
    return [
        (
            ("method", "name"),
            f"{method.name} trains {method.trains_base_weights}, which a {model.quantization.bits}-bit base holds quantized and frozen (got {method.name} with model.quantization). Use one of: {usable}; or remove model.quantization.",
        )
    ]


def quantization_problems(model: ModelSpec) -> list[tuple[tuple[str, ...], str]]:
    q = model.quantization
    assert q is not None
    key = ("model", "quantization")
    problems: list[tuple[tuple[str, ...], str]] = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            (
                key,
                f"needs bitsandbytes, which is not installed (got bits {q.bits}). Install it: pip install 'peftcli[quant]'.",
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
                "this machine runs no bfloat16 (no CUDA GPU with bf16, no CPU bf16 support) (got 'bfloat16'). Use float32.",
            )
        )
    if model.decoder is not None:
        problems.append(
            (
                key,
                f"quantizes a single pretrained model; an encoder-decoder built from two is not supported (got decoder {model.decoder!r}). Remove one of them.",
            )
        )
    return problems


def bf16_runs_here() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _location_problems(name: str, key: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    if name.startswith(PACKAGE_PREFIX):
        folder = package_folder(name)
        if folder is None:
            pkg = name[len(PACKAGE_PREFIX) :].partition("/")[0]
            return [
                (
                    key,
                    f"Python package {pkg!r} is not installed (got {name!r}). Install it, e.g. `pip install {pkg.replace('_', '-')}`.",
                )
            ]
        if not folder.exists():
            return [
                (
                    key,
                    f"no folder {folder.name!r} inside the package (got {name!r}). Check the path after the package name.",
                )
            ]
    elif _looks_like_path(name) and not Path(name).exists():
        return [
            (
                key,
                f"model folder not found (got {name!r}). Give a hub id, an existing folder or package:<pkg>/<folder>.",
            )
        ]
    return []


def _no_examples(path: Path) -> str | None:
    """Why a csv/tsv/json/jsonl file holds no examples, from its first lines only (loading an empty
    file fails deep inside `datasets` with a message that does not say so)."""
    if path.suffix.lower() not in (".csv", ".tsv", ".json", ".jsonl"):
        return None
    try:
        with path.open("rb") as f:
            lines = (line for line in f if line.strip())
            if next(lines, None) is None:
                return "the file is empty"
            if path.suffix.lower() in (".csv", ".tsv") and next(lines, None) is None:
                return "the file holds only a header row"
    except OSError:
        return None  # unreadable: loading it names the cause
    return None


def data_problems(data: DataSpec, task: str | None) -> list[tuple[tuple[str, ...], str]]:
    problems: list[tuple[tuple[str, ...], str]] = []
    if (data.dataset is None) == (data.files is None):
        problems.append((("data",), "give exactly one of `dataset` (a hub id) or `files` (split -> local files)."))
    if data.dataset and _looks_like_path(data.dataset) and not Path(data.dataset).exists():
        problems.append(
            (
                ("data", "dataset"),
                f"local dataset folder not found (got {data.dataset!r}). Give a hub id or an existing folder.",
            )
        )
    if data.revision is not None and (data.files is not None or (data.dataset and Path(data.dataset).is_dir())):
        problems.append(
            (
                ("data", "revision"),
                f"applies to a hub dataset, not local files (got {data.revision!r}). Remove it, or give data.dataset a hub id.",
            )
        )
    for split, files in (data.files or {}).items():
        for f in files:
            if Path(f).is_dir():
                problems.append(
                    (
                        ("data", "files", split),
                        f"a folder, not a file (got {f!r}). Name its files, or give the folder as data.dataset.",
                    )
                )
            elif not Path(f).is_file():
                problems.append(
                    (
                        ("data", "files", split),
                        f"file not found (got {f!r}). Relative paths in a recipe are relative to its folder.",
                    )
                )
            elif no_rows := _no_examples(Path(f)):
                problems.append((("data", "files", split), f"{no_rows} (got {f!r}). Give a file with examples."))
    if data.files is not None:
        for key, split in (("train_split", data.train_split), ("eval_split", data.eval_split)):
            if split is not None and split not in data.files:
                problems.append(
                    (
                        ("data", key),
                        f"no such split in data.files (got {split!r}; files give {', '.join(data.files)}). Add data.files.{split}"
                        + (" or set data.eval_split: null." if key == "eval_split" else "."),
                    )
                )
    c = data.columns
    problems += _token_column_problems(c, task)
    if c.response_names is not None and task in TASKS and task not in ("seq2seq_lm", "token_classification"):
        problems.append(
            (
                ("data", "columns", "response_names"),
                f"names seq2seq_lm targets (got {c.response_names!r} with task {task}). Remove it.",
            )
        )
    if task == "sequence_classification":
        if not c.text:
            problems.append(
                (
                    ("data", "columns", "text"),
                    "sequence_classification needs the text column's name (e.g. text: sentence).",
                )
            )
        if not c.label:
            problems.append(
                (
                    ("data", "columns", "label"),
                    "sequence_classification needs the label column's name (e.g. label: label).",
                )
            )
        if c.messages:
            problems.append(
                (
                    ("data", "columns", "messages"),
                    f"chat data trains causal_lm only (got {c.messages!r} with task sequence_classification). Remove it, or set task: causal_lm.",
                )
            )
    elif task == "causal_lm" and c.messages:
        if c.text or c.prompt or c.prompt_template or c.response:
            problems.append(
                (
                    ("data", "columns", "messages"),
                    "a conversation is the whole example: give `messages` alone, without text, prompt, prompt_template or response.",
                )
            )
    elif task == "seq2seq_lm":
        problems += _seq2seq_column_problems(c)
    elif task == "causal_lm":
        has_prompt = bool(c.prompt or c.prompt_template)
        if c.text and (has_prompt or c.response):
            problems.append(
                (
                    ("data", "columns"),
                    "causal_lm takes either `text`, or `prompt`/`prompt_template` with `response`, not both.",
                )
            )
        elif not c.text and not (has_prompt and c.response):
            problems.append(
                (
                    ("data", "columns"),
                    "causal_lm needs `text`, `messages` (a chat column), or `response` with `prompt` or `prompt_template`.",
                )
            )
        if c.prompt and c.prompt_template:
            problems.append((("data", "columns", "prompt_template"), "give `prompt` or `prompt_template`, not both."))
    return problems


TOKEN_COLUMNS = ("tokens", "tags")


def _token_column_problems(c: Columns, task: str | None) -> list[tuple[tuple[str, ...], str]]:
    """token_classification takes `tokens` and `tags` and nothing else; other tasks take neither."""
    if task is None:
        return []
    given = {k: v for k, v in c.model_dump().items() if v is not None}
    if task != "token_classification":
        return [
            (
                ("data", "columns", k),
                f"word-level columns train token_classification only (got {given[k]!r} with task {task}). Remove it, or set task: token_classification.",
            )
            for k in TOKEN_COLUMNS
            if k in given
        ]
    problems = [
        (("data", "columns", k), f"token_classification needs the {k} column's name (e.g. {k}: {k}): {what}.")
        for k, what in (("tokens", "a list of words per row"), ("tags", "a list of tags per row, one per word"))
        if k not in given
    ]
    problems += [
        (
            ("data", "columns", k),
            f"token_classification reads `tokens` and `tags` only (got {k}: {given[k]!r}). Remove it.",
        )
        for k in given
        if k not in TOKEN_COLUMNS
    ]
    return problems


def _seq2seq_column_problems(c: Columns) -> list[tuple[tuple[str, ...], str]]:
    problems: list[tuple[tuple[str, ...], str]] = []
    for key in ("text", "text_pair", "label", "messages"):
        if getattr(c, key):
            problems.append(
                (
                    ("data", "columns", key),
                    f"not used by seq2seq_lm (got {getattr(c, key)!r}). Give the source as `prompt` or `prompt_template` and the target as `response`.",
                )
            )
    if not (c.prompt or c.prompt_template):
        problems.append(
            (
                ("data", "columns", "prompt"),
                "seq2seq_lm needs the source column's name (e.g. prompt: article), or a prompt_template.",
            )
        )
    if c.prompt and c.prompt_template:
        problems.append((("data", "columns", "prompt_template"), "give `prompt` or `prompt_template`, not both."))
    if not c.response:
        problems.append(
            (("data", "columns", "response"), "seq2seq_lm needs the target column's name (e.g. response: summary).")
        )
    return problems
