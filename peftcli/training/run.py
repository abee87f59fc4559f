"""One `peft train` run, top to bottom: recipe -> adapted model -> training -> run directory."""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape

from peftcli.config.load import load_recipe
from peftcli.config.schema import Recipe
from peftcli.data.batching import eval_loader, train_loader
from peftcli.data.prepare import prepare_data
from peftcli.errors import MethodError, PeftcliError, RunInterrupted, TrainingDiverged
from peftcli.methods import context_for, get_method
from peftcli.methods.base import Calibration, count_parameters
from peftcli.models.loading import DTYPES, head_kwargs, load_base_model, load_tokenizer
from peftcli.models.quantization import weight_memory
from peftcli.reporting import trackers as tracking
from peftcli.tasks.registry import TASKS, Task
from peftcli.training import host_memory, precision
from peftcli.training.accelerator import make_accelerator
from peftcli.training.batches import model_inputs
from peftcli.training.checkpoints import check_data, checkpoint_dir, data_fingerprint, find_checkpoint, read_loop_state
from peftcli.training.distributed import on_main, partitioned_optimizer
from peftcli.training.loop import Hooks, train
from peftcli.training.optim import runs_as
from peftcli.training.resume import check_resumable
from peftcli.training.run_dir import check_run_dir, kept_paths, settle_replacement
from peftcli.training.run_state import Parts, Run, Start, best_snapshot
from peftcli.training.state import TrainResult
from peftcli.training.stops import NonFiniteLoss, OutOfMemory, Stop, Stopped

# emoji=False: a run named `a:fire:b` is printed as written (escape() leaves emoji codes).
console = Console(stderr=True, soft_wrap=True, emoji=False)


def run_train(recipe_path: Path, overrides: list[str], overwrite: bool = False, resume: str | None = None) -> Path:
    """Trains `recipe_path` (with `overrides`) into its run directory, and returns the directory. A new
    run needs a free directory (`overwrite`: it replaces the old run once it has saved); `resume` (latest,
    or a checkpoint folder) goes on from a checkpoint of the same recipe.

    Raises:
        PeftcliError: the recipe, the run directory, the data or the model refused; the loss diverged
            (TrainingDiverged), a save failed (CheckpointError), or a signal stopped it (RunInterrupted).
    """
    started = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)
    start = start_run(recipe, recipe_path, overwrite, resume)
    parts = build(recipe, start)
    run = Run(recipe, recipe_path, overrides, overwrite, start, parts, started)
    try:
        on_main(start.accelerator, written(run.take_run_dir))
        if start.loop is not None and start.resumed_from is not None:
            console.print(f"resuming from {escape(str(start.resumed_from))} (step {start.loop.step})")
            run.best = best_snapshot(start.resumed_from)
        result = fit(run, run.hooks())
        on_main(start.accelerator, written(lambda: run.end(result)))
    except BaseException:
        run.failed()
        raise
    finally:
        run.lock.release()
    # Every process leaves together, after the main one wrote the run, and the process group is closed
    # before the interpreter exits: a peer torn down mid-exit aborted gloo's threads ("terminate called
    # without an active exception") in a run that had trained and saved.
    start.accelerator.wait_for_everyone()
    start.accelerator.end_training()
    return start.run_dir


def start_run(recipe: Recipe, recipe_path: Path, overwrite: bool, resume: str | None) -> Start:
    """Before anything loads: the accelerator and trackers (started once the run directory is ours), and
    the run directory checked, free for a new run or holding the checkpoint to resume from."""
    run_dir = recipe.run_dir()
    trackers = tracking.trackers_for(recipe.train.report_to, run_dir, str(recipe.name))
    accelerator = make_accelerator(recipe.train, trackers)
    if recipe.train.return_freed_memory and accelerator.device.type == "cpu":
        host_memory.return_freed_memory()
    keep = kept_paths(recipe, recipe_path)
    kept: list[str] = []
    loop, resumed_from = None, None
    if resume is None:
        # The main process checks the run directory (the others could see the main process's own lock
        # and recipe.yaml appear on a shared filesystem), and every process stops with it.
        on_main(accelerator, lambda: (settle_replacement(run_dir), check_run_dir(run_dir, overwrite, keep)))
    else:
        accelerator, kept = check_resumable(recipe, accelerator, trackers)
        resumed_from = find_checkpoint(run_dir, resume)
        loop = read_loop_state(resumed_from, accelerator.process_index, accelerator.num_processes)
    task, method = TASKS[recipe.task], get_method(recipe.method.name)
    check_engine(method, accelerator)
    console.quiet = not accelerator.is_main_process
    for line in kept:
        console.print(f"resuming with {escape(line)}, as the run started (a default changed since)")
    return Start(run_dir, accelerator, trackers, keep, task, method, loop, resumed_from)


