"""HF peft's adapter files and atomic writes: the bottom of peftcli, importing nothing of it but errors.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<parameter name>`, which is exactly what `peft.PeftModel.from_pretrained` reads.
Only safetensors and JSON are read back: nothing a user supplies is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from peftcli.errors import CheckpointError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
LABELS_NAME = "labels.json"


# -- atomic writes -----------------------------------------------------------------------------


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only read it
    by setting it, and a file another thread creates meanwhile would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: Path | str) -> None:
    """Gives `path` the mode a plain open() (a file) or mkdir() (a folder) would have: mkstemp,
    mkdtemp and safetensors' save_file (which writes through a temporary file) make owner-only ones,
    which teammates on a shared machine cannot read."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


def plain_modes(folder: Path) -> None:
    """plain_mode for `folder` and everything in it: after a writer peftcli does not control
    (transformers' save_pretrained writes its weights through safetensors)."""
    plain_mode(folder)
    for path in Path(folder).rglob("*"):
        if not path.is_symlink():
            plain_mode(path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        plain_mode(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None: json.dumps writes them as NaN and
    Infinity, which are not JSON (jq, JavaScript and most parsers refuse the whole file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Strict JSON, atomically: a non-finite float is written as null."""
    atomic_write_text(path, json.dumps(finite(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it replaces `path` in one rename, so a
    reader (or a crash) sees the old folder or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    plain_mode(tmp)
    try:
        yield tmp
        atomic_rename_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_rename_dir(tmp: Path, path: Path) -> None:
    """Puts the finished folder `tmp` at `path`, replacing any folder there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, whose I/O failures (a full disk) come as OSError like every other write's:
    safetensors raises its own SafetensorError, which names the OS error only inside its text."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"I/O error: (.+?) \(os error (\d+)\)", str(exc))
        if found is None:
            raise OSError(str(exc)) from None
        raise OSError(int(found.group(2)), found.group(1)) from None
    plain_mode(path)


# -- save --------------------------------------------------------------------------------------


def write_adapter(
    folder: Path,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    label_names: list[str] | None = None,
    tokenizer: Any = None,
) -> None:
    """The adapter's files, into a folder that is not yet in place (see `atomic_dir`)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    check_saved(folder / WEIGHTS_NAME, {k: tuple(v.shape) for k, v in state.items()})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if label_names is not None:
        (folder / LABELS_NAME).write_text(json.dumps({"labels": label_names}, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def check_saved(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Re-opens a written adapter: every tensor is there, with the shape meant."""
    saved = read_state(path)
    for key, shape in shapes.items():
        got = tuple(saved[key].shape) if key in saved else None
        if got != shape:
            raise CheckpointError(
                f"{path}: {key} reads back with shape {got} instead of {shape}; the disk may be full or failing."
            )


def check_whole(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """`state` holds the trainable tensors with the shapes they had before training (`shapes`). A
    parameter read while FSDP or ZeRO-3 shards it is empty or a flat slice: an adapter saved from it
    would load nowhere, a known failure of hand-written scripts."""
    for key, t in state.items():
        if key in shapes and tuple(t.shape) != shapes[key]:
            raise CheckpointError(
                f"adapter tensor {key} has shape {tuple(t.shape)} instead of {shapes[key]}, so nothing was saved. "
                "It was read while its parameter was sharded; this is a peftcli bug, please report it with your "
                "launch config."
            )


# -- load --------------------------------------------------------------------------------------


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found. Give a run directory's adapter/ folder.")
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} in this folder; it is not an adapter folder.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}). The file is corrupt; re-save the adapter.") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{path}: no `peft_type` key; it is not an adapter config.")
    return config


def weights_file(folder: Path) -> Path:
    """The adapter's safetensors file, checked before any model loads: its header reads and covers
    the whole file (so a truncated file fails here). A pickle (`.bin`) is refused unread: unpickling
    runs code."""
    path = folder / WEIGHTS_NAME
    if path.is_file():
        try:
            with safe_open(str(path), "pt"):
                return path
        except (SafetensorError, OSError) as exc:
            raise unreadable(path, exc) from None
    pickles = [folder / name for name in PICKLE_NAMES if (folder / name).is_file()]
    if pickles:
        raise CheckpointError(
            f"{pickles[0]}: a pickle file, which peftcli never loads (unpickling can run any code). "
            f"If you trust it, convert it to {WEIGHTS_NAME} with HF peft's save_pretrained."
        )
    raise CheckpointError(f"{path}: adapter weights not found; the adapter folder is incomplete. Re-save the adapter.")


def unreadable(path: Path, exc: Exception) -> CheckpointError:
    """read_state's message, for a file whose header is read without loading it."""
    return CheckpointError(
        f"{path}: cannot read the safetensors file ({exc}). It is corrupt or truncated; re-save the adapter."
    )


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter weights not found.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: cannot read the safetensors file ({exc}). It is corrupt or truncated; re-save the adapter."
        ) from None
