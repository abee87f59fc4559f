"""One flat accelerate training loop: mixed precision, gradient accumulation, clipping, the schedule,
periodic eval and logging, and the state a run needs to continue exactly (`LoopState`). It knows
nothing about methods (it trains whatever requires grad, and calls the generic TrainingHooks a method
may ask for) and nothing about files (the caller gets records and loop states through `Hooks`, and
hands a loop state back to resume).

Read `train` top to bottom; each step is a named helper below it.
"""

from __future__ import annotations

import math
import os
import random
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from transformers import get_scheduler

from peftcli.config.recipe import OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.errors import PeftcliError, first_line
from peftcli.methods.base import TrainingHooks, trainable_parameters
from peftcli.tasks.registry import TARGET_INDEX, Task, head_at_targets, higher_is_better, with_target_index
from peftcli.training import precision
from peftcli.training.distributed import (
    accumulating,
    allow_unused,
    backward_kwargs,
    configure_deepspeed,
    data_parallel,
    first_batch,
    full_parameters,
    gather_uneven,
    partitioned_optimizer,
    sharded,
    unused_parameters,
)
from peftcli.training.speedups.dropout_masks import cheaper_dropout
from peftcli.training.speedups.first_position import first_position_only


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


@dataclass
class Position:
    """Where the data stream stands: the epoch, and the micro-batches this process has taken from it."""

    epoch: int = 0
    batches: int = 0


@dataclass
class LoopState:
    """Everything the loop needs to go on from a step boundary as if it had never stopped: the
    trainable parameters, optimizer, schedule, grad scaler, the method's own training state, this
    process's random number generators and the data position. `peftcli.training.checkpoints` stores it."""

    step: int
    position: Position
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    method: tuple[dict[str, torch.Tensor], dict[str, Any]] | None
    result: dict[str, Any]
    rng: dict[str, Any]


@dataclass
class Stop:
    """Set from a signal handler; the loop saves a loop state at the next step boundary and raises Stopped."""

    signal: int | None = None

    def request(self, signum: int) -> None:
        self.signal = signum


class Stopped(Exception):
    def __init__(self, step: int, signal: int) -> None:
        super().__init__(f"stopped at step {step} by signal {signal}")
        self.step, self.signal = step, signal


class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"the loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class OutOfMemory(Exception):
    """The device (or the host) ran out of memory on a batch: which step and what the batch held."""

    def __init__(self, phase: str, step: int, examples: int, length: int, detail: str) -> None:
        super().__init__(f"out of memory in {phase} at step {step}")
        self.phase, self.step, self.examples, self.length, self.detail = phase, step, examples, length, detail


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal (a RuntimeError that says so)."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
    )


