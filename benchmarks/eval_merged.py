"""`peft eval`'s loop on a run directory with the adapter kept apart and folded into the weights
(what `peft eval` does for a mergeable adapter on float32 weights), alternated, in one process.

    peft train recipes/lora-sst2.yaml data.dataset=../shared/data/sst2 train.max_steps=20 output_dir=runs/eval-all
    python benchmarks/eval_merged.py runs/eval-all --repeat 3

Prints one JSON line per timed loop (examples/s and the metrics) and a last line with the medians
and their ratio. Loading, merging and a warm-up loop are not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from accelerate import Accelerator

from peftcli.commands.evaluate import eval_data_spec, merge_for_eval
from peftcli.data.batching import eval_loader
from peftcli.data.prepare import prepare_eval_data
from peftcli.models.target import build, resolve_target
from peftcli.training.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory or adapter folder with a recipe")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="peft eval's default")
    args = parser.parse_args()

    target = resolve_target(args.run, [])
    spec = eval_data_spec(target, [], None, None)
    accelerator = Accelerator()
    rates: dict[str, list[float]] = {"apart": [], "merged": []}
    for _ in range(args.repeat):
        for kind, kind_rates in rates.items():
            built = build(target)
            if kind == "merged" and not merge_for_eval(built):
                raise SystemExit(f"{args.run}: the adapter cannot be merged (method or weight dtype)")
            data = prepare_eval_data(spec, target.task.name, built.tokenizer, target.label_names)
            loader = eval_loader(data, built.tokenizer.pad_token_id, args.batch_size, 0, 1)
            model = accelerator.prepare(built.model)
            evaluate(model, loader, target.task, accelerator, target.label_names)  # warm-up
            started = time.perf_counter()
            result = evaluate(model, loader, target.task, accelerator, target.label_names)
            rate = len(data) / (time.perf_counter() - started)
            kind_rates.append(rate)
            print(
                json.dumps({"adapter": kind, "examples_per_s": round(rate, 1), "metrics": result.metrics}), flush=True
            )
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "median_examples_per_s": {k: round(v, 1) for k, v in medians.items()},
                "merged_vs_apart": round(medians["merged"] / medians["apart"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