def build(recipe: Recipe, start: Start) -> Parts:
    """The tokenizer, the data and their loaders, and the base model with the method's adapter."""
    accelerator, task, method, t = start.accelerator, start.task, start.method, recipe.train
    console.print(f"[bold]{escape(str(recipe.name))}[/]: {method.name} on {escape(recipe.model.name)} ({recipe.task})")
    chosen, why = precision.resolve(t.mixed_precision)
    console.print(f"mixed precision: {chosen}" + (f" (auto: {why})" if t.mixed_precision == "auto" else ""))
    runs = runs_as(recipe.optimizer, on_cuda=accelerator.device.type == "cuda")
    if runs != recipe.optimizer.name:
        paging = "bitsandbytes pages its state on CUDA only"
        console.print(f"optimizer: {recipe.optimizer.name} runs as {runs} here ({paging})")
    tokenizer = load_tokenizer(recipe.model)
    # The adapter folder gets the tokenizer as it loaded: a fast tokenizer's file also records the
    # truncation and padding of its last call, which tokenizing sets, or not when datasets' cache answers.
    saved_tokenizer = copy.deepcopy(tokenizer)
    data = prepare_data(recipe.data, recipe.task, tokenizer)
    # The main process writes checkpoints, so it alone fingerprints the data and checks it.
    fingerprint = data_fingerprint(data.train, data.eval) if accelerator.is_main_process else None
    if start.resumed_from is not None:
        resumed_from = start.resumed_from
        on_main(accelerator, lambda: check_data(resumed_from, str(fingerprint)))
    set_seed(t.seed)  # a new classification head is initialized randomly as the model loads
    model = load_base_model(recipe.model, task, **head_kwargs(task, data.label_names, tokenizer))
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
    set_seed(t.seed)  # the adapter's random initialization is part of the recipe
    adapted = method.apply(model, recipe.method, context_for(model, task.head_modules))
    if method.calibrate is not None:
        model.to(accelerator.device)
        method.calibrate(model, recipe.method, adapted, calibration(loader, task, accelerator))
    trainable, total = count_parameters(model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return Parts(saved_tokenizer, data, fingerprint, model, adapted, loader, evals, weights, trainable, total)


def fit(run: Run, hooks: Hooks) -> TrainResult:
    """The loop, its stops and failures said as the run's errors: where it saved, and how to go on."""
    recipe, t, parts, start = run.recipe, run.recipe.train, run.parts, run.start
    method = start.method
    method_hooks = (
        method.training_hooks(parts.model, recipe.method, parts.adapted) if method.training_hooks is not None else None
    )
    with stop_on_signals() as stop:
        try:
            return train(
                model=parts.model,
                task=start.task,
                train_data=parts.loader,
                eval_data=parts.evals,
                spec=t,
                optim=recipe.optimizer,
                schedule=recipe.schedule,
                label_names=parts.data.label_names,
                hooks=hooks,
                accelerator=start.accelerator,
                method_hooks=method_hooks,
                resume=start.loop,
                stop=stop,
            )
        except Stopped as exc:
            raise RunInterrupted(
                exc.signal,
                f"{signal.Signals(exc.signal).name} at step {exc.step}: saved {checkpoint_dir(run.run_dir, exc.step)}. "
                f"Resume with: {run.resume_hint}",
            ) from None
        except NonFiniteLoss as exc:
            raise TrainingDiverged(
                f"train: the loss or its gradient became {exc.loss} at step {exc.step}; {run.last_checkpoint()}. "
                "Lower optimizer.lr, set train.max_grad_norm, or let a few bad steps pass with "
                "train.skip_nonfinite_steps."
            ) from None
        except OutOfMemory as exc:
            raise PeftcliError(out_of_memory_line(exc, t)) from None


def check_engine(method: Any, accelerator: Any) -> None:
    """A method that needs whole tensors between steps is refused under FSDP and DeepSpeed."""
    if method.unsharded_only is not None and partitioned_optimizer(accelerator):
        engine = accelerator.distributed_type.value
        raise MethodError(
            f"method.name: {method.name} cannot train under {engine}: {method.unsharded_only}, which {engine} holds "
            f"in pieces across processes (got {method.name}). Use lora, or train {method.name} under DDP "
            "(--num-processes N)."
        )


def written(action: Callable[[], None]) -> Callable[[], None]:
    """`action`, with a failed write (an unwritable folder, a full disk) as one line."""

    def run() -> None:
        try:
            action()
        except OSError as exc:
            where = exc.filename or "the run directory"
            raise PeftcliError(
                f"{where}: cannot write ({exc.strerror or exc}). Check that the folder is writable and the disk has "
                "space."
            ) from None

    return run


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
        f"{exc.phase}: out of memory at step {exc.step}, on a batch of {exc.examples} examples {exc.length} tokens "
        f"long ({exc.detail}). {fix}."
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
