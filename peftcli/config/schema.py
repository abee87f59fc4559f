"""The recipe schema: one pydantic model per section, the single source of defaults and of the help.

Each field's description is its one line in docs/recipe-reference.md (scripts/recipe_reference.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

# The tokenizers library truncates to a 64-bit length and raises past it; no model reads 2**31 tokens.
MAX_TOKENS = 2**31 - 1


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
        "cross-attention layers, which train in full with the adapter. Default: "
        "`name` is an encoder-decoder (T5, BART)",
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
        description="longer examples are truncated (seq2seq: the source; token classification: "
        "words past it are not trained or scored)",
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
        "optimizer memory; paged: moments that may spill to host memory, on CUDA; on a CPU the same as "
        "adamw8bit), pip install 'peftcli[quant]'",
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
        "tensorboard, mlflow, wandb, trackio (pip install 'peftcli[<name>]'); files in <run>/trackers/. "
        "docs/trackers.md",
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
