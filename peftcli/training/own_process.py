"""One training run in a process of its own, for `peft compare` and `peft sweep`: what a run measures
must be its own. Peak memory is the process's peak (RSS on a CPU, which never goes down), and
accelerate allows one mixed-precision setting per process. A run that fails, or whose process dies,
comes back as one line saying why; Ctrl-C stops the run at a step boundary, and then the caller.

`run_jobs` trains the runs a caller yields, as many at once as there are slots (`--parallel` of
`peft compare` and `peft sweep`): each run takes its `Slot` (peftcli.training.slots), its GPU or its share
of the CPU cores, and with several slots its output goes to a log file instead of the terminal."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from rich.console import Console

from peftcli.errors import PeftcliError, RunInterrupted
from peftcli.training.run import run_train
from peftcli.training.slots import Slot

MAX_REASON = 400  # characters of a failed run's reason kept in a table

console = Console(stderr=True, soft_wrap=True, emoji=False)


@dataclass(frozen=True)
class Job:
    """A run to train into `run_dir`; `tag` is the caller's, handed back when the run ends."""

    label: str
    recipe: Path
    overrides: tuple[str, ...]
    run_dir: Path
    overwrite: bool
    tag: Any = None


@dataclass(frozen=True)
class Started:
    """A run in its own process: `child.sentinel` is ready once it ended."""

    child: Any
    receive: Any
    label: str


def run_jobs(
    jobs: Iterator[Job],
    slots: list[Slot],
    ended: Callable[[Job, str | None], None],
    log_dir: Path,
    debug: bool,
    setup: Callable[[bool], None] | None,
    command: str,
    unwritten: str,
) -> None:
    """Trains every job `jobs` yields, as many at once as there are slots, and calls `ended(job,
    reason)` as each ends (reason None: it finished). The next job is asked for only when a slot is
    free, so a search can suggest it from every result so far. With several slots each run's output
    goes to log_dir/<label>.log. A stop (Ctrl-C, SIGTERM) reaches every running job; no new one
    starts, and once all have ended RunInterrupted is raised with every stopped job's lines."""
    running: dict[Any, tuple[Started, Slot, Job]] = {}  # by the process's sentinel
    free: list[Slot] = list(slots)
    stopped: dict[str, RunInterrupted] = {}
    with signals_passed_to(lambda: [run.child for run, _, _ in running.values()]):
        while True:
            while free and not stopped and (job := next(jobs, None)) is not None:
                slot = free.pop(0)
                where = slot if len(slots) == 1 else slot.with_log(log_dir / f"{job.label}.log")
                if where.log is not None:
                    said = f"  training on {where.describe()}; its output: {where.log}"
                    console.print(said, markup=False, highlight=False)
                run = start_run(
                    job.recipe, job.overrides, job.run_dir, job.label, job.overwrite, debug, setup, where, command
                )
                running[run.child.sentinel] = (run, slot, job)
            if not running:
                break
            for sentinel in wait(list(running)):
                run, slot, job = running.pop(sentinel)
                free.append(slot)
                try:
                    reason = run_outcome(run, command, unwritten)
                except RunInterrupted as exc:
                    stopped[job.label] = exc
                    continue
                ended(job, reason)
    if stopped:  # each run's own lines (where it saved, how to resume), then the command's
        labels = sorted(stopped)
        lines = [line for label in labels for line in stopped[label].lines[:-1]]
        signum = stopped[labels[0]].exit_code - 128
        raise RunInterrupted(signum, *lines, f"{command} stopped at {', '.join(labels)}; {unwritten} was not written.")


def start_run(
    recipe: Path,
    overrides: tuple[str, ...] | list[str],
    run_dir: Path,
    label: str,
    overwrite: bool,
    debug: bool,
    setup: Callable[[bool], None] | None,
    slot: Slot,
    command: str,
) -> Started:
    overrides = [*overrides, f"output_dir={json.dumps(str(run_dir))}"]
    context = process_context()
    receive, send = context.Pipe(duplex=False)
    args = (str(recipe), overrides, overwrite, debug, setup, slot, send)
    child = context.Process(target=train_child, args=args, name=f"{command} {label}")
    child.start()
    send.close()
    return Started(child, receive, label)


