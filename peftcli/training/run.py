"""`peft train RECIPE [key=value ...]`: recipe -> adapted model -> training -> run directory."""

from __future__ import annotations

import platform
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import accelerate
import datasets
import torch
import transformers
import yaml
from accelerate.utils import set_seed
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

import peftcli
from peftcli.adapter_io import (
    PREFIX,
    WEIGHTS_NAME,
    atomic_write_text,
    check_whole,
    read_adapter_config,
    read_state,
    write_adapter,
)
from peftcli.config.recipe import Recipe, load_recipe
from peftcli.data.prepare import data_commit, eval_loader, prepare_data, train_loader
from peftcli.errors import CheckpointError, MethodError, PeftcliError, RunInterrupted, TrainingDiverged
from peftcli.methods import context_for, get_method
from peftcli.methods.base import Calibration, count_parameters, trainable_parameters
from peftcli.models.adapters import adapter_config, method_state, save_adapter
from peftcli.models.loading import DTYPES, base_name, head_kwargs, load_base_model, load_tokenizer, model_commit
from peftcli.models.quantization import weight_memory
from peftcli.reporting import trackers as tracking
from peftcli.reporting.html import write_run_html
from peftcli.reporting.model_card import run_card, write_card
from peftcli.reporting.report import MetricsLog, metric_label, weights_text, write_report
from peftcli.tasks.registry import TASKS, Task
from peftcli.training import host_memory, precision
from peftcli.training.checkpoints import (
    BEST,
    abandon_after,
    check_data,
    checkpoint_dir,
    data_fingerprint,
    find_checkpoint,
    read_loop_state,
    save_checkpoint,
    write_loop_state,
)
from peftcli.training.distributed import on_main, partitioned_optimizer
from peftcli.training.loop import (
    Hooks,
    LoopState,
    NonFiniteLoss,
    OutOfMemory,
    Stop,
    Stopped,
    make_accelerator,
    model_inputs,
    train,
)
from peftcli.training.run_dir import (
    Replacement,
    RunLock,
    busy,
    check_run_dir,
    kept_paths,
    locked_by_another,
    settle_replacement,
)

# emoji=False: a run named `a:fire:b` is printed as written (escape() leaves emoji codes).
console = Console(stderr=True, soft_wrap=True, emoji=False)


