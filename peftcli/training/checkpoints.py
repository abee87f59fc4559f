"""Step checkpoints that a run resumes from, bit for bit: the loop state in safetensors and JSON.

A checkpoint folder `checkpoints/step-N/` holds:

    adapter_config.json, adapter_model.safetensors   the adapter at step N (`peft eval` loads it)
    best/                                            the best eval's adapter so far, when there was an eval
    training_state.safetensors                       trainable parameters, optimizer tensors, method tensors
    training_state.json                              step, data position, optimizer groups, schedule, scaler,
                                                     counters and log so far, the number of processes
    rng-<rank>.safetensors, rng-<rank>.json          each process's random number generators

The main process writes every file, the other processes' generators included (they send them: on
another machine the run directory need not exist), into a temporary folder that it renames into place
once all are written: a `step-N` folder is complete or absent, whenever the run dies.
Nothing is unpickled on the way back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import Accelerator

from peftcli.adapter_io import atomic_rename_dir, read_state, save_tensors
from peftcli.errors import CheckpointError
from peftcli.training.distributed import gather_to_main, on_main
from peftcli.training.state import LoopState, Position

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
BEST = "best"
ABANDONED = ".abandoned-"
NESTED = "/"  # optimizer.<param>.<slot>/<key>: a slot that is itself a dict of tensors
FORMAT = 1


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def checkpoint_steps(run_dir: Path) -> list[Path]:
    """The complete step checkpoints of a run, oldest first (temporary folders start with a dot)."""
    folders = [p for p in (run_dir / "checkpoints").glob("step-*") if p.name.split("-", 1)[1].isdigit() and p.is_dir()]
    return sorted(folders, key=step_of)


def save_checkpoint(
    folder: Path,
    state: LoopState | None,
    accelerator: Accelerator,
    write_main: Callable[[Path], None],
    keep: int,
) -> None:
    """Writes `folder` from the main process, the run directory's one writer: what `write_main` writes
    (the adapters and the loop state) and every process's generators. Then keeps the last `keep`
    checkpoints, this one always among them. A write that fails (a full disk: OSError) leaves the
    earlier checkpoints as they were and stops every process (distributed.on_main)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    rngs = gather_to_main(accelerator, state.rng) if state is not None else []

    def write() -> None:
        try:
            for stale in folder.parent.glob(".step-*.tmp"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            for rank, rng in enumerate(rngs):
                write_rng(tmp, rng, rank)
            write_main(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_rename_dir(tmp, folder)
        prune(folder, keep)

    on_main(accelerator, write)


def prune(written: Path, keep: int) -> None:
    """Keeps `written` and the newest `keep - 1` checkpoints older than it; a newer one (from a run
    that later resumed from an earlier checkpoint) is never kept in its place."""
    step = step_of(written)
    older = [p for p in checkpoint_steps(written.parent.parent) if step_of(p) < step]
    newer = [p for p in checkpoint_steps(written.parent.parent) if step_of(p) > step]
    abandoned = list(written.parent.glob(f"{ABANDONED}step-*"))
    for old in older[: max(len(older) - (keep - 1), 0)] + newer + abandoned:
        shutil.rmtree(old, ignore_errors=True)


def step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def abandon_after(run_dir: Path, step: int) -> list[Path]:
    """Resuming from step N: the checkpoints after N belong to the run being replaced, so `latest` must
    not find them. They are moved aside (`checkpoints/.abandoned-step-M`, which `latest` never reads)
    and deleted at this run's first save: a resumed run that fails before it saved leaves them there.
    Returns the checkpoints moved."""
    newer = [p for p in checkpoint_steps(run_dir) if step_of(p) > step]
    for p in newer:
        aside = p.with_name(f"{ABANDONED}{p.name}")
        shutil.rmtree(aside, ignore_errors=True)
        p.rename(aside)
    return newer


# -- write -------------------------------------------------------------------------------------


def write_loop_state(folder: Path, state: LoopState, num_processes: int, data_fingerprint: str | None = None) -> None:
    tensors = {f"param.{name}": t for name, t in state.params.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state.optimizer["state"].items():
        for key, value in slots.items():
            # bitsandbytes' 8-bit optimizers keep their quantized moments one level down, in a dict.
            nested = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in nested:
                name = key if sub is None else f"{key}{NESTED}{sub}"
                if isinstance(v, torch.Tensor):
                    tensors[f"optimizer.{index}.{name}"] = v
                else:
                    scalars.setdefault(str(index), {})[name] = v
    method_tensors, method_extras = state.method or ({}, None)
    tensors |= {f"method.{key}": t for key, t in method_tensors.items()}
    save_tensors(own_storage(tensors), folder / STATE_TENSORS, metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "step": state.step,
        "num_processes": num_processes,
        "position": {"epoch": state.position.epoch, "batches": state.position.batches},
        "optimizer": {"param_groups": state.optimizer["param_groups"], "scalars": scalars},
        "scheduler": state.scheduler,
        "scaler": state.scaler,
        "method": method_extras,
        "has_method_state": state.method is not None,
        "result": state.result,
        "data_fingerprint": data_fingerprint,
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the host, each with memory of its own, as safetensors requires: bitsandbytes' 8-bit
    optimizers give every parameter's state the same quantization maps (`qmap1`, `qmap2`), which `.cpu()`
    leaves shared on a CPU run (on a GPU it copies). A resumed run gets one copy a parameter: equal
    values, and bitsandbytes reads each parameter's own."""
    out, seen = {}, set()
    for key, value in tensors.items():
        host = value.detach().cpu().contiguous()
        where = host.untyped_storage().data_ptr()
        out[key] = host.clone() if where in seen and host.numel() else host
        seen.add(where)
    return out


def write_rng(folder: Path, rng: dict[str, Any], rank: int) -> None:
    tensors = {"torch": rng["torch"]} | {f"cuda.{i}": s for i, s in enumerate(rng["cuda"])}
    save_tensors(tensors, folder / f"rng-{rank}.safetensors")
    version, internal, gauss = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    python = {"version": version, "state": list(internal), "gauss": gauss}
    numpy = {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached}
    (folder / f"rng-{rank}.json").write_text(json.dumps({"python": python, "numpy": numpy}) + "\n", encoding="utf-8")


def data_fingerprint(*splits: datasets.Dataset | None) -> str:
    """A hash of the tokenized examples, in order: what the run trains and evaluates on, wherever it
    was read from. Column by column and chunk by chunk over Arrow's buffers: about a pass over the
    token ids, without a copy of the data."""
    digest = hashlib.sha256()
    for ds in splits:
        digest.update(b"split" if ds is not None else b"none")
        table = ds.with_format("arrow")[:] if ds is not None else pa.table({})
        for name in sorted(table.column_names):
            column = table.column(name)
            digest.update(name.encode() + b"\0" + str(column.type).encode())
            nested = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            if nested:  # the lengths, then the values: the same bytes however the rows are chunked
                for chunk in column.chunks:
                    digest.update(pc.list_value_length(chunk).to_numpy(zero_copy_only=False).tobytes())
            for chunk in column.chunks:
                values = pc.list_flatten(chunk) if nested else chunk
                if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
                    digest.update(values.to_numpy(zero_copy_only=False).tobytes())
                else:
                    digest.update(json.dumps(values.to_pylist()).encode())
    return digest.hexdigest()


# -- read --------------------------------------------------------------------------------------


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """`latest` (the newest complete step checkpoint of the run) or a step checkpoint of this run."""
    if resume != "latest":
        folder = Path(resume)
        if not folder.is_dir():
            raise CheckpointError(
                f"--resume {resume}: no such checkpoint folder. Give a run's checkpoints/step-N folder, or --resume "
                "alone for the latest."
            )
        steps = checkpoint_steps(run_dir)
        if not any(folder.resolve() == s.resolve() for s in steps):
            raise CheckpointError(
                f"--resume {resume}: not a step checkpoint of this run ({run_dir / 'checkpoints'}: "
                f"{', '.join(s.name for s in steps) or 'none'}). Give one of its checkpoints/step-N folders, or "
                "--resume alone for the latest."
            )
        return folder
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise CheckpointError(
            f"--resume: {run_dir} has no step checkpoint to resume from (none in {run_dir / 'checkpoints'}). "
            "Set train.save_every, or stop a run with Ctrl-C: it saves one on the way out."
        )
    return steps[-1]


def check_data(folder: Path, fingerprint: str) -> None:
    """The run resumes on the data it started with: the tokenized examples' fingerprint is the one
    its checkpoint recorded (checkpoints written before fingerprints were kept are not checked)."""
    saved = json.loads((folder / STATE_JSON).read_text(encoding="utf-8")).get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise CheckpointError(
            f"--resume: the training data differs from the data {folder} was trained on (fingerprint "
            f"{fingerprint[:12]}, was {saved[:12]}): a data file changed since the run started. "
            "Resume with the original data, or start a new run."
        )


def read_loop_state(folder: Path, rank: int, num_processes: int) -> LoopState:
    path = folder / STATE_JSON
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no {STATE_JSON}; this checkpoint holds an adapter but not the training state, so the run "
            "cannot resume from it."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not valid JSON ({exc}). The checkpoint is corrupt; resume from an earlier one."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a peftcli training state of format {FORMAT}; resume from a checkpoint this version wrote."
        )
    if meta["num_processes"] != num_processes:
        raise CheckpointError(
            f"{folder}: written by {meta['num_processes']} processes, resumed with {num_processes}. "
            f"Resume with {meta['num_processes']} processes (the data order and generators are per process)."
        )
    tensors = read_state(folder / STATE_TENSORS)
    optimizer_state: dict[int, dict[str, Any]] = {}
    for index, slots in meta["optimizer"]["scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(slots)
    params, method = {}, {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "param":
            params[rest] = t
        elif kind == "optimizer":
            index, _, slot = rest.partition(".")
            optimizer_state.setdefault(int(index), {})[slot] = t
        elif kind == "method":
            method[rest] = t
    for slots in optimizer_state.values():
        for name in [n for n in slots if NESTED in n]:
            key, _, sub = name.partition(NESTED)
            slots.setdefault(key, {})[sub] = slots.pop(name)
    return LoopState(
        step=meta["step"],
        position=Position(**meta["position"]),
        params=params,
        optimizer={"state": optimizer_state, "param_groups": meta["optimizer"]["param_groups"]},
        scheduler=meta["scheduler"],
        scaler=meta["scaler"],
        method=(method, meta["method"]) if meta["has_method_state"] else None,
        result=meta["result"],
        rng=read_rng(folder, rank),
    )


def read_rng(folder: Path, rank: int) -> dict[str, Any]:
    path = folder / f"rng-{rank}.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {path.name}; the checkpoint is incomplete. Resume from an earlier one.")
    tensors = read_state(folder / f"rng-{rank}.safetensors")
    saved = json.loads(path.read_text(encoding="utf-8"))
    python, numpy = saved["python"], saved["numpy"]
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    return {
        "torch": tensors["torch"],
        "cuda": cuda,
        "python": (python["version"], tuple(python["state"]), python["gauss"]),
        "numpy": (
            numpy["kind"],
            np.array(numpy["keys"], dtype=np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        ),
    }
