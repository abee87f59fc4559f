"""A run directory's one writer and its replacement: the OS lock `peft train` holds for the whole run,
and what `--overwrite` may delete.

The lock is `flock` on a file beside the run directory (`runs/.<name>.lock`), so it guards the folder
before the folder exists and while `--overwrite` replaces it. The kernel drops it when its process
ends, however it ends: a killed run leaves at most an unlocked file, which the next run takes over. The
file names its holder (pid, host, command) for the refusal message, and is removed when the run ends.

`--overwrite` deletes only a folder that a peftcli run wrote (its `recipe.yaml` starts with the header
`peft train` writes), never one that holds the recipe, the data, the model or the current folder, by
any spelling of the path. The old run is moved aside (`runs/.<name>.replaced`) rather than deleted, and
goes only once the new run has saved something in its place (a checkpoint or its adapter); a new run
that fails before that puts the old one back.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from peftcli.config.schema import Recipe
from peftcli.errors import PeftcliError
from peftcli.models.loading import location_of

RUN_RECIPE = "recipe.yaml"
RUN_HEADER = "# Resolved from "


def real(run_dir: Path) -> Path:
    """The folder itself, however it is spelled (`..`, symbolic links above it): one lock per folder."""
    return Path(os.path.realpath(run_dir))


def lock_path(run_dir: Path) -> Path:
    return real(run_dir).parent / f".{real(run_dir).name}.lock"


def aside_path(run_dir: Path) -> Path:
    return real(run_dir).parent / f".{real(run_dir).name}.replaced"


def is_run(folder: Path) -> bool:
    """A folder `peft train` wrote: its recipe.yaml starts with the resolved-recipe header."""
    recipe = folder / RUN_RECIPE
    try:
        with recipe.open("rb") as f:
            return f.read(len(RUN_HEADER)) == RUN_HEADER.encode()
    except OSError:
        return False


def holder(run_dir: Path) -> str:
    """Who holds the run's lock, as its lock file says."""
    try:
        info = json.loads(lock_path(run_dir).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def busy(run_dir: Path) -> PeftcliError:
    return PeftcliError(
        f"{run_dir}: another peft train is writing this run directory ({holder(run_dir)}). "
        "Wait for it to end, or give this run another name (name=NEW or output_dir=DIR)."
    )


def locked_by_another(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (checked without creating anything)."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def refuse_if_busy(run_dir: Path) -> None:
    """A run being written by another process is not resumed under it."""
    if locked_by_another(run_dir):
        raise busy(run_dir)


class RunLock:
    """The run directory's lock, held from `acquire` to `release`. Only the main process takes it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise busy(self.run_dir) from None
                raise
            # The holder before us may have removed the file between our open and our lock: then we
            # locked a file no one else can see, so try again on the one at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._write_holder()
                return
            os.close(fd)
        raise busy(self.run_dir)

    def _write_holder(self) -> None:
        assert self.fd is not None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["peft", *sys.argv[1:]]) if sys.argv[1:] else "peft train",
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no one else holds this file
        finally:
            os.close(self.fd)
            self.fd = None


# -- what --overwrite may delete ----------------------------------------------------------------


def within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or inside it, whatever the spelling (symbolic links, `..`, trailing `/`)."""
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def check_replaceable(run_dir: Path, keep: Iterable[tuple[Path, str]]) -> None:
    """Refuses to replace `run_dir` unless it is a peftcli run holding none of `keep` (path, what)."""
    if run_dir.is_symlink():
        raise PeftcliError(
            f"{run_dir}: a symbolic link ({os.readlink(run_dir)}); --overwrite replaces only a run directory itself. "
            "Give output_dir the real folder, or another name."
        )
    for path, what in keep:
        if within(path, run_dir):
            raise PeftcliError(
                f"{run_dir}: --overwrite would delete {what} ({path}), which is inside it. Choose another output_dir."
            )
    if not run_dir.is_dir():
        raise PeftcliError(f"{run_dir}: a file, not a run directory. Choose another output_dir, or remove the file.")
    if not is_run(run_dir):
        raise PeftcliError(
            f"{run_dir}: not a peftcli run directory (no {RUN_RECIPE} written by peft train), so --overwrite will not "
            "delete it. Choose another output_dir, or empty the folder yourself."
        )


def check_run_dir(run_dir: Path, overwrite: bool, keep: Iterable[tuple[Path, str]] = ()) -> None:
    """Before anything loads: the run directory is free, or `--overwrite` may replace it."""
    refuse_if_busy(run_dir)
    check_free(run_dir, overwrite, keep)


def check_free(run_dir: Path, overwrite: bool, keep: Iterable[tuple[Path, str]]) -> None:
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if run_dir.is_dir() and not run_dir.is_symlink() and not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise PeftcliError(
            f"{run_dir}: run directory already exists. Pass --overwrite to replace it, "
            "or give the run another name (name=NEW or output_dir=DIR)."
        )
    check_replaceable(run_dir, keep)


def kept_paths(recipe: Recipe | None, recipe_path: Path | None) -> list[tuple[Path, str]]:
    """What --overwrite must never delete: the recipe, the current folder, the data and the model."""
    keep = [(Path.cwd(), "the folder you run from")] + (
        [(recipe_path, "the recipe")] if recipe_path is not None else []
    )
    if recipe is None:
        return keep
    for files in (recipe.data.files or {}).values():
        keep += [(Path(f), "a data file") for f in files]
    if recipe.data.dataset and Path(recipe.data.dataset).exists():
        keep.append((Path(recipe.data.dataset), "the dataset"))
    for name, key in ((recipe.model.name, "model.name"), (recipe.model.decoder, "model.decoder")):
        if name and Path(location_of(name, key)).exists():
            keep.append((Path(location_of(name, key)), "the base model"))
    return keep


def settle_replacement(run_dir: Path) -> None:
    """What a replacement killed midway left (see Replacement.recover), settled under the lock before
    the run directory is checked; nothing is created when there is nothing to settle."""
    if not aside_path(run_dir).is_dir():
        return
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        Replacement(run_dir).recover()
    finally:
        lock.release()


class Replacement:
    """A new run in place of an old one: the old folder waits aside until the new run has saved."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.aside = aside_path(run_dir)
        self.moved = False

    def begin(self, overwrite: bool, keep: Iterable[tuple[Path, str]]) -> None:
        """Under the lock: settles what a killed replacement left, then moves the old run aside."""
        self.recover()
        check_free(self.run_dir, overwrite, keep)
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            os.replace(self.run_dir, self.aside)
            self.moved = True

    def recover(self) -> None:
        """A replacement killed before the new run saved anything: the old run comes back."""
        if not self.aside.is_dir():
            return
        # What the new run saved, complete: its adapter, or a step checkpoint (a killed save leaves a
        # hidden temporary folder, and a `checkpoints/` folder holding only that is nothing).
        checkpoints = self.run_dir / "checkpoints"
        new_saved = (self.run_dir / "adapter" / "adapter_model.safetensors").is_file() or any(
            p.is_dir() and p.name.split("-", 1)[1].isdigit() for p in checkpoints.glob("step-*")
        )
        if new_saved:
            shutil.rmtree(self.aside)
        else:
            if self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            os.replace(self.aside, self.run_dir)

    def saved(self) -> None:
        """The new run has something in the old one's place: the old one goes."""
        if self.moved:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.moved = False

    def failed(self) -> None:
        """The new run failed before it saved anything: the old run comes back."""
        if self.moved:
            if self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            os.replace(self.aside, self.run_dir)
            self.moved = False