def run_train(recipe_path: Path, overrides: list[str], overwrite: bool = False, resume: str | None = None) -> Path:
    started = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)
    run_dir = recipe.run_dir()
    trackers = tracking.trackers_for(
        recipe.train.report_to, run_dir, str(recipe.name)
    )  # started once the run directory is ours
    accelerator = make_accelerator(recipe.train, trackers)
    if recipe.train.return_freed_memory and accelerator.device.type == "cpu":
        host_memory.return_freed_memory()
    keep = kept_paths(recipe, recipe_path)
    # The main process checks the run directory (the others could see the main process's own lock
    # and recipe.yaml appear on a shared filesystem), and every process stops with it.
    kept: list[str] = []
    if resume is None:
        on_main(accelerator, lambda: (settle_replacement(run_dir), check_run_dir(run_dir, overwrite, keep)))
        loop, resumed_from = None, None
    else:
        if partitioned_optimizer(accelerator):
            raise CheckpointError(
                "--resume: runs under FSDP or DeepSpeed cannot resume yet (their optimizer state is partitioned "
                "across processes and peftcli saves the adapter only). Start a new run, or resume under DDP."
            )
        on_main(accelerator, lambda: (settle_replacement(run_dir), refuse_if_busy(run_dir)))
        kept = check_same_recipe(run_dir, recipe)
        if kept:  # the run's own precision may differ from what the default picks now
            accelerator = make_accelerator(recipe.train, trackers)
        resumed_from = find_checkpoint(run_dir, resume)
        loop = read_loop_state(resumed_from, accelerator.process_index, accelerator.num_processes)
    task, method = TASKS[recipe.task], get_method(recipe.method.name)
    check_engine(method, accelerator)
    console.quiet = not accelerator.is_main_process
    for line in kept:
        console.print(f"resuming with {escape(line)}, as the run started (a default changed since)")

    console.print(f"[bold]{escape(str(recipe.name))}[/]: {method.name} on {escape(recipe.model.name)} ({recipe.task})")
    chosen, why = precision.resolve(recipe.train.mixed_precision)
    console.print(f"mixed precision: {chosen}" + (f" (auto: {why})" if recipe.train.mixed_precision == "auto" else ""))
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, recipe.task, tokenizer)
    # The main process writes checkpoints, so it alone fingerprints the data and checks it.
    fingerprint = data_fingerprint(data.train, data.eval) if accelerator.is_main_process else None
    if resumed_from is not None:
        on_main(accelerator, lambda: check_data(resumed_from, str(fingerprint)))
    set_seed(recipe.train.seed)  # a new classification head is initialized randomly as the model loads
    model = load_base_model(recipe.model, task, **head_kwargs(task, data.label_names, tokenizer))
    t = recipe.train
    n, rank = accelerator.num_processes, accelerator.process_index
    loader = train_loader(
        data.train, tokenizer.pad_token_id, t.batch_size, t.grad_accum, recipe.data.group_by_length, t.seed, n
    )
    evals = (
        eval_loader(data.eval, tokenizer.pad_token_id, t.eval_batch_size or 2 * t.batch_size, rank, n)
        if data.eval
        else None
    )
    weights = weight_memory(model, DTYPES[recipe.model.dtype])  # the base as loaded, before the adapter
    if t.gradient_checkpointing:
        checkpointing(model)
    set_seed(recipe.train.seed)  # the adapter's random initialization is part of the recipe
    adapted = method.apply(model, recipe.method, context_for(model, task.head_modules))
    if method.calibrate is not None:
        model.to(accelerator.device)
        method.calibrate(model, recipe.method, adapted, calibration(loader, task, accelerator))
    trainable, total = count_parameters(model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    is_main = accelerator.is_main_process
    # From here on this process is the run directory's one writer, until it ends (run_dir.py).
    lock, replacement = RunLock(run_dir), Replacement(run_dir)

    def take_run_dir() -> None:
        lock.acquire()
        if loop is None:
            replacement.begin(overwrite, keep)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "recipe.yaml", resolved_recipe_text(recipe, recipe_path, overrides))
        else:
            for abandoned in abandon_after(run_dir, loop.step):
                console.print(
                    f"{escape(str(abandoned))}: newer than the checkpoint this run resumes from; moved aside, "
                    "and deleted at this run's first save"
                )

    try:
        on_main(accelerator, written(take_run_dir))
        best: dict[str, Any] = {}
        if loop is not None and resumed_from is not None:
            console.print(f"resuming from {escape(str(resumed_from))} (step {loop.step})")
            if (resumed_from / BEST).is_dir():
                best["snapshot"] = (
                    read_state(resumed_from / BEST / WEIGHTS_NAME),
                    read_adapter_config(resumed_from / BEST),
                )

        # Before any sharding: the shapes every trainable tensor must have when it is saved.
        whole = {PREFIX + n: tuple(p.shape) for n, p in trainable_parameters(model).items()}
        resume_hint = resume_command(recipe_path, overrides, accelerator)

        def snapshot() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            # The config is taken with the weights: training may change it (AdaLoRA's rank pattern).
            config = adapter_config(
                method, recipe.method, adapted, task, base_name(recipe.model), recipe.model.revision
            )
            state = method_state(method, model, adapted)
            if method.state is None:  # a method's own export may reshape (AdaLoRA drops pruned ranks)
                check_whole(state, whole)
            return state, config

        def on_eval(step: int, metrics: dict[str, float], improved: bool) -> None:
            if improved:
                best["snapshot"] = snapshot()

        def on_save(step: int, state: LoopState | None) -> None:
            def write(folder: Path) -> None:
                write_adapter(folder, *snapshot(), data.label_names)
                if "snapshot" in best:
                    write_adapter(folder / BEST, *best["snapshot"])
                if state is not None:
                    write_loop_state(folder, state, accelerator.num_processes, fingerprint)

            try:
                save_checkpoint(checkpoint_dir(run_dir, step), state, accelerator, write, t.save_total_limit)
            except OSError as exc:
                raise CheckpointError(
                    save_failed(checkpoint_dir(run_dir, step), "checkpoint", exc, run_dir, saved, resume_hint)
                ) from None
            saved["step"] = step
            if is_main:
                replacement.saved()

        def on_end() -> None:
            final["snapshot"] = best.get("snapshot") or snapshot()

        saved: dict[str, int] = {"step": loop.step} if loop is not None else {}
        final: dict[str, Any] = {}
        history = loop.result["history"] if loop is not None else []
        on_log = (
            MetricsLog(run_dir / "metrics.jsonl", history, lambda line: console.print(escape(line)))
            if is_main
            else Hooks().on_log
        )
        if trackers:  # every record goes to metrics.jsonl, then to the trackers (main process only)
            on_main(accelerator, lambda: tracking.start(accelerator, recipe.model_dump(mode="json"), history))
            on_log = tracking.logging_to(accelerator, on_log) if is_main else on_log
        hooks = Hooks(on_log=on_log, on_eval=on_eval, on_save=on_save, on_end=on_end)
        method_hooks = (
            method.training_hooks(model, recipe.method, adapted) if method.training_hooks is not None else None
        )
        with stop_on_signals() as stop:
            try:
                result = train(
                    model=model,
                    task=task,
                    train_data=loader,
                    eval_data=evals,
                    spec=t,
                    optim=recipe.optimizer,
                    schedule=recipe.schedule,
                    label_names=data.label_names,
                    hooks=hooks,
                    accelerator=accelerator,
                    method_hooks=method_hooks,
                    resume=loop,
                    stop=stop,
                )
            except Stopped as exc:
                raise RunInterrupted(
                    exc.signal,
                    f"{signal.Signals(exc.signal).name} at step {exc.step}: saved {checkpoint_dir(run_dir, exc.step)}. "
                    f"Resume with: {resume_hint}",
                ) from None
            except NonFiniteLoss as exc:
                raise TrainingDiverged(
                    f"train: the loss or its gradient became {exc.loss} at step {exc.step}; {last_checkpoint(run_dir, saved)}. "
                    "Lower optimizer.lr, set train.max_grad_norm, or let a few bad steps pass with train.skip_nonfinite_steps."
                ) from None
            except OutOfMemory as exc:
                raise PeftcliError(out_of_memory_line(exc, t)) from None

        def finish() -> None:
            try:
                save_adapter(run_dir / "adapter", *final["snapshot"], data.label_names, tokenizer)
            except OSError as exc:
                raise CheckpointError(
                    save_failed(run_dir / "adapter", "adapter", exc, run_dir, saved, resume_hint)
                ) from None
            replacement.saved()
            report = build_report(
                recipe,
                method.name,
                task,
                result,
                trainable,
                total,
                run_dir,
                time.perf_counter() - started,
                accelerator,
                weights=weights,
            )
            write_report(run_dir, report)
            write_card(
                run_dir / "adapter", run_card(recipe, method, task, data.label_names, report, run_dir / "adapter")
            )
            write_run_html(run_dir, report, result.history)
            tracking.log_summary(accelerator, report)
            tracking.close(accelerator)
            print_summary(report, run_dir, result.history)

        on_main(accelerator, written(finish))
    except BaseException:
        if is_main:
            tracking.close(accelerator, failed=True)
            replacement.failed()
        raise
    finally:
        lock.release()
    # Every process leaves together, after the main one wrote the run, and the process group is closed
    # before the interpreter exits: a peer torn down mid-exit aborted gloo's threads ("terminate called
    # without an active exception") in a run that had trained and saved.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def refuse_if_busy(run_dir: Path) -> None:
    if locked_by_another(run_dir):
        raise busy(run_dir)