def out_of_memory(exc: BaseException, phase: str, step: int, batches: list[dict[str, torch.Tensor]]) -> OutOfMemory:
    first = first_line(exc, 160)
    examples = max(b["input_ids"].shape[0] for b in batches) if batches else 0
    length = max(b["input_ids"].shape[1] for b in batches) if batches else 0
    return OutOfMemory(phase, step, examples, length, first)


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    tokens: int
    examples: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    peak_memory_mb: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0

    CARRIED = (
        "steps",
        "train_seconds",
        "tokens",
        "examples",
        "final_metrics",
        "best_metrics",
        "best_step",
        "history",
        "skipped_steps",
    )

    def carried(self) -> dict[str, Any]:
        """What a resumed run takes over: the counters, the evals so far and the log."""
        return {k: getattr(self, k) for k in self.CARRIED}

    def add_step(self, tokens: int, examples: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.examples += examples
        self.train_seconds += seconds

    def track_eval(self, step: int, metrics: dict[str, float], metric: str) -> bool:
        """Records an eval; True when it is the best so far by `metric` (ties keep the earlier one). A
        NaN or infinite value is never the best (a NaN compares False with everything, so a first NaN
        would stay best for good), and any finite value beats one (a best kept from before)."""
        if metric not in metrics:
            raise PeftcliError(f"train.best_metric: {metric!r} is not an eval metric (metrics: {', '.join(metrics)}).")
        self.final_metrics = metrics
        best = self.best_metrics.get(metric)
        value = metrics[metric]
        improved = math.isfinite(value) and (
            best is None or not math.isfinite(best) or (value > best if higher_is_better(metric) else value < best)
        )
        if improved:
            self.best_metrics, self.best_step = metrics, step
        return improved


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
) -> TrainResult:
    hooks = hooks or Hooks()
    method_hooks = method_hooks or TrainingHooks()
    accelerator = accelerator or make_accelerator(spec)
    stop = stop or Stop()
    set_seed(spec.seed)
    sampler = train_data.batch_sampler
    fp32_masters(model, accelerator)
    configure_deepspeed(accelerator, spec.batch_size, spec.grad_accum, spec.max_grad_norm)
    optimizer = make_optimizer(model, optim)
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
    train_data = accelerator.prepare_data_loader(train_data, device_placement=False)
    # The schedule is built on the prepared (per-process) loader's length and stepped once per
    # optimizer step; it is not passed to prepare(), which would step it once per process.
    steps_per_epoch = math.ceil(len(train_data) / spec.grad_accum)
    total_steps = spec.max_steps or math.ceil(spec.epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, schedule, total_steps)
    method_hooks.start(total_steps)
    attention = training_attention(accelerator, model)
    head = output_head(accelerator, model, task)

    result = TrainResult(steps=0, train_seconds=0.0, tokens=0, examples=0)
    position = Position()
    if resume is not None:
        restore(resume, model, optimizer, scheduler, accelerator, method_hooks, result, position)
    since_log = StepStats()

    def log(record: dict[str, Any]) -> None:
        result.history.append(record)
        hooks.on_log(record)

    def loop_state(step: int) -> LoopState:
        return capture(step, position, model, optimizer, scheduler, accelerator, method_hooks, result)

    model.train()
    first = result.steps + 1
    narrowing = first_position_only(
        model, accelerator.unwrap_model(model), task.reads_one_position, low_precision(accelerator, model)
    )
    with progress_bar(accelerator, total_steps, first - 1) as progress, narrowing, cheaper_dropout(model):
        for step, window in enumerate(
            step_windows(train_data, sampler, spec.grad_accum, total_steps - first + 1, position), start=first
        ):
            started = time.perf_counter()
            try:
                loss, tokens, examples = train_step(
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    window=window,
                    task=task,
                    accelerator=accelerator,
                    spec=spec,
                    method_hooks=method_hooks,
                    step=step,
                    attention=attention,
                    head=head,
                )
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                raise out_of_memory(exc, "train", step, window) from None
            seconds = time.perf_counter() - started
            result.add_step(tokens, examples, seconds)
            if not math.isfinite(loss):
                result.skipped_steps += 1
                if result.skipped_steps > spec.skip_nonfinite_steps:
                    raise NonFiniteLoss(step, loss)
                progress.line(
                    f"step {step}: the loss is {loss}; the step was skipped ({result.skipped_steps} of {spec.skip_nonfinite_steps} allowed)"
                )
            else:
                since_log.add(loss, tokens, examples, seconds)

            if step % spec.log_every == 0 or step == total_steps:
                record = since_log.record(step, step / steps_per_epoch, scheduler.get_last_lr()[0])
                log(record)
                progress.logged(record)
            progress.advance(step)

            if eval_data is not None and (step == total_steps or (spec.eval_every and step % spec.eval_every == 0)):
                try:
                    metrics = evaluate(model, eval_data, task, accelerator, label_names).metrics
                except OutOfMemory as exc:
                    exc.step = step
                    raise
                best_metric = spec.best_metric or task.best_metric
                improved = result.track_eval(step, metrics, best_metric)
                log(
                    {"step": step, "epoch": round(step / steps_per_epoch, 4)}
                    | {f"eval_{k}": v for k, v in metrics.items()}
                )
                with full_parameters(accelerator, model):
                    hooks.on_eval(step, metrics, improved)
                progress.line(eval_line(step, total_steps, metrics, best_metric if improved else None))
                model.train()

            stopping = stop_requested(stop, accelerator) if step != total_steps else None
            if stopping is not None or (spec.save_every and step % spec.save_every == 0 and step != total_steps):
                with full_parameters(accelerator, model):
                    hooks.on_save(step, None if partitioned_optimizer(accelerator) else loop_state(step))
            if stopping is not None:
                raise Stopped(step, stopping)
    result.peak_memory_mb = peak_memory_mb(accelerator)
    with full_parameters(accelerator, model):
        hooks.on_end()
    return result


