"""How much faster than HF Trainer + HF peft `peft train` and `peft eval` can be on a benchmark
workload by doing less arithmetic alone: the ceiling each speed target of issue 6 runs into.

    python benchmarks/ceilings.py --workload minilm-sst2 --workload smollm2-gsm8k

Both tools run the same kernels on the same examples, so at equal speed per FLOP their throughput
ratio is the ratio of the FLOPs they spend. This script counts them, batch by batch, from the
examples `train_vs_hf.py` gives both tools (tokenized by the same code) and each tool's batching:

- peftcli: its length-grouped sampler (training) and longest-first eval batches; for sequence
  classification the last layer's attention output and feed-forward at the first position only
  (`peftcli/training/speedups/first_position.py`); for causal LM the LM head at the positions with a target only.
- Trainer defaults: random batches in training (the mean over 5 seeds), file order in evaluation.
- Trainer grouped: transformers' `LengthGroupedSampler`, which transformers 5 uses for evaluation
  too when training is length-grouped (`Trainer._get_eval_sampler`); the mean over 5 seeds.

Every linear layer runs at every padded position unless said above; the pooler and classifier once
per example; attention's two products (scores and weighted values) over each row's padded length
squared, the causal mask not halving them. Training counts a frozen base's forward and input
gradients: 2x the forward's linear FLOPs, 3x its attention FLOPs. LoRA's own products are left out
(the same on both sides, under 1% here). Prints one JSON line per workload and comparison: each
side's GFLOPs, the ceiling (Trainer's FLOPs over peftcli's), the target, and how much faster per
FLOP than Trainer peftcli would have to run to reach the target (target / ceiling).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_hf import ROOT, SMOLLM2_SHAPE, Workload, model_folder, workloads

SEEDS = range(5)
TARGETS = {
    ("train", "hf-grouped"): 1.5,
    ("train", "hf-defaults"): 3.0,
    ("eval", "hf-grouped"): 2.0,
    ("eval", "hf-defaults"): 2.0,
}


@dataclass(frozen=True)
class Shape:
    """Where a model's matrix products go, in weights (multiply-accumulates per position)."""

    per_token: int  # linear weights run at every position
    first_only: int  # of those, what peftcli runs at the first position only (sequence classification)
    head: int  # causal LM: the LM head, which peftcli runs at target positions only
    per_example: int  # pooler and classifier: once per example on both sides
    attention_width: int  # layers x query width: attention's products per pair of positions


