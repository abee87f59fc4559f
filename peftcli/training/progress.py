"""What the loop reports as it goes: log records of the steps since the last one, the progress bar or
log lines on stderr, eval lines, and the peak memory."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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