def run_outcome(run: Started, command: str, unwritten: str) -> str | None:
    """The ended run's result: None, or why it did not finish; RunInterrupted when it was stopped."""
    run.child.join()
    message = run.receive.recv() if run.receive.poll() else None
    run.receive.close()
    if message is None:  # it died without a word: killed, most often by the kernel for want of memory
        code = run.child.exitcode or 0
        if code == -signal.SIGKILL:
            return "the training process was killed (SIGKILL; out of memory?) before it finished."
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"the training process {how} before it finished."
    if message[0] == "stopped":
        _, signum, lines = message
        raise RunInterrupted(signum, *lines, f"{command} stopped at {run.label}; {unwritten} was not written.")
    return None if message[0] == "ok" else message[1]


def process_context() -> Any:
    """A fork server: a fresh interpreter that imports the training code once (torch, transformers:
    seconds each time) and forks a clean process per run. A plain fork of this process would share
    its memory and threads; where there is no fork server (Windows), each run starts from scratch."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["peftcli.training.run"])
    return context


def train_child(
    recipe: str,
    overrides: list[str],
    overwrite: bool,
    debug: bool,
    setup: Callable[[bool], None] | None,
    slot: Slot,
    send: Any,
) -> None:
    """In the run's own process: run_train, then ("ok",), ("failed", reason) or ("stopped", signal, lines)."""
    take_slot(slot)
    if setup is not None:
        setup(debug)
    try:
        run_train(Path(recipe), overrides, overwrite=overwrite)
        send.send(("ok",))
    except RunInterrupted as exc:
        send.send(("stopped", exc.exit_code - 128, exc.lines))
    except KeyboardInterrupt:  # a second Ctrl-C quits at once
        send.send(("stopped", signal.SIGINT, ["interrupted"]))
    except PeftcliError as exc:
        if debug:
            traceback.print_exc()
        send.send(("failed", one_line(exc.lines)))
    except Exception as exc:  # noqa: BLE001 - a bug, or out of memory: the traceback helps, and the other runs go on
        traceback.print_exc()
        send.send(("failed", one_line([f"{type(exc).__name__}: {exc}"])))
    finally:
        send.close()


def take_slot(slot: Slot) -> None:
    """Before torch touches a device: the slot's environment (CUDA reads CUDA_VISIBLE_DEVICES when it
    starts, which is at the first CUDA call, not at import), threads, and output file."""
    os.environ.update(slot.env)
    if slot.threads is not None:
        import torch

        torch.set_num_threads(slot.threads)
    if slot.log is not None:
        slot.log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(slot.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)  # the file descriptors: rich, tqdm and C libraries all write there
        os.dup2(fd, 2)
        os.close(fd)
        remake_consoles()


def remake_consoles() -> None:
    """peftcli's module consoles were made in the fork server, which may have had a terminal: rich
    chose colours then, once. Made again, they see the log file and write plain text; their other
    settings (no emoji codes, no highlighting) are kept."""
    for name, module in list(sys.modules.items()):
        made = getattr(module, "console", None) if name.startswith("peftcli.") else None
        if isinstance(made, Console):
            kept = {"emoji": made._emoji, "highlight": made._highlight, "markup": made._markup}
            module.console = Console(stderr=made.stderr, soft_wrap=made.soft_wrap, **kept)  # type: ignore[attr-defined]


def one_line(lines: list[str]) -> str:
    text = " ".join(" ".join(line.split()) for line in lines)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


@contextmanager
def signals_passed_to(children: Callable[[], list[Any]]) -> Iterator[None]:
    """Ctrl-C reaches the training processes from the terminal itself (it goes to the whole foreground
    group), which then stop at a step boundary and save a checkpoint; this process waits for that
    instead of dying first. SIGTERM comes to this process alone, so it is passed on to every child
    that `children()` names when it comes."""

    def forward(signum: int, frame: Any) -> None:
        for child in children():
            with suppress(ProcessLookupError, TypeError):
                os.kill(child.pid, signum)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