def model_shape(w: Workload) -> Shape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from peftcli.training.speedups.first_position import last_layer, residual_output

    if w.task == "causal_lm":
        config = LlamaConfig(**(w.config or SMOLLM2_SHAPE))  # SmolLM2's GGUF config (checked in tests)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        linear = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        head = linear.pop("lm_head")
        width = config.num_hidden_layers * config.num_attention_heads * config.head_dim
        return Shape(per_token=sum(linear.values()), first_only=0, head=head, per_example=0, attention_width=width)
    config = AutoConfig.from_pretrained(model_folder(w.model), num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    layers = model.base_model.encoder
    per_token = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    per_example = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - per_token
    last, narrowed, seen = last_layer(layers), 0, False
    assert last is not None
    boundary = residual_output(last)
    for module in last.modules():
        seen = seen or module is boundary
        if seen and isinstance(module, torch.nn.Linear):
            narrowed += module.weight.numel()
    width = config.num_hidden_layers * config.hidden_size
    return Shape(per_token=per_token, first_only=narrowed, head=0, per_example=per_example, attention_width=width)


def forward_flops(shape: Shape, batches: list[list[int]], targets: list[int] | None, peftcli: bool) -> float:
    """One forward over the batches (lists of example lengths); `targets`, per example, the number of
    positions with a target (causal LM)."""
    flops, k = 0.0, 0
    for lengths in batches:
        width = max(lengths)
        padded = len(lengths) * width
        flops += 2 * shape.per_token * padded
        if peftcli and shape.first_only:
            flops -= 2 * shape.first_only * (padded - len(lengths))
        if shape.head:
            positions = sum(targets[k : k + len(lengths)]) if peftcli else padded  # type: ignore[index]
            flops += 2 * shape.head * positions
        flops += 2 * shape.per_example * len(lengths)
        flops += attention_flops(shape, lengths)
        k += len(lengths)
    return flops


def attention_flops(shape: Shape, lengths: list[int]) -> float:
    """A batch's two attention products (scores, weighted values) over its padded length squared."""
    return 2 * 2 * shape.attention_width * max(lengths) ** 2 * len(lengths)


def training_flops(shape: Shape, batches: list[list[int]], targets: list[int] | None, peftcli: bool) -> float:
    attention = sum(attention_flops(shape, b) for b in batches)
    forward = forward_flops(shape, batches, targets, peftcli)
    return 2 * (forward - attention) + 3 * attention


def padded(batches: list[list[int]]) -> int:
    return sum(len(b) * max(b) for b in batches)


def ordered(
    batches: list[list[int]], lengths: list[int], targets: list[int] | None
) -> tuple[list[list[int]], list[int] | None]:
    """Batches of example indices as lengths, and the targets in the same order."""
    flat = [i for b in batches for i in b]
    return [[lengths[i] for i in b] for b in batches], ([targets[i] for i in flat] if targets else None)


def hf_batches(kind: str, lengths: list[int], batch: int, seed: int) -> list[list[int]]:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    if kind == "grouped":
        order = list(LengthGroupedSampler(batch, lengths=lengths, generator=g))
    elif kind == "random":
        order = torch.randperm(len(lengths), generator=g).tolist()
    else:
        order = list(range(len(lengths)))
    return [order[s : s + batch] for s in range(0, len(order), batch)]


def examples(w: Workload, steps: int) -> dict[str, tuple[list[int], list[int] | None, list[list[int]]]]:
    """Each split's example lengths, (causal LM) target counts and peftcli's batches of indices
    (`peft train`'s grouped steps, `peft eval`'s batches), as train_vs_hf gives both tools the examples."""
    from transformers import AutoTokenizer

    from peftcli.config.schema import Recipe
    from peftcli.data.batching import GroupedBatchSampler, eval_loader, lengths_of
    from peftcli.data.prepare import prepare_data
    from peftcli.tasks.registry import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(model_folder(w.model), gguf_file=w.gguf_file)
    spec = Recipe.model_validate(w.recipe(steps, Path("unused"))).data
    data = prepare_data(spec, w.task, tokenizer)
    out = {}
    for split, ds in (("train", data.train), ("eval", data.eval)):
        # peftcli's head runs where the next token is a target (peftcli.tasks.registry.next_token_targets).
        targets = (
            [sum(t != IGNORE_INDEX for t in labels[1:]) for labels in ds["labels"]] if w.task == "causal_lm" else None
        )
        lengths = lengths_of(ds)
        if split == "train":
            batches = GroupedBatchSampler(lengths, w.batch_size, 1, True, w.seed).step_batches()
        else:
            batches = list(eval_loader(ds, 0, w.eval_batch_size).batch_sampler)
        out[split] = (lengths, targets, batches)
    return out


def ceilings(w: Workload, steps: int) -> list[dict[str, Any]]:
    shape = model_shape(w)
    rows = []
    for split, (lengths, targets, our_batches) in examples(w, steps).items():
        count = training_flops if split == "train" else forward_flops
        batch = w.batch_size if split == "train" else w.eval_batch_size
        ours_lengths, ours_targets = ordered(our_batches, lengths, targets)
        ours = count(shape, ours_lengths, ours_targets, peftcli=True)
        for tool, kind in (("hf-defaults", "random" if split == "train" else "file order"), ("hf-grouped", "grouped")):
            seeds = SEEDS if kind != "file order" else [0]
            their_batches = [ordered(hf_batches(kind, lengths, batch, s), lengths, targets) for s in seeds]
            theirs = statistics.mean(count(shape, *b, peftcli=False) for b in their_batches)
            target = TARGETS[(split, tool)]
            rows.append(
                {
                    "workload": w.name,
                    "split": split,
                    "examples": len(lengths),
                    "real_tokens": sum(lengths),
                    "peftcli_padded_tokens": padded(ours_lengths),
                    "their_padded_tokens": round(statistics.mean(padded(b[0]) for b in their_batches)),
                    "against": tool,
                    "their_batches": kind,
                    "peftcli_gflops": round(ours / 1e9, 1),
                    "their_gflops": round(theirs / 1e9, 1),
                    "ceiling": round(theirs / ours, 3),
                    "target": target,
                    "per_flop_speed_needed": round(target / (theirs / ours), 3),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", help="default: minilm-sst2 and smollm2-gsm8k")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, help="train_vs_hf's --steps (default: its table's, 200 or 30)")
    args = parser.parse_args()
    table = workloads(args.data)
    for name in args.workload or ["minilm-sst2", "smollm2-gsm8k"]:
        w = table[name]
        steps = args.steps or (30 if w.task == "causal_lm" else 200)
        for row in ceilings(w, steps):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