def check_engine(method: Any, accelerator: Any) -> None:
    """A method that needs whole tensors between steps is refused under FSDP and DeepSpeed."""
    if method.unsharded_only is not None and partitioned_optimizer(accelerator):
        engine = accelerator.distributed_type.value
        raise MethodError(
            f"method.name: {method.name} cannot train under {engine}: {method.unsharded_only}, which {engine} holds in "
            f"pieces across processes (got {method.name}). Use lora, or train {method.name} under DDP (--num-processes N)."
        )


def written(action: Callable[[], None]) -> Callable[[], None]:
    """`action`, with a failed write (an unwritable folder, a full disk) as one line."""

    def run() -> None:
        try:
            action()
        except OSError as exc:
            where = exc.filename or "the run directory"
            raise PeftcliError(
                f"{where}: cannot write ({exc.strerror or exc}). Check that the folder is writable and the disk has space."
            ) from None

    return run


def last_checkpoint(run_dir: Path, saved: dict[str, int]) -> str:
    return (
        f"the last good checkpoint is {checkpoint_dir(run_dir, saved['step'])}" if saved else "no checkpoint was saved"
    )


def save_failed(where: Path, what: str, exc: OSError, run_dir: Path, saved: dict[str, int], resume_hint: str) -> str:
    """A save that failed (a full disk): what is kept, and how to go on from it."""
    reason = exc.strerror or str(exc)
    if not saved:
        return f"{where}: could not save the {what} ({reason}); no checkpoint was saved before it. Free disk space, then train again."
    return (
        f"{where}: could not save the {what} ({reason}); the checkpoint before it, {checkpoint_dir(run_dir, saved['step'])}, "
        f"is kept. Free disk space, then resume with: {resume_hint}"
    )


