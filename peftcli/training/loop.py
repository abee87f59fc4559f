"""One flat accelerate training loop: mixed precision, gradient accumulation, clipping, the schedule,
periodic eval and logging. It knows nothing about methods (it trains whatever requires grad, and calls
the generic TrainingHooks a method may ask for) and nothing about files (the caller gets records and
loop states through `Hooks`, and hands a loop state back to resume).

Read `train` top to bottom, then `train_step`; each part is a named helper below them. The speed
tricks are entered in one place (`speedups.applied`), each in its own module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.methods.base import TrainingHooks
from peftcli.tasks.registry import Task
from peftcli.training.accelerator import fp32_masters, make_accelerator
from peftcli.training.batches import model_inputs, on_device, step_windows
from peftcli.training.distributed import (
    accumulating,
    allow_unused,
    backward_kwargs,
    configure_deepspeed,
    data_parallel,
    first_batch,
    full_parameters,
    partitioned_optimizer,
    unused_parameters,
)
from peftcli.training.evaluation import evaluate
from peftcli.training.optim import make_optimizer, make_scheduler
from peftcli.training.progress import LoopOutput, StepStats, eval_line, peak_memory_mb, progress_bar
from peftcli.training.speedups.applied import ALL, NO_SPEEDUPS, PerBatch, applied
from peftcli.training.state import LoopState, Position, Training, TrainResult, capture, restore
from peftcli.training.stops import NonFiniteLoss, OutOfMemory, Stop, Stopped, is_out_of_memory, out_of_memory


@dataclass
class Hooks:
    """What the caller does with the loop's output; each defaults to nothing. on_eval, on_save and
    on_end run with every parameter whole (`full_parameters`), so they may read and save the model
    however it is sharded. on_save gets the loop state to store, or None where the optimizer is
    partitioned across processes (FSDP, DeepSpeed) and the run cannot resume from it."""

    on_log: Callable[[dict[str, Any]], None] = lambda record: None
    on_eval: Callable[[int, dict[str, float], bool], None] = lambda step, metrics, best: None
    on_save: Callable[[int, LoopState | None], None] = lambda step, state: None
    on_end: Callable[[], None] = lambda: None


def train(
    *,
    model: nn.Module,
    task: Task,
    train_data: DataLoader,
    eval_data: DataLoader | None,
    spec: TrainSpec,
    optim: OptimizerSpec,
    schedule: ScheduleSpec,
    label_names: list[str] | None = None,
    hooks: Hooks | None = None,
    accelerator: Accelerator | None = None,
    method_hooks: TrainingHooks | None = None,
    resume: LoopState | None = None,
    stop: Stop | None = None,
    speedups: frozenset[str] = ALL,
) -> TrainResult:
    """Trains `model` on `train_data` for `spec`'s steps; `speedups` names the speed tricks that may
    apply (peftcli.training.speedups.applied: all by default). Returns the counters, evals and log."""
    accelerator = accelerator or make_accelerator(spec)
    set_seed(spec.seed)
    sampler = train_data.batch_sampler
    model, optimizer, train_data = prepared(model, task, train_data, spec, optim, accelerator)
    # The schedule is built on the prepared (per-process) loader's length and stepped once per
    # optimizer step; it is not passed to prepare(), which would step it once per process.
    steps_per_epoch = math.ceil(len(train_data) / spec.grad_accum)
    total_steps = spec.max_steps or math.ceil(spec.epochs * steps_per_epoch)
    training = Training(
        model, optimizer, make_scheduler(optimizer, schedule, total_steps), accelerator, method_hooks or TrainingHooks()
    )
    training.method_hooks.start(total_steps)
    loop = Loop(training, task, spec, hooks or Hooks(), stop or Stop(), total_steps, steps_per_epoch)
    if resume is not None:
        restore(resume, training, loop.result, loop.position)
    model.train()
    first = loop.result.steps + 1
    windows = step_windows(train_data, sampler, spec.grad_accum, total_steps - first + 1, loop.position)
    with (
        progress_bar(accelerator, total_steps, first - 1) as progress,
        applied(model, accelerator, task, True, speedups) as per_batch,
    ):
        for step, window in enumerate(windows, start=first):
            started = time.perf_counter()
            loss, tokens, examples = guarded_step(training, window, task, spec, step, per_batch)
            loop.took(step, loss, tokens, examples, time.perf_counter() - started, progress)
            if eval_data is not None and (step == total_steps or (spec.eval_every and step % spec.eval_every == 0)):
                loop.evaluate(step, eval_data, label_names, speedups, progress)
            loop.save_or_stop(step)
    loop.result.peak_memory_mb = peak_memory_mb(accelerator)
    with full_parameters(accelerator, model):
        loop.hooks.on_end()
    return loop.result


def prepared(
    model: nn.Module,
    task: Task,
    train_data: DataLoader,
    spec: TrainSpec,
    optim: OptimizerSpec,
    accelerator: Accelerator,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    """The model and its optimizer as accelerate prepares them, and the training loader."""
    fp32_masters(model, accelerator)
    configure_deepspeed(accelerator, spec.batch_size, spec.grad_accum, spec.max_grad_norm)
    optimizer = make_optimizer(model, optim, on_cuda=accelerator.device.type == "cuda")
    if data_parallel(accelerator):  # DDP stops at step 2 if a trainable parameter gets no gradient
        with accelerator.autocast():
            unused = unused_parameters(
                model.to(accelerator.device),
                first_batch(train_data),
                lambda m, b: task.loss_sum(m(**model_inputs(b, task)).logits, b)[0],
            )
        allow_unused(accelerator, unused)
    # The eval loader is not prepared: it already holds this process's share of the eval batches
    # (data.eval_loader), and accelerate would pad the shares to equal length with repeated examples.
    model, optimizer = accelerator.prepare(model, optimizer)
    # Batches stay on the host until train_step has counted their tokens and targets there (no device
    # sync per micro-batch), then go to the device from pinned memory, without blocking.
    return model, optimizer, accelerator.prepare_data_loader(train_data, device_placement=False)


@dataclass
class Loop:
    """What the steps of one `train` call share: the counters and log, the data position, the caller's
    hooks, and what happens after each step (log, eval, save, stop)."""

    training: Training
    task: Task
    spec: TrainSpec
    hooks: Hooks
    stop: Stop
    total_steps: int
    steps_per_epoch: int
    result: TrainResult = field(default_factory=lambda: TrainResult(steps=0, train_seconds=0.0, tokens=0, examples=0))
    position: Position = field(default_factory=Position)
    since_log: StepStats = field(default_factory=StepStats)

    def log(self, record: dict[str, Any]) -> None:
        self.result.history.append(record)
        self.hooks.on_log(record)

    def took(self, step: int, loss: float, tokens: int, examples: int, seconds: float, progress: LoopOutput) -> None:
        """Counts a step; a non-finite loss skips it, up to `train.skip_nonfinite_steps` times."""
        self.result.add_step(tokens, examples, seconds)
        if not math.isfinite(loss):
            self.result.skipped_steps += 1
            if self.result.skipped_steps > self.spec.skip_nonfinite_steps:
                raise NonFiniteLoss(step, loss)
            progress.line(
                f"step {step}: the loss is {loss}; the step was skipped ({self.result.skipped_steps} of "
                f"{self.spec.skip_nonfinite_steps} allowed)"
            )
        else:
            self.since_log.add(loss, tokens, examples, seconds)
        if step % self.spec.log_every == 0 or step == self.total_steps:
            lr = self.training.scheduler.get_last_lr()[0]
            record = self.since_log.record(step, step / self.steps_per_epoch, lr)
            self.log(record)
            progress.logged(record)
        progress.advance(step)

    def evaluate(
        self,
        step: int,
        eval_data: DataLoader,
        label_names: list[str] | None,
        speedups: frozenset[str],
        progress: LoopOutput,
    ) -> None:
        model, accelerator = self.training.model, self.training.accelerator
        try:
            metrics = evaluate(model, eval_data, self.task, accelerator, label_names, speedups=speedups).metrics
        except OutOfMemory as exc:
            exc.step = step
            raise
        best_metric = self.spec.best_metric or self.task.best_metric
        improved = self.result.track_eval(step, metrics, best_metric)
        self.log(
            {"step": step, "epoch": round(step / self.steps_per_epoch, 4)}
            | {f"eval_{k}": v for k, v in metrics.items()}
        )
        with full_parameters(accelerator, model):
            self.hooks.on_eval(step, metrics, improved)
        progress.line(eval_line(step, self.total_steps, metrics, best_metric if improved else None))
        model.train()

    def loop_state(self, step: int) -> LoopState:
        return capture(step, self.position, self.training, self.result)

    def save_or_stop(self, step: int) -> None:
        """Saves every `train.save_every` steps, and where a signal asked to stop, then stops."""
        accelerator, spec = self.training.accelerator, self.spec
        stopping = stop_requested(self.stop, accelerator) if step != self.total_steps else None
        if stopping is not None or (spec.save_every and step % spec.save_every == 0 and step != self.total_steps):
            with full_parameters(accelerator, self.training.model):
                self.hooks.on_save(step, None if partitioned_optimizer(accelerator) else self.loop_state(step))
        if stopping is not None:
            raise Stopped(step, stopping)


def stop_requested(stop: Stop, accelerator: Accelerator) -> int | None:
    """The signal that asked to stop, on any process: all processes stop at the same step."""
    signal = stop.signal or 0
    if accelerator.num_processes > 1:
        signal = int(accelerator.gather(torch.tensor([signal], device=accelerator.device)).max().item())
    return signal or None


def guarded_step(
    training: Training,
    window: list[dict[str, torch.Tensor]],
    task: Task,
    spec: TrainSpec,
    step: int,
    per_batch: PerBatch,
) -> tuple[float, int, int]:
    """`train_step`, with running out of memory told as what the step held (OutOfMemory)."""
    try:
        return train_step(
            model=training.model,
            optimizer=training.optimizer,
            scheduler=training.scheduler,
            window=window,
            task=task,
            accelerator=training.accelerator,
            spec=spec,
            method_hooks=training.method_hooks,
            step=step,
            per_batch=per_batch,
        )
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(exc, "train", step, window) from None


def train_step(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    window: list[dict[str, torch.Tensor]],
    task: Task,
    accelerator: Accelerator,
    spec: TrainSpec,
    method_hooks: TrainingHooks,
    step: int,
    per_batch: PerBatch = NO_SPEEDUPS,
) -> tuple[float, int, int]:
    """One optimizer step over an accumulation window. Each micro-batch's summed loss is divided by
    the loss terms of the whole window on all processes, so the gradient equals the large batch's.
    A method's regularizer joins the last micro-batch's loss: once per step, inside the gradient sync.
    Returns the window's mean loss, and the tokens and examples of all processes; when the loss (or
    the gradient norm) is not finite, nothing was updated."""
    global_units, tokens, examples = window_counts(window, task, accelerator)
    # DDP averages gradients over processes, hence the factor num_processes.
    scale = accelerator.num_processes / global_units
    loss_total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        batch = on_device(per_batch.on_host(batch), accelerator.device)
        with accumulating(accelerator, model, last=last), per_batch.around(batch) as for_loss:
            loss_sum, _ = task.loss_sum(model(**model_inputs(batch, task)).logits, for_loss)
            objective = loss_sum * scale
            if method_hooks.regularizer is not None and last:
                objective = objective + method_hooks.regularizer()
            accelerator.backward(objective, **backward_kwargs(accelerator))
        loss_total += loss_sum.detach()
    mean_loss = accelerator.reduce(loss_total, reduction="sum") / global_units
    norm = (
        accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm) if spec.max_grad_norm is not None else None
    )
    loss = read_loss(mean_loss, norm, accelerator)
    if stepped(
        loss, optimizer, accelerator
    ):  # a method's hooks (AdaLoRA's importance averages) see only steps that updated
        method_hooks.after_optimizer_step(step)
    # A skipped step (non-finite loss) leaves the weights and the optimizer untouched; the schedule
    # still advances, so the learning rate stays tied to the step number.
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens, examples


def window_counts(
    window: list[dict[str, torch.Tensor]], task: Task, accelerator: Accelerator
) -> tuple[float, int, int]:
    """The window's loss terms (at least 1), tokens and examples, summed over all processes."""
    # Counted on the host, where the batches still are: a count on the device would wait for it.
    local = [
        sum(task.units(b) for b in window),
        sum(int(b["attention_mask"].sum()) for b in window),
        sum(b["input_ids"].shape[0] for b in window),
    ]
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(
            torch.tensor(local, dtype=torch.float64, device=accelerator.device), reduction="sum"
        )
        local = counts.tolist()  # one sync per step, for the step's totals over all processes
    return max(float(local[0]), 1.0), int(local[1]), int(local[2])


def read_loss(mean_loss: torch.Tensor, norm: torch.Tensor | float | None, accelerator: Accelerator) -> float:
    """The step's one read of the device: the loss, and the gradient norm where it decides the step.
    With fp16 the grad scaler handles overflowing gradients itself (it skips and lowers the scale)."""
    if isinstance(norm, torch.Tensor) and accelerator.scaler is None:
        loss, norm_value = torch.stack([mean_loss.float(), norm.float().to(mean_loss.device)]).tolist()
        if math.isfinite(loss) and not math.isfinite(norm_value):
            loss = norm_value  # a finite loss with non-finite gradients: the step is as bad
        return loss
    return mean_loss.item()


def stepped(loss: float, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> bool:
    """Steps the optimizer where the loss is finite; whether it updated the weights."""
    finite = math.isfinite(loss)
    if accelerator.scaler is None:
        if finite:
            optimizer.step()
        return finite
    # fp16: the grad scaler updates only when every gradient is finite, and lowers its scale when
    # not. It must see every step, skipped or not: clipping has unscaled this step's gradients, and
    # without the scaler's update the next step's unscale fails ("unscale_() has already been called").
    optimizer.step()
    return finite and not accelerator.optimizer_step_was_skipped