def stop_requested(stop: Stop, accelerator: Accelerator) -> int | None:
    """The signal that asked to stop, on any process: all processes stop at the same step."""
    signal = stop.signal or 0
    if accelerator.num_processes > 1:
        signal = int(accelerator.gather(torch.tensor([signal], device=accelerator.device)).max().item())
    return signal or None


def capture(
    step: int,
    position: Position,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    accelerator: Accelerator,
    method_hooks: TrainingHooks,
    result: TrainResult,
) -> LoopState:
    unwrapped = accelerator.unwrap_model(model)
    return LoopState(
        step=step,
        position=Position(position.epoch, position.batches),
        params={n: p.detach().cpu().clone() for n, p in trainable_parameters(unwrapped).items()},
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        method=method_hooks.state() if method_hooks.state is not None else None,
        result=result.carried(),
        rng=rng_state(),
    )


def restore(
    state: LoopState,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    accelerator: Accelerator,
    method_hooks: TrainingHooks,
    result: TrainResult,
    position: Position,
) -> None:
    unwrapped = accelerator.unwrap_model(model)
    params = trainable_parameters(unwrapped)
    if set(params) != set(state.params):
        missing, extra = sorted(set(params) - set(state.params)), sorted(set(state.params) - set(params))
        raise PeftcliError(
            f"--resume: the checkpoint's trainable parameters do not match this model's (missing {missing[:3]}, "
            f"unexpected {extra[:3]}). Resume with the recipe the run was started with."
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state.params[name].shape:
                raise PeftcliError(
                    f"--resume: {name} has shape {tuple(state.params[name].shape)} in the checkpoint and "
                    f"{tuple(p.shape)} in this model. Resume with the recipe the run was started with."
                )
            p.copy_(state.params[name])
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    if accelerator.scaler is not None and state.scaler is not None:
        accelerator.scaler.load_state_dict(state.scaler)
    if state.method is not None and method_hooks.load_state is not None:
        method_hooks.load_state(*state.method)
    for key, value in state.result.items():
        setattr(result, key, value)
    position.epoch, position.batches = state.position.epoch, state.position.batches
    set_rng_state(state.rng)


def rng_state() -> dict[str, Any]:
    """This process's generators: torch (CPU and CUDA), Python's and NumPy's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def make_accelerator(spec: TrainSpec, trackers: list[Any] | None = None) -> Accelerator:
    """`trackers`: experiment trackers for `log_with` (peftcli.reporting.trackers), made but not started."""
    mixed_precision, _ = precision.resolve(spec.mixed_precision)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PeftcliError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is visible (got 'fp16'). "
            "Use auto, bf16 (CPUs with bf16 support) or no."
        )
    if mixed_precision == "bf16" and not torch.cuda.is_available() and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise PeftcliError(
            "train.mixed_precision: this CPU has no bfloat16 support and no CUDA GPU is visible (got 'bf16'). Use auto or no."
        )
    for engine, config in (("FSDP", "configs/fsdp.yaml"), ("DEEPSPEED", "configs/deepspeed-zero*.yaml")):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true") and not torch.cuda.is_available():
            raise PeftcliError(
                f"accelerate launch: {config} shards the model across GPUs and none is visible (got ACCELERATE_USE_{engine}=true). "
                "On CPUs use configs/cpu-ddp.yaml or --num-processes N."
            )
    precision.set_tf32(spec.tf32)
    # accelerate keeps one state per process and refuses another precision once it is set: a second
    # run in the same process (the Python API, tests) starts from a fresh state. The process group stays.
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()
    # Several processes and no GPU: DDP on the CPUs over gloo (accelerate picks that only when told cpu=True).
    on_cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=on_cpus, log_with=trackers or None)


def fp32_masters(model: nn.Module, accelerator: Accelerator) -> None:
    """Under autocast every trainable tensor is fp32, whatever `model.dtype` is: a classification
    head, BitFit's biases or full fine-tuning's weights left in fp16 would lose small updates to
    rounding, and the fp16 grad scaler refuses to unscale fp16 gradients ("Attempting to unscale FP16
    gradients"). Autocast computes in 16 bits all the same. DeepSpeed keeps its own fp32 masters."""
    if accelerator.mixed_precision not in ("fp16", "bf16") or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def make_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    groups = parameter_groups(model, spec)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    if spec.name in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb  # an optional extra; recipe validation checked it is installed

        cls = bnb.optim.PagedAdamW8bit if spec.name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)


def parameter_groups(model: nn.Module, spec: OptimizerSpec) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, in the same order on every run (a resumed optimizer's state
    maps onto them by position). As in HF Trainer: no weight decay on biases and norm weights (1-D
    tensors). LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354, `loraplus_lr_ratio`): LoRA's
    B matrices and the 1-D tensors train at lr x ratio, the groups HF peft's create_loraplus_optimizer
    makes (LoRA on embeddings, its third group, is not one peftcli offers)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise PeftcliError("method: no parameter is trainable; the method adapted nothing.")
    ratio = spec.loraplus_lr_ratio
    if ratio is not None and not any("lora_B" in n for n, _ in named):
        raise PeftcliError(
            f"optimizer.loraplus_lr_ratio: scales the learning rate of LoRA's B matrices, and this method trains "
            f"none (got {ratio:g}). Use method lora or adalora, or remove optimizer.loraplus_lr_ratio."
        )

    def faster(name: str, p: torch.Tensor) -> bool:
        return ratio is not None and ("lora_B" in name or p.ndim == 1)

    groups = []
    for fast in (False, True):
        lr = {"lr": spec.lr * ratio} if fast and ratio is not None else {}
        matrices = [p for n, p in named if p.ndim > 1 and faster(n, p) == fast]
        vectors = [p for n, p in named if p.ndim <= 1 and faster(n, p) == fast]
        groups += [
            {"params": matrices, "weight_decay": spec.weight_decay, **lr},
            {"params": vectors, "weight_decay": 0.0, **lr},
        ]
    return [g for g in groups if g["params"]]