def out_of_memory_line(exc: OutOfMemory, t: Any) -> str:
    batch = "train.eval_batch_size" if exc.phase == "eval" else "train.batch_size"
    fix = (
        f"Lower {batch}"
        + (" (raise train.grad_accum to keep the step's batch)" if exc.phase == "train" else "")
        + ", lower data.max_length"
        + (
            ", or set train.gradient_checkpointing: true"
            if exc.phase == "train" and not t.gradient_checkpointing
            else ""
        )
    )
    return (
        f"{exc.phase}: out of memory at step {exc.step}, on a batch of {exc.examples} examples {exc.length} tokens long "
        f"({exc.detail}). {fix}."
    )


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """SIGINT and SIGTERM ask the loop to stop at the next step boundary; a second SIGINT stops at once."""
    stop = Stop()

    def handler(signum: int, frame: Any) -> None:
        stop.request(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print(
            f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step (Ctrl-C again to quit now)"
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(recipe_path: Path, overrides: list[str], accelerator: Any = None) -> str:
    """The command that resumes this run from its latest checkpoint, with as many processes."""
    processes = accelerator.num_processes if accelerator is not None else 1
    launch = ["--num-processes", str(processes)] if processes > 1 else []
    return " ".join(["peft train", shlex.quote(str(recipe_path)), *map(shlex.quote, overrides), "--resume", *launch])


def check_same_recipe(run_dir: Path, recipe: Recipe) -> list[str]:
    """A run resumes with the recipe it started with; only where and how often it saves may change.
    A default that changed since the run started (train.mixed_precision's, from no to auto) keeps the
    run's own value, and a key newer than the run takes its default: the recipe is set so, and the
    keys kept are returned to be said."""
    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        raise CheckpointError(
            f"--resume: {saved_path} not found; {run_dir} is not a run directory to resume. Check name= or output_dir=."
        )
    saved = flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")))
    now = flatten(recipe.model_dump(mode="json"))
    changed, kept = [], []
    for key in sorted(saved.keys() | now.keys()):
        if key in RESUME_MAY_CHANGE or saved.get(key) == now.get(key) or key not in saved:
            continue
        if key in now and not explicitly_set(recipe, key):
            set_value(recipe, key, saved[key])
            kept.append(f"{key}: {saved[key]}")
        else:
            changed.append(key)
    if changed:
        raise CheckpointError(
            f"--resume: the recipe differs from the one {run_dir} was started with, in {', '.join(changed)}. "
            f"Resume with the same recipe and overrides (the run's own copy is {saved_path})."
        )
    return kept


def explicitly_set(recipe: Recipe, key: str) -> bool:
    """Whether the recipe file or an override gave `key` (section.field), rather than its default."""
    node: Any = recipe
    for part in key.split("."):
        if not isinstance(node, BaseModel):
            return True  # inside a mapping (data.files): given
        if part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def set_value(recipe: Recipe, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node: Any = recipe
    for part in parents:
        node = getattr(node, part)
    setattr(node, last, value)


RESUME_MAY_CHANGE = {
    "train.save_every",
    "train.save_total_limit",
    "train.log_every",
    "train.skip_nonfinite_steps",
    "train.report_to",
    "train.return_freed_memory",
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def resolved_recipe_text(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> str:
    header = f"# Resolved from {recipe_path}" + (f" with {' '.join(overrides)}" if overrides else "")
    return f"{header}\n# Repeat this run: peft train {recipe.run_dir() / 'recipe.yaml'} output_dir=NEW_DIR\n{recipe.to_yaml()}"


def build_report(
    recipe: Recipe,
    method: str,
    task: Task,
    result: Any,
    trainable: int,
    total: int,
    run_dir: Path,
    wall: float,
    accelerator: Any,
    *,
    weights: dict[str, int],
) -> dict[str, Any]:
    adapter_bytes = (run_dir / "adapter" / WEIGHTS_NAME).stat().st_size
    seconds = max(result.train_seconds, 1e-9)
    return {
        "name": recipe.name,
        "method": method,
        "model": recipe.model.name,
        # The Hub commits loaded (model.revision / data.revision, or main, as it was): null for local files.
        "model_commit": model_commit(recipe.model),
        "data_commit": data_commit(recipe.data),
        "task": task.name,
        "summary": {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": 100 * trainable / total,
            "adapter_bytes": adapter_bytes,
            "steps": result.steps,
            "examples": result.examples,
            "tokens": result.tokens,
            "wall_seconds": wall,
            "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens / seconds,
            "examples_per_s": result.examples / seconds,
            "peak_memory_mb": result.peak_memory_mb,
            "weights_bytes": weights["weights"],
            "weights_bytes_unquantized": weights["weights_unquantized"],
            "quantization": quantization_text(recipe.model.quantization),
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "cpu_threads": torch.get_num_threads(),
            "mixed_precision": accelerator.mixed_precision,
            "mixed_precision_requested": recipe.train.mixed_precision,
            "tf32": bool(recipe.train.tf32 and torch.cuda.is_available()),
        },
        "final_metrics": result.final_metrics,
        "best_metrics": result.best_metrics,
        "best_step": result.best_step,
        "best_metric": recipe.train.best_metric or task.best_metric,
        "final_step": (eval_steps(result.history) or [None])[-1],
        "versions": {
            "peftcli": peftcli.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
    }


def quantization_text(q: Any) -> str | None:
    """`4 bits (nf4)`, `8 bits (LLM.int8)`, or None for a float base."""
    if q is None:
        return None
    return "8 bits (LLM.int8)" if q.bits == 8 else f"4 bits ({q.quant_type or 'nf4'})"


def print_summary(report: dict[str, Any], run_dir: Path, history: list[dict[str, Any]]) -> None:
    """The end of a run, each figure named: the wall time against the time in training steps (the
    tokens/s are over those), and which eval's metrics are which (the saved adapter is the best one's)."""
    first, *evals = summary_lines(report, history)
    console.print(f"[bold green]done[/] {escape(first)}")
    for line in [*evals, f"run directory: {run_dir}  (adapter in {run_dir / 'adapter'})"]:
        console.print(line, markup=False)


def summary_lines(report: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """`in 32.0 s wall: 152 training steps took 23.5 s (the rest: loading, 4 evals, saving); ...`, then
    the best and the final eval. A resumed run's steps, tokens and step time count from its start, its
    wall time from this process's."""
    s, evals = report["summary"], len(eval_steps(history))
    rest = ["loading", f"{evals} eval{'s' if evals != 1 else ''}" if evals else "", "saving"]
    split = (
        f"the rest: {', '.join(filter(None, rest))}"
        if s["wall_seconds"] >= s["train_seconds"]
        else "since the run started"
    )
    speed = f"{s['tokens_per_s']:,.0f} tok/s in the training steps ({s['tokens'] / max(s['wall_seconds'], 1e-9):,.0f} over the wall time)"
    timing = f"in {s['wall_seconds']:.1f} s wall: {s['steps']} training steps took {s['train_seconds']:.1f} s ({split})"
    lines = [f"{timing}; {speed}, peak memory {s['peak_memory_mb']:,.0f} MB"]
    if s.get("quantization"):
        lines.append(
            f"base weights: {weights_text(s['weights_bytes'], s['weights_bytes_unquantized'], s['quantization'])}"
        )
    best, final = report.get("best_step"), report.get("final_step")
    if best is None or final is None:
        return [*lines, f"no eval: the adapter is the one of the last step, {s['steps']}"]
    first = report["best_metric"]
    if best == final:
        return [
            *lines,
            f"best and final eval, step {best} (the saved adapter): {metrics_text(report['best_metrics'], first)}",
        ]
    return [
        *lines,
        f"best eval, step {best} of {s['steps']} (the saved adapter): {metrics_text(report['best_metrics'], first)}",
        f"final eval, step {final}: {metrics_text(report['final_metrics'], first)}",
    ]


def metrics_text(metrics: dict[str, float], first: str) -> str:
    """`accuracy 0.9550  f1 0.9549  eval loss 0.1387`: the metric that picks the best eval first, and
    the loss named as the eval's (the progress lines show the training loss)."""
    names = sorted(metrics, key=lambda k: k != first)
    return "  ".join(f"{metric_label(k)} {metrics[k]:.4f}" for k in names)


def eval_steps(history: list[dict[str, Any]]) -> list[int]:
    """The steps at which the run evaluated, in order."""
    return [r["step"] for r in history if any(k.startswith("eval_") for k in r)]


def checkpointing(model: torch.nn.Module) -> None:
    """Activations recomputed in the backward (non-reentrant: the frozen base's inputs need no grad).
    transformers 5.23 renamed gradient_checkpointing_enable, which now warns; older ones lack the new name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def calibration(loader: Any, task: Task, accelerator: Any) -> Calibration:
    """Training batches and the task's mean loss, for methods that score parameters before training."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        total, count = task.loss_sum(model(**model_inputs(batch, task)).logits, batch)
        return total / count.clamp(min=1)

    return Calibration(batches=iter(loader), loss=loss)