def make_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int) -> Any:
    warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil((spec.warmup_ratio or 0.0) * total_steps)
    name = "constant_with_warmup" if spec.name == "constant" else spec.name
    return get_scheduler(name, optimizer, num_warmup_steps=min(warmup, total_steps), num_training_steps=total_steps)


def step_windows(
    loader: DataLoader, sampler: Any, grad_accum: int, steps: int, position: Position
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The accumulation windows of the next `steps` optimizer steps, epoch after epoch, from `position`
    (which they keep up to date: a resumed run skips the micro-batches it already took)."""
    taken = 0
    while taken < steps:
        # accelerate's loader counts its passes and sets the sampler's epoch from that count when a
        # pass starts: a resumed run sets the count as well, or it would replay epoch 0's order.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(position.epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(position.epoch)
        if len(loader) == 0:
            raise PeftcliError(
                "data: the training split gives no batch on this process; it needs at least one example per process."
            )
        for window in windows(islice(iter(loader), position.batches, None), grad_accum):
            position.batches += len(window)
            yield window
            taken += 1
            if taken >= steps:
                return
        position.epoch, position.batches = position.epoch + 1, 0


def windows(batches: Iterator[dict[str, torch.Tensor]], size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Groups micro-batches into the accumulation windows of one optimizer step each (the last may be short)."""
    window: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


# torch's CPU flash-attention kernel has a slow bf16 backward for short sequences: 5.5x the math
# kernel's time at 24 tokens, 1.4x at 128, faster only from about 192 on (benchmarks/attention_kernels.py).
# Its forward alone is faster at every length, so evals keep it; fp32 keeps it too (it wins there).
MATH_ATTENTION_BELOW = 192


def training_attention(accelerator: Accelerator, model: nn.Module) -> Callable[[int], AbstractContextManager[Any]]:
    """For a training forward of a batch this long: which scaled-dot-product attention kernels may run."""
    bf16 = accelerator.mixed_precision == "bf16" or any(p.dtype == torch.bfloat16 for p in model.parameters())
    if accelerator.device.type != "cpu" or not bf16:
        return lambda length: nullcontext()
    return lambda length: sdpa_kernel(SDPBackend.MATH) if length < MATH_ATTENTION_BELOW else nullcontext()


def output_head(accelerator: Accelerator, model: nn.Module, task: Task) -> nn.Module | None:
    """The output head, when the task lets it run at the target positions only (tasks.head_at_targets)."""
    if not task.head_at_targets_only:
        return None
    get = getattr(accelerator.unwrap_model(model), "get_output_embeddings", None)
    return get() if get is not None else None


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on the device; from pinned memory the copy does not block the host."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], task: Task) -> dict[str, torch.Tensor]:
    """The forward pass's arguments: the labels too for an encoder-decoder, which shifts them into the
    decoder's input (the model then computes its own loss as well, which is not used)."""
    drop = (TARGET_INDEX,) if task.encoder_decoder else ("labels", TARGET_INDEX)
    return {k: v for k, v in batch.items() if k not in drop}


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
    attention: Callable[[int], AbstractContextManager[Any]] = lambda length: nullcontext(),
    head: nn.Module | None = None,
) -> tuple[float, int, int]:
    """One optimizer step over an accumulation window. Each micro-batch's summed loss is divided by
    the loss terms of the whole window on all processes, so the gradient equals the large batch's.
    A method's regularizer joins the last micro-batch's loss: once per step, inside the gradient sync.
    Returns the window's mean loss, and the tokens and examples of all processes; when the loss (or
    the gradient norm) is not finite, nothing was updated."""
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
    global_units = max(float(local[0]), 1.0)
    tokens, examples = int(local[1]), int(local[2])
    # DDP averages gradients over processes, hence the factor num_processes.
    scale = accelerator.num_processes / global_units
    loss_total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        batch = on_device(with_target_index(batch, task), accelerator.device)
        # The attention kernel choice holds through the backward too: gradient checkpointing recomputes
        # the forward there, and another kernel would recompute other tensors than it saved.
        with accumulating(accelerator, model, last=i == len(window) - 1), attention(batch["input_ids"].shape[1]):
            with head_at_targets(head, batch):
                logits = model(**model_inputs(batch, task)).logits
            loss_sum, _ = task.loss_sum(logits, batch)
            objective = loss_sum * scale
            if method_hooks.regularizer is not None and i == len(window) - 1:
                objective = objective + method_hooks.regularizer()
            accelerator.backward(objective, **backward_kwargs(accelerator))
        loss_total += loss_sum.detach()
    mean_loss = accelerator.reduce(loss_total, reduction="sum") / global_units
    norm = (
        accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm) if spec.max_grad_norm is not None else None
    )
    # The step's one read of the device: the loss, and the gradient norm where it decides the step.
    # With fp16 the grad scaler handles overflowing gradients itself (it skips and lowers the scale).
    if isinstance(norm, torch.Tensor) and accelerator.scaler is None:
        loss, norm_value = torch.stack([mean_loss.float(), norm.float().to(mean_loss.device)]).tolist()
        if math.isfinite(loss) and not math.isfinite(norm_value):
            loss = norm_value  # a finite loss with non-finite gradients: the step is as bad
    else:
        loss = mean_loss.item()
    finite = math.isfinite(loss)
    if accelerator.scaler is not None:
        # fp16: the grad scaler updates only when every gradient is finite, and lowers its scale when
        # not. It must see every step, skipped or not: clipping has unscaled this step's gradients, and
        # without the scaler's update the next step's unscale fails ("unscale_() has already been called").
        optimizer.step()
        stepped = finite and not accelerator.optimizer_step_was_skipped
    else:
        if finite:
            optimizer.step()
        stepped = finite
    if stepped:  # a method's hooks (AdaLoRA's importance averages) see only steps that updated
        method_hooks.after_optimizer_step(step)
    # A skipped step (non-finite loss) leaves the weights and the optimizer untouched; the schedule
    # still advances, so the learning rate stays tied to the step number.
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens, examples


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    preds: torch.Tensor | None  # classification: predicted and true label ids, gathered from all processes
    labels: torch.Tensor | None


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: Task,
    accelerator: Accelerator,
    label_names: list[str] | None,
    on_batch: Callable[[], None] = lambda: None,
) -> EvalOutput:
    model.eval()
    head = output_head(accelerator, model, task)
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    units = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    # Sharded parameters (FSDP, ZeRO-3) are gathered in every forward: every process runs as many
    # forwards as the one with the most batches (the others run a one-example filler whose output
    # counts for nothing), or a collective would wait forever for its peer.
    fillers = filler_forwards(loader, accelerator) if sharded(accelerator) else 0
    # Where each process holds the whole model (DDP), evals run on it directly: DDP's own forward
    # broadcasts buffers, a collective that a process with fewer eval batches would leave unpaired.
    model = model if sharded(accelerator) else accelerator.unwrap_model(model)
    narrowing = first_position_only(
        model, accelerator.unwrap_model(model), task.reads_one_position, low_precision(accelerator, model)
    )
    with no_grad_for(accelerator), narrowing:
        for batch in loader:
            batch = on_device(with_target_index(batch, task), accelerator.device)
            try:
                with head_at_targets(head, batch):
                    logits = model(**model_inputs(batch, task)).logits
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                raise out_of_memory(exc, "eval", 0, [batch]) from None
            batch_loss, batch_units = task.loss_sum(logits, batch)
            loss_sum += batch_loss.double()
            units += batch_units
            predicted = task.predictions(logits, batch)
            if predicted is not None:
                preds.append(predicted[0])
                labels.append(predicted[1])
            on_batch()
        for _ in range(fillers):
            filler = {k: v.to(accelerator.device) for k, v in loader.collate_fn([loader.dataset[0]]).items()}
            with head_at_targets(head, filler):
                model(**model_inputs(filler, task))
    preds, labels = [torch.cat(preds).cpu()] if preds else [], [torch.cat(labels).cpu()] if labels else []
    # Each process evaluated its own share of the examples (data.eval_loader): sums and rows are
    # joined once at the end, so no example counts twice and uneven shares are fine.
    total_loss = accelerator.reduce(loss_sum, reduction="sum").item()
    total_units = accelerator.reduce(units, reduction="sum").item()
    has_preds = int(accelerator.reduce(torch.tensor(len(preds), device=accelerator.device), reduction="sum").item()) > 0
    all_preds = (
        gather_uneven(accelerator, torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long))
        if has_preds
        else None
    )
    all_labels = (
        gather_uneven(accelerator, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
        if has_preds
        else None
    )
    return EvalOutput(
        task.metrics(total_loss, total_units, all_preds, all_labels, label_names or []), all_preds, all_labels
    )


def no_grad_for(accelerator: Accelerator) -> AbstractContextManager[Any]:
    """inference_mode where it is safe, no_grad where parameters are sharded: FSDP and ZeRO-3 cannot
    gather into inference tensors, and tensors made in inference mode cannot be saved for a later
    backward (HF Trainer evaluates under no_grad too)."""
    return torch.no_grad() if sharded(accelerator) else torch.inference_mode()


def filler_forwards(loader: DataLoader, accelerator: Accelerator) -> int:
    """How many forwards this process must add to match the process with the most eval batches."""
    mine = torch.tensor([len(loader)], device=accelerator.device)
    most = int(accelerator.reduce(mine, reduction="max").item()) if accelerator.num_processes > 1 else len(loader)
    return most - len(loader)


def low_precision(accelerator: Accelerator, model: nn.Module) -> bool:
    """Whether the forward computes in 16 bits: 16-bit weights, or autocast (whose weights stay fp32)."""
    return accelerator.mixed_precision in ("fp16", "bf16") or any(
        p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()
    )


class StepStats:
    """Sums since the last log line, turned into one record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = 0.0
        self.steps = 0
        self.tokens = 0
        self.examples = 0
        self.seconds = 0.0

    def add(self, loss: float, tokens: int, examples: int, seconds: float) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.examples += examples
        self.seconds += seconds

    def record(self, step: int, epoch: float, lr: float) -> dict[str, Any]:
        seconds = max(self.seconds, 1e-9)
        record = {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": self.loss / max(self.steps, 1),
            "lr": lr,
            "tokens_per_s": self.tokens / seconds,
            "examples_per_s": self.examples / seconds,
        }
        self.reset()
        return record


def peak_memory_mb(accelerator: Accelerator) -> float:
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LoopOutput:
    """What the loop prints, all on stderr, each line whole. In a terminal: a live bar with the latest
    log record. Elsewhere (a pipe, a log file) there is no bar to redraw: each log record is a line of
    its own instead. Only the main process prints."""

    def __init__(self, progress: Progress, bar: Any, total: int, done: int, live: bool, main: bool) -> None:
        self.progress, self.bar, self.total, self.live, self.main = progress, bar, total, live, main
        self.logged_at = done

    def logged(self, record: dict[str, Any]) -> None:
        """A log record: the averages over the steps since the one before."""
        status = log_status(record, record["step"] - self.logged_at)
        self.logged_at = record["step"]
        if self.live:
            self.progress.update(self.bar, status=status)
        else:
            self.line(f"step {record['step']}/{self.total}: {status}")

    def advance(self, step: int) -> None:
        self.progress.update(self.bar, completed=step)

    def line(self, text: str) -> None:
        if self.main:
            self.progress.console.print(text, markup=False, highlight=False)


def log_status(record: dict[str, Any], steps: int) -> str:
    """The train loss and the speed are means over the steps since the last log line, and the words say
    so: the end line's speed is over every step, which differs wherever the speed changed during the
    run (a machine busy with other work: 71 tok/s in the bar's last steps, 23 over the whole run)."""
    over = "the last step" if steps == 1 else f"the last {steps} steps"
    return f"train loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s ({over})"


def eval_line(step: int, total: int, metrics: dict[str, float], best: str | None) -> str:
    """`step 40/152 eval: loss 0.3012  accuracy 0.9000  f1 0.8990  (best accuracy so far)`."""
    values = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    return f"step {step}/{total} eval: {values}" + (f"  (best {best} so far)" if best is not None else "")


@contextmanager
def progress_bar(accelerator: Accelerator, total: int, done: int = 0) -> Iterator[LoopOutput]:
    # A console of its own, made now: on stderr with the run's other lines (rich's default console is
    # stdout), never wrapping a line at its width (80 columns when not a terminal), and seeing the
    # stderr of this moment (a parallel trial's log file, commands/own_process.py).
    console = Console(stderr=True, soft_wrap=True, emoji=False)
    live = accelerator.is_main_process and console.is_terminal and not console.is_dumb_terminal
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not live,
    )
    with progress:
        bar = progress.add_task("train", total=total, completed=done, status="")
        yield LoopOutput(progress, bar, total, done, live, accelerator.is_main_process)
